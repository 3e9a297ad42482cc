"""OpenRLHF agent executor (``--train.agent_func_path``): one ConsultEnv episode per call.

OpenRLHF loads this file in each vLLM rollout actor and calls
``AgentExecutor().execute(prompt, label, sampling_params, max_length, hf_tokenizer,
llm_engine)``. The policy runs on ``llm_engine``; the agents are an
:class:`agents.pool.AgentPool` built from the executor config the launcher put in
``AIPO_OPENRLHF_EXECUTOR`` (SGLang endpoints from ``aipo serve`` inlined). The episode
runs through :func:`aipo_env.episode.run_episode`, like every other; the returned dict
is :func:`trainers.openrlhf.rollout.trajectory_to_openrlhf`'s.

One sample never ends the run: OpenRLHF gathers an actor's episodes with
``asyncio.gather``, so an exception here would fail the whole rollout.

Under a protocol that tools answer (it declares them: ``executor.env.protocol: tools``,
ARPO's ``<python>`` and ``<search>``) the requests go to the recipe's tool set
(``executor.tools``, built by :mod:`trainers.tool_config`) instead of an agent pool. OpenRLHF samples each
trajectory on its own, so this is trajectory-level tool-use RL: no rollout tree. A failed reset,
generation or env step, and any error converting the episode, give a failed sample
(reward 0, no trained token, ``extra_logs["episode_error"]`` 1). Only building the
task and the agent pool may raise: a run whose pool cannot be built should stop at once.

The pool is built on the first episode, in a worker thread (``asyncio.to_thread``): it
loads the agents' tokenizers (an ``sglang://`` agent loads its served model's), and the
vLLM actor's event loop keeps serving other episodes meanwhile. A lock makes concurrent
first episodes build it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from typing import Any

from openrlhf.utils.agent import AgentExecutorBase

from agents.base import ConsultService
from tasks.base import Problem, RewardResult, Task
from trainers.openrlhf.config import ExecutorConfig
from trainers.openrlhf.dump import dump_sample
from trainers.tool_config import make_tool_service

logger = logging.getLogger(__name__)


class _OneProblemTask(Task):
    """A task whose only problem is OpenRLHF's prompt; scoring is the named task's."""

    def __init__(self, base: Task, problem: Problem) -> None:
        super().__init__()
        self.base = base
        self.name = base.name
        self._problem = problem

    def load(self) -> list[Problem]:
        return [self._problem]

    def extract_answer(self, response: str) -> str | None:
        return self.base.extract_answer(response)

    def score(self, problem: Problem, response: str) -> RewardResult:
        return self.base.score(problem, response)

    async def ascore(self, problem: Problem, response: str) -> RewardResult:
        return await self.base.ascore(problem, response)


def _executor_config() -> ExecutorConfig:
    from trainers.openrlhf.launcher import EXECUTOR_CONFIG_ENV

    raw = os.environ.get(EXECUTOR_CONFIG_ENV)
    if not raw:
        # The launcher always sets it: a worker without it was not started by 'aipo train'.
        logger.warning(
            "%s is not set in this worker: episodes run with the default ExecutorConfig "
            "(task 'math', no agents); launch with 'aipo train --engine openrlhf'",
            EXECUTOR_CONFIG_ENV,
        )
        return ExecutorConfig()
    return ExecutorConfig.model_validate(json.loads(raw))


def _placeholder_ids(prompt: Any, tokenizer: Any, max_length: int) -> list[int]:
    """Ids standing in for a sample that has none (its reset failed): the raw prompt's, else EOS."""
    try:
        ids = list(tokenizer(str(prompt), add_special_tokens=False)["input_ids"])[
            : max(1, int(max_length) - 1)
        ]
    except Exception:  # the reason the reset failed may break this too
        ids = []
    if ids:
        return [int(t) for t in ids]
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int):
            return [token]
    return [0]


def _agent_models(pool_config: Any) -> list[str]:
    """``agent: tokenizer`` for each agent whose backend the pool loads (for the log)."""
    loaded = []
    for name, agent in pool_config.agents.items():
        if agent.kind == "llm" and agent.backend != "policy":
            loaded.append(f"{name}: {agent.tokenizer or agent.backend}")
    return loaded


