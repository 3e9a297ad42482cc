"""The content form of a question's text: what two copies of the same question share.

:func:`normalize_question` is the default :meth:`tasks.base.Task.content_key`, by which
held-out sets are partitioned and checked against training (:mod:`tasks.splits`).
"""

from __future__ import annotations

import re
import unicodedata

#: A number not glued to a word or to another number: an optional sign, digits (with
#: comma thousands separators, or plain), an optional decimal part.
_NUMBER = re.compile(
    r"(?<![\w.,])([+-]?)([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.([0-9]+))?(?![\w]|[.,][0-9])"
)
#: The characters after which a ``+`` before a number is a sign, not an addition.
_SIGN_CONTEXT = "([{=,:;+-*/^<>"


def _fold_number(match: re.Match[str]) -> str:
    sign, whole, fraction = match.group(1), match.group(2), match.group(3)
    if sign == "+":
        before = match.string[: match.start()].rstrip()
        if before and before[-1] not in _SIGN_CONTEXT:
            sign = "+"  # "3 +5": an addition; kept so "3 +5" and "3 5" stay apart
        else:
            sign = ""
    whole = whole.replace(",", "").lstrip("0") or "0"
    fraction = (fraction or "").rstrip("0")
    return f"{sign}{whole}.{fraction}" if fraction else f"{sign}{whole}"


def normalize_question(text: str) -> str:
    """The content form of a question: two questions that differ only in form get the same string.

    It folds, in this order:

    1. Unicode compatibility forms (NFKC): full-width digits and letters, ligatures,
       non-breaking spaces become their plain forms;
    2. case (``str.casefold``);
    3. number formatting, for a number not glued to a letter, digit, ``.`` or ``,``:
       comma thousands separators (``1,000`` -> ``1000``; only groups of exactly three
       digits, so ``1,0000`` and ``1.2.3`` are left alone), leading zeros of the integer
       part (``007`` -> ``7``, ``00.5`` -> ``0.5``), trailing zeros of the decimal part
       and a decimal point left bare (``5.0`` -> ``5``, ``5.50`` -> ``5.5``), and a
       leading ``+`` sign where it is a sign: at the start, or after an opening bracket,
       ``=``, ``,``, ``:``, ``;`` or an operator (``x = +5`` -> ``x = 5``; in ``3 +5``
       it is an addition and stays);
    4. whitespace: every run of spaces, tabs and newlines becomes one space; the ends
       are stripped.

    Nothing else changes: punctuation, word order, exponents (``1e5``), fractions
    (``1/2`` against ``0.5``) and units stay as written.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _NUMBER.sub(_fold_number, text)
    return " ".join(text.split())
