"""Group advantages, dynamic sampling and overlong shaping against hand computation and OpenRLHF."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from trainers.advantages import (
    ESTIMATORS,
    compute_advantages,
    filter_uniform_groups,
    overlong_penalty,
)

# Group a (rows 0, 2, 4): rewards 1, 2, 0.  Group b (rows 1, 3, 5, 6): rewards 0, 0, 1, 3.
REWARDS = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 3.0], dtype=torch.float64)
GROUPS = ["a", "b", "a", "b", "a", "b", "b"]
S2 = math.sqrt(2.0)

HAND = {
    # a: mean 1, unbiased std sqrt((0 + 1 + 1) / 2) = 1; b: mean 1, std sqrt((1 + 1 + 0 + 4) / 3)
    "grpo": [0.0, -1 / S2, 1.0, -1 / S2, -1.0, 0.0, 2 / S2],
    "dr_grpo": [0.0, -1.0, 1.0, -1.0, -1.0, 0.0, 2.0],
    # a: sum 3, baseline (3 - R) / 2; b: sum 4, baseline (4 - R) / 3
    "rloo": [1 - 1.0, 0 - 4 / 3, 2 - 0.5, 0 - 4 / 3, 0 - 1.5, 1 - 1.0, 3 - 1 / 3],
    # dr_grpo values have batch mean 0 and biased variance (0+1+1+1+1+0+4)/7 = 8/7
    "reinforce_baseline": [v / math.sqrt(8 / 7) for v in [0.0, -1.0, 1.0, -1.0, -1.0, 0.0, 2.0]],
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_match_hand_computation(estimator: str) -> None:
    adv = compute_advantages(REWARDS, GROUPS, estimator, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor(HAND[estimator], dtype=torch.float64))


def test_grpo_eps_is_added_to_the_std() -> None:
    adv = compute_advantages(REWARDS, GROUPS, "grpo")
    assert adv[2].item() == pytest.approx(1.0 / (1.0 + 1e-6), rel=1e-12)


def test_integer_group_ids_give_the_same_advantages() -> None:
    ids = torch.tensor([7, 3, 7, 3, 7, 3, 3])
    for estimator in ESTIMATORS:
        torch.testing.assert_close(
            compute_advantages(REWARDS, ids, estimator),
            compute_advantages(REWARDS, GROUPS, estimator),
        )


def _openrlhf_group_estimator(rewards: torch.Tensor, n: int, estimator: str) -> torch.Tensor:
    """The lines of OpenRLHF 0.11.2 ``experience_maker.py`` for grouped, contiguous rewards."""
    rewards = rewards.reshape(-1, n)
    if estimator == "rloo":
        baseline = (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
        rewards = rewards - baseline
    elif estimator in ["reinforce_baseline", "dr_grpo"]:
        rewards = rewards - rewards.mean(-1, keepdim=True)
    elif estimator == "group_norm":
        rewards = (rewards - rewards.mean(-1, keepdim=True)) / (
            rewards.std(-1, keepdim=True) + 1e-9
        )
    return rewards.reshape(-1)


def _openrlhf_whiten(advantages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's whitening over action tokens (each row repeated once per response token)."""
    all_advantages = torch.repeat_interleave(advantages, lengths)
    mean = all_advantages.sum() / lengths.sum()
    var = ((all_advantages - mean).pow(2)).sum() / lengths.sum()
    return (advantages - mean) * var.clamp(min=1e-8).rsqrt()


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("grpo", "group_norm"), ("dr_grpo", "dr_grpo"), ("rloo", "rloo"), ("reinforce_baseline", "x")],
)
def test_estimators_match_openrlhf_formulas_on_shuffled_groups(ours: str, theirs: str) -> None:
    gen = torch.Generator().manual_seed(0)
    n, groups = 8, 5
    rewards = (torch.rand(groups * n, generator=gen, dtype=torch.float64) < 0.4).double()
    rewards += torch.rand(groups * n, generator=gen, dtype=torch.float64) * 0.1
    lengths = torch.randint(1, 50, (groups * n,), generator=gen)
    perm = torch.randperm(groups * n, generator=gen)
    ids = [f"prompt-{i // n}" for i in range(groups * n)]
    shuffled_ids = [ids[i] for i in perm.tolist()]

    if ours == "reinforce_baseline":
        expected = _openrlhf_whiten(_openrlhf_group_estimator(rewards, n, "dr_grpo"), lengths)
        got = compute_advantages(
            rewards[perm], shuffled_ids, ours, token_weights=lengths[perm].double()
        )
    else:
        expected = _openrlhf_group_estimator(rewards, n, theirs)
        got = compute_advantages(rewards[perm], shuffled_ids, ours, eps=1e-9)
    torch.testing.assert_close(got, expected[perm])


