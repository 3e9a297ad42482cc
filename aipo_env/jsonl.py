"""Appending to a JSON-lines file that a killed writer may have left with a torn last line.

Every JSONL record file of a run (rollout and evaluation trajectories, ``metrics.jsonl``)
is written one line per record, newline included, in a single write. A process killed
mid-write leaves a last line without its newline. Appending after it would glue the next
record onto the fragment: that record is lost and the glued line, no longer the last,
makes every later strict read of the file fail. :func:`open_for_append` first brings the
file back to a line boundary.
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
        if complete(file.read()):
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
