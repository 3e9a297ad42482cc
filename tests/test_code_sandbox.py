"""The code sandbox: a hostile solution cannot reach the trainer, the network or its files,
cannot fork without bound, cannot outlive its test and cannot forge its result.

Each behaviour runs under both sandboxes. The ``bwrap`` case skips where bubblewrap
cannot run on the machine; the ``none`` case skips, with the reason, where the
fallback is documented not to protect (see ``tasks/sandbox.py``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import sandbox
from tasks.base import Problem
from tasks.code import CodeTask
from tasks.sandbox import SandboxUnavailable

REPO = Path(__file__).resolve().parent.parent
CALL_TEST = {"input": "[1, 2, 3]\n2", "output": "[2, 4, 6]", "testtype": "functional"}

# A stand-in for the trainer: scores one answer in its own process and prints the result.
_TRAINER = """
import json, os, sys
from tasks.base import Problem
from tasks.code import CodeTask

task = CodeTask("code", path="unused.jsonl", sandbox=sys.argv[1], wall_s=5.0)
code = sys.argv[2].replace("TRAINER_PID", str(os.getpid()))
tests = [{"input": "", "output": "5", "testtype": "stdin"}]
problem = Problem(id="code/0", task="code", question="q", reference="",
                  metadata={"tests": tests, "func_name": None})
result = task.score(problem, "```python\\n" + code + "\\n```")
print(json.dumps({"correct": result.correct, "reason": result.reason,
                  "sandbox": result.details.get("sandbox")}))
"""


@pytest.fixture(params=["bwrap", "none"])
def kind(request: pytest.FixtureRequest) -> str:
    """The sandbox under test; ``bwrap`` skips where bubblewrap cannot run here."""
    if request.param == "bwrap" and (problem := sandbox.bwrap_problem()) is not None:
        pytest.skip(f"bubblewrap cannot run on this machine: {problem}")
    return request.param


def _skip_fallback(kind: str, why: str) -> None:
    if kind == "none":
        pytest.skip(f"documented weakness of the fallback sandbox: {why}")


def _task(kind: str, **limits: float) -> CodeTask:
    return CodeTask("code", path="unused.jsonl", sandbox=kind, **{"wall_s": 5.0, **limits})


def _problem(tests: list[dict], func_name: str | None = None) -> Problem:
    return Problem(
        id="code/0",
        task="code",
        question="q",
        reference="",
        metadata={"tests": tests, "func_name": func_name},
    )


def _stdin_problem(expected: str) -> Problem:
    return _problem([{"input": "", "output": expected, "testtype": "stdin"}])


def _answer(code: str) -> str:
    return f"```python\n{code}\n```"


def _score_in_trainer(kind: str, code: str) -> dict:
    """Score ``code`` in a separate trainer process; fails the test if that process dies."""
    proc = subprocess.run(
        [sys.executable, "-c", _TRAINER, kind, code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"the trainer process died (exit status {proc.returncode}): {proc.stderr[-800:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pids_running(argv: list[str]) -> list[int]:
    """Host pids whose command line is exactly ``argv``."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == wanted:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_killing_its_parent_does_not_reach_the_trainer(kind: str) -> None:
    # What the kill hits depends on the sandbox (bwrap: nothing, the parent is the
    # namespace's init or another uid; fallback: the supervisor, so the test fails);
    # in every case the trainer lives on and gets a result.
    code = "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(1)\nprint(5)"
    result = _score_in_trainer(kind, code)
    assert result["sandbox"] == kind
    if kind == "none":
        assert (result["correct"], result["reason"]) == (
            False,
            "the sandbox's supervisor died without a report (exit status -9)",
        )


def test_the_trainer_pid_does_not_exist_in_the_sandbox(kind: str) -> None:
    _skip_fallback(kind, "the solution shares the trainer's PID namespace and user")
    code = "import os, signal\nos.kill(TRAINER_PID, signal.SIGKILL)\nprint(5)"
    result = _score_in_trainer(kind, code)
    assert result["correct"] is False
    assert "ProcessLookupError" in result["reason"]


async def test_raw_sockets_cannot_reach_a_local_server(kind: str) -> None:
    _skip_fallback(kind, "sockets are blocked at the Python level only; _socket bypasses it")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (
            "import _socket, importlib, socket\n"
            "def attempt(make):\n"
            "    try:\n"
            "        conn = make()\n"
            "        conn.settimeout(2)\n"
            f"        conn.connect(('127.0.0.1', {port}))\n"
            "        print('connected')\n"
            "    except OSError:\n"
            "        print('blocked')\n"
            "attempt(lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM))\n"
            "attempt(lambda: importlib.reload(socket).socket())\n"
        )
        result = await _task(kind).ascore(_stdin_problem("blocked\nblocked"), _answer(code))
        pending, _, _ = select.select([server], [], [], 0)
    assert result.correct, result.reason
    assert not pending, "a connection from the sandbox reached the server"


async def test_files_outside_the_work_dir_are_out_of_reach(kind: str, tmp_path: Path) -> None:
    _skip_fallback(kind, "the solution can read and write every file the trainer can")
    target = tmp_path / "escaped.txt"
    code = (
        "def attempt(action):\n"
        "    try:\n"
        "        action()\n"
        "        print('reached')\n"
        "    except OSError:\n"
        "        print('blocked')\n"
        f"attempt(lambda: open({str(target)!r}, 'w').write('x'))\n"
        "attempt(lambda: open('/etc/passwd').read())\n"
    )
    result = await _task(kind).ascore(_stdin_problem("blocked\nblocked"), _answer(code))
    assert result.correct, result.reason
    assert not target.exists()


