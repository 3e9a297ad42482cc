"""Code generation (LiveCodeBench style): run the answer's Python against tests.

The last fenced ``python`` block of a response is run once per test in a fresh
sandbox (:mod:`tasks.sandbox`) under CPU-time, wall-time, memory, output and
process-count limits. Two kinds of test: ``stdin`` (feed input, compare stdout
line by line) and ``functional`` (call a named function, or a method of
``Solution``, with JSON arguments and compare the JSON return value). The
expected outputs never enter the sandbox, and a function's return value comes
back on a channel the solution's output cannot reach, so printing a fake result
neither passes nor breaks scoring. The reward is 1.0 only when every test passes.

The ``sandbox`` setting picks the isolation: ``"bwrap"`` runs each test in
bubblewrap (own PID, network, IPC and mount namespaces, a read-only view of the
system and Python, one writable directory, an unprivileged uid when the trainer
is root), so nothing the solution does reaches the trainer, its files or the
network. ``"none"`` keeps only the supervisor process and the resource limits:
the solution cannot end the run through ``os.getppid()``, but runs as the
trainer's user with its network and files. ``"auto"`` (the default) uses bwrap
when a trial run succeeds and otherwise falls back to ``"none"`` with a WARNING.
Each result records the sandbox that scored it in ``details["sandbox"]``. The
exact guarantees and what stays unprotected are in :mod:`tasks.sandbox`.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import json
import pickle
import re
import signal
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.base import Problem, RewardResult, Task
from tasks.sandbox import Limits, SandboxRun, resolve_sandbox, run_python
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


async def run_test(
    code: str,
    test: Mapping[str, Any],
    *,
    func_name: str | None,
    cpu_s: int = 4,
    wall_s: float = 10.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    sandbox: str = "auto",
) -> dict[str, Any]:
    """Run one test in a fresh sandbox; returns ``{"passed", "error", "sandbox"}``.

    ``sandbox`` is ``"auto"``, ``"bwrap"`` or ``"none"`` (see :mod:`tasks.sandbox`).
    """
    kind = resolve_sandbox(sandbox)
    if test.get("testtype", "stdin") == "functional":
        if not func_name:
            return {
                "passed": False,
                "error": "functional test without a function name",
                "sandbox": kind,
            }
        lines = [ln for ln in str(test["input"]).splitlines() if ln.strip()]
        stdin = json.dumps([json.loads(ln) for ln in lines])
    else:
        func_name, stdin = None, str(test["input"])
    limits = Limits(cpu_s=cpu_s, wall_s=wall_s, memory_mb=memory_mb, max_processes=max_processes)
    run = await run_python(code, stdin=stdin, limits=limits, sandbox=kind, func_name=func_name)
    passed, error = _judge(run, test, func_name, limits)
    return {"passed": passed, "error": error, "sandbox": kind}


def _judge(
    run: SandboxRun, test: Mapping[str, Any], func_name: str | None, limits: Limits
) -> tuple[bool, str]:
    """Whether the run passed ``test``, and why not."""
    if run.failure:
        return False, run.failure
    if run.value_error:
        return False, run.value_error
    if run.signal is not None or run.exit_code != 0:
        return False, _describe_failure(run, limits)
    if func_name is not None:
        if run.value is None:
            return False, "no return value"
        try:
            got = json.loads(run.value)
        except ValueError:
            return False, f"returned malformed JSON {run.value[:200]!r}"
        expected = json.loads(str(test["output"]))
        if got == expected:
            return True, ""
        return False, f"returned {got!r}, expected {expected!r}"
    if _normalize_output(run.stdout) == _normalize_output(str(test["output"])):
        return True, ""
    return False, f"printed {run.stdout[:200]!r}, expected {str(test['output'])[:200]!r}"


def _describe_failure(run: SandboxRun, limits: Limits) -> str:
    if run.signal in (signal.SIGXCPU, signal.SIGKILL) and "Error" not in run.stderr:
        return f"CPU-time limit of {limits.cpu_s} s exceeded (signal {run.signal})"
    if run.signal == signal.SIGXFSZ or f"[Errno {errno.EFBIG}]" in run.stderr:
        return f"output limit of {limits.output_mb} MiB exceeded"
    if "MemoryError" in run.stderr:
        return "memory limit exceeded (MemoryError)"
    stderr = run.stderr.strip()
    if stderr:
        return f"crashed: {stderr.splitlines()[-1]}"
    if run.signal is not None:
        return f"crashed: killed by signal {run.signal}"
    return f"crashed: exit status {run.exit_code}"


class CodeTask(Task):
    """Programming problems with stdin/stdout or call-based tests.

    Args:
        name: registered task name.
        path: local ``.jsonl``/``.parquet`` file; overrides ``hf_name``.
        hf_name, split, data_files: the Hugging Face dataset (LiveCodeBench by default).
        columns: our field -> dataset column (see :data:`LCB_COLUMNS`).
        include_private: also run the private tests when the row has them.
        cpu_s, wall_s, memory_mb: CPU seconds, wall seconds and address space (MiB)
            of each test's solution process.
        max_processes: processes and threads a solution may have at once (bwrap only).
        sandbox: ``"auto"`` (bwrap when it runs here, else ``"none"`` with a WARNING),
            ``"bwrap"`` (raise :class:`tasks.sandbox.SandboxUnavailable` at construction
            when bwrap cannot run) or ``"none"`` (no OS isolation; see :mod:`tasks.sandbox`).
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
        max_processes: int = 32,
        sandbox: str = "auto",
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
        self.max_processes = max_processes
        if sandbox not in ("auto", "none"):
            # Rejects unknown names; "bwrap" fails here, not in the middle of a run.
            resolve_sandbox(sandbox)
        self.sandbox = sandbox
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
        kind = await asyncio.to_thread(resolve_sandbox, self.sandbox)  # probes once per process
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
                    max_processes=self.max_processes,
                    sandbox=kind,
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
                "sandbox": kind,
            },
        )

    def score(self, problem: Problem, response: str) -> RewardResult:
        """Synchronous wrapper (runs its own event loop; do not call from a running loop)."""
        return asyncio.run(self.ascore(problem, response))


def make_livecodebench(**kwargs: Any) -> CodeTask:
    """LiveCodeBench code generation (``test.jsonl`` = release v1 by default)."""
    return CodeTask(kwargs.pop("name", "livecodebench"), **kwargs)
