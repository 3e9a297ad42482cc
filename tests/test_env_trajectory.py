"""Trajectory records: validation, JSONL round trips, collation, rendering."""

from __future__ import annotations

import math

import pytest
import torch

from aipo_env import sources
from aipo_env.batch import collate
from aipo_env.masks import MaskRule
from aipo_env.show import render_trajectory
from aipo_env.sources import CODE_AGENT_BASE, CODE_ENV, CODE_POLICY, CODE_PROMPT
from aipo_env.trajectory import (
    ConsultRecord,
    Trajectory,
    TrajectoryWriter,
    Turn,
    read_jsonl,
    write_jsonl,
)
from tasks.base import RewardResult


def make_trajectory(tid: str = "t0", reward: float = 1.0) -> Trajectory:
    return Trajectory(
        trajectory_id=tid,
        problem_id="p",
        task="test",
        group_id="g",
        token_ids=[5, 6, 7, 8, 9, 10, 11],
        prompt_len=2,
        source=["prompt", "prompt", "policy", "env", "agent:knowledge", "env", "policy"],
        loss_mask=[0, 0, 1, 0, 0, 0, 1],
        behavior_logprobs=[None, None, -0.5, None, -1.25, None, float("-inf")],
        turns=[
            Turn(
                index=0,
                policy_start=2,
                policy_end=3,
                feedback_start=3,
                feedback_end=6,
                consult=ConsultRecord(agent="knowledge", question="q?", latency_s=0.3),
            ),
            Turn(index=1, policy_start=6, policy_end=7),
        ],
        reward=reward,
        verifier=RewardResult(score=reward, correct=True, extracted="3", details={"a": [1]}),
        finish_reason="eos",
        consults=1,
    )


def test_misaligned_lists_are_rejected() -> None:
    data = make_trajectory().model_dump()
    data["loss_mask"] = data["loss_mask"][:-1]
    with pytest.raises(ValueError, match="loss_mask has 6 entries for 7 tokens"):
        Trajectory(**data)


def test_jsonl_round_trip_is_lossless(tmp_path) -> None:
    records = [make_trajectory("a"), make_trajectory("b", 0.0)]
    path = tmp_path / "t.jsonl"
    assert write_jsonl(path, records) == 2
    back = read_jsonl(path)
    assert back == records
    assert back[0].behavior_logprobs[-1] == float("-inf")
    assert {t.trajectory_id for t in back} == {"a", "b"}


def test_torn_last_line_is_skipped(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryWriter(path) as writer:
        writer.write(make_trajectory("a"))
    with path.open("a") as f:
        f.write('{"trajectory_id": "b", "tok')
    assert [t.trajectory_id for t in read_jsonl(path)] == ["a"]


def test_collate_pads_and_codes_sources() -> None:
    long = make_trajectory("a")
    short = long.model_copy(
        update={
            "trajectory_id": "b",
            "group_id": "h",
            "token_ids": [1, 2, 3],
            "source": ["prompt", "policy", "policy"],
            "loss_mask": [0, 1, 1],
            "behavior_logprobs": [None, -0.1, -0.2],
            "reward": 0.0,
        }
    )
    batch = collate([long, short], pad_token_id=99)
    assert batch.input_ids.shape == (2, 7)
    assert batch.input_ids[1].tolist() == [1, 2, 3, 99, 99, 99, 99]
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    knowledge = CODE_AGENT_BASE + 1
    assert sources.source_codes(long.source, ("verify", "knowledge", "reasoning")) == [
        CODE_PROMPT,
        CODE_PROMPT,
        CODE_POLICY,
        CODE_ENV,
        knowledge,
        CODE_ENV,
        CODE_POLICY,
    ]
    assert batch.agent_mask[0].tolist() == [False] * 4 + [True, False, False]
    assert batch.loss_mask[0].tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert math.isnan(batch.behavior_logprobs[0, 0]) and math.isnan(batch.behavior_logprobs[1, 5])
    assert batch.behavior_logprobs[0, 4].item() == pytest.approx(-1.25)
    assert batch.prompt_lens.tolist() == [2, 2]
    assert batch.rewards.tolist() == [1.0, 0.0]
    assert batch.group_ids == ["g", "h"]


def test_collate_can_train_agent_tokens_and_rejects_unknown_agents() -> None:
    t = make_trajectory()
    batch = collate([t], pad_token_id=0, rule=MaskRule(train_injected=True))
    assert batch.loss_mask[0, 4].item() == 1.0 and batch.loss_mask[0, 3].item() == 0.0
    with pytest.raises(ValueError, match="agent:knowledge"):
        collate([t], pad_token_id=0, agent_names=("verify",))
    assert batch.input_ids.dtype == torch.long


def test_render_labels_segments(tokenizer) -> None:
    text = render_trajectory(make_trajectory(), tokenizer, color=False)
    assert "[agent:knowledge · 1 tok · loss mask 0/1]" in text
    assert "finish=eos" in text
