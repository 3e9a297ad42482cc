"""Resident memory from ``/proc`` (Linux), and the JSON-and-PNG report every benchmark writes.

``VmHWM`` is the kernel's own peak-RSS mark of a process; writing ``5`` to its
``clear_refs`` resets it to the current RSS, so a phase's peak can be its own. Not
``ru_maxrss``: on Linux a child's counts the parent's resident set at the fork.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def status_mib(field: str, pid: int | str = "self") -> float:
    """``VmRSS`` or ``VmHWM`` (peak RSS since the last reset) of process ``pid`` in MiB.

    Raises:
        OSError: the process is gone (or this is not Linux).
        RuntimeError: its status has no such line (a zombie keeps no memory).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (``VmHWM``) to its current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_report(
    report: dict[str, Any],
    out_dir: Path,
    stem: str,
    plot: Callable[[dict[str, Any], Path], Any],
) -> None:
    """Write ``<stem>.json`` and, where matplotlib is installed, ``<stem>.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, out_dir / f"{stem}.png")
    except ImportError:
        print("matplotlib is not installed: no PNG written")
    print(f"wrote {out_dir / stem}.json and .png")
