"""``aipo eval`` end to end on a tiny local dataset, resuming, and bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aipo.commands import eval as eval_cli
from aipo_env.evaluation.runner import EvalConfig, EvalInputError, evaluate, parse_task_args
from aipo_env.trajectory import read_jsonl

PROBLEMS = [
    {"unique_id": "a", "problem": "What is 1+1?", "answer": "2"},
    {"unique_id": "b", "problem": "What is 2+3?", "answer": "5"},
    {"unique_id": "c", "problem": "What is 3*3?", "answer": "9"},
]


@pytest.fixture
def math_file(tmp_path: Path) -> Path:
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _base(model: str, math_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        model,
        "--tasks",
        "math500",
        "--task-arg",
        f"math500.path={math_file}",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_eval_end_to_end_with_tiny_model(tiny_model_dir, math_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = eval_cli.run(_args(*_base(tiny_model_dir, math_file, out, "--limit", "2", "--n", "2")))
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["math500"]
    assert results["ks"] == [1, 2]
    assert task["problems_evaluated"] == 2 and task["samples"] == 4
    trajectories = read_jsonl(out / "trajectories.jsonl")
    assert len(trajectories) == 4
    by_id = {t.trajectory_id: t for t in trajectories}
    assert all(t.mode == "independent" for t in trajectories)
    for problem in task["problems"]:
        assert len(problem["samples"]) == 2
        for sample in problem["samples"]:
            t = by_id[sample["trajectory"]["id"]]
            assert sample["trajectory"]["path"] == "trajectories.jsonl"
            assert sample["response_tokens"] == len(t.token_ids) - t.prompt_len
            assert 1 <= sample["response_tokens"] <= 8
            assert sample["finish_reason"] == t.finish_reason
            assert sample["reward"] == t.reward
    truncated = sum(t.finish_reason == "length" for t in trajectories) / 4
    assert task["metrics"]["truncation_rate"] == pytest.approx(truncated)
    correct = sum(s["correct"] for p in task["problems"] for s in p["samples"])
    assert task["metrics"]["avg@n"] == pytest.approx(correct / 4)
    assert (out / "results.md").read_text().startswith("| task | problems | n |")
    assert (out / "passk.png").read_bytes()[:4] == b"\x89PNG"
    assert "| math500 | 2 | 2 |" in capsys.readouterr().out


class _CountingGenerator:
    """Wraps a generator and counts the episodes it was asked to start."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    async def generate(self, input_ids, params, *, session_id=None):
        self.calls += 1
        return await self.inner.generate(input_ids, params, session_id=session_id)

    async def aclose(self) -> None:
        pass


async def test_resume_completes_without_duplicates(tiny_model_dir, math_file, tmp_path) -> None:
    from policies.transformers_generator import TransformersGenerator

    inner = TransformersGenerator(tiny_model_dir, max_context=512)
    config = EvalConfig(
        model=tiny_model_dir,
        tasks=["math500"],
        task_args={"math500": {"path": str(math_file)}},
        n=2,
        max_new_tokens=4,
        temperature=1.0,
    )
    out = tmp_path / "run"
    # An interrupted run: only the first problem's samples were written, and a kill
    # tore the line of a third one.
    first = _CountingGenerator(inner)
    await evaluate(config.model_copy(update={"limit": 1}), out, generator=first, progress=False)
    assert first.calls == 2
    with (out / "trajectories.jsonl").open("a") as f:
        f.write('{"trajectory_id": "math500/')
    before = {t.trajectory_id: t for t in read_jsonl(out / "trajectories.jsonl")}

    with pytest.raises(EvalInputError, match="--resume"):
        await evaluate(config, out, generator=first, progress=False)

    second = _CountingGenerator(inner)
    results = await evaluate(config, out, generator=second, resume=True, progress=False)
    assert second.calls == 4  # only problems b and c were sampled
    trajectories = read_jsonl(out / "trajectories.jsonl")
    ids = [t.trajectory_id for t in trajectories]
    assert len(ids) == len(set(ids)) == 6
    pids = sorted(t.problem_id for t in trajectories)
    assert sorted(set(pids)) == sorted({t.problem_id for t in trajectories})
    assert len(set(pids)) == 3
    # The samples written before the interruption are kept as they were.
    after = {t.trajectory_id: t for t in trajectories}
    for tid, t in before.items():
        assert after[tid].token_ids == t.token_ids
    task = results["tasks"]["math500"]
    assert task["problems_evaluated"] == 3 and task["samples"] == 6

    # Changing a sampling setting on resume is refused, naming the field.
    with pytest.raises(EvalInputError, match=r"temperature: 1\.0 -> 0\.5"):
        await evaluate(
            config.model_copy(update={"temperature": 0.5}),
            out,
            generator=second,
            resume=True,
            progress=False,
        )
    await inner.aclose()


