"""benchmarks/seed_stats.py: arm comparisons with the seed as the unit of replication."""

from __future__ import annotations

import math

import pytest
from benchmark_script import load_script

stats = load_script("seed_stats")


def test_the_seed_t_interval_matches_a_hand_computation() -> None:
    # diffs 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t(0.975, 2) x 0.1 / sqrt(3).
    mean, low, high, n = stats.seed_paired_t([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)  # 0.248
    assert n == 3 and mean == pytest.approx(0.2)
    assert low == pytest.approx(0.2 - half) and high == pytest.approx(0.2 + half)
    assert half == pytest.approx(0.248, abs=5e-4)


def test_one_seed_gives_no_interval_not_a_zero_width_one() -> None:
    single = stats.seed_paired_t([0.4])
    assert single.mean == pytest.approx(0.4) and single.n == 1
    assert math.isnan(single.low) and math.isnan(single.high)
    two_stage = stats.two_stage_bootstrap([[0.0, 1.0, 0.0]], [[1.0, 1.0, 0.0]])
    assert two_stage.mean == pytest.approx(1 / 3)
    assert math.isnan(two_stage.low) and math.isnan(two_stage.high)
    line = stats.describe(stats.compare_over_seeds([[0.0, 1.0]], [[1.0, 1.0]], [0]))
    assert "+0.500, no interval (1 seed" in line
    assert "two-stage bootstrap: no interval (1 seed)" in line


def test_a_non_finite_seed_difference_is_refused_with_the_values() -> None:
    with pytest.raises(ValueError, match=r"finite; got \[0.1, nan\]"):
        stats.seed_paired_t([0.1, float("nan")])


def test_two_stage_is_wider_than_pairs_when_seeds_disagree_but_problems_agree() -> None:
    # Within a seed every problem moves by the same amount; the seeds disagree in sign.
    problems = 64
    base = [[0.5] * problems for _ in range(3)]
    arm = [[0.5 + d] * problems for d in (0.3, -0.2, 0.1)]
    comparison = stats.compare_over_seeds(base, arm, [0, 1, 2], pairs=True)
    two, pairs, t = (
        comparison["two_stage_bootstrap"],
        comparison["pairs_bootstrap"],
        comparison["seed_t"],
    )
    assert comparison["diff"] == pytest.approx(0.2 / 3) == pytest.approx(pairs["diff"])
    assert pairs["problems"] == 3 * problems
    width = {name: c["ci_high"] - c["ci_low"] for name, c in (("two", two), ("pairs", pairs))}
    assert width["two"] > 3 * width["pairs"]
    # The seeds alone carry the spread: the two-stage interval spans the seeds' mean
    # differences, the pairs interval excludes zero although one seed went the other way.
    assert two["ci_low"] < 0 < two["ci_high"] and pairs["ci_low"] > 0
    assert t["ci_low"] < two["ci_low"] and t["ci_high"] > two["ci_high"]


def test_the_two_stage_bootstrap_is_reproducible_and_keeps_problems_paired() -> None:
    # Both arms differ by exactly 0.25 on every problem: any resampling that keeps the
    # pairs gives 0.25, whatever the problems' own spread.
    base = [[0.0, 1.0, 0.5, 0.25], [1.0, 0.0, 0.75, 0.5]]
    arm = [[v + 0.25 for v in seed] for seed in base]
    result = stats.two_stage_bootstrap(base, arm, seed=3)
    assert result.low == pytest.approx(0.25) and result.high == pytest.approx(0.25)
    noisy = [[v + d for v, d in zip(seed, (0.1, -0.3, 0.4, 0.0), strict=True)] for seed in base]
    assert stats.two_stage_bootstrap(base, noisy) == stats.two_stage_bootstrap(base, noisy)


def test_the_arms_must_share_seeds_and_problems() -> None:
    with pytest.raises(ValueError, match="seed 1: the arms need the same problems"):
        stats.two_stage_bootstrap([[0.0], [0.0, 1.0]], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="for seeds"):
        stats.compare_over_seeds([[0.0]], [[1.0]], [0, 1])


def test_seed_means_alone_give_the_t_interval_and_say_why_no_bootstrap() -> None:
    comparison = stats.compare_over_seeds([0.5, 0.6, 0.4], [0.7, 0.7, 0.7], [0, 1, 2])
    assert comparison["per_seed"] == pytest.approx({"0": 0.2, "1": 0.1, "2": 0.3})
    assert comparison["two_stage_bootstrap"] is None
    line = stats.describe(comparison)
    assert line.startswith("+0.200 [-0.048, +0.448] (t over 3 seeds; per seed +0.200")
    assert "two-stage bootstrap n/a" in line
    with pytest.raises(ValueError, match="per-problem"):
        stats.compare_over_seeds([0.5], [0.7], [0], pairs=True)


def test_the_report_line_labels_the_pairs_bootstrap_as_secondary() -> None:
    base = [[0.0, 1.0], [0.0, 0.0]]
    arm = [[1.0, 1.0], [0.0, 1.0]]
    line = stats.describe(stats.compare_over_seeds(base, arm, [0, 1], pairs=True))
    t_part, two_part, pairs_part = line.split("; two-stage")[0], *line.split("; ")[-2:]
    assert t_part.startswith("+0.500 [") and "(t over 2 seeds" in t_part
    assert two_part.startswith("two-stage bootstrap [")
    assert pairs_part.startswith("pairs bootstrap, treats problems as independent: [")
    assert pairs_part.endswith("over 4 pairs")
    assert "as a secondary figure, the pairs bootstrap, treats problems as independent" in (
        stats.legend(pairs=True)
    )


def test_records_are_paired_on_shared_seeds_and_problem_ids() -> None:
    base = {0: {"p1": 0.0, "p2": 1.0}, 1: {"p1": 1.0, "p2": 1.0}, 2: {"p1": 0.0, "p2": 0.0}}
    arm = {0: {"p2": 1.0, "p1": 1.0}, 1: {"p1": 1.0, "p2": 0.0}}  # seed 2 did not run
    comparison = stats.compare_by_seed(base, arm)
    assert comparison["per_seed"] == pytest.approx({"0": 0.5, "1": -0.5})
    assert comparison["two_stage_bootstrap"]["seeds"] == 2
    # A record with the seed's accuracy only: the t-interval, no two-stage bootstrap.
    mixed = stats.compare_by_seed(base, {0: 0.75, 1: 0.5})
    assert mixed["per_seed"] == pytest.approx({"0": 0.25, "1": -0.5})
    assert mixed["two_stage_bootstrap"] is None
    assert stats.compare_by_seed(base, {5: 1.0}) is None
    with pytest.raises(ValueError, match=r"seed 0: the arms were scored on different problems"):
        stats.compare_by_seed(base, {0: {"p1": 1.0, "p3": 0.0}})
