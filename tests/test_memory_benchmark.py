"""benchmarks/memory.py's meter: each phase's peak RSS is its own, measured by the kernel's mark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS marks"
)

# In a child process: pytest's own heap would blur the peaks.
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from benchmarks.memory import Meter
meter = Meter(interval=0.05, limit_mib=1e9)
with meter.phase("big"):
    b = bytearray(400 * 2**20)
    b[::4096] = b"x" * len(b[::4096])
    del b
with meter.phase("small"):
    c = bytearray(40 * 2**20)
    c[::4096] = b"x" * len(c[::4096])
    del c
print(json.dumps({{"events": meter.events, "overall": meter.close()}}))
"""


def test_each_phase_reports_its_own_peak_not_an_earlier_ones() -> None:
    import json

    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT))],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    big, small = report["events"]
    assert (big["phase"], small["phase"]) == ("big", "small")
    assert 380 < big["above_start_mib"] < 600
    # The second phase starts after the first freed its 400 MiB: its peak is its own 40 MiB.
    assert 30 < small["above_start_mib"] < 150
    assert report["overall"] >= big["peak_mib"]
