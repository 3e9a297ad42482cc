"""benchmarks/arpo.py: a fair comparison, intervals, and finished arms that are not rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmark_script import load_script

bench = load_script("arpo")


def args(tmp_path: Path, *extra: str):
    return bench.parse_args(["--out", str(tmp_path / "out"), "--steps", "2", *extra])


@pytest.mark.parametrize("setting", sorted(bench.SETTINGS))
def test_the_arms_differ_in_the_rollout_strategy_only(tmp_path, setting) -> None:
    a = args(tmp_path)
    configs = {
        arm: bench.run_config(setting, arm, 1, a, tmp_path / "run").model_dump(mode="json")
        for arm in bench.ARMS
    }
    assert configs["grpo"]["rollout"].pop("strategy") == "grpo"
    assert configs["arpo"]["rollout"].pop("strategy") == "arpo"
    assert configs["grpo"] == configs["arpo"]
    assert configs["arpo"]["seed"] == 1 and configs["arpo"]["train"]["steps"] == 2


def test_mean_and_95_percent_t_interval() -> None:
    mean, half = bench.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(bench.mean_ci([5.0])[1])


def test_a_finished_arm_with_the_same_budget_is_read_back(tmp_path, monkeypatch) -> None:
    a = args(tmp_path)
    saved = tmp_path / "out" / "arms" / "consult-arpo-seed0.json"
    saved.parent.mkdir(parents=True)
    record = {"arm": "arpo", "seed": 0, "budget": bench.budget(a), "figures": {}}
    saved.write_text(json.dumps(record))

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr("trainers.embedded.EmbeddedTrainer", Refuse)
    assert bench.run_arm("consult", "arpo", 0, a, tmp_path / "runs") == record
    other = args(tmp_path, "--prompts", "3")  # another budget: trained again
    with pytest.raises(AssertionError, match="trained again"):
        bench.run_arm("consult", "arpo", 0, other, tmp_path / "runs")


def _record(a, arm: str, seed: int, accuracy: float, solved=None) -> dict:
    figures = {key: 1.0 for key in bench.FIGURES}
    figures["eval_accuracy_after"] = accuracy
    record = {"arm": arm, "seed": seed, "budget": bench.budget(a), "figures": figures}
    if solved is not None:
        record["held_out_after"] = solved
    return record


def test_arpo_is_paired_with_grpo_seed_by_seed(tmp_path) -> None:
    a = args(tmp_path)
    old = [
        _record(a, "grpo", 0, 0.25),
        _record(a, "arpo", 0, 0.5),
        _record(a, "grpo", 1, 0.5),
        _record(a, "arpo", 1, 0.5),
        _record(a, "arpo", 2, 1.0),  # no grpo run for seed 2: not paired
    ]
    against = bench.paired(old)["grpo"]["arpo"]
    assert against["per_seed"] == pytest.approx({"0": 0.25, "1": 0.0})
    assert against["seed_t"]["seeds"] == 2 and against["two_stage_bootstrap"] is None
    # Records that keep the problems solved: paired by problem within a seed as well. Seed 0
    # gains p1, seed 1 gains p0 and loses p1: the seeds' differences are 0.5 and 0.
    grpo = {0: {"p0": True, "p1": False}, 1: {"p0": False, "p1": True}}
    arpo = {0: {"p0": True, "p1": True}, 1: {"p0": True, "p1": False}}
    new = [_record(a, "grpo", s, 0.5, grpo[s]) for s in (0, 1)]
    new += [_record(a, "arpo", s, 0.5, arpo[s]) for s in (0, 1)]
    against = bench.paired(new)["grpo"]["arpo"]
    assert against["per_seed"] == pytest.approx({"0": 0.5, "1": 0.0})  # not the accuracies
    two_stage = against["two_stage_bootstrap"]
    assert two_stage["seeds"] == 2 and two_stage["ci_low"] < 0.25 < two_stage["ci_high"]
    table = bench.aggregate(old, ["grpo", "arpo"])
    markdown = bench.render_markdown(table, "cmd", "consult", bench.paired(old))
    assert (
        "- arpo: +0.125 [" in markdown and "(t over 2 seeds; per seed +0.250, +0.000)" in markdown
    )


def test_report_only_reads_the_finished_runs_and_trains_nothing(tmp_path, monkeypatch) -> None:
    a = args(tmp_path, "--seeds", "0", "1")
    arms = tmp_path / "out" / "arms"
    arms.mkdir(parents=True)
    for arm, seed, accuracy in (("grpo", 0, 0.25), ("arpo", 0, 0.5), ("grpo", 1, 0.5)):
        record = dict(_record(a, arm, seed, accuracy), setting="consult")
        (arms / f"consult-{arm}-seed{seed}.json").write_text(json.dumps(record))
    other = dict(_record(a, "arpo", 1, 0.9), budget={"steps": 99})  # another budget: not read
    (arms / "consult-arpo-seed1.json").write_text(json.dumps(other))

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("--report-only trained a run")

    monkeypatch.setattr("trainers.embedded.EmbeddedTrainer", Refuse)
    argv = ["--out", str(tmp_path / "out"), "--steps", "2", "--seeds", "0", "1", "--report-only"]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "out" / "consult.json").read_text())
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [
        ("grpo", 0),
        ("arpo", 0),
        ("grpo", 1),
    ]
    assert result["vs"]["grpo"]["arpo"]["per_seed"] == pytest.approx({"0": 0.25})
    assert "- arpo: +0.250, no interval (1 seed" in (tmp_path / "out" / "consult.md").read_text()
    nothing = ["--out", str(tmp_path / "out"), "--steps", "2", "--seeds", "7", "--report-only"]
    assert bench.main(nothing) == 1  # no finished run to report