async def test_work_dir_stays_writable(kind: str) -> None:
    code = "open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())"
    result = await _task(kind).ascore(_stdin_problem("kept"), _answer(code))
    assert result.correct, result.reason


async def test_fork_bomb_is_capped_by_the_process_limit(kind: str) -> None:
    _skip_fallback(kind, "RLIMIT_NPROC would count the trainer's processes too, so none is set")
    code = (
        "import os, time\n"
        "count = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(3)\n"
        "        os._exit(0)\n"
        "    count += 1\n"
        "print('capped' if 4 <= count < 16 else f'forked {count}')\n"
    )
    task = _task(kind, max_processes=16)
    result = await task.ascore(_stdin_problem("capped"), _answer(code))
    assert result.correct, result.reason


async def test_forked_child_that_closes_stdout_dies_with_the_test(kind: str) -> None:
    argv = ["sleep", f"{40 + secrets.randbelow(10**6) / 10**6:.6f}"]
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    for fd in (0, 1, 2):\n"
        "        os.close(fd)\n"
        f"    os.execv('/bin/sleep', {argv!r})\n"
        "time.sleep(0.5)\n"
        "print(5)\n"
    )
    try:
        result = await _task(kind).ascore(_stdin_problem("5"), _answer(code))
        assert result.correct, result.reason
        assert _pids_running(argv) == [], "the solution's child outlived its test"
    finally:
        for pid in _pids_running(argv):
            os.kill(pid, 9)


async def test_disk_writes_are_capped_per_solution_not_per_file(kind: str) -> None:
    _skip_fallback(kind, "the work directory is on the trainer's disk; files are capped one by one")
    # 20 files of 15 MiB each: every file is under the 16 MiB file-size limit.
    code = (
        "written = 0\n"
        "try:\n"
        "    for i in range(20):\n"
        "        with open(f'f{i}', 'wb') as f:\n"
        "            for _ in range(15):\n"
        "                f.write(b'x' * (1 << 20))\n"
        "                written += 1 << 20\n"
        "except OSError as exc:\n"
        "    print(f'stopped: {exc.strerror}')\n"
        "print(f'wrote {written >> 20} MiB')\n"
    )
    run = await sandbox.run_python(code, stdin="", limits=sandbox.Limits(wall_s=20.0), sandbox=kind)
    assert run.exit_code == 0, run.stderr[-300:]
    assert "stopped: No space left on device" in run.stdout, run.stdout
    assert int(run.stdout.split("wrote ")[1].split()[0]) <= sandbox.Limits().disk_mb


async def test_memory_is_capped_for_all_the_solutions_processes_together(kind: str) -> None:
    # Three processes of 300 MiB each, every one under the 512 MiB per-process cap.
    code = (
        "import os, time\n"
        "for _ in range(2):\n"
        "    if os.fork() == 0:\n"
        "        block = b'x' * (300 << 20)\n"
        "        time.sleep(8)\n"
        "        os._exit(0)\n"
        "block = b'x' * (300 << 20)\n"
        "time.sleep(8)\n"
        "print(5)\n"
    )
    task = _task(kind, memory_mb=512, wall_s=15.0)
    began = time.monotonic()
    result = await task.ascore(_stdin_problem("5"), _answer(code))
    assert not result.correct and "memory" in result.reason, result.reason
    assert time.monotonic() - began < 8, "the solution was not stopped while it held the memory"


async def test_the_solution_cannot_create_user_namespaces(kind: str) -> None:
    if sandbox.userns_filter_problem() is not None:
        pytest.skip(f"no seccomp filter here: {sandbox.userns_filter_problem()}")
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "CLONE_NEWUSER = 0x10000000\n"
        "print('created' if libc.unshare(CLONE_NEWUSER) == 0 else 'refused')\n"
        "pid = os.fork()\n"  # fork and threads (clone without the flag) still work
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "import threading\n"
        "t = threading.Thread(target=print, args=('thread',))\n"
        "t.start(); t.join()\n"
    )
    result = await _task(kind).ascore(_stdin_problem("refused\nthread"), _answer(code))
    assert result.correct, result.reason


@pytest.mark.parametrize("payload", ["[2, 4, 6]", "{not json"])
async def test_printed_result_marker_neither_passes_nor_raises(kind: str, payload: str) -> None:
    code = (
        "import os, sys\n"
        "def scale(xs, k):\n"
        f"    sys.stdout.write('\\n@@AIPO_RESULT@@' + {payload!r} + '\\n')\n"
        "    sys.stdout.flush()\n"
        "    os._exit(0)\n"
    )
    result = await _task(kind).ascore(_problem([CALL_TEST], "scale"), _answer(code))
    assert (result.correct, result.reason) == (False, "no return value")
    assert result.details["sandbox"] == kind


def test_unknown_sandbox_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown sandbox 'docker'; expected one of auto, bwrap"):
        CodeTask("code", path="unused.jsonl", sandbox="docker")


def test_bwrap_required_but_unavailable_fails_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bwrap is not installed")
    with pytest.raises(SandboxUnavailable, match="bwrap is not installed"):
        CodeTask("code", path="unused.jsonl", sandbox="bwrap")


async def test_auto_falls_back_with_one_warning_and_records_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bwrap is not installed")
    monkeypatch.setattr(sandbox, "_warned_fallback", False)
    task = _task("auto")
    with caplog.at_level(logging.WARNING, logger="tasks.sandbox"):
        results = [await task.ascore(_stdin_problem("5"), _answer("print(5)")) for _ in range(2)]
    assert [(r.correct, r.details["sandbox"]) for r in results] == [(True, "none")] * 2
    warnings = [r for r in caplog.records if r.name == "tasks.sandbox"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "bwrap is not installed" in warnings[0].getMessage()
