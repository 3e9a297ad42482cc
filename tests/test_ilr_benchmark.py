"""benchmarks/ilr.py: arms that differ only where they should, and the aggregate."""

from __future__ import annotations

import pytest
from benchmark_script import load_script

bench = load_script("ilr")


def test_the_ilr_arms_differ_in_one_peer_setting_and_grpo_gets_three_times_the_samples(
    tmp_path,
) -> None:
    args = bench.parse_args(["--steps", "2"])
    configs = {
        arm: bench.run_config(arm, 3, args, tmp_path / arm).model_dump(mode="json")
        for arm in bench.ARMS
    }
    for config in configs.values():
        config.pop("run_dir")
    ilr = configs["ilr"]
    assert ilr["peers"]["interaction"] == "dynamic" and ilr["peers"]["calibration"] is True
    assert ilr["peers"]["seeds"] == [3, 1003] and ilr["seed"] == 3
    only_dynamic = dict(configs["dynamic_only"], peers=dict(ilr["peers"], calibration=False))
    assert configs["dynamic_only"] == only_dynamic
    only_calibration = dict(
        configs["calibration_only"], peers=dict(ilr["peers"], interaction="cooperate")
    )
    assert configs["calibration_only"] == only_calibration
    grpo = configs["grpo"]
    assert grpo["peers"] is None and grpo["rollout"]["n_samples"] == 3 * ilr["rollout"]["n_samples"]
    assert grpo["rollout"]["schedule"]["start_fraction"] == 0  # never told it may consult
    assert grpo["train"]["minibatch_size"] == 4 * 12  # one optimizer step, as each peer's
    for key in ("policy", "task", "optim", "loss"):
        assert grpo[key] == ilr[key], key
    # The token-matched arm differs from grpo only in its samples and their one minibatch.
    tokens = configs["grpo_tokens"]
    assert tokens["rollout"]["n_samples"] == 21 and tokens["train"]["minibatch_size"] == 4 * 21
    rollout = dict(grpo["rollout"], n_samples=21)
    assert tokens == dict(grpo, rollout=rollout, train=dict(grpo["train"], minibatch_size=84))


def test_aggregate_pools_every_policy_of_every_seed() -> None:
    records = [
        {
            "arm": "ilr",
            "seed": s,
            "policies": {
                "A": {"eval_before": 0.1, "eval_after": a, "generated_tokens_per_step": 100.0},
                "B": {"eval_before": 0.1, "eval_after": b, "generated_tokens_per_step": 120.0},
            },
        }
        for s, a, b in ((0, 0.2, 0.4), (1, 0.3, 0.5))
    ]
    row = bench.aggregate(records)["ilr"]
    assert row["eval_after"]["values"] == [0.2, 0.4, 0.3, 0.5]
    assert row["eval_after"]["mean"] == pytest.approx(0.35)
    assert row["generated_tokens_per_step"]["mean"] == pytest.approx(110.0)