class AgentExecutor(AgentExecutorBase):
    """Runs AIPO's consult environment with OpenRLHF's engine as the policy.

    ``config`` (default: read from the environment, as the launcher wrote it) is the
    recipe's typed :class:`~trainers.openrlhf.config.ExecutorConfig`: the task, the
    episodes' :class:`~aipo_env.config.EnvConfig`, the agent pool and the ``aipo serve``
    endpoints. ``agents`` may be a ready :class:`ConsultService` and ``task`` a ready
    task (tests).
    """

    def __init__(
        self,
        config: ExecutorConfig | None = None,
        agents: ConsultService | None = None,
        task: Task | None = None,
    ) -> None:
        from trainers.openrlhf.loss import loss_config_from_env

        self.config = _executor_config() if config is None else config
        self.loss = loss_config_from_env()
        self._agents = agents
        self._task = task
        self._setup_lock = asyncio.Lock()

    def _build_services(self, tokenizer: Any) -> tuple[Task, ConsultService]:
        """The task and the agent pool (blocking: loads tokenizers); run in a worker thread."""
        task = self._task
        if task is None:
            from tasks.registry import make_task

            # The task only scores here: OpenRLHF's own data flags hold the problems
            # (data.prompt_dataset, eval.dataset), so there is no train or held-out side to
            # build (trainers/held_out.py is the embedded trainers'); the prompt and label
            # of each episode arrive with it.
            task = make_task(self.config.task)
        agents = self._agents
        if agents is None:
            # A protocol that declares tools is answered by them (tools.*), not the agent
            # pool; None for one the pool answers.
            agents = make_tool_service(self.config.tools, self.config.env.protocol)
        if agents is None:
            from agents.pool import AgentPool

            pool_config = self.config.agent_pool()
            models = _agent_models(pool_config)
            if models:
                # WARNING so it reaches the Ray worker log: a tokenizer that is not in this
                # node's cache is downloaded here, on every rollout node.
                logger.warning(
                    "building the agent pool: loading tokenizers (%s); every rollout node "
                    "needs them in its Hugging Face cache (check with `aipo doctor`)",
                    ", ".join(models),
                )
            agents = AgentPool.from_config(
                pool_config,
                policy_tokenizer=tokenizer,
                task=task,
                max_reply_tokens=self.config.env.max_reply_tokens,
                timeout_s=self.config.env.agent_timeout_s,
            )
        return task, agents

    async def _services(self, tokenizer: Any) -> tuple[Task, ConsultService]:
        """The task and the agent pool, built once, off the event loop."""
        if self._task is None or self._agents is None:
            async with self._setup_lock:
                if self._task is None or self._agents is None:
                    self._task, self._agents = await asyncio.to_thread(
                        self._build_services, tokenizer
                    )
        assert self._task is not None and self._agents is not None
        return self._task, self._agents

    async def execute(
        self, prompt, label, sampling_params, max_length: int, hf_tokenizer, llm_engine, images=None
    ):
        """One episode on ``prompt``; returns OpenRLHF's per-sample result dict (never raises for one sample)."""
        from aipo_env.env import ConsultEnv
        from aipo_env.episode import run_episode
        from aipo_env.trajectory import Trajectory
        from trainers.openrlhf.rollout import (
            OpenRLHFEngineGenerator,
            is_failed,
            trajectory_to_openrlhf,
        )

        base, agents = await self._services(hf_tokenizer)
        env_config = self.config.episode_env(max_length)
        rule = self.loss.mask_rule(mask_on_drift=env_config.mask_on_drift)
        problem_id = hashlib.sha1(f"{prompt}\x00{label}".encode()).hexdigest()[:16]
        options = {
            "problem_index": 0,
            "group_id": problem_id,
            # With a trajectory id, run_episode turns a failed reset into a trajectory.
            "trajectory_id": f"{problem_id}-{uuid.uuid4().hex[:12]}",
        }
        trajectory: Trajectory | None = None
        try:
            problem = Problem(id=problem_id, task=base.name, question=prompt, reference=str(label))
            env = ConsultEnv(
                _OneProblemTask(base, problem), agents, hf_tokenizer, env_config, mask_rule=rule
            )
            policy = OpenRLHFEngineGenerator(llm_engine, hf_tokenizer, sampling_params, max_length)
            trajectory = await run_episode(env, policy, options)
            if is_failed(trajectory):
                logger.warning(
                    "episode %s failed (%s): %s; it is kept as a sample with reward 0 and "
                    "no trained token",
                    trajectory.trajectory_id,
                    trajectory.finish_reason,
                    trajectory.error,
                )
            placeholder = (
                () if trajectory.token_ids else _placeholder_ids(prompt, hf_tokenizer, max_length)
            )
            result = trajectory_to_openrlhf(
                trajectory, prompt=prompt, label=label, rule=rule, placeholder_ids=placeholder
            )
            dump_sample(result)
            return result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one sample must not end the run
            logger.exception("episode %s failed in the executor", options["trajectory_id"])
            failed = Trajectory(
                trajectory_id=options["trajectory_id"],
                problem_id=problem_id,
                task=base.name,
                group_id=problem_id,
                token_ids=[],
                prompt_len=0,
                source=[],
                loss_mask=[],
                behavior_logprobs=[],
                finish_reason=f"error:executor_{type(exc).__name__}",
                error=str(exc),
            )
            seen = trajectory.token_ids if trajectory is not None else []
            return trajectory_to_openrlhf(
                failed,
                prompt=prompt,
                label=label,
                rule=rule,
                placeholder_ids=seen or _placeholder_ids(prompt, hf_tokenizer, max_length),
            )