async def test_evaluate_alone_is_greedy_independent_and_resumes(tokenizer, tmp_path) -> None:
    from scripted import AdditionTask, ScriptedGenerator

    from aipo_env.config import EnvConfig
    from aipo_env.evaluation.alone import evaluate_alone

    script = ['<consult agent="verify">Is it 3?</consult> \\boxed{3}' + tokenizer.eos_token]
    policy = ScriptedGenerator(tokenizer, script, max_context=512)
    out = tmp_path / "eval" / "before.jsonl"
    options = {
        "output": out,
        "env_config": EnvConfig(),
        "max_new_tokens": 64,
        "concurrency": 2,
    }
    first = await evaluate_alone(policy, AdditionTask(n=3), problems=[0, 2], **options)
    assert sorted(t.problem_id for t in first) == ["add-0", "add-2"]
    assert {params.temperature for _, _, params in policy.calls} == {0.0}
    # Independent mode: the consult tag is counted as an attempt, never answered.
    assert all(t.consult_attempts == 1 and t.consults == 0 for t in first)
    assert len(read_jsonl(out)) == 2

    calls = len(policy.calls)
    again = await evaluate_alone(policy, AdditionTask(n=3), problems=[0, 2], **options)
    assert len(policy.calls) == calls  # every sample was read back from the file
    assert [t.token_ids for t in again] == [t.token_ids for t in first]


def test_unknown_task_is_exit_2(tmp_path, capsys) -> None:
    code = eval_cli.run(_args("--tasks", "math5000", "--output", str(tmp_path / "o")))
    err = capsys.readouterr().err
    assert code == 2 and "unknown task 'math5000'" in err and "math500" in err
    assert "Traceback" not in err


def test_n_smaller_than_k_is_exit_2(math_file, tmp_path, capsys) -> None:
    argv = _base("default", math_file, tmp_path / "o", "--n", "2", "--k", "1,4")
    assert eval_cli.run(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert "k=4" in err and "n=2" in err
    assert not (tmp_path / "o" / "trajectories.jsonl").exists()


def test_checkpoint_without_tokenizer_is_exit_2(math_file, tmp_path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert eval_cli.run(_args(*_base(str(ckpt), math_file, tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{ckpt}' has no tokenizer" in err


def test_unreachable_dataset_says_how_to_use_a_local_file(tmp_path, capsys) -> None:
    # Tests run offline, so the hub dataset cannot be reached.
    argv = ["--tasks", "aime2024", "--output", str(tmp_path / "o"), "--no-progress"]
    assert eval_cli.run(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert "aime2024.path=" in err or "path=" in err
    assert "Traceback" not in err


def test_missing_local_file_names_it(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.jsonl"
    argv = ["--tasks", "gsm8k", "--task-arg", f"gsm8k.path={missing}", "--output", str(tmp_path)]
    assert eval_cli.run(_args(*argv)) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "agents:\n  verify: {kind: oracle, temprature: 0.2}\n",
            "unknown config key 'agents.verify.temprature'; valid keys under 'agents.verify': backend",
        ),
        (
            "cache_size: 1\ncache_size: 2\n",
            "duplicate key 'cache_size' on line 2 (first on line 1)",
        ),
        (
            "agents:\n  verify: {top_p: 0}\n",
            "agents.verify.top_p: 0 is out of range; allowed: 0.0 < value <= 1.0",
        ),
    ],
)
def test_bad_agents_file_is_named_by_the_config_loader_before_any_model_loads(
    text, expected, math_file, tmp_path, capsys
) -> None:
    agents = tmp_path / "agents.yaml"
    agents.write_text(text)
    out = tmp_path / "o"
    argv = _base("/nonexistent/model", math_file, out, "--consult", "on", "--agents", str(agents))
    assert eval_cli.run(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert f"agents config '{agents}' is invalid" in err and expected in err
    assert "nonexistent" not in err and not out.exists()


def test_missing_agents_file_is_exit_2(math_file, tmp_path, capsys) -> None:
    missing = tmp_path / "agents.yaml"
    argv = _base("default", math_file, tmp_path / "o", "--consult", "on", "--agents", str(missing))
    assert eval_cli.run(_args(*argv)) == 2
    assert f"agents config '{missing}' does not exist" in capsys.readouterr().err


def test_parse_task_args() -> None:
    parsed = parse_task_args(
        ["math500.path=x.jsonl", "math500.limit=3", "rg:chain_sum.size=5"],
        ["math500", "rg:chain_sum"],
    )
    assert parsed == {"math500": {"path": "x.jsonl", "limit": 3}, "rg:chain_sum": {"size": 5}}
    with pytest.raises(EvalInputError, match="TASK.KEY=VALUE"):
        parse_task_args(["pathonly"], ["math500"])
    with pytest.raises(EvalInputError, match="not in --tasks"):
        parse_task_args(["gsm8k.path=x"], ["math500"])


def test_compare_cli_prints_differences(tmp_path, capsys) -> None:
    from aipo_env.evaluation.results import SampleRecord, build_results, task_summary, write_json

    def run_file(name: str, solved: int) -> Path:
        samples = [
            SampleRecord(
                problem_id=f"p{i}",
                sample_index=0,
                reward=float(i < solved),
                correct=i < solved,
                response_tokens=5,
                finish_reason="eos",
            )
            for i in range(20)
        ]
        results = build_results({"model": name}, {"math": task_summary(samples, [1])}, [1])
        return write_json(results, tmp_path / f"{name}.json")

    a, b = run_file("a", 5), run_file("b", 15)
    assert eval_cli.run(_args("--compare", str(a), str(b))) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("math") and "pass@1" in line)
    assert "0.2500" in row and "0.7500" in row and "+0.5000" in row
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    assert eval_cli.run(_args("--compare", str(a), str(bogus))) == 2
    assert "not an aipo eval results file" in capsys.readouterr().err
