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
