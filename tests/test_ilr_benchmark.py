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


def _record(arm: str, seed: int, after: dict[str, float], solved=None) -> dict:
    """An arm's record: each policy's accuracy after and, if given, which problems it solved."""
    policies = {}
    for name, accuracy in after.items():
        policies[name] = {
            "eval_before": 0.5,
            "eval_after": accuracy,
            "generated_tokens_per_step": 100.0,
        }
        if solved is not None:
            policies[name]["held_out_after"] = solved[name]
    return {"arm": arm, "seed": seed, "policies": policies}


def test_old_records_are_compared_by_seed_on_the_mean_of_the_peers() -> None:
    # Records written before held_out_after was kept: one value per seed, the peers' mean.
    records = [
        _record("grpo_tokens", 0, {"policy": 0.75}),
        _record("grpo_tokens", 1, {"policy": 0.75}),
        _record("ilr", 0, {"A": 0.5, "B": 0.75}),
        _record("ilr", 1, {"A": 0.5, "B": 0.5}),
    ]
    vs = bench.paired(records)
    assert set(vs) == {"grpo_tokens"}  # no ablation ran: nothing against ilr
    ilr = vs["grpo_tokens"]["ilr"]
    assert ilr["per_seed"] == pytest.approx({"0": -0.125, "1": -0.25})
    half = 12.706 * 0.0625  # t(1) x sd(-0.125, -0.25) / sqrt(2)
    assert ilr["seed_t"]["ci_high"] == pytest.approx(-0.1875 + half)
    assert ilr["two_stage_bootstrap"] is None
    markdown = bench.render_markdown(bench.aggregate(records), "cmd", vs)
    assert "the comparisons below pair the arms by seed instead" in markdown
    assert "- ilr: -0.188 [-0.982, +0.607] (t over 2 seeds; per seed -0.125, -0.250); " in markdown
    assert "two-stage bootstrap n/a (the records keep no per-problem results)" in markdown


def test_records_with_solved_problems_pair_them_and_bootstrap_in_two_stages() -> None:
    peers = {"A": {"p0": True, "p1": False}, "B": {"p0": True, "p1": True}}
    records = [
        _record("ilr", 0, {"A": 0.5, "B": 1.0}, peers),
        _record("ilr", 1, {"A": 0.5, "B": 1.0}, peers),
        _record("dynamic_only", 0, {"A": 0.5, "B": 0.5}, {n: peers["A"] for n in "AB"}),
        _record("dynamic_only", 1, {"A": 1.0, "B": 1.0}, {n: peers["B"] for n in "AB"}),
    ]
    assert bench.seed_score(records[0]) == {"p0": 1.0, "p1": 0.5}  # share of peers that solved
    against = bench.paired(records)["ilr"]["dynamic_only"]
    assert against["per_seed"] == pytest.approx({"0": -0.25, "1": 0.25})
    assert against["two_stage_bootstrap"]["seeds"] == 2
    with pytest.raises(ValueError, match="ilr seed 0: its policies were evaluated on different"):
        bench.seed_score(_record("ilr", 0, {"A": 1, "B": 1}, {"A": {"p0": 1}, "B": {"p9": 1}}))


def test_a_record_keeps_which_held_out_problems_a_policy_solved(tmp_path) -> None:
    from aipo_env.trajectory import Trajectory, write_jsonl
    from benchmarks.arm_runs import held_out_correct
    from tasks.base import RewardResult

    def sample(problem: str, correct: bool | None) -> Trajectory:
        verifier = None if correct is None else RewardResult(score=float(correct), correct=correct)
        return Trajectory(
            trajectory_id=f"eval-{problem}",
            problem_id=problem,
            task="test",
            group_id=problem,
            token_ids=[1, 2],
            prompt_len=1,
            source=["prompt", "policy"],
            loss_mask=[0, 1],
            behavior_logprobs=[None, -0.5],
            verifier=verifier,
            finish_reason="eos" if correct is not None else "error:policy",
        )

    path = tmp_path / "eval" / "after.jsonl"
    path.parent.mkdir()
    write_jsonl(path, [sample("3", True), sample("7", False), sample("9", None)])
    assert held_out_correct(path) == {"3": True, "7": False, "9": False}  # unscored: not solved
    assert held_out_correct(tmp_path / "eval" / "missing.jsonl") == {}