def test_unknown_estimator_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown advantage estimator 'grpoo'.*grpo, dr_grpo, rloo"
    ):
        compute_advantages(REWARDS, GROUPS, "grpoo")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_groups_of_one_are_rejected(estimator: str) -> None:
    with pytest.raises(ValueError, match=r"at least 2 rollouts per group.*\['c'\]"):
        compute_advantages(torch.tensor([1.0, 0.0, 1.0]), ["a", "a", "c"], estimator)


def test_mismatched_lengths_and_non_finite_rewards_are_rejected() -> None:
    with pytest.raises(ValueError, match="3 group ids for 2 rewards"):
        compute_advantages(torch.tensor([1.0, 0.0]), ["a", "a", "b"])
    with pytest.raises(ValueError, match="rewards must be finite"):
        compute_advantages(torch.tensor([1.0, float("nan")]), ["a", "a"])


def test_filter_uniform_groups_drops_all_equal_groups() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 0.0])
    ids = ["solved", "failed", "solved", "failed", "mixed", "mixed", "single"]
    result = filter_uniform_groups(rewards, ids)
    assert result.keep_mask.tolist() == [False, False, False, False, True, True, False]
    assert result.kept_indices.tolist() == [4, 5]
    assert (result.n_groups, result.n_groups_kept, result.n_groups_dropped) == (4, 1, 3)


def test_filter_uniform_groups_tolerance_and_tensor_ids() -> None:
    rewards = torch.tensor([1.0, 1.0 + 1e-4, 0.0, 1.0])
    ids = torch.tensor([0, 0, 1, 1])
    assert filter_uniform_groups(rewards, ids).kept_indices.tolist() == [0, 1, 2, 3]
    assert filter_uniform_groups(rewards, ids, atol=1e-3).kept_indices.tolist() == [2, 3]


def test_overlong_penalty_values_at_the_boundaries() -> None:
    # max 100, buffer 20: free up to 80, linear in (80, 100], -factor beyond.
    lengths = [0, 80, 81, 90, 99, 100, 130]
    got = overlong_penalty(lengths, max_len=100, buffer_len=20, factor=0.5)
    expected = [0.0, 0.0, -0.5 / 20, -0.5 * 10 / 20, -0.5 * 19 / 20, -0.5, -0.5]
    torch.testing.assert_close(got, torch.tensor(expected))


def test_overlong_penalty_equals_openrlhf_length_penalty() -> None:
    length_penalty = importlib.import_module("openrlhf.trainer.ppo_utils.length_penalty")
    lengths = torch.tensor([10, 70, 75, 88, 96, 100, 101, 150])
    experience = SimpleNamespace(response_length=lengths, rewards=torch.zeros(len(lengths)))
    length_penalty.apply_overlong_penalty([experience], 100, 30, 0.7)
    got = overlong_penalty(lengths, max_len=100, buffer_len=30, factor=0.7)
    torch.testing.assert_close(got, experience.rewards)


@pytest.mark.parametrize("buffer_len", [0, 101])
def test_overlong_penalty_rejects_bad_buffer(buffer_len: int) -> None:
    with pytest.raises(ValueError, match=r"buffer_len must be in \(0, max_len=100\]"):
        overlong_penalty([10], max_len=100, buffer_len=buffer_len)
