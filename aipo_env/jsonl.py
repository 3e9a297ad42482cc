"""Reading, writing and appending to the JSON-lines record files of a run.

Every JSONL record file of a run (rollout and evaluation trajectories, ``metrics.jsonl``)
is written one line per record, newline included, in a single write. A process killed
mid-write leaves a last line without its newline. Appending after it would glue the next
record onto the fragment: that record is lost and the glued line, no longer the last,
makes every later strict read of the file fail. :func:`open_for_append` first brings the
file back to a line boundary.

A line ends at ``\n`` and nowhere else. The policy's text may hold U+2028, U+2029 or
U+0085, which JSON leaves unescaped but ``str.splitlines`` breaks lines at:
:func:`escape_line_breaks` escapes them in what is written, and :func:`read_lines` splits
on ``\n`` only, so files from writers that did not escape them read back too. A file
that starts with a UTF-8 byte-order mark (an editor's save) reads as if it had none.
A line that is not a record anywhere but last is damage (files glued by a writer older
than :func:`open_for_append`); it is reported as :class:`JsonlError`, naming the file
and the line, and not repaired.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

logger = logging.getLogger(__name__)

#: Bytes read at a time when looking back for the last newline.
_CHUNK = 1 << 16
#: The UTF-8 byte-order mark an editor may put at the start of a file.
BOM = b"\xef\xbb\xbf"
#: Characters ``str.splitlines`` breaks lines at that JSON serializers leave raw in strings.
_RAW_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class JsonlError(ValueError):
    """A JSONL file cannot be read as records; the message names the file and the line."""


def escape_line_breaks(line: str) -> str:
    """``line`` (one JSON value) with U+0085, U+2028 and U+2029 written as ``\\uXXXX`` escapes.

    Outside strings JSON has none of them, so the escapes change no value; they keep a
    record on one line for readers that split lines the way ``str.splitlines`` does.
    """
    for raw, escaped in _RAW_BREAKS.items():
        if raw in line:
            line = line.replace(raw, escaped)
    return line


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of ``path``, split on ``\n`` only.

    A leading byte-order mark is skipped.

    Raises:
        JsonlError: the file is not UTF-8 (the message names the line of the bad byte).
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise JsonlError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def is_json(line: bytes) -> bool:
    """Whether ``line`` is one complete JSON value."""
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return False
    return True


def _last_line_start(file: BinaryIO, size: int) -> int:
    """Offset just after the last newline before ``size`` (0 when there is none)."""
    pos = size
    while pos > 0:
        read = min(_CHUNK, pos)
        pos -= read
        file.seek(pos)
        found = file.read(read).rfind(b"\n")
        if found >= 0:
            return pos + found + 1
    return 0


def repair_torn_tail(path: str | Path, complete: Callable[[bytes], bool] = is_json) -> int:
    """End ``path`` on a line boundary; return how many bytes of a torn last line were dropped.

    A last line without its newline is kept (its newline added) when ``complete`` says it
    is a whole record, as the file's reader would accept it; otherwise it is the fragment
    of a killed write and is truncated away. A missing or empty file is left alone.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open("rb+") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return 0
        start = _last_line_start(file, size)
        file.seek(start)
        last = file.read()
        if start == 0 and last.startswith(BOM):  # a reader skips it: so does the test
            last = last[len(BOM) :]
        if complete(last):
            file.seek(0, os.SEEK_END)
            file.write(b"\n")
            dropped = 0
        else:
            file.truncate(start)
            dropped = size - start
        file.flush()
        os.fsync(file.fileno())
    return dropped


def open_for_append(path: str | Path, complete: Callable[[bytes], bool] = is_json) -> TextIO:
    """Open ``path`` for appending lines after :func:`repair_torn_tail`; creates it when missing.

    ``complete`` decides whether an unterminated last line is a whole record; pass the
    same test the file's reader applies, so a record the reader accepts is never dropped
    and a line it would skip is never kept in the middle of the file.
    """
    path = Path(path)
    dropped = repair_torn_tail(path, complete)
    if dropped:
        logger.warning(
            "%s ended in a torn line (a killed writer); dropped its %d bytes before appending",
            path,
            dropped,
        )
    return path.open("a", encoding="utf-8")
