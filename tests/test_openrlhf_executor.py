"""Our AgentExecutor as OpenRLHF calls it, over a vLLM-shaped stand-in engine."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("openrlhf.utils.agent", reason="openrlhf not installed")

from openrlhf.utils.agent import AgentExecutorBase  # noqa: E402
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator  # noqa: E402
from vllm_standin import VLLMSamplingParams  # noqa: E402

from policies.base import SamplingParams  # noqa: E402
from trainers.openrlhf.config import ExecutorConfig  # noqa: E402
from trainers.openrlhf.executor import AgentExecutor  # noqa: E402
from trainers.openrlhf.loss import LOSS_CONFIG_ENV, decode_rollout_log_probs  # noqa: E402


class FakeEngine:
    """``await generate(ids, params)`` -> vLLM-like RequestOutput, backed by a scripted policy."""

    def __init__(self, policy: ScriptedGenerator) -> None:
        self.policy = policy
        self.params: list[VLLMSamplingParams] = []

    async def generate(self, ids, params, multi_modal_data=None):
        self.params.append(params)
        g = await self.policy.generate(
            ids,
            SamplingParams(max_new_tokens=params.max_tokens, stop=params.stop or []),
            session_id="one",
        )
        out = SimpleNamespace(
            token_ids=g.token_ids,
            text=self.policy.tokenizer.decode(g.token_ids),
            finish_reason=g.finish_reason,
            stop_reason=g.stop_match,
            logprobs=[
                {t: SimpleNamespace(logprob=lp)}
                for t, lp in zip(g.token_ids, g.logprobs, strict=True)
            ],
        )
        return SimpleNamespace(outputs=[out])


SCRIPT = [
    'Let me ask. <consult agent="knowledge">How do I add?</consult>',
    "So the answer is \\boxed{REF}<|im_end|>",
]


async def _run(tokenizer, mode: str, monkeypatch):
    monkeypatch.setenv(LOSS_CONFIG_ENV, f'{{"agent_mode": "{mode}"}}')
    task = AdditionTask(n=1)
    problem = task.problems[0]
    script = [s.replace("REF", problem.reference) for s in SCRIPT]
    engine = FakeEngine(ScriptedGenerator(tokenizer, script))
    agents = ScriptedAgents({"knowledge": "Add the digits column by column."})
    executor = AgentExecutor(config=ExecutorConfig(), agents=agents, task=task)
    assert isinstance(executor, AgentExecutorBase)
    result = await executor.execute(
        problem.question, problem.reference, VLLMSamplingParams(temperature=0.7), 4096,
        tokenizer, engine,
    )  # fmt: skip
    return result, engine, script


@pytest.mark.parametrize("mode", ["mask", "shaped"])
async def test_execute_returns_exact_ids_ranges_and_flags(tokenizer, mode, monkeypatch):
    result, engine, script = await _run(tokenizer, mode, monkeypatch)
    obs = result["observation_tokens"]
    ranges = result["action_ranges"]
    assert result["reward"] == 1.0 and result["truncated"] is False
    assert result["extra_logs"]["consults"] == 1.0
    # The policy's segments sit verbatim in the observation.
    first = tokenizer.encode(script[0], add_special_tokens=False)
    assert obs[ranges[0][0] : ranges[0][0] + len(first)] == first
    assert engine.params[0].temperature == 0.7 and engine.params[0].include_stop_str_in_output
    assert engine.params[0].logprobs == 1 and engine.params[0].stop
    rollout = torch.tensor(result["rollout_log_probs"])
    assert len(rollout) == len(obs)
    agent_flag, _, _ = decode_rollout_log_probs(rollout)
    covered = torch.zeros(len(obs), dtype=torch.bool)
    for s, e in ranges:
        covered[s:e] = True
    if mode == "mask":
        assert len(ranges) == 2 and not agent_flag.any()
    else:
        # Agent tokens are trainable and flagged; the flag lies inside the ranges only.
        assert agent_flag.any() and bool(covered[agent_flag].all())
        assert len(ranges) < 4  # agent segment merged with neighbouring trained tokens or alone
    # Policy tokens carry the engine's log-probs (<= 0, non-zero for sampled tokens).
    policy_pos = covered & ~agent_flag
    assert (rollout[policy_pos] <= 0).all() and (rollout[policy_pos] != 0).any()
    # OpenRLHF's shift (samples_generator): action_mask[1:], rollout_log_probs[1:].
    action_mask = covered.long()[1:]
    assert action_mask.sum() == sum(e - s for s, e in ranges)


async def test_first_episodes_build_the_pool_once_without_blocking_the_loop(
    tokenizer, monkeypatch, caplog
):
    """Concurrent first episodes share one pool, built in a thread while the loop runs on."""
    from agents.pool import AgentPool

    monkeypatch.setenv(LOSS_CONFIG_ENV, '{"agent_mode": "mask"}')
    builds: list[int] = []

    def slow_from_config(cls, config, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # loading tokenizers
        assert kwargs["policy_tokenizer"] is tokenizer
        return ScriptedAgents({"knowledge": "Add the digits."})

    monkeypatch.setattr(AgentPool, "from_config", classmethod(slow_from_config))
    task = AdditionTask(n=1)
    problem = task.problems[0]
    config = ExecutorConfig.model_validate(
        {
            "agents": {
                "agents": {
                    "knowledge": {"backend": "sglang://node3:30000", "tokenizer": "Org/Agent-32B"}
                }
            }
        }
    )
    executor = AgentExecutor(config=config, task=task)
    answer = f"So the answer is \\boxed{{{problem.reference}}}<|im_end|>"

    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    async def episode():
        engine = FakeEngine(ScriptedGenerator(tokenizer, [answer]))
        return await executor.execute(
            problem.question, problem.reference, VLLMSamplingParams(), 4096, tokenizer, engine
        )

    ticking = asyncio.create_task(ticker())
    with caplog.at_level(logging.WARNING):
        results = await asyncio.gather(episode(), episode(), episode())
    done.set()
    await ticking

    assert len(builds) == 1 and builds[0] != threading.get_ident()
    assert ticks >= 10  # ~30 ticks in 0.3 s; a blocked loop gives one or two
    assert all(r["reward"] == 1.0 for r in results)
    assert "Org/Agent-32B" in caplog.text and "aipo doctor" in caplog.text
