"""Task registry and the 'aipo tasks' listing."""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

import pytest

import tasks
from tasks import registry
from tasks.base import Problem, RewardResult, Task


class _EchoTask(Task):
    """A user task: one problem whose answer is its own text."""

    def __init__(self, word: str = "hello") -> None:
        super().__init__()
        self.word = word

    def load(self) -> list[Problem]:
        return [Problem(id="echo/0", task="echo", question="Say it.", reference=self.word)]

    def extract_answer(self, response: str) -> str | None:
        return response.strip() or None

    def score(self, problem: Problem, response: str) -> RewardResult:
        ok = self.extract_answer(response) == problem.reference
        return RewardResult(score=float(ok), correct=ok)


def test_user_task_registers_and_is_made_with_kwargs() -> None:
    with mock.patch.dict(registry._REGISTRY):  # the registration ends with the test
        tasks.register_task("echo_test", _EchoTask, description="echo", source="inline", size=1)
        task = tasks.make_task("echo_test", word="bye")
        assert task.problems[0].reference == "bye"
        spec = {s.name: s for s in tasks.list_tasks()}["echo_test"]
        assert (spec.source, spec.size, spec.description) == ("inline", 1, "echo")
        with pytest.raises(ValueError, match="already registered"):
            tasks.register_task("echo_test", _EchoTask, description="x", source="y")
    assert "echo_test" not in {s.name for s in tasks.list_tasks()}


def test_unknown_name_lists_registered_tasks() -> None:
    with pytest.raises(KeyError) as info:
        tasks.make_task("math5000")
    message = str(info.value)
    assert "unknown task 'math5000'" in message
    assert "math500" in message and "gpqa_diamond" in message and "rg:<name>" in message


def test_builtin_names_are_registered() -> None:
    names = {s.name for s in tasks.list_tasks()}
    expected = {"math500", "aime2024", "aime2025", "gsm8k", "deepmath", "gpqa_diamond"}
    assert expected | {"livecodebench", "rg:chain_sum", "rg:gsm_symbolic"} <= names


def test_local_file_variant_through_make_task(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2", "unique_id": "u1"}\n')
    (problem,) = tasks.make_task("math500", path=str(path)).problems
    assert (problem.id, problem.reference) == ("math500/u1", "2")


def test_aipo_tasks_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from aipo.cli import main

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "HuggingFaceH4/MATH-500" in lines["math500"] and "500" in lines["math500"]
    assert "reasoning-gym" in lines["rg:chain_sum"]
    assert "gated" in lines["gpqa_diamond"]


def test_aipo_tasks_imports_no_torch_or_datasets() -> None:
    code = (
        "import sys; from aipo.cli import main; main(['tasks']); "
        "print(sorted(m for m in ('torch', 'datasets', 'reasoning_gym', 'math_verify') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
