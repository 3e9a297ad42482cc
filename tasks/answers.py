"""Answer extraction shared by the tasks: the last ``\\boxed{...}`` and friends."""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*[:：]\s*(.+?)\s*$")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``.

    Braces are balanced (escaped ``\\{`` and ``\\}`` do not count), so
    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. ``\\boxed 5`` (no braces)
    gives ``5``. Returns None when there is no complete box.
    """
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start != -1:
            content = _box_content(text, start + len(command))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            start = text.rfind(command, 0, start)
    return None if best is None else best[1].strip()


def _box_content(text: str, i: int) -> str | None:
    """Content of a box whose command ends at ``i`` (None when unbalanced)."""
    if text.startswith("{", i):
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                j += 2  # skip escaped characters, \{ and \} included
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None
    # "\boxed 5": the form takes one space-separated token.
    match = re.match(r" +([^\s$]+)", text[i:])
    return match.group(1) if match else None


def answer_line(text: str) -> str | None:
    """The value of the last ``Answer: ...`` line, or None."""
    matches = _ANSWER_LINE.findall(text)
    return matches[-1].strip() if matches else None


#: Markdown emphasis around a term: the markers touch no word character on the outside,
#: so ``2**8`` (a power) and ``x__1`` are left alone.
_EMPHASIS = re.compile(r"(?<![\w)\]}])(\*\*|__)(?=\S)(.+?)(?<=\S)\1(?![\w(\[{])")
_LOOSE_MARKER = re.compile(r"^(?:\*\*|__)|(?:\*\*|__)$")


def strip_markdown(answer: str) -> str:
    """Remove markdown emphasis (``**73**`` -> ``73``), which trips math parsers.

    Only emphasis is removed: ``2**8`` stays a power.
    """
    return _LOOSE_MARKER.sub("", _EMPHASIS.sub(r"\2", answer).strip()).strip()


# -- where a text states a reference answer (the agents' leak guard, direction hints) --------

#: A number as written in prose: optional sign (not a hyphen between two words or numbers),
#: thousands separators, decimals; never part of a longer word or number (``x2``, ``2nd``).
_NUMBER_TOKEN = re.compile(r"(?<![\w.])(?:(?<![\w)\]])-)?\d+(?:,\d{3})*(?:\.\d+)?(?![\w]|\.\d)")
_FRACTION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def numeric_value(text: str) -> float | None:
    """The value of a plain number or fraction (``-1,234.5``, ``3/4``, ``\\frac{3}{4}``), else None."""
    cleaned = text.strip().strip("$").replace(" ", "")
    cleaned = re.sub(r"^\\[dt]?frac\{(-?[\d.]+)\}\{([\d.]+)\}$", r"\1/\2", cleaned)
    cleaned = cleaned.replace("\\!", "").replace("{,}", "")
    if re.fullmatch(r"-?\d+(?:,\d{3})*(?:\.\d+)?", cleaned):
        return float(cleaned.replace(",", ""))
    fraction = _FRACTION.match(cleaned)
    if fraction and float(fraction.group(2)) != 0:
        return float(fraction.group(1)) / float(fraction.group(2))
    return None


def reference_spans(reference: str, text: str) -> list[tuple[int, int]]:
    """Where ``text`` states ``reference``, as ``(start, end)`` character spans, in order.

    A numeric reference (``500``, ``-4``, ``0.75``, ``3/4``) is stated by a number token of
    the same value (``500``, ``500.0``, ``1,000`` for 1000; ``- 4`` in ``0 - 4`` is a minus
    sign and a 4, not -4); a fraction also by its written form. Any other reference by its
    text as a whole word, case-insensitively (case-sensitively when it is one character:
    the letter b is not the option B). An empty reference is never stated.
    """
    reference = reference.strip()
    if not reference:
        return []
    value = numeric_value(reference)
    spans: list[tuple[int, int]] = []
    if value is not None:
        for match in _NUMBER_TOKEN.finditer(text):
            if float(match.group().replace(",", "")) == value:
                spans.append(match.span())
        if "/" not in reference and "frac" not in reference:
            return spans
    written = [re.escape(reference)]
    fraction = _FRACTION.match(reference)
    if fraction:  # 3/4 is also written \frac{3}{4}
        written.append(rf"\\[dt]?frac\{{{fraction.group(1)}\}}\{{{fraction.group(2)}\}}")
    flags = 0 if len(reference) == 1 else re.IGNORECASE
    pattern = re.compile(rf"(?<!\w)(?:{'|'.join(written)})(?!\w)", flags)
    spans += [m.span() for m in pattern.finditer(text) if not _inside(m.span(), spans)]
    return sorted(spans)


def _inside(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(start < span[1] and span[0] < end for start, end in spans)


def numeric_direction(reference: str, candidate: str) -> str | None:
    """``"too large"`` or ``"too small"`` when both are numbers and differ, else None."""
    ref, cand = numeric_value(reference), numeric_value(candidate)
    if ref is None or cand is None or ref == cand:
        return None
    return "too large" if cand > ref else "too small"
