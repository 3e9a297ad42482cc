"""OpenRLHF agent executor (``--train.agent_func_path``): one ConsultEnv episode per call.

OpenRLHF loads this file in each vLLM rollout actor and calls
``AgentExecutor().execute(prompt, label, sampling_params, max_length, hf_tokenizer,
llm_engine)``. The policy runs on ``llm_engine``; the agents are an
:class:`agents.pool.AgentPool` built from the executor config the launcher put in
``AIPO_OPENRLHF_EXECUTOR`` (SGLang endpoints from ``aipo serve`` inlined). The episode
runs through :func:`aipo_env.episode.run_episode`, like every other; the returned dict
is :func:`trainers.openrlhf.rollout.trajectory_to_openrlhf`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from openrlhf.utils.agent import AgentExecutorBase

from agents.base import ConsultService
from tasks.base import Problem, RewardResult, Task
from trainers.openrlhf.config import ExecutorConfig


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
    return ExecutorConfig.model_validate(json.loads(raw)) if raw else ExecutorConfig()


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

    def _base_task(self) -> Task:
        if self._task is None:
            from tasks.registry import make_task

            self._task = make_task(self.config.task)
        return self._task

    def _agent_service(self, tokenizer: Any) -> ConsultService:
        if self._agents is None:
            from agents.pool import AgentPool

            self._agents = AgentPool.from_config(
                self.config.agent_pool(),
                policy_tokenizer=tokenizer,
                task=self._base_task(),
                max_reply_tokens=self.config.env.max_reply_tokens,
                timeout_s=self.config.env.agent_timeout_s,
            )
        return self._agents

    async def execute(
        self, prompt, label, sampling_params, max_length: int, hf_tokenizer, llm_engine, images=None
    ):
        """One episode on ``prompt``; returns OpenRLHF's per-sample result dict."""
        from aipo_env.env import ConsultEnv
        from aipo_env.episode import run_episode
        from trainers.openrlhf.rollout import OpenRLHFEngineGenerator, trajectory_to_openrlhf

        env_config = self.config.episode_env(max_length)
        rule = self.loss.mask_rule(mask_on_drift=env_config.mask_on_drift)
        problem_id = hashlib.sha1(f"{prompt}\x00{label}".encode()).hexdigest()[:16]
        base = self._base_task()
        problem = Problem(id=problem_id, task=base.name, question=prompt, reference=str(label))
        env = ConsultEnv(
            _OneProblemTask(base, problem),
            self._agent_service(hf_tokenizer),
            hf_tokenizer,
            env_config,
            mask_rule=rule,
        )
        policy = OpenRLHFEngineGenerator(llm_engine, hf_tokenizer, sampling_params, max_length)
        trajectory = await run_episode(env, policy, {"problem_index": 0, "group_id": problem_id})
        return trajectory_to_openrlhf(trajectory, prompt=prompt, label=label, rule=rule)
