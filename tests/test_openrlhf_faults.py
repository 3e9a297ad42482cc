"""One bad sample never ends an OpenRLHF run: failures become well-formed samples OpenRLHF trains on.

OpenRLHF 0.11.2 gathers an engine's episodes with ``asyncio.gather`` (``LLMRayActor.
generate_responses``), so one exception from the executor fails the rollout and the run.
The consumer side (``SamplesGenerator._process_response_into_experience``,
``RemoteExperienceMaker.get_cumulative_returns``) needs vLLM to import; those methods are
compiled from the installed source and run here on the executor's dicts.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("openrlhf.utils.agent", reason="openrlhf not installed")

from openrlhf.models.utils import compute_reward  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf_source import stock_methods  # noqa: E402
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator  # noqa: E402
from vllm_standin import VLLMSamplingParams  # noqa: E402

from aipo_env import sources  # noqa: E402
from aipo_env.env import ConsultEnv  # noqa: E402
from aipo_env.masks import MaskRule  # noqa: E402
from aipo_env.trajectory import Trajectory  # noqa: E402
from policies.base import SamplingParams  # noqa: E402
from trainers.losses import LossConfig  # noqa: E402
from trainers.openrlhf.config import ExecutorConfig  # noqa: E402
from trainers.openrlhf.executor import AgentExecutor  # noqa: E402
from trainers.openrlhf.loss import (  # noqa: E402
    LOSS_CONFIG_ENV,
    decode_rollout_log_probs,
    make_aipo_policy_loss_class,
)
from trainers.openrlhf.rollout import trajectory_to_openrlhf  # noqa: E402

EXTRA_LOGS = {
    "consults",
    "consult_errors",
    "agent_tokens",
    "tokenization_drift",
    "finished_eos",
    "episode_error",
}
RESULT_KEYS = {
    "prompt",
    "label",
    "images",
    "mm_train_inputs",
    "reward",
    "scores",
    "observation_tokens",
    "action_ranges",
    "rollout_log_probs",
    "truncated",
    "extra_logs",
}
CONSULT = 'Let me ask. <consult agent="knowledge">How do I add?</consult>'


def request_output(token_ids, logprobs=None, finish="stop"):
    """A vLLM-shaped ``RequestOutput`` with one completion."""
    if logprobs is None:
        logprobs = [-0.5] * len(token_ids)
    out = SimpleNamespace(
        token_ids=token_ids,
        text="",
        finish_reason=finish,
        stop_reason=None,
        logprobs=[
            {t: SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, logprobs, strict=True)
        ],
    )
    return SimpleNamespace(outputs=[out])


def scripted_turn(tokenizer, text: str):
    """A turn that samples ``text`` as the scripted policy would (stop strings honoured)."""
    policy = ScriptedGenerator(tokenizer, [text])

    async def agenerate(ids):
        g = await policy.generate(ids, SamplingParams(max_new_tokens=200), session_id="s")
        return request_output(g.token_ids, g.logprobs, g.finish_reason)

    return agenerate


class AsyncEngine:
    """``generate`` answers call ``i`` with ``turns[i](ids)``: a coroutine function or a plain one (which may raise)."""

    def __init__(self, *turns) -> None:
        self.turns = list(turns)
        self.calls = 0

    async def generate(self, ids, params, multi_modal_data=None):
        turn = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        result = turn(ids)
        return await result if hasattr(result, "__await__") else result


def _raise(ids):
    raise RuntimeError("engine died")


async def _execute(tokenizer, engine, monkeypatch, *, mode="shaped", agents=None, max_length=4096):
    monkeypatch.setenv(LOSS_CONFIG_ENV, f'{{"agent_mode": "{mode}"}}')
    task = AdditionTask(n=1)
    problem = task.problems[0]
    agents = agents or ScriptedAgents({"knowledge": "Add the digits column by column."})
    executor = AgentExecutor(config=ExecutorConfig(), agents=agents, task=task)
    return await executor.execute(
        problem.question, problem.reference, VLLMSamplingParams(), max_length, tokenizer, engine
    )


def assert_failed_sample(result) -> None:
    """Reward 0, truncated, nothing trained, no flag, no NaN; batchable by OpenRLHF."""
    assert set(result) == RESULT_KEYS and set(result["extra_logs"]) == EXTRA_LOGS
    assert result["reward"] == 0.0 and result["scores"] == 0.0
    assert result["truncated"] is True
    assert result["action_ranges"] == []
    obs, rollout = result["observation_tokens"], result["rollout_log_probs"]
    assert obs and all(isinstance(t, int) for t in obs)
    assert len(rollout) == len(obs)
    assert all(math.isfinite(v) and v <= 0.0 for v in rollout)
    assert all(math.isfinite(v) for v in result["extra_logs"].values())


GARBAGE = {
    "no_outputs": lambda ids: SimpleNamespace(outputs=[]),
    "nan_logprob": lambda ids: request_output([5, 6], [math.nan, -0.1]),
    "positive_logprob": lambda ids: request_output([5], [3.0]),
    "negative_token_id": lambda ids: request_output([-1]),
    "text_token": lambda ids: request_output(["x"]),
    "no_finish_reason": lambda ids: request_output([5], finish=None),
    "no_logprobs": lambda ids: SimpleNamespace(
        outputs=[SimpleNamespace(token_ids=[5], logprobs=None, finish_reason="stop")]
    ),
}


@pytest.mark.parametrize("name", ["raises", *GARBAGE])
async def test_engine_failure_or_garbage_gives_a_failed_sample(tokenizer, monkeypatch, name):
    engine = AsyncEngine(_raise if name == "raises" else GARBAGE[name])
    result = await _execute(tokenizer, engine, monkeypatch)
    assert_failed_sample(result)
    assert result["extra_logs"]["episode_error"] == 1.0


async def test_failure_after_a_consult_trains_none_of_the_episode(tokenizer, monkeypatch):
    engine = AsyncEngine(scripted_turn(tokenizer, CONSULT), _raise)
    result = await _execute(tokenizer, engine, monkeypatch)
    assert_failed_sample(result)
    # The policy's first segment and the agent's reply are in the sample, but not trained.
    assert result["extra_logs"]["consults"] == 1.0 and result["extra_logs"]["agent_tokens"] > 0
    agent, _, _ = decode_rollout_log_probs(torch.tensor(result["rollout_log_probs"]))
    assert not agent.any()


async def test_prompt_longer_than_max_length_gives_an_untrained_sample(tokenizer, monkeypatch):
    engine = AsyncEngine(_raise)
    result = await _execute(tokenizer, engine, monkeypatch, max_length=16)
    assert engine.calls == 0  # the episode ended at reset (context_overflow)
    assert result["action_ranges"] == [] and result["reward"] == 0.0 and result["truncated"]
    assert len(result["observation_tokens"]) >= 16


async def test_reset_that_raises_gives_a_placeholder_sample(tokenizer, monkeypatch):
    def broken(self, problem):
        raise ValueError("chat template failed")

    monkeypatch.setattr(ConsultEnv, "prompt_ids", broken)
    result = await _execute(tokenizer, AsyncEngine(_raise), monkeypatch)
    assert_failed_sample(result)
    assert result["extra_logs"]["episode_error"] == 1.0


async def test_bug_in_the_episode_loop_gives_a_failed_sample(tokenizer, monkeypatch):
    import aipo_env.episode

    async def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(aipo_env.episode, "run_episode", broken)
    result = await _execute(tokenizer, AsyncEngine(_raise), monkeypatch)
    assert_failed_sample(result)


async def test_agent_that_raises_is_a_consult_error_not_a_failed_run(tokenizer, monkeypatch):
    task = AdditionTask(n=1)
    answer = f"So the answer is \\boxed{{{task.problems[0].reference}}}<|im_end|>"
    engine = AsyncEngine(scripted_turn(tokenizer, CONSULT), scripted_turn(tokenizer, answer))
    agents = ScriptedAgents({"knowledge": RuntimeError("agent server down")})
    result = await _execute(tokenizer, engine, monkeypatch, agents=agents)
    assert result["extra_logs"]["consult_errors"] == 1.0
    assert result["extra_logs"]["episode_error"] == 0.0
    assert result["reward"] == 1.0 and result["action_ranges"]


def test_unusable_agent_logprobs_are_read_as_unknown_not_raised():
    """An agent's NaN, infinite or rounded-up log-prob: mu = 1, never an exception."""
    src = [sources.PROMPT, sources.POLICY, *[sources.agent("knowledge")] * 3, sources.POLICY]
    lps = [None, -0.2, math.nan, 1e-7, -math.inf, -0.4]
    trajectory = Trajectory(
        trajectory_id="t",
        problem_id="p",
        task="test",
        group_id="g",
        token_ids=[1, 2, 3, 4, 5, 6],
        prompt_len=1,
        source=src,
        loss_mask=[0, 1, 1, 1, 1, 1],
        behavior_logprobs=lps,
        finish_reason="eos",
        reward=1.0,
    )
    result = trajectory_to_openrlhf(
        trajectory, prompt="q", label="a", rule=MaskRule(train_injected=True)
    )
    assert result["rollout_log_probs"] == [0.0, -0.2, 1.0, 1.0, 1.0, -0.4]
    assert result["action_ranges"] == [(1, 6)]


