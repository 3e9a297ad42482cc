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
