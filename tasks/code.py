"""Code generation (LiveCodeBench style): run the answer's Python against tests.

The last fenced ``python`` block of a response is run once per test in a fresh
subprocess, in a temporary directory, under CPU-time, wall-time and memory
limits, with networking disabled. Two kinds of test: ``stdin`` (feed input,
compare stdout line by line) and ``functional`` (call a named function, or a
method of ``Solution``, with JSON arguments and compare the JSON return value).
The reward is 1.0 only when every test passes.

This is a best-effort sandbox, not a security boundary: the limits stop
accidents (infinite loops, memory hogs, stray network calls), not a determined
attacker. Run untrusted code inside a container or VM.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pickle
import re
import resource
import signal
import sys
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.base import Problem, RewardResult, Task
from tasks.sources import build_problems, load_rows, required_text

#: LiveCodeBench's columns: our field -> dataset column.
LCB_COLUMNS: dict[str, str] = {
    "question": "question_content",
    "tests": "public_test_cases",
    "private_tests": "private_test_cases",
    "metadata": "metadata",
    "starter_code": "starter_code",
    "id": "question_id",
}

_CODE_BLOCK = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Runs before the user's code: blocks sockets, then runs the solution either as a
# script (stdin tests) or calls a function and prints its JSON result after a marker.
_BOOTSTRAP = r"""
import json, runpy, socket, sys

def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the code sandbox")

class _NoSocket:
    def __init__(self, *args, **kwargs):
        _no_network()

socket.socket = _NoSocket
socket.create_connection = _no_network
socket.socketpair = _no_network
socket.getaddrinfo = _no_network
socket.fromfd = _no_network

solution, mode = sys.argv[1], sys.argv[2]
sys.argv = [solution]
if mode == "stdin":
    runpy.run_path(solution, run_name="__main__")
else:
    func_name = mode.split(":", 1)[1]
    args = json.loads(sys.stdin.read())
    namespace = runpy.run_path(solution, run_name="solution")
    if "Solution" in namespace and hasattr(namespace["Solution"], func_name):
        target = getattr(namespace["Solution"](), func_name)
    elif func_name in namespace:
        target = namespace[func_name]
    else:
        raise NameError(f"the solution defines no function {func_name!r}")
    result = target(*args)
    sys.stdout.write("\n@@AIPO_RESULT@@" + json.dumps(result) + "\n")
"""
_RESULT_MARKER = "@@AIPO_RESULT@@"


class _StrOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: LiveCodeBench's private tests are a pickled JSON string."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from test data")


def decode_tests(value: Any) -> list[dict[str, Any]]:
    """Tests from a cell: a list, a JSON string, or LiveCodeBench's base64(zlib(pickle(json)))."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        raw = zlib.decompress(base64.b64decode(value))
        decoded = json.loads(_StrOnlyUnpickler(io.BytesIO(raw)).load())
    if not isinstance(decoded, list):
        raise ValueError(f"tests cell holds {type(decoded).__name__}; expected a list")
    return decoded


def extract_code(response: str) -> str | None:
    """The last fenced python code block (a bare ``` block when none is tagged)."""
    blocks = _CODE_BLOCK.findall(response)
    if not blocks:
        blocks = re.findall(r"```[ \t]*\n(.*?)```", response, re.DOTALL)
    return blocks[-1] if blocks else None


