"""benchmarks/vs_trl.py: one budget reaches both trainers; per-step seconds and ratios are right."""

from __future__ import annotations

import dataclasses

import pytest
from benchmark_script import load_script

vs_trl = load_script("vs_trl")

#: A different valid value for every budget field.
CHANGED = {
    "model": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "task": "rg:chain_sum",
    "prompts_per_step": 2,
    "samples_per_prompt": 8,
    "max_new_tokens": 32,
    "temperature": 1.0,
    "lr": 3e-6,
    "ppo_epochs": 2,
    "micro_batch_size": 4,
    "steps": 5,
    "dtype": "bfloat16",
    "device": "cuda",
    "seed": 7,
}


def _both_sides(budget, tmp_path):
    cfg = vs_trl.aipo_config(budget, tmp_path / "run")
    return cfg, vs_trl.trl_settings(cfg, tmp_path / "trl")


def test_every_budget_field_is_listed_here():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(vs_trl.SharedBudget)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_changing_one_budget_field_changes_both_sides(field, tmp_path):
    base_cfg, base_trl = _both_sides(vs_trl.SharedBudget(), tmp_path)
    changed = dataclasses.replace(vs_trl.SharedBudget(), **{field: CHANGED[field]})
    cfg, trl = _both_sides(changed, tmp_path)
    assert cfg.model_dump() != base_cfg.model_dump(), f"{field} did not reach aipo train"
    if field in ("model", "task"):
        # TRL's model and prompts are read off aipo's config in the TRL process.
        assert (cfg.policy.model, cfg.task.name) != (base_cfg.policy.model, base_cfg.task.name)
    else:
        assert trl != base_trl, f"{field} did not reach TRL's GRPOConfig"


def test_default_budget_maps_to_the_same_numbers_on_both_sides(tmp_path):
    cfg, trl = _both_sides(vs_trl.SharedBudget(), tmp_path)
    assert cfg.train.prompts_per_step * cfg.rollout.n_samples == 16
    assert trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"] == 16
    assert trl["per_device_train_batch_size"] == cfg.train.micro_batch_size == 8
    assert trl["num_generations"] == cfg.rollout.n_samples == 4
    assert trl["max_completion_length"] == cfg.env.max_new_tokens_per_turn == 64
    assert trl["temperature"] == cfg.rollout.temperature == 0.7
    assert trl["learning_rate"] == cfg.optim.lr == 1e-5
    assert trl["num_iterations"] == cfg.train.ppo_epochs == 1
    assert (trl["epsilon"], trl["epsilon_high"]) == (cfg.loss.eps_clip_low, cfg.loss.eps_clip_high)
    assert trl["beta"] == cfg.loss.kl_coef == 0.0
    assert trl["max_grad_norm"] == cfg.optim.max_grad_norm
    # Consulting, evaluation and saves are off inside the timed steps.
    assert cfg.env.mode == "independent" and cfg.env.max_consults == 0
    assert cfg.env.auto_consult is None
    assert all(agent.kind == "oracle" for agent in cfg.agents.agents.values())
    assert cfg.task.eval_size == 0 and cfg.train.save_every == 0
    assert trl["save_strategy"] == "no" and trl["eval_strategy"] == "no"
    # TRL's CPU defaults that aipo does not share are off.
    assert trl["bf16"] is False and trl["activation_checkpointing"] is False


def test_a_config_trl_cannot_mirror_is_refused_naming_the_field(tmp_path):
    cfg = vs_trl.aipo_config(vs_trl.SharedBudget(), tmp_path / "run")
    consulting = cfg.model_copy(update={"env": cfg.env.model_copy(update={"max_consults": 1})})
    with pytest.raises(ValueError, match="env.max_consults=1"):
        vs_trl.trl_settings(consulting, tmp_path / "trl")
    split = cfg.model_copy(update={"train": cfg.train.model_copy(update={"minibatch_size": 8})})
    with pytest.raises(ValueError, match="train.minibatch_size=8"):
        vs_trl.trl_settings(split, tmp_path / "trl")


def test_aipo_step_seconds_come_from_consecutive_records():
    records = [
        {"step": 2, "time": 130.0, "rollout_s": 20.0, "update_s": 9.0},
        {"step": 1, "time": 100.0, "rollout_s": 25.0, "update_s": 10.0},
        {"step": 3, "time": 158.5, "rollout_s": 19.0, "update_s": 9.0},
    ]
    assert vs_trl.aipo_step_seconds(records) == [35.0, 30.0, 28.5]


