"""Held-out means held out: training and held-out sets share no question, by content (issue 24).

Every family of task is built the way the trainer builds it (``trainers.held_out.make_tasks``)
and its two sides are checked disjoint by content key; the old way (the same task with
another seed) is measured first, so each check could fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from aipo.commands import eval as eval_cli
from tasks.question_text import normalize_question
from tasks.registry import make_task
from tasks.splits import SplitTask, held_out_side, measure_overlap
from trainers.config import TaskSection, TrainConfig
from trainers.held_out import HELD_OUT_FILE, HeldOutError, make_tasks
from trainers.summary import EvalResult, TrainSummary

#: The default config's task (configs/default.yaml).
CHAIN = {"name": "rg:chain_sum_easy", "kwargs": {"size": 500, "seed": 0}}
CHAIN_EVAL = {"eval_kwargs": {"seed": 10000}, "eval_size": 32}


def _keys(task) -> set[str]:
    return {task.content_key(p) for p in task.problems}


def _disjoint(cfg: TaskSection) -> tuple[SplitTask, SplitTask]:
    """Both sides as the trainer builds them, checked disjoint by content key."""
    split = make_tasks(cfg)
    assert split.eval_task is not None and split.overlap is not None
    assert len(split.eval_task) == cfg.eval_size
    assert not _keys(split.task) & _keys(split.eval_task)
    assert split.overlap.count == 0
    return split.task, split.eval_task


# -- normalisation and the partition ----------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 1,000 + 2?", "what is 1000 + 2?"),  # thousands separator, case
        ("Compute  7\n\t* 3", "compute 7 * 3"),  # whitespace
        ("x = 007", "x = 7"),  # leading zeros
        ("Half of 5.0 is 2.50", "half of 5 is 2.5"),  # canonical decimals
        ("Solve y = +4", "solve y = 4"),  # a leading plus sign
        ("(+3) squared", "(3) squared"),
        ("ＷＨＡＴ ＩＳ １２？", "what is 12?"),  # NFKC: full-width forms
        ("Straße", "STRASSE"),  # casefold
    ],
)
def test_normalize_question_folds_form(a: str, b: str) -> None:
    assert a != b and normalize_question(a) == normalize_question(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("3 +5", "3 5"),  # '+' between operands is an addition
        ("1/2", "0.5"),  # fractions are not decimals
        ("1,0000", "10000"),  # not a thousands separator
        ("1.2.3", "1.23"),
        ("12", "1 2"),
        ("-5", "5"),
    ],
)
def test_normalize_question_keeps_content(a: str, b: str) -> None:
    assert normalize_question(a) != normalize_question(b)


def test_held_out_side_is_a_stable_sha256_partition() -> None:
    keys = [f"question {i}" for i in range(2000)]
    at_20 = {k for k in keys if held_out_side(k, 0.2)}
    assert 300 < len(at_20) < 500
    assert at_20 <= {k for k in keys if held_out_side(k, 0.3)}  # monotone in the fraction
    # sha256 of the key, the same in every process (Python's hash() is salted per process).
    assert [held_out_side(k, 0.5) for k in ("a", "b", "c", "d")] == [
        hashlib.sha256(k.encode()).digest()[0] < 128 for k in ("a", "b", "c", "d")
    ]
    assert len({held_out_side(k, 0.5) for k in ("a", "b", "c", "d")}) == 2
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        held_out_side("a", 1.0)


# -- every task family: default train and held-out sets are disjoint -------------------


def test_reasoning_gym_default_config_is_disjoint_where_another_seed_was_not() -> None:
    old_train = make_task(CHAIN["name"], **CHAIN["kwargs"])
    old_eval = make_task(CHAIN["name"], size=500, seed=10000)
    old = measure_overlap(old_train.problems, old_eval.problems[:32], old_eval.content_key)
    assert old.count == 30 and old.held_out == 32  # the number

    train, held = _disjoint(TaskSection(**CHAIN, **CHAIN_EVAL))
    assert isinstance(train, SplitTask) and train.side == "train"
    assert train.other_side > 0 and held.other_side > 0  # both sides were filtered
    assert len(_keys(held)) == 32  # distinct, duplicates dropped
    assert held.duplicates > 0
    assert len(train) == 500 - train.other_side  # generated draws may repeat in training


def test_generated_task_with_facts_is_disjoint_and_keeps_its_privileged_information() -> None:
    cfg = TaskSection(
        name="rg:leg_counting",
        kwargs={"size": 200, "seed": 0},
        eval_kwargs={"seed": 10000},
        eval_size=16,
    )
    train, held = _disjoint(cfg)
    # The partition did something: the same draws split into complementary sides.
    base = make_task("rg:leg_counting", size=200, seed=0)
    other = SplitTask(base, "held_out", cfg.held_out_fraction)
    assert len(other) > 0 and len(train) + len(other) == 200
    assert not _keys(train) & _keys(other)
    problem = held.problems[0]
    assert held.privileged == {"facts", "steps"}
    assert held.facts(problem) and held.facts(problem) == held.base.facts(problem)
    assert held.solution_steps(problem) == held.base.solution_steps(problem)
    assert held.seed == 10000 and held.name == "rg:leg_counting"  # delegated attributes
    answer = f"\\boxed{{{problem.reference}}}"
    assert held.score(problem, answer).correct
    assert asyncio.run(held.ascore(problem, answer)).correct


def _math_rows(n: int) -> list[dict]:
    return [
        {"unique_id": f"q{i}", "problem": f"What is {i * 1000} plus {i}?", "answer": str(i * 1001)}
        for i in range(1, n + 1)
    ]


def test_dataset_file_is_disjoint_and_its_duplicates_are_dropped_and_counted(
    tmp_path: Path,
) -> None:
    rows = _math_rows(80)
    # Same questions, other forms: whitespace, case, thousands separators, decimals, zeros.
    duplicates = [
        {"unique_id": "d1", "problem": "what   is 1,000 PLUS 1?", "answer": "1001"},
        {"unique_id": "d2", "problem": "What is 2000.0 plus 02?", "answer": "2002"},
        {"unique_id": "d3", "problem": "What is 3,000\nplus 3.00?", "answer": "3003"},
        {"unique_id": "d4", "problem": "WHAT IS 40,000 PLUS 40?", "answer": "40040"},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + duplicates))
    same_file = {"name": "math500", "kwargs": {"path": str(path)}, "eval_kwargs": {}}

    old = make_tasks(TaskSection(**same_file, eval_size=8, held_out="task", allow_overlap=True))
    assert old.overlap is not None and old.overlap.count == 8  # the same file: all of it

    train, held = _disjoint(TaskSection(**same_file, eval_size=8))
    assert train.duplicates + held.duplicates == len(duplicates)
    assert len(train) + held.available == len(rows)
    assert not train.generated  # a dataset: repeated rows are duplicates, not draws


def _lcb_rows(n: int) -> list[dict]:
    tests = json.dumps([{"input": "1\n", "output": "1\n", "testtype": "stdin"}])
    return [
        {
            "question_content": f"Print the number {i} read from stdin, {i} times.",
            "public_test_cases": tests,
            "private_test_cases": "",
            "metadata": "{}",
            "starter_code": "",
            "question_id": f"lcb{i}",
        }
        for i in range(n)
    ]


def test_code_task_file_is_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "lcb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _lcb_rows(60)))
    kwargs = {"path": str(path), "sandbox": "none"}
    same = {"name": "livecodebench", "kwargs": kwargs, "eval_kwargs": {}, "eval_size": 6}
    old = make_tasks(TaskSection(**same, held_out="task", allow_overlap=True))
    assert old.overlap is not None and old.overlap.count == 6
    train, held = _disjoint(TaskSection(**same))
    assert len(train) + held.available == 60


def test_multiple_choice_key_ignores_the_seeded_option_order(tmp_path: Path) -> None:
    rows = [
        {
            "Question": f"Which is right, case {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong a {i}",
            "Incorrect Answer 2": f"wrong b {i}",
            "Incorrect Answer 3": f"wrong c {i}",
            "Record ID": f"rec{i}",
        }
        for i in range(40)
    ]
    path = tmp_path / "gpqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    seed0 = make_task("gpqa_diamond", path=str(path), seed=0)
    seed1 = make_task("gpqa_diamond", path=str(path), seed=1)
    by_text = measure_overlap(
        seed0.problems, seed1.problems, lambda p: normalize_question(p.question)
    )
    assert by_text.count < 40  # the shuffle hides repeated questions from the text
    assert measure_overlap(seed0.problems, seed1.problems, seed1.content_key).count == 40
    cfg = TaskSection(
        name="gpqa_diamond",
        kwargs={"path": str(path)},
        eval_kwargs={"seed": 1},
        eval_size=4,
    )
    _disjoint(cfg)


# -- the old behaviour is refused before any model loads; allowed, it is reported ------


def _train_config(tmp_path: Path, **task) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "task": {**CHAIN, **CHAIN_EVAL, **task},
            "train": {"plot": False},
        }
    )


class _ModelLoaded(Exception):
    pass


def _open_until_the_model(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """``open_run`` up to the policy load, which raises :class:`_ModelLoaded`."""
    import trainers.run_state as run_state

    def load_policy(cfg):
        raise _ModelLoaded

    monkeypatch.setattr(run_state, "load_policy", load_policy)

    async def go() -> None:
        async with run_state.open_run(config, progress=False):
            pass

    asyncio.run(go())


def test_another_seed_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _train_config(tmp_path, held_out="task")
    with pytest.raises(HeldOutError) as refused:
        _open_until_the_model(config, monkeypatch)
    message = str(refused.value)
    assert "30 of 32 held-out problems" in message and "rg:chain_sum_easy" in message
    assert message.count("State the final answer") == 2  # two examples
    assert "task.held_out: partition" in message and "task.allow_overlap: true" in message
    # The default config gets as far as the model.
    with pytest.raises(_ModelLoaded):
        _open_until_the_model(_train_config(tmp_path / "default"), monkeypatch)


def test_allowed_overlap_is_reported_on_every_eval_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _train_config(tmp_path, held_out="task", allow_overlap=True)
    with pytest.raises(_ModelLoaded):
        _open_until_the_model(config, monkeypatch)
    report = json.loads((tmp_path / "run" / HELD_OUT_FILE).read_text())
    assert report["count"] == 30 and report["held_out"] == 32 and report["mode"] == "task"
    assert report["held_out_distinct"] == 32 and report["train_distinct"] > 100
    assert len(report["examples"]) == 5

    result = EvalResult(32, 0.781, 0.781, 0.0, 0.0, 5.0)
    summary = TrainSummary(
        run_dir="r",
        steps=1,
        eval_before=result,
        eval_after=result,
        train_reward_first=0.0,
        train_reward_last=0.0,
        consult_rate_mean=0.0,
        policy_tokens_per_s=0.0,
        wall_s=1.0,
        checkpoint=None,
        plot=None,
        metrics="m",
        held_out=report,
    )
    eval_lines = [line for line in summary.render().splitlines() if "  eval " in line]
    assert len(eval_lines) == 2
    assert all(line.endswith("[held-out overlaps training: 30 of 32]") for line in eval_lines)
    assert json.loads(json.dumps(asdict(summary)))["held_out"]["count"] == 30


def test_a_held_out_set_larger_than_its_pool_is_refused_with_both_numbers() -> None:
    cfg = TaskSection(**CHAIN, eval_kwargs={"seed": 10000}, eval_size=64)
    with pytest.raises(HeldOutError) as refused:
        make_tasks(cfg)
    assert str(refused.value) == (
        "task rg:chain_sum_easy: eval_size 64 but the held-out side has only 33 distinct "
        "problems (of 500 generated with seed 10000); lower task.eval_size, raise "
        "task.eval_kwargs.size or task.held_out_fraction"
    )


def test_ilr_validation_split_is_held_out_too() -> None:
    from aipo.config import load_config
    from trainers.held_out import make_train_task, validation_task

    config = load_config(TrainConfig, Path(__file__).parent.parent / "configs" / "ilr.yaml")
    assert config.peers is not None
    peers = config.peers
    validation = validation_task(
        config.task, overrides=peers.validation_kwargs, size=peers.validation_size
    )
    assert len(validation) == peers.validation_size
    assert not _keys(validation) & _keys(make_train_task(config.task))


# -- aipo eval --train-config ------------------------------------------------------------


def _eval_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "trained"
    run.mkdir()
    (run / "config.yaml").write_text(
        "task:\n  name: rg:chain_sum_easy\n  kwargs: {size: 500, seed: 0}\n"
        "  eval_kwargs: {seed: 10000}\n"
    )
    return run


def _seed_10000(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        model,
        "--tasks",
        "rg:chain_sum_easy",
        "--task-arg",
        "rg:chain_sum_easy.seed=10000",
        "--limit",
        "32",
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_aipo_eval_refuses_problems_the_run_trained_on(tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path)
    argv = _seed_10000("/nonexistent/model", tmp_path / "o", "--train-config", str(run))
    assert eval_cli.run(_eval_args(*argv)) == 2
    err = capsys.readouterr().err
    assert "27 of 32 problems to evaluate occur in the training set" in err
    assert "--allow-overlap" in err and "--held-out-side" in err
    assert "cannot load model" not in err  # refused before the model loads
    assert not (tmp_path / "o" / "trajectories.jsonl").exists()


@pytest.mark.slow
def test_aipo_eval_of_the_held_out_side_writes_the_overlap(
    tmp_path: Path, tiny_model_dir: str, capsys
) -> None:
    run = _run_dir(tmp_path)
    out = tmp_path / "o"
    argv = _seed_10000(
        tiny_model_dir,
        out,
        "--train-config",
        str(run),
        "--held-out-side",
        "--max-new-tokens",
        "4",
    )
    argv[argv.index("--limit") + 1] = "3"
    assert eval_cli.run(_eval_args(*argv)) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    overlap = results["tasks"]["rg:chain_sum_easy"]["overlap"]
    assert overlap["count"] == 0 and overlap["held_out"] == 3
    assert overlap["train_config"] == str(run / "config.yaml")
    assert results["config"]["held_out_fraction"] == 0.2
    assert "training set of" in capsys.readouterr().out
