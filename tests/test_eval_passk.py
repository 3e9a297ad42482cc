"""pass@k estimator, aggregation, bootstrap intervals and run comparison."""

from __future__ import annotations

import itertools
from math import comb

import pytest

from aipo_env.passk import (
    AVG_KEY,
    aggregate,
    bootstrap_ci,
    check_ks,
    compare,
    default_ks,
    format_comparison,
    metrics_with_ci,
    overall,
    pass_at_k,
    problem_metrics,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - comb(3, 2) / comb(5, 2)),  # 1 - 3/10
        (5, 2, 3, 1 - comb(3, 3) / comb(5, 3)),  # 1 - 1/10
        (5, 2, 5, 1.0),
        (5, 0, 1, 0.0),
        (5, 0, 5, 0.0),
        (5, 5, 1, 1.0),
        (5, 5, 5, 1.0),
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_matches_closed_form(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_subset_enumeration() -> None:
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_stable_for_large_n() -> None:
    # The binomials here overflow floats; the product form does not.
    value = pass_at_k(2000, 3, 1000)
    assert value == pytest.approx(1 - comb(1997, 1000) / comb(2000, 1000), rel=1e-9)


def test_k_above_n_names_the_values() -> None:
    with pytest.raises(ValueError, match=r"k=8.*n=4"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match=r"k=8.*n=4"):
        check_ks(4, [1, 2, 8])
    with pytest.raises(ValueError, match="k=3"):
        problem_metrics([True, False], [1, 3])


def test_default_ks_are_powers_of_two_and_n() -> None:
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]


def test_problem_metrics_and_aggregate() -> None:
    p1 = problem_metrics([True, False, False, False], [1, 2, 4])
    p2 = problem_metrics([True, True, True, True], [1, 2, 4])
    assert p1 == pytest.approx({AVG_KEY: 0.25, "pass@1": 0.25, "pass@2": 0.5, "pass@4": 1.0})
    agg = aggregate([p1, p2])
    assert agg["pass@1"] == pytest.approx(0.625)
    assert agg["pass@2"] == pytest.approx(0.75)
    assert overall({"a": {"pass@1": 0.2, "pass@8": 0.9}, "b": {"pass@1": 0.6}}) == {
        "pass@1": pytest.approx(0.4)
    }


def test_bootstrap_ci_contains_estimate_and_is_seeded() -> None:
    values = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75, 1.0, 0.0, 0.5]
    mean = sum(values) / len(values)
    low, high = bootstrap_ci(values, seed=7)
    assert low <= mean <= high
    assert low < high
    assert bootstrap_ci(values, seed=7) == (low, high)
    assert bootstrap_ci(values, seed=8) != (low, high)
    ci = metrics_with_ci([{"pass@1": v} for v in values], seed=7)
    assert ci["pass@1"] == pytest.approx({"mean": mean, "ci_low": low, "ci_high": high})


def _results(correct_by_problem: dict[str, list[bool]]) -> dict:
    return {
        "tasks": {
            "math": {
                "problems": [
                    {"id": pid, "samples": [{"correct": c} for c in corr]}
                    for pid, corr in correct_by_problem.items()
                ]
            }
        }
    }


def test_compare_finds_a_known_difference_on_shared_problems() -> None:
    # A solves 10 of 40 problems, B solves 30; both runs have 2 samples each.
    ids = [f"p{i}" for i in range(40)]
    a = _results({pid: [i < 10, i < 10] for i, pid in enumerate(ids)})
    b = _results({pid: [i < 30, i < 30] for i, pid in enumerate(ids)})
    # A problem only B has must not count.
    b["tasks"]["math"]["problems"].append({"id": "extra", "samples": [{"correct": False}] * 2})
    diffs = compare(a, b, seed=3)
    d = diffs["math"]["pass@1"]
    assert d["problems"] == 40
    assert d["a"] == pytest.approx(0.25)
    assert d["b"] == pytest.approx(0.75)
    assert d["diff"] == pytest.approx(0.5)
    assert 0.0 < d["ci_low"] <= 0.5 <= d["ci_high"] < 1.0
    assert set(diffs["math"]) == {AVG_KEY, "pass@1", "pass@2"}
    assert compare(a, b, seed=3) == diffs
    text = format_comparison(diffs)
    assert "math" in text and "+0.5000" in text


def test_compare_identical_runs_is_zero() -> None:
    a = _results({"x": [True, False], "y": [False, False], "z": [True, True]})
    diffs = compare(a, a)
    for d in diffs["math"].values():
        assert d["diff"] == 0.0 and d["ci_low"] == 0.0 and d["ci_high"] == 0.0


def test_wilson_interval_matches_the_textbook_values() -> None:
    from aipo_env.passk import wilson_interval

    low, high = wilson_interval(1, 96)  # R: prop.test(1, 96, correct = FALSE)$conf.int
    assert low == pytest.approx(0.00184, abs=1e-4) and high == pytest.approx(0.0567, abs=1e-4)
    assert wilson_interval(0, 96)[0] == 0.0 and wilson_interval(0, 96)[1] > 0.03
    assert wilson_interval(96, 96)[1] == 1.0
    with pytest.raises(ValueError, match="3 of 2"):
        wilson_interval(3, 2)
