"""Reward shaping and row selection in the embedded trainer, on hand-built trajectories."""

from __future__ import annotations

import pytest
import torch

from aipo_env.trajectory import Trajectory
from trainers.config import TrainConfig
from trainers.embedded import shaped_advantages


def trajectory(
    group: str, prompt_len: int, response_len: int, reward: float, finish: str = "eos"
) -> Trajectory:
    n = prompt_len + response_len
    return Trajectory(
        trajectory_id=f"{group}-{prompt_len}-{response_len}-{finish}",
        problem_id="p",
        task="t",
        group_id=group,
        token_ids=list(range(n)),
        prompt_len=prompt_len,
        source=["prompt"] * prompt_len + ["policy"] * response_len,
        loss_mask=[0] * prompt_len + [1] * response_len,
        behavior_logprobs=[None] * prompt_len + [-1.0] * response_len,
        reward=reward,
        finish_reason=finish,
    )


def advantages_of(rows: list[Trajectory], **train):
    """The trainer's advantages step under a config with these ``train`` settings."""
    config = TrainConfig(
        policy={"max_context": 128},
        env={"max_total_tokens": 100},
        train={"advantage": "dr_grpo", **train},
    )
    return shaped_advantages(rows, config)


def test_overlong_penalty_measures_the_response_against_the_context_left_after_the_prompt() -> None:
    # Budget = 100 - prompt_len; buffer 10: no penalty up to budget - 10, -1 at the budget.
    rows = [
        trajectory("g", prompt_len=20, response_len=70, reward=1.0),  # 70 <= 80 - 10: none
        trajectory("g", prompt_len=20, response_len=75, reward=1.0),  # 5 into the buffer: -0.5
        trajectory("h", prompt_len=40, response_len=60, reward=1.0),  # at its budget of 60: -1
        trajectory("h", prompt_len=40, response_len=45, reward=1.0),  # 45 <= 50: none
    ]
    advantages, keep, metrics = advantages_of(rows, overlong_buffer=10)
    shaped = torch.tensor([1.0, 0.5, 0.0, 1.0])
    expected = shaped - torch.tensor([0.75, 0.75, 0.5, 0.5])  # dr_grpo: minus the group mean
    assert torch.allclose(advantages, expected)
    assert metrics["overlong_penalty_mean"] == pytest.approx(-1.5 / 4)
    assert keep.all()


def test_failed_and_optionally_truncated_episodes_are_not_trained() -> None:
    rows = [
        trajectory("g", 5, 5, 1.0),
        trajectory("g", 5, 5, 0.0, finish="error:GenerationError"),
        trajectory("h", 5, 5, 1.0, finish="length"),
        trajectory("h", 5, 5, 0.0),
    ]
    _, keep, _ = advantages_of(rows)
    assert keep.tolist() == [True, False, True, True]
    _, keep, metrics = advantages_of(rows, mask_truncated=True)
    assert keep.tolist() == [True, False, False, True]
    assert metrics["trained_trajectories"] == 2.0


def test_dynamic_sampling_drops_groups_whose_rewards_are_all_equal() -> None:
    rows = [
        trajectory("g", 5, 5, 1.0),
        trajectory("g", 5, 5, 1.0),
        trajectory("h", 5, 5, 1.0),
        trajectory("h", 5, 5, 0.0),
    ]
    _, keep, metrics = advantages_of(rows, dynamic_sampling=True)
    assert keep.tolist() == [False, False, True, True]
    assert metrics["groups_dropped"] == 1.0
