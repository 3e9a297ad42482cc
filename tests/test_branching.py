"""ARPO's branching building blocks: normalised entropy, the branching rule, the leaf budget."""

from __future__ import annotations

import math
import random

import pytest

from aipo_env.branching import BranchBudget, normalized_entropy, should_branch

V = 49152


def test_uniform_top_k_has_entropy_log_k_over_log_vocab() -> None:
    for k in (2, 10):
        position = [math.log(1 / k)] * k
        assert normalized_entropy([position] * 5, V) == pytest.approx(math.log(k) / math.log(V))


def test_one_hot_has_zero_entropy_and_impossible_tokens_count_nothing() -> None:
    assert normalized_entropy([[0.0, -math.inf, -math.inf]] * 3, V) == 0.0


def test_entropy_is_the_mean_over_positions_of_raw_top_probabilities() -> None:
    # Position 1: p = (0.5, 0.25) -> 0.5 ln 2 + 0.25 ln 4 = ln 2, not renormalised.
    # Position 2: p = (0.9,) -> -0.9 ln 0.9.
    top = [[math.log(0.5), math.log(0.25)], [math.log(0.9)]]
    expected = (math.log(2) - 0.9 * math.log(0.9)) / 2 / math.log(100)
    assert normalized_entropy(top, 100) == pytest.approx(expected)


def test_entropy_reads_only_the_first_k_positions() -> None:
    calm, unsure = [0.0], [math.log(0.5)] * 2
    top = [calm] * 3 + [unsure] * 10
    assert normalized_entropy(top, V, k=3) == 0.0
    assert normalized_entropy(top, V, k=4) == pytest.approx(math.log(2) / 4 / math.log(V))
    assert normalized_entropy([], V) == 0.0


@pytest.mark.parametrize("vocab_size, k", [(1, 20), (V, 0)])
def test_entropy_refuses_a_degenerate_vocabulary_or_window(vocab_size: int, k: int) -> None:
    with pytest.raises(ValueError, match="vocab_size|k "):
        normalized_entropy([[0.0]], vocab_size, k=k)


@pytest.mark.parametrize("dh", [0.0, 0.8, -1.5, 3.0])
def test_should_branch_follows_the_rule_on_the_same_draws(dh: float) -> None:
    draws = random.Random(7)
    expected = [not min(1.0, max(0.0, draws.random() - 0.2 * dh)) > 0.5 for _ in range(2000)]
    rng = random.Random(7)
    got = [should_branch(rng, dh) for _ in range(2000)]
    assert got == expected


def test_zero_entropy_change_branches_exactly_when_the_draw_is_at_most_one_half() -> None:
    rng, check = random.Random(3), random.Random(3)
    decisions = [should_branch(rng, 0.0) for _ in range(1000)]
    assert decisions == [check.random() <= 0.5 for _ in range(1000)]
    assert 0 < sum(decisions) < 1000


@pytest.mark.parametrize(
    ("dh", "chance"), [(-5.0, 0.0), (-1.0, 0.3), (0.0, 0.5), (0.5, 0.6), (1.0, 0.7), (4.0, 1.0)]
)
def test_branch_frequency_is_the_clipped_chance(dh: float, chance: float) -> None:
    # clip(p + w * dH, 0, 1) with the defaults p = 0.5, w = 0.2
    n = 20000
    rng = random.Random(11)
    freq = sum(should_branch(rng, dh) for _ in range(n)) / n
    assert freq == pytest.approx(chance, abs=0.015)


def test_higher_entropy_change_branches_at_least_as_often_on_every_draw() -> None:
    low, high = random.Random(5), random.Random(5)
    for _ in range(2000):
        assert should_branch(high, 1.0) >= should_branch(low, 0.2)


def test_branch_probability_one_always_branches() -> None:
    rng = random.Random(0)
    assert all(should_branch(rng, -10.0, branch_probability=1.0) for _ in range(200))
    with pytest.raises(ValueError, match="branch_probability 1.5"):
        should_branch(rng, 0.0, branch_probability=1.5)


def test_budget_never_exceeds_its_leaves_and_fills_to_exactly_n() -> None:
    rng = random.Random(2)
    for _ in range(200):
        n = rng.randint(1, 16)
        budget = BranchBudget(leaves=n, initial=rng.randint(1, n))
        leaves = budget.initial
        for _ in range(rng.randint(0, 10)):
            granted = budget.take(rng.randint(0, 3))
            leaves += granted
            assert 0 <= granted and leaves <= n and budget.room() == n - leaves
        leaves += budget.fill()
        assert leaves == n and budget.room() == 0
        assert budget.take(1) == 0 and budget.fill() == 0


def test_budget_grants_what_is_left() -> None:
    budget = BranchBudget(leaves=8, initial=4)
    assert (budget.room(), budget.take(1), budget.take(2), budget.take(5)) == (4, 1, 2, 1)
    assert budget.room() == 0


@pytest.mark.parametrize("leaves, initial", [(4, 5), (4, 0)])
def test_budget_refuses_more_initial_samples_than_leaves_or_none(leaves: int, initial: int) -> None:
    with pytest.raises(ValueError, match=f"initial samples {initial}"):
        BranchBudget(leaves=leaves, initial=initial)
    with pytest.raises(ValueError, match="n >= 0"):
        BranchBudget(leaves=4, initial=2).take(-1)
