"""benchmarks/learning.py: arm configs share the budget, rows and plots come from the curves."""

from __future__ import annotations

import json
import math

import pytest
from benchmark_script import load_script

learning = load_script("learning")


def _configs(tmp_path, arms=("grpo", "aipo", "aipo_mask"), **budget):
    kwargs = dict(steps=6, prompts=2, samples=4, lr=2e-5, seed=3) | budget
    return {a: learning.arm_config(a, run_dir=tmp_path / a, **kwargs) for a in arms}


def test_arms_differ_only_in_consulting_and_agent_mode(tmp_path):
    configs = _configs(tmp_path)
    grpo, aipo, masked = configs["grpo"], configs["aipo"], configs["aipo_mask"]
    # GRPO alone: nobody may consult, no agent calls, agent tokens untrained.
    assert grpo.rollout.schedule.allowed(0, 4) == 0
    assert grpo.rollout.schedule.allowed(5, 4) == 0
    assert grpo.env.max_consults == 0
    assert grpo.loss.agent_mode == "mask"
    # AIPO: half of each group at first, a quarter at the last step, shaped agent tokens.
    assert aipo.rollout.schedule.allowed(0, 4) == 2
    assert aipo.rollout.schedule.allowed(6, 4) == 1
    assert aipo.env.max_consults == 1
    assert aipo.loss.agent_mode == "shaped"
    assert masked.loss.agent_mode == "mask"
    assert masked.rollout.schedule == aipo.rollout.schedule
    # The budget flags reached every arm.
    for cfg in configs.values():
        assert (cfg.train.steps, cfg.train.prompts_per_step, cfg.rollout.n_samples) == (6, 2, 4)
        assert (cfg.optim.lr, cfg.seed) == (2e-5, 3)
    learning.check_same_budget(configs)
    # Outside the consult schedule, env.max_consults and the loss mode, the arms are identical.
    dumps = {a: c.model_dump(mode="json") for a, c in configs.items()}
    for d in dumps.values():
        d.pop("run_dir")
        d["rollout"].pop("schedule")
        d["env"].pop("max_consults")
        d["loss"].pop("agent_mode")
        # Dumped only where agent tokens are trained (mask mode leaves its defaults out).
        d["loss"].pop("agent_positive_only", None)
        d["loss"].pop("agent_normalization", None)
    assert dumps["grpo"] == dumps["aipo"] == dumps["aipo_mask"]


def test_unequal_budgets_are_refused(tmp_path):
    configs = _configs(tmp_path, arms=("grpo",))
    configs["aipo"] = learning.arm_config(
        "aipo", run_dir=tmp_path / "aipo", steps=6, prompts=2, samples=4, lr=5e-5, seed=3
    )
    with pytest.raises(ValueError, match="optim.lr"):
        learning.check_same_budget(configs)


def test_unknown_arm_is_named(tmp_path):
    with pytest.raises(ValueError, match="'ppo'.*grpo, aipo, aipo_mask"):
        learning.arm_config("ppo", run_dir=tmp_path, steps=1, prompts=1, samples=2, lr=1e-5, seed=0)


def test_extra_overrides_apply_to_the_arm(tmp_path):
    cfg = learning.arm_config(
        "aipo",
        run_dir=tmp_path,
        steps=2,
        prompts=1,
        samples=2,
        lr=1e-5,
        seed=0,
        extra=["task.eval_size=5", "env.max_new_tokens_per_turn=16"],
    )
    assert cfg.task.eval_size == 5
    assert cfg.env.max_new_tokens_per_turn == 16


