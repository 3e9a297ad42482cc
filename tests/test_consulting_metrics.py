"""Learning when to consult: the per-consult cost in the reward, and the metrics that show it."""

from __future__ import annotations

import json

import pytest
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator

from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from aipo_env.trajectory import ConsultRecord, Trajectory, Turn
from tasks.base import RewardResult
from trainers.consulting import (
    agent_coef_summary,
    consulting_metrics,
    consulting_summary,
    difficulty_bucket,
)
from trainers.summary import TrainSummary, summarize

EOS = "<|im_end|>"
ASK = '<consult agent="reasoning">hint?</consult>'


# -- the consult cost ------------------------------------------------------------------------


async def _reward(tokenizer, config: EnvConfig, script: list[str]) -> Trajectory:
    task = AdditionTask(1)
    env = ConsultEnv(task, ScriptedAgents({"reasoning": "Add the ones."}), tokenizer, config)
    return await run_episode(env, ScriptedGenerator(tokenizer, script), {"problem_index": 0})


async def test_each_consult_the_policy_wrote_costs_consult_cost(tokenizer) -> None:
    right = f"\\boxed{{{AdditionTask(1).problems[0].reference}}}{EOS}"
    # Two consults written, the second refused by the budget: both cost. 1 - 2 * 0.25 = 0.5.
    t = await _reward(tokenizer, EnvConfig(consult_cost=0.25, max_consults=1), [ASK, ASK, right])
    assert t.consult_attempts == 2 and t.consults == 1
    assert t.verifier.score == 1.0 and t.reward == pytest.approx(0.5)
    # A wrong answer after one consult: 0 - 0.25.
    t = await _reward(tokenizer, EnvConfig(consult_cost=0.25), [ASK, f"\\boxed{{-1}}{EOS}"])
    assert t.reward == pytest.approx(-0.25)
    # The env's auto consult is free; the policy's own one is not: 1 - 0.25.
    config = EnvConfig(consult_cost=0.25, auto_consult="reasoning", max_consults=2)
    t = await _reward(tokenizer, config, [ASK, right])
    assert t.consults == 2 and t.reward == pytest.approx(0.75)
    # Default: consulting is free.
    t = await _reward(tokenizer, EnvConfig(), [ASK, right])
    assert t.reward == 1.0


async def test_evaluation_alone_pays_no_consult_cost(tokenizer) -> None:
    right = f"{ASK} \\boxed{{{AdditionTask(1).problems[0].reference}}}{EOS}"
    config = EnvConfig(consult_cost=0.25, mode="independent")
    t = await _reward(tokenizer, config, [right])
    assert t.consult_attempts == 1 and t.reward == 1.0


def test_consult_cost_cannot_be_negative() -> None:
    with pytest.raises(ValueError, match="consult_cost"):
        EnvConfig(consult_cost=-0.1)


# -- hand-made trajectories --------------------------------------------------------------------


def episode(
    group: str,
    correct: bool,
    *,
    allowed: bool = True,
    wrote: int = 0,
    answered: int = 0,
    finish: str = "eos",
    leak: str | None = None,
) -> Trajectory:
    """One episode of ``group``: ``wrote`` consult tags by the policy, ``answered`` agent replies."""
    turns = [
        Turn(index=j, policy_start=1, policy_end=2, consult=ConsultRecord(agent="reasoning"))
        for j in range(answered)
    ]
    if leak is not None:
        turns.append(
            Turn(
                index=len(turns),
                policy_start=1,
                policy_end=2,
                consult=ConsultRecord(agent="reasoning", error="agent ... withheld", leak=leak),
            )
        )
    return Trajectory(
        trajectory_id=f"{group}-{len(group)}-{correct}-{wrote}-{answered}",
        problem_id=group,
        task="test",
        group_id=group,
        token_ids=[1, 2],
        prompt_len=1,
        source=["prompt", "policy"],
        loss_mask=[0, 1],
        behavior_logprobs=[None, -0.5],
        turns=turns,
        reward=float(correct),
        verifier=None
        if finish.startswith("error:")
        else RewardResult(score=float(correct), correct=correct),
        finish_reason=finish,
        error="boom" if finish.startswith("error:") else None,
        allow_consult=allowed,
        consults=answered,
        consult_attempts=wrote,
    )


@pytest.mark.parametrize(
    ("rate", "bucket"),
    [(0.0, "unsolved"), (0.25, "hard"), (0.5, "hard"), (0.75, "easy"), (1.0, "solved")],
)
def test_difficulty_buckets_by_solve_rate(rate: float, bucket: str) -> None:
    assert difficulty_bucket(rate) == bucket


