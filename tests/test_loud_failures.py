"""Failures that must not look like success: error rates by kind, thresholds, backend probes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scripted import AdditionTask, ScriptedGenerator

from agents.llm_agent import probe_backend
from agents.pool import AgentPool, AgentPoolConfig
from aipo_env.trajectory import ConsultRecord, Trajectory, Turn
from policies.base import Generation
from trainers.config import TrainSection
from trainers.stopping import failure_reason
from trainers.summary import TrainSummary, consult_error_kind, error_summary, rollout_metrics


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("agent 'verify' timed out after 60.0 s", "timeout"),
        ("agent 'verify' could not answer: agent 'verify': timeout after 30.0 s", "timeout"),
        ("agent 'knowledge' failed (RuntimeError)", "agent_error"),
        (
            "agent 'knowledge' could not answer: agent 'knowledge' failed: GenerationError: "
            "server down (gave up after 2 attempts)",
            "agent_error",
        ),
        ("agent 'verify' returned str, expected AgentReply", "agent_error"),
        ("malformed consult: no closing </consult> tag", "malformed"),
        ("unknown agent 'verfy'; expected one of verify, knowledge", "unknown_agent"),
        (
            "agent 'verify' could not answer: empty question for agent 'verify'; write the question",
            "empty_question",
        ),
        ("consult budget of 2 exhausted; continue on your own", "budget"),
        ("consulting is not available in this episode; continue on your own", "unavailable"),
        ("no agents are available; continue on your own", "unavailable"),
        ("something new", "other"),
    ],
)
def test_consult_errors_are_classified_by_who_failed(message: str, kind: str) -> None:
    assert consult_error_kind(message) == kind


def _trajectory(i: int, finish: str = "eos", consults: list[str | None] = ()) -> Trajectory:
    turns = [
        Turn(index=j, policy_start=1, policy_end=2, consult=ConsultRecord(agent="verify", error=e))
        for j, e in enumerate(consults)
    ]
    return Trajectory(
        trajectory_id=f"t{i}",
        problem_id="p",
        task="test",
        group_id="g",
        token_ids=[1, 2],
        prompt_len=1,
        source=["prompt", "policy"],
        loss_mask=[0, 1],
        behavior_logprobs=[None, -0.5],
        turns=turns,
        finish_reason=finish,
        error="boom" if finish.startswith("error:") else None,
    )


STEP = [
    _trajectory(0, "error:GenerationError"),
    _trajectory(1, "error:env_ValueError"),
    _trajectory(2, consults=[None, "agent 'verify' timed out after 60.0 s"]),
    _trajectory(3, consults=["malformed consult: no closing </consult> tag", None]),
]


def test_rollout_metrics_report_error_rates_by_kind() -> None:
    metrics = rollout_metrics(STEP)
    assert metrics["finish_error"] == 0.5
    assert metrics["errors/GenerationError"] == 0.25
    assert metrics["errors/env_ValueError"] == 0.25
    assert metrics["consult_errors/timeout"] == 0.25  # of the 4 consults
    assert metrics["consult_errors/malformed"] == 0.25
    # 2 answered, 1 timed out; the malformed one never reached an agent.
    assert metrics["agent_error_rate"] == pytest.approx(1 / 3)


def test_failure_reason_names_the_threshold_passed_and_the_first_error() -> None:
    metrics = rollout_metrics(STEP)
    assert failure_reason(STEP, metrics, TrainSection()) is None  # 50% is not above 0.5
    reason = failure_reason(STEP, metrics, TrainSection(max_error_rate=0.4))
    assert reason is not None
    assert "50% of its trajectories ended in error" in reason
    assert "GenerationError 25%, env_ValueError 25%" in reason
    assert "train.max_error_rate=0.4" in reason and "error:GenerationError: boom" in reason
    reason = failure_reason(STEP, metrics, TrainSection(max_agent_error_rate=0.3))
    assert reason is not None
    assert "33% of the consults that reached an agent failed" in reason
    assert "train.max_agent_error_rate=0.3" in reason and "timed out after 60.0 s" in reason
    assert failure_reason(STEP, metrics, TrainSection(max_error_rate=0.0)) is not None
    assert (
        failure_reason(STEP, metrics, TrainSection(max_error_rate=1, max_agent_error_rate=1))
        is None
    )


def test_the_summary_shows_the_failure_rates_of_the_run() -> None:
    records = [
        {"step": 1, "finish_error": 0.5, "errors/GenerationError": 0.5, "reward_mean": 0.0},
        {"step": 2, "reward_mean": 1.0},
    ]
    errors = error_summary(records)
    assert errors == {"errors/GenerationError": 0.25, "finish_error": 0.25}
    assert error_summary([{"step": 1, "finish_eos": 1.0}]) == {}
    summary = TrainSummary(
        run_dir="r",
        steps=2,
        eval_before=None,
        eval_after=None,
        train_reward_first=0.0,
        train_reward_last=1.0,
        consult_rate_mean=0.0,
        policy_tokens_per_s=1.0,
        wall_s=1.0,
        checkpoint=None,
        plot=None,
        metrics="m",
        errors=errors,
    )
    assert "errors      : errors/GenerationError 25.0%, finish_error 25.0%" in summary.render()


# -- probing backends -------------------------------------------------------------------


class _Answers(ScriptedGenerator):
    """A scripted backend answering every request with ``reply`` (a Generation or text)."""

    def __init__(self, tokenizer: Any, reply: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, lambda session, turn, ids: reply, **kwargs)


async def test_probe_backend_says_what_is_wrong(tokenizer: Any) -> None:
    assert await probe_backend(_Answers(tokenizer, "fine"), 5.0) is None
    failing = _Answers(tokenizer, "x", fail=lambda session, turn: True)
    assert "GenerationError: scripted failure" in await probe_backend(failing, 5.0)
    empty = Generation(token_ids=[], logprobs=[], finish_reason="stop")
    assert "malformed (0 token ids" in await probe_backend(_Answers(tokenizer, empty), 5.0)
    slow = _Answers(tokenizer, "late", delay=(1.0, 1.0))
    assert "within 0.05 s" in await probe_backend(slow, 0.05)


async def test_the_probe_draws_nothing_from_the_backend_random_stream(tiny_model_dir: str) -> None:
    from policies.transformers_generator import TransformersGenerator

    generator = TransformersGenerator(tiny_model_dir, device="cpu", max_context=256)
    try:
        state = generator._rng.getstate()
        assert await probe_backend(generator, 30.0) is None
        assert generator._rng.getstate() == state
        assert not generator.prefix_cache._sessions  # nothing kept for later requests
    finally:
        await generator.aclose()


async def test_the_pool_probe_names_each_agent_that_is_down(tokenizer: Any) -> None:
    from agents.llm_agent import KnowledgeAgent, ReasoningAgent, VerifyAgent
    from agents.oracle import OracleVerifyAgent

    up = _Answers(tokenizer, "fine")
    down = _Answers(tokenizer, "x", fail=lambda session, turn: True)
    policy = _Answers(tokenizer, "x", fail=lambda session, turn: True)
    pool = AgentPool(
        {
            "verify": OracleVerifyAgent(AdditionTask()),
            "knowledge": KnowledgeAgent(down),
            "reasoning": ReasoningAgent(down),
            "critic": VerifyAgent(up, name="critic"),
            "echo": KnowledgeAgent(policy, name="echo"),
        },
        AgentPoolConfig(agents={}),
    )
    found = await pool.probe(skip=(policy,))
    assert sorted(found) == ["knowledge", "reasoning"]
    assert "scripted failure" in found["knowledge"]
    assert len(down.calls) == 1  # agents sharing a backend share its probe
    assert not policy.calls  # the policy's generator is its owner's to check


# -- skipped dataset rows ----------------------------------------------------------------


def test_rows_skipped_as_malformed_reach_the_results(tmp_path: Path, tiny_model_dir: str) -> None:
    import argparse

    from aipo.commands import eval as eval_cli

    data = tmp_path / "math.jsonl"
    rows = [
        json.dumps({"unique_id": "a", "problem": "What is 1+1?", "answer": "2"}),
        json.dumps({"unique_id": "b", "problem": "What is 2+3?"}),  # no answer
        "not json at all",
        json.dumps({"unique_id": "c", "problem": "What is 3*3?", "answer": "9"}),
    ]
    data.write_text("\n".join(rows) + "\n")
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(
        [
            "--model",
            tiny_model_dir,
            "--tasks",
            "math500",
            "--task-arg",
            f"math500.path={data}",
            "--max-new-tokens",
            "4",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert eval_cli.run(args) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["math500"]["skipped_rows"] == 2
    assert results["tasks"]["math500"]["problems_evaluated"] == 2
    assert (
        "Dataset rows skipped as malformed (not evaluated): math500 2."
        in (out / "results.md").read_text()
    )