def test_summarize_arm_reads_the_curve_and_the_evaluations():
    records = [
        {"step": 1, "reward_mean": 0.25, "consult_rate": 0.5},
        {"step": 2, "reward_mean": 0.5, "consult_rate": 0.25},
        {"step": 3, "reward_mean": float("nan")},
        {"step": 4, "reward_mean": 0.75, "consult_rate": 0.0},
        {"step": 5, "reward_mean": 1.0, "consult_rate": 0.25},
    ]
    summary = {"eval_before": {"accuracy": 0.4}, "eval_after": {"accuracy": 0.6}, "wall_s": 12.5}
    row = learning.summarize_arm(records, summary)
    assert row["steps"] == 5
    assert (row["reward_first"], row["reward_last"]) == (0.25, 1.0)
    assert row["reward_last3_mean"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert (row["eval_accuracy_before"], row["eval_accuracy_after"]) == (0.4, 0.6)
    assert row["consult_rate_mean"] == pytest.approx(0.25)
    assert row["wall_s"] == 12.5
    empty = learning.summarize_arm([], {"eval_before": None, "eval_after": None})
    assert math.isnan(empty["reward_first"]) and math.isnan(empty["eval_accuracy_after"])


def test_table_has_a_line_per_arm_with_its_figures():
    row = dict(
        steps=3,
        reward_first=0.125,
        reward_last=0.875,
        reward_last3_mean=0.5,
        eval_accuracy_before=0.25,
        eval_accuracy_after=0.75,
        consult_rate_mean=0.375,
        wall_s=61.0,
    )
    table = learning.render_table({"grpo": row, "aipo": {**row, "reward_last": 0.625}})
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("grpo") and "0.875" in lines[2] and "0.375" in lines[2]
    assert lines[3].startswith("aipo") and "0.625" in lines[3]


def test_plot_has_a_consult_panel_only_when_an_arm_consulted(tmp_path):
    from PIL import Image

    flat = [
        {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.1 * s, "consult_rate": 0.0}
        for s in (1, 2)
    ]
    consulted = [{**r, "consult_rate": 0.5} for r in flat]
    two = learning.plot_arms({"grpo": flat}, tmp_path / "two.png")
    three = learning.plot_arms({"grpo": flat, "aipo": consulted}, tmp_path / "three.png")
    h2, h3 = Image.open(two).size[1], Image.open(three).size[1]
    assert h3 > h2  # one more panel of the same height
    # An arm allowed to consult gets its panel even when its rate stayed 0.
    named = learning.plot_arms({"grpo": flat, "aipo": flat}, tmp_path / "named.png", ["aipo"])
    assert Image.open(named).size[1] == h3


def test_consulting_arms_are_those_allowed_to_consult(tmp_path):
    assert learning.consulting_arms(_configs(tmp_path)) == ["aipo", "aipo_mask"]


@pytest.mark.slow
def test_main_trains_both_arms_and_writes_results(tmp_path, tiny_model_dir):
    out = tmp_path / "results"
    code = learning.main(
        [
            "--steps=1",
            "--prompts=2",
            "--samples=2",
            "--arms=grpo,aipo",
            f"--run-root={tmp_path / 'runs'}",
            f"--out={out}",
            "--no-progress",
            f"--set=policy.model={tiny_model_dir}",
            "--set=task.eval_size=2",
            "--set=task.kwargs.size=8",
            # Eight draws leave no held-out side to evaluate; the held-out set draws its own.
            "--set=task.eval_kwargs.size=200",
            "--set=env.max_new_tokens_per_turn=6",
        ]
    )
    assert code == 0
    result = json.loads((out / "learning.json").read_text())
    assert set(result["arms"]) == {"grpo", "aipo"}
    for arm in ("grpo", "aipo"):
        data = result["arms"][arm]
        assert [r["step"] for r in data["curve"]] == [1]
        assert data["config"]["policy"]["model"] == tiny_model_dir
        assert data["summary"]["eval_before"]["problems"] == 2
    assert result["arms"]["grpo"]["row"]["consult_rate_mean"] == 0.0
    assert result["arms"]["aipo"]["config"]["loss"]["agent_mode"] == "shaped"
    assert (out / "learning.png").stat().st_size > 0