async def test_openrlhf_batches_and_trains_failed_samples_without_nan(tokenizer, monkeypatch):
    """The stock consumer code on a good sample and two failed ones, then the AIPO loss."""
    task = AdditionTask(n=1)
    answer = f"So the answer is \\boxed{{{task.problems[0].reference}}}<|im_end|>"
    good = await _execute(
        tokenizer,
        AsyncEngine(scripted_turn(tokenizer, CONSULT), scripted_turn(tokenizer, answer)),
        monkeypatch,
    )
    crashed = await _execute(
        tokenizer, AsyncEngine(scripted_turn(tokenizer, CONSULT), _raise), monkeypatch
    )
    overflow = await _execute(tokenizer, AsyncEngine(_raise), monkeypatch, max_length=16)
    assert good["action_ranges"] and good["reward"] == 1.0

    generator = stock_methods(
        "trainer/ppo_utils/samples_generator.py",
        "SamplesGenerator",
        {"_process_response_into_experience"},
    )
    maker = stock_methods(
        "trainer/ppo_utils/experience_maker.py", "RemoteExperienceMaker", {"get_cumulative_returns"}
    )
    experiences = [
        generator._process_response_into_experience(None, r, max_len=4096)
        for r in (good, crashed, overflow)
    ]
    batch = Experience.concat_experiences(experiences, tokenizer.pad_token_id)
    mask = batch.action_mask
    assert mask[0].sum() > 0 and mask[1:].sum() == 0
    for key in EXTRA_LOGS:  # every sample logs every key, so OpenRLHF can stack them
        assert batch.info[key].shape == (3,)

    # Returns as OpenRLHF computes them for GRPO-style estimators: the failed rows carry none.
    kl = torch.zeros(mask.shape)
    rewards = compute_reward(batch.rewards.float(), 0.0, kl, action_mask=mask)
    returns = maker.get_cumulative_returns(None, rewards, mask, 1.0)
    assert torch.isfinite(returns).all() and (returns[1:] == 0).all()

    advantages = (returns - 0.5) * mask  # as if whitened; zero off the action mask
    logp = (batch.rollout_log_probs.clamp(max=0) - 0.1).requires_grad_()
    # batch_num_tokens given by hand: the 'shared' normaliser (under 'separate' the step's
    # policy and agent counts come from ppo_train's own counting; test_loss_agent_channel.py).
    loss_fn = make_aipo_policy_loss_class()(
        agent_loss=LossConfig(agent_mode="shaped", agent_normalization="shared")
    )
    loss, clip, kl_ppo, _, _ = loss_fn(
        logp,
        batch.rollout_log_probs.clamp(max=0),
        advantages,
        action_mask=mask,
        rollout_log_probs=batch.rollout_log_probs,
        batch_num_tokens=float(mask.sum()),
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[1:] == 0).all() and (grad[0] != 0).any()

    # A micro-batch of failed samples only: finite metrics (stock: 0/0 = NaN on every rank).
    only_failed = loss_fn(
        logp[1:],
        logp[1:].detach(),
        advantages[1:],
        action_mask=mask[1:],
        rollout_log_probs=batch.rollout_log_probs[1:],
        batch_num_tokens=float(mask.sum()),
    )
    assert all(torch.isfinite(v).all() for v in only_failed if v is not None)
    assert only_failed[0].item() == 0.0
