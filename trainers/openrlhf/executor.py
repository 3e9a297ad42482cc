"""OpenRLHF agent executor (``--train.agent_func_path``): one ConsultEnv episode per call.

OpenRLHF loads this file in each vLLM rollout actor and calls
``AgentExecutor().execute(prompt, label, sampling_params, max_length, hf_tokenizer,
llm_engine)``. The policy runs on ``llm_engine``; the agents are an
:class:`agents.pool.AgentPool` built from the executor config the launcher put in
``AIPO_OPENRLHF_EXECUTOR`` (SGLang endpoints from ``aipo serve`` inlined). The
returned dict is :func:`trainers.openrlhf.rollout.trajectory_to_openrlhf`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from openrlhf.utils.agent import AgentExecutorBase

from agents.base import ConsultService
from tasks.base import Problem, RewardResult, Task


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


def _executor_config() -> dict[str, Any]:
    from trainers.openrlhf.launcher import EXECUTOR_CONFIG_ENV

    raw = os.environ.get(EXECUTOR_CONFIG_ENV)
    return json.loads(raw) if raw else {}


class AgentExecutor(AgentExecutorBase):
    """Runs AIPO's consult environment with OpenRLHF's engine as the policy.

    ``config`` (default: from the environment) has ``task``, ``env`` (EnvConfig
    fields), ``agents`` (AgentPoolConfig fields) and ``endpoints`` (``aipo serve``'s
    file content: ``{"agents": {name: {AgentConfig fields}}}``). ``agents`` may be a
    ready :class:`ConsultService` and ``task`` a ready task (tests).
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        agents: ConsultService | None = None,
        task: Task | None = None,
    ) -> None:
        from trainers.openrlhf.loss import loss_config_from_env

        self.config = _executor_config() if config is None else dict(config)
        self.loss = loss_config_from_env()
        self._agents = agents
        self._task = task

    def _base_task(self) -> Task:
        if self._task is None:
            from tasks.registry import make_task

            self._task = make_task(self.config.get("task", "math"))
        return self._task

    def _agent_service(self, tokenizer: Any) -> ConsultService:
        if self._agents is None:
            from agents.pool import AgentPool, AgentPoolConfig

            pool = dict(self.config.get("agents") or {})
            served = (self.config.get("endpoints") or {}).get("agents", {})
            agents = dict(pool.get("agents") or {})
            for name, settings in served.items():
                agents[name] = {**agents.get(name, {}), **settings}
            if agents:
                pool["agents"] = agents
            self._agents = AgentPool.from_config(
                AgentPoolConfig(**pool), policy_tokenizer=tokenizer, task=self._base_task()
            )
        return self._agents

    async def execute(
        self, prompt, label, sampling_params, max_length: int, hf_tokenizer, llm_engine, images=None
    ):
        """One episode on ``prompt``; returns OpenRLHF's per-sample result dict."""
        from aipo_env.config import EnvConfig
        from aipo_env.env import ConsultEnv
        from policies.base import ContextOverflowError, SamplingParams
        from trainers.openrlhf.rollout import OpenRLHFEngineGenerator, trajectory_to_openrlhf

        train_agents = self.loss.agent_mode != "mask"
        env_fields = {**(self.config.get("env") or {}), "train_agent_tokens": train_agents}
        env_fields.setdefault("max_total_tokens", int(max_length))
        problem_id = hashlib.sha1(f"{prompt}\x00{label}".encode()).hexdigest()[:16]
        base = self._base_task()
        problem = Problem(id=problem_id, task=base.name, question=prompt, reference=str(label))
        env = ConsultEnv(
            _OneProblemTask(base, problem),
            self._agent_service(hf_tokenizer),
            hf_tokenizer,
            EnvConfig(**env_fields),
        )
        policy = OpenRLHFEngineGenerator(llm_engine, hf_tokenizer, sampling_params, max_length)
        _, info = await env.areset(options={"problem_index": 0, "group_id": problem_id})
        trajectory = info.get("trajectory")
        while trajectory is None:
            params = SamplingParams(
                max_new_tokens=max(1, env.max_new_tokens()), stop=env.sampling_stop
            )
            try:
                generation = await policy.generate(
                    env.token_ids, params, session_id=env.trajectory_id
                )
            except ContextOverflowError as exc:
                trajectory = env.abort("context_overflow", str(exc))
                break
            _, _, terminated, truncated, step_info = await env.astep(generation)
            if terminated or truncated:
                trajectory = step_info["trajectory"]
        return trajectory_to_openrlhf(
            trajectory, prompt=prompt, label=label, train_agent_tokens=train_agents
        )