def test_callback_step_seconds_run_from_one_end_to_the_next():
    seconds = vs_trl.end_to_end_seconds([10.0, 75.0, 141.0], [70.0, 140.0, 200.0])
    assert seconds == [60.0, 70.0, 60.0]


def test_ratio_summary_pairs_steps_by_round_and_drops_warmup():
    aipo = [[50.0, 30.0, 40.0], [45.0, 20.0, 30.0]]
    trl = [[90.0, 60.0, 60.0], [80.0, 70.0, 60.0]]
    summary = vs_trl.ratio_summary(aipo, trl, warmup=1)
    assert summary["ratios"] == [2.0, 1.5, 3.5, 2.0]
    assert (summary["ratio_min"], summary["ratio_median"], summary["ratio_max"]) == (1.5, 2.0, 3.5)
    assert summary["aipo_median_s"] == 30.0  # median of 30, 40, 20, 30
    assert summary["trl_median_s"] == 60.0
    assert summary["ratio_of_medians"] == 2.0
    assert summary["steps_compared"] == 4
    assert summary["ratio_geomean"] == pytest.approx(21**0.25)  # (2 * 1.5 * 3.5 * 2) ** (1/4)
    low, high = summary["ratio_geomean_ci95"]
    assert 1.0 < low < 21**0.25 < high < 5.0


def test_per_token_ratios_pair_steps_by_round_and_drop_warmup_and_empty_steps():
    aipo = [{"step_s": [9.0, 10.0, 12.0], "completion_tokens": [100, 200, 0]}]
    trl = [{"step_s": [30.0, 20.0, 18.0], "completion_tokens": [300, 100, 90]}]
    # Step 1: 0.1 against 0.09 s/token; step 2: 0.2 against 0.05; step 3: no aipo tokens.
    assert vs_trl.per_token_ratios(aipo, trl, warmup=1) == [pytest.approx(4.0)]
    assert vs_trl.per_token_ratios(aipo, trl, warmup=0) == [
        pytest.approx(10 / 9),
        pytest.approx(4.0),
    ]


def test_same_problems_compares_the_two_sides_round_by_round():
    one, two = [["p1", "p2"], ["p3", "p4"]], [["p5", "p6"], ["p7", "p8"]]
    runs = {
        "aipo": [{"problems": one}, {"problems": two}],
        "trl": [{"problems": one}, {"problems": two}],
    }
    assert vs_trl.same_problems(runs)  # each round its own seed, so its own problems
    runs["trl"][1] = {"problems": [["p5", "p6"], ["p7", "p9"]]}
    assert not vs_trl.same_problems(runs)


def test_ratio_summary_refuses_unpaired_runs():
    with pytest.raises(ValueError, match="round 1: aipo ran 3 steps, TRL 2"):
        vs_trl.ratio_summary([[1.0, 2.0, 3.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="no step is left"):
        vs_trl.ratio_summary([[1.0]], [[2.0]], warmup=1)


def test_trl_accepts_the_settings():
    pytest.importorskip("trl", reason="TRL is a benchmark extra: pip install -e '.[bench]'")
    from trl import GRPOConfig

    cfg = vs_trl.aipo_config(vs_trl.SharedBudget(), "runs/vs-trl-test")
    args = GRPOConfig(**vs_trl.trl_settings(cfg, "runs/vs-trl-test-trl"))
    # One generation of all rows feeds exactly one optimizer step, as in aipo train.
    assert args.generation_batch_size == 16 and args.steps_per_generation == 2
    assert args.gradient_checkpointing is False and args.bf16 is False


def test_peak_rss_is_the_childs_own_and_grows_with_what_it_holds(tmp_path) -> None:
    import sys

    wait = "import time; time.sleep(1)"
    small_s, small = vs_trl._run_logged([sys.executable, "-c", wait], tmp_path / "small.log")
    hold = f"b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); {wait}"
    _, big = vs_trl._run_logged([sys.executable, "-c", hold], tmp_path / "big.log")
    assert small_s > 0
    assert 1 < small < 100  # a bare interpreter, in MiB (not KiB, not bytes)
    assert big - small > 250  # the 300 MiB the child touched
    assert vs_trl.peak_rss_summary(
        {
            "aipo": [{"peak_rss_mib": 100.0}, {"peak_rss_mib": 300.0}],
            "trl": [{"peak_rss_mib": 400.0}],
        }
    ) == {"aipo": 200.0, "trl": 400.0, "ratio": 2.0}


def test_a_failing_child_raises_with_its_log(tmp_path) -> None:
    import sys

    with pytest.raises(RuntimeError, match="exited 3"):
        vs_trl._run_logged(
            [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "f.log"
        )