def test_consult_rate_by_difficulty_counts_the_policys_own_consults_among_allowed_episodes() -> (
    None
):
    step = [
        # unsolved (0/4): of 3 allowed, 2 wrote a consult; the one not allowed does not count.
        episode("u", False, wrote=1, answered=1),
        episode("u", False, wrote=2, answered=1),
        episode("u", False),
        episode("u", False, allowed=False, wrote=1),
        # hard (1/2): an auto consult (answered, not written) is not the policy's choice.
        episode("h", True, answered=1),
        episode("h", False, wrote=1, answered=1),
        # easy (2/3)
        episode("e", True),
        episode("e", True),
        episode("e", False),
        # an episode that ended in error has no verdict: left out (the group stays solved).
        episode("s", True),
        episode("s", False, wrote=1, finish="error:GenerationError"),
    ]
    metrics = consulting_metrics(step)
    assert metrics["consult_rate/unsolved"] == pytest.approx(2 / 3)
    assert metrics["consult_rate/hard"] == pytest.approx(1 / 2)
    assert metrics["consult_rate/easy"] == 0.0
    assert metrics["consult_rate/solved"] == 0.0


def test_dependency_gap_compares_episodes_with_agent_replies_with_the_same_problems_alone() -> None:
    step = [
        # group a: with replies 2/2 correct, alone 1/2: +0.5
        episode("a", True, answered=1),
        episode("a", True, answered=1),
        episode("a", False, allowed=False),
        episode("a", True, allowed=False),
        # group b: with replies 0/1, alone 1/3: -1/3 (one alone episode may consult but did not)
        episode("b", False, answered=1),
        episode("b", False),
        episode("b", False, allowed=False),
        episode("b", True, allowed=False),
        # group c: every episode got replies: no pair, left out.
        episode("c", True, answered=1),
        episode("c", False, answered=2),
    ]
    metrics = consulting_metrics(step)
    assert metrics["dependency_gap"] == pytest.approx((0.5 - 1 / 3) / 2)
    assert metrics["dependency_gap/groups"] == 2
    # By the schedule's assignment: a: 1 - 0.5; b: 0/2 - 1/2; c has no episode kept alone.
    assert metrics["dependency_gap/allowed"] == pytest.approx((0.5 - 0.5) / 2)


def test_no_pairs_no_gap_and_no_answered_consults_no_leak_rate() -> None:
    metrics = consulting_metrics([episode("a", True), episode("a", False)])
    assert "dependency_gap" not in metrics and "agents/leak_rate" not in metrics
    assert metrics["consult_rate/hard"] == 0.0


def test_leak_rate_is_the_share_of_answered_consults_the_guard_acted_on() -> None:
    step = [
        episode("a", True, answered=2),
        episode("a", True, answered=1, leak="rewritten"),
        episode("a", False, leak="blocked"),
    ]
    # 3 plain replies + 1 rewritten + 1 blocked answered; 2 of 5 leaked.
    assert consulting_metrics(step)["agents/leak_rate"] == pytest.approx(2 / 5)


# -- the run's summary -------------------------------------------------------------------------


def test_agent_coefficient_summary_uses_the_steps_that_trained_agent_tokens() -> None:
    records = [
        {"update/agent/coef_mean": 0.6, "update/agent/coef_min": 0.2, "update/agent/coef_max": 0.9},
        {"update/agent/coef_mean": 0.0, "update/agent/coef_min": 0.0, "update/agent/coef_max": 0.0},
        {
            "update/agent/coef_mean": 0.8,
            "update/agent/coef_min": 0.4,
            "update/agent/coef_max": 0.95,
        },
    ]
    assert agent_coef_summary(records) == pytest.approx({"mean": 0.7, "min": 0.2, "max": 0.95})
    assert agent_coef_summary(records[1:2]) == {}


def test_the_summary_reports_consulting_and_agent_coefficients(tmp_path) -> None:
    records = [
        {"step": 1, "reward_mean": 0.5, "consult_rate": 0.5, "dependency_gap": 0.4,
         "consult_rate/hard": 1.0, "agents/leak_rate": 0.0,
         "update/agent/coef_mean": 0.5, "update/agent/coef_min": 0.1, "update/agent/coef_max": 0.9},
        {"step": 2, "reward_mean": 0.6, "consult_rate": 0.25, "dependency_gap": 0.2,
         "consult_rate/unsolved": 0.5, "agents/leak_rate": 0.5,
         "update/agent/coef_mean": 0.7, "update/agent/coef_min": 0.3, "update/agent/coef_max": 0.8},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert consulting_summary(records) == pytest.approx(
        {"consult_rate/unsolved": 0.5, "consult_rate/hard": 1.0, "dependency_gap": 0.3,
         "agents/leak_rate": 0.25}
    )  # fmt: skip
    summary = summarize(
        tmp_path, steps=2, eval_before=None, eval_after=None, checkpoint=None,
        skipped_updates=0, plot=False, started=0.0,
    )  # fmt: skip
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["consulting"]["dependency_gap"] == pytest.approx(0.3)
    assert written["agent_coef"] == pytest.approx({"mean": 0.6, "min": 0.1, "max": 0.9})
    text = TrainSummary.render(summary)
    assert "dependency_gap 0.300" in text and "agent coef" in text
