"""Code task: stdin and call-based tests, limits, networking blocked, under each sandbox.

Hostile solutions (escapes, fork bombs, forged results) are in test_code_sandbox.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.base import Problem
from tasks.code import CodeTask, decode_tests, extract_code
from tasks.sandbox import bwrap_problem

STDIN_TESTS = [
    {"input": "2 3\n", "output": "5\n", "testtype": "stdin"},
    {"input": "10 -4\n", "output": "6\n", "testtype": "stdin"},
]
CALL_TESTS = [
    {"input": "[1, 2, 3]\n2", "output": "[2, 4, 6]", "testtype": "functional"},
    {"input": "[]\n5", "output": "[]", "testtype": "functional"},
]


@pytest.fixture(scope="module", params=["bwrap", "none"])
def task(request: pytest.FixtureRequest) -> CodeTask:
    """The task under each sandbox; ``bwrap`` skips where bubblewrap cannot run here."""
    if request.param == "bwrap" and (problem := bwrap_problem()) is not None:
        pytest.skip(f"bubblewrap cannot run on this machine: {problem}")
    # wall_s leaves room for a loaded machine: the memory hog must be stopped for memory,
    # and under load (two other jobs on two cores) starting bwrap alone took seconds.
    return CodeTask(
        "code", path="unused.jsonl", cpu_s=2, wall_s=15.0, memory_mb=256, sandbox=request.param
    )


def _problem(tests: list[dict], func_name: str | None = None) -> Problem:
    return Problem(
        id="code/0",
        task="code",
        question="q",
        reference="",
        metadata={"tests": tests, "func_name": func_name},
    )


def _answer(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


async def test_correct_stdin_solution_passes(task: CodeTask) -> None:
    code = "a, b = map(int, input().split())\nprint(a + b)"
    result = await task.ascore(_problem(STDIN_TESTS), _answer(code))
    assert (result.score, result.correct) == (1.0, True), result.reason
    assert result.details["passed_fraction"] == 1.0


async def test_wrong_output_scores_zero_with_fraction(task: CodeTask) -> None:
    code = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"
    result = await task.ascore(_problem(STDIN_TESTS), _answer(code))
    assert (result.score, result.correct) == (0.0, False)
    assert result.details["passed_fraction"] == 0.5
    assert result.details["first_failure"]["test"] == 1
    assert "expected '6" in result.details["first_failure"]["error"]


async def test_crash_scores_zero_with_error(task: CodeTask) -> None:
    result = await task.ascore(_problem(STDIN_TESTS[:1]), _answer("raise RuntimeError('boom')"))
    assert result.score == 0.0
    assert "RuntimeError: boom" in result.reason


async def test_infinite_loop_is_stopped(task: CodeTask) -> None:
    result = await task.ascore(_problem(STDIN_TESTS[:1]), _answer("while True:\n    pass"))
    assert result.score == 0.0
    assert "limit" in result.reason and "exceeded" in result.reason


async def test_sleeping_solution_hits_wall_time() -> None:
    quick = CodeTask("code", path="x.jsonl", cpu_s=2, wall_s=1.0)
    result = await quick.ascore(_problem(STDIN_TESTS[:1]), _answer("import time\ntime.sleep(60)"))
    assert result.score == 0.0
    assert "wall-time limit" in result.reason


async def test_memory_hog_is_stopped(task: CodeTask) -> None:
    code = "blocks = [bytearray(64 * 1024 * 1024) for _ in range(64)]\nprint(5)"
    result = await task.ascore(_problem(STDIN_TESTS[:1]), _answer(code))
    assert result.score == 0.0
    assert "memory" in result.reason.lower()


async def test_network_is_blocked(task: CodeTask) -> None:
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9))\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print('blocked' if 'disabled' in str(exc) else 'other')\n"
        "try:\n"
        "    socket.socket()\n"
        "    print('socket')\n"
        "except OSError as exc:\n"
        "    print('blocked' if 'disabled' in str(exc) else 'other')\n"
    )
    result = await task.ascore(
        _problem([{"input": "", "output": "blocked\nblocked", "testtype": "stdin"}]), _answer(code)
    )
    assert result.correct, result.reason


async def test_call_based_function_and_solution_class(task: CodeTask) -> None:
    plain = "def scale(xs, k):\n    return [x * k for x in xs]"
    result = await task.ascore(_problem(CALL_TESTS, "scale"), _answer(plain))
    assert result.correct, result.reason
    method = "class Solution:\n    def scale(self, xs, k):\n        return [x * k + 1 for x in xs]"
    result = await task.ascore(_problem(CALL_TESTS, "scale"), _answer(method))
    assert (result.correct, result.details["passed"]) == (False, 1)
    assert "expected [2, 4, 6]" in result.reason


def test_sync_score_and_missing_code(task: CodeTask) -> None:
    code = "a, b = map(int, input().split())\nprint(a + b)"
    assert task.score(_problem(STDIN_TESTS), _answer(code)).correct
    result = task.score(_problem(STDIN_TESTS), "print(5) without a fence")
    assert (result.score, result.reason) == (0.0, "no python code block")


def test_extract_last_python_block() -> None:
    text = "```python\nfirst\n```\ntext\n```python\nsecond\n```"
    assert extract_code(text) == "second\n"
    assert extract_code("no code") is None


def test_livecodebench_rows_load_from_local_file(tmp_path: Path) -> None:
    import base64
    import pickle
    import zlib

    private = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(STDIN_TESTS[1:])))).decode()
    rows = [
        {
            "question_content": "Add two numbers.",
            "public_test_cases": json.dumps(STDIN_TESTS[:1]),
            "private_test_cases": private,
            "metadata": "{}",
            "starter_code": "",
            "question_id": "abc1",
        },
        {
            "question_content": "Scale.",
            "public_test_cases": json.dumps(CALL_TESTS),
            "private_test_cases": "",
            "metadata": json.dumps({"func_name": "scale"}),
            "starter_code": "class Solution:\n    def scale(self, xs, k):",
            "question_id": "abc2",
        },
        {"question_content": "No tests.", "public_test_cases": "[]", "question_id": "abc3"},
    ]
    path = tmp_path / "lcb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = CodeTask("livecodebench", path=path)
    first, second = task.problems
    assert task.skipped == 1
    assert first.id == "livecodebench/abc1" and first.metadata["tests"] == STDIN_TESTS
    assert second.metadata["func_name"] == "scale" and "class Solution" in second.question


def test_pickled_tests_with_code_are_refused() -> None:
    import base64
    import pickle
    import zlib

    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("x")))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        decode_tests(evil)