def _normalize_output(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:
        os.setsid()  # own process group, so a timeout kills children too
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


async def run_test(
    code: str,
    test: Mapping[str, Any],
    *,
    func_name: str | None,
    cpu_s: int = 4,
    wall_s: float = 10.0,
    memory_mb: int = 512,
) -> dict[str, Any]:
    """Run one test in a fresh sandboxed subprocess; returns ``{"passed": bool, ...}``."""
    kind = test.get("testtype", "stdin")
    with tempfile.TemporaryDirectory(prefix="aipo-code-") as tmp:
        Path(tmp, "solution.py").write_text(code)
        Path(tmp, "bootstrap.py").write_text(_BOOTSTRAP)
        if kind == "functional":
            if not func_name:
                return {"passed": False, "error": "functional test without a function name"}
            mode = f"call:{func_name}"
            lines = [ln for ln in str(test["input"]).splitlines() if ln.strip()]
            stdin = json.dumps([json.loads(ln) for ln in lines])
        else:
            mode, stdin = "stdin", str(test["input"])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "bootstrap.py",
            "solution.py",
            mode,
            cwd=tmp,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": tmp},
            preexec_fn=_limits(cpu_s, memory_mb),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), wall_s)
        except asyncio.TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            return {"passed": False, "error": f"wall-time limit of {wall_s:g} s exceeded"}
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if proc.returncode != 0:
        return {"passed": False, "error": _describe_failure(proc.returncode, stderr, cpu_s)}
    if kind == "functional":
        if _RESULT_MARKER not in stdout:
            return {"passed": False, "error": "no return value"}
        got = json.loads(stdout.rsplit(_RESULT_MARKER, 1)[1])
        expected = json.loads(str(test["output"]))
        passed = got == expected
        return {
            "passed": passed,
            "error": "" if passed else f"returned {got!r}, expected {expected!r}",
        }
    passed = _normalize_output(stdout) == _normalize_output(str(test["output"]))
    return {
        "passed": passed,
        "error": ""
        if passed
        else f"printed {stdout[:200]!r}, expected {str(test['output'])[:200]!r}",
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_failure(returncode: int, stderr: str, cpu_s: int) -> str:
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and "Error" not in stderr:
        return f"CPU-time limit of {cpu_s} s exceeded (signal {-returncode})"
    if "MemoryError" in stderr:
        return "memory limit exceeded (MemoryError)"
    tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
    return f"crashed: {tail}"


class CodeTask(Task):
    """Programming problems with stdin/stdout or call-based tests.

    Args:
        name: registered task name.
        path: local ``.jsonl``/``.parquet`` file; overrides ``hf_name``.
        hf_name, split, data_files: the Hugging Face dataset (LiveCodeBench by default).
        columns: our field -> dataset column (see :data:`LCB_COLUMNS`).
        include_private: also run the private tests when the row has them.
        cpu_s, wall_s, memory_mb: limits of each test process.
        limit: keep only the first ``limit`` problems.
    """

    answer_format = "Write your solution as Python 3 in one ```python code block."

    def __init__(
        self,
        name: str = "livecodebench",
        *,
        path: str | Path | None = None,
        hf_name: str | None = "livecodebench/code_generation_lite",
        split: str = "train",
        data_files: str | list[str] | None = "test.jsonl",
        columns: Mapping[str, str] | None = None,
        include_private: bool = True,
        cpu_s: int = 4,
        wall_s: float = 10.0,
        memory_mb: int = 512,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.hf_name = hf_name
        self.split = split
        self.data_files = data_files
        self.columns = {**LCB_COLUMNS, **(columns or {})}
        self.include_private = include_private
        self.cpu_s, self.wall_s, self.memory_mb = cpu_s, wall_s, memory_mb
        self.limit = limit
        #: Rows skipped as malformed during the last load.
        self.skipped = 0

    def load(self) -> list[Problem]:
        """Read rows and decode their tests; rows without tests are skipped and counted."""
        rows = load_rows(
            source_name=self.name,
            path=self.path,
            hf_name=self.hf_name,
            hf_config=None,
            split=self.split,
            columns=self.columns,
            required=("question", "tests"),
            data_files=self.data_files if self.path is None else None,
        )
        problems, self.skipped = build_problems(rows, self._problem, self.name)
        return problems[: self.limit] if self.limit is not None else problems

    def _problem(self, index: int, row: dict[str, Any]) -> Problem:
        cols = self.columns
        tests = decode_tests(row.get(cols["tests"]))
        if self.include_private:
            try:
                tests += decode_tests(row.get(cols["private_tests"]))
            except (ValueError, zlib.error, pickle.UnpicklingError) as exc:
                raise ValueError(f"private tests unreadable: {exc}") from exc
        if not tests or not all(
            isinstance(t, dict) and "input" in t and "output" in t for t in tests
        ):
            raise ValueError("no usable tests (each needs 'input' and 'output')")
        meta = row.get(cols["metadata"]) or {}
        if isinstance(meta, str):
            meta = json.loads(meta) if meta.strip() else {}
        func_name = meta.get("func_name") or row.get("func_name")
        if any(t.get("testtype") == "functional" for t in tests) and not func_name:
            raise ValueError("functional tests but no func_name in metadata")
        question = required_text(row, cols["question"])
        starter = row.get(cols["starter_code"])
        if isinstance(starter, str) and starter.strip():
            question += f"\n\nStart from this code:\n```python\n{starter.strip()}\n```"
        row_id = row.get(cols["id"])
        return Problem(
            id=f"{self.name}/{row_id if row_id not in (None, '') else index}",
            task=self.name,
            question=question,
            reference=json.dumps(tests[0]["output"]) if tests else "",
            metadata={"tests": tests, "func_name": func_name},
        )

    def extract_answer(self, response: str) -> str | None:
        """The last fenced python block."""
        return extract_code(response)

    async def ascore(self, problem: Problem, response: str) -> RewardResult:
        """Run every test (sequentially, each in its own process); 1.0 only if all pass."""
        code = self.extract_answer(response)
        if code is None:
            return RewardResult(score=0.0, correct=False, reason="no python code block")
        tests = problem.metadata.get("tests") or []
        results = []
        for test in tests:
            results.append(
                await run_test(
                    code,
                    test,
                    func_name=problem.metadata.get("func_name"),
                    cpu_s=self.cpu_s,
                    wall_s=self.wall_s,
                    memory_mb=self.memory_mb,
                )
            )
        passed = sum(r["passed"] for r in results)
        first_failure = next(
            ({"test": i, "error": r["error"]} for i, r in enumerate(results) if not r["passed"]),
            None,
        )
        correct = bool(tests) and passed == len(tests)
        return RewardResult(
            score=1.0 if correct else 0.0,
            correct=correct,
            extracted=code,
            reason="" if correct else (first_failure or {}).get("error", "no tests"),
            details={
                "passed": passed,
                "total": len(tests),
                "passed_fraction": passed / len(tests) if tests else 0.0,
                "first_failure": first_failure,
            },
        )

    def score(self, problem: Problem, response: str) -> RewardResult:
        """Synchronous wrapper (runs its own event loop; do not call from a running loop)."""
        return asyncio.run(self.ascore(problem, response))


def make_livecodebench(**kwargs: Any) -> CodeTask:
    """LiveCodeBench code generation (``test.jsonl`` = release v1 by default)."""
    return CodeTask(kwargs.pop("name", "livecodebench"), **kwargs)
