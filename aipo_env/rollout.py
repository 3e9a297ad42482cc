"""``RolloutDriver``: many consult episodes at once against a policy generator.

Episodes run concurrently under a semaphore; ``n`` samples of one problem form a group
(one group id); a :class:`ConsultSchedule` decides which samples may consult and how
often, decaying over training steps. The strategy that ``strategy`` names
(:data:`aipo_env.strategies.STRATEGIES`) produces the episodes: ``grpo`` (default)
samples a group's episodes independently (:mod:`aipo_env.independent_rollout`),
``arpo`` grows it as ARPO's rollout tree (:mod:`aipo_env.tree_rollout`). Each
trajectory is appended to a JSONL file as
it finishes (flushed and fsynced), so a killed process loses only the episodes in
flight, and a resumed run skips ids already written. One failing episode never kills
the batch: it ends with ``error:<kind>`` and is still returned and written.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.base import ConsultService
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from aipo_env.masks import MaskRule
from aipo_env.rollout_strategy import RolloutStrategy
from aipo_env.strategies import STRATEGIES
from aipo_env.trajectory import Trajectory, TrajectoryWriter, read_jsonl
from configs.registry import check_registered
from policies.base import Generator, SamplingParams
from tasks.base import Task

logger = logging.getLogger(__name__)


class ConsultSchedule(BaseModel):
    """Who may consult: a fraction of each group, decayed over training steps."""

    model_config = ConfigDict(extra="forbid")

    start_fraction: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Fraction of a group allowed to consult at step 0."
    )
    end_fraction: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Fraction allowed once the decay is over."
    )
    decay: Literal["constant", "linear", "cosine", "exponential"] = Field(
        default="constant", description="Shape of the decay from start_fraction to end_fraction."
    )
    decay_steps: int = Field(default=0, ge=0, description="Training steps the decay takes.")

    def fraction(self, step: int) -> float:
        """The fraction of a group allowed to consult at training ``step``."""
        if self.decay == "constant" or self.decay_steps == 0:
            return self.start_fraction if self.decay == "constant" else self.end_fraction
        t = min(max(step, 0), self.decay_steps) / self.decay_steps
        a, b = self.start_fraction, self.end_fraction
        if self.decay == "linear":
            return a + (b - a) * t
        if self.decay == "cosine":
            return b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))
        # exponential: geometric interpolation; a zero end decays towards a small floor
        lo = max(b, 1e-3)
        value = a * (lo / a) ** t if a > 0 else 0.0
        return b if t >= 1 else value

    def allowed(self, step: int, n: int) -> int:
        """How many of a group of ``n`` samples may consult (the first ones by sample index)."""
        return max(0, min(n, round(self.fraction(step) * n)))


class RolloutConfig(BaseModel):
    """Sampling and concurrency for a rollout batch."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(default=4, ge=1, description="Samples per problem (the group size).")
    temperature: float = Field(default=1.0, ge=0.0, description="Policy sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Policy nucleus mass.")
    top_k: int = Field(default=-1, ge=-1, description="Policy top-k; -1 disables it.")
    max_new_tokens: int | None = Field(
        default=None,
        description="Per-turn token cap for the policy; None uses the env's max_new_tokens_per_turn.",
    )
    concurrency: int = Field(default=64, ge=1, description="Episodes in flight at once.")
    seed: int | None = Field(default=None, description="Base seed for per-request sampling seeds.")
    exact_logprobs: bool = Field(
        default=False,
        description=(
            "Record policy log-probs that do not depend on which requests shared a decode step "
            "(SamplingParams.exact_logprobs: the embedded generator scores each turn again on "
            "its own, about one batch-of-one forward per token). Default False; the embedded "
            "trainer turns it on under loss.rollout_correction, the one place its update reads them."
        ),
    )
    schedule: ConsultSchedule = Field(
        default_factory=ConsultSchedule, description="Who may consult, over training steps."
    )

    # -- the rollout strategy (aipo_env/strategies.py; ARPO's tree: aipo_env/tree_rollout.py)
    strategy: str = Field(
        default="grpo",
        description=(
            "grpo: n_samples independent episodes per prompt. arpo: a rollout tree per prompt "
            "with n_samples leaves: initial_samples global samples, branches forked at "
            "tool-result and consult-reply boundaries by the entropy rule, fresh samples to fill."
        ),
    )
    initial_samples: int | None = Field(
        default=None,
        ge=1,
        description="arpo: M, the global samples a tree starts with; None: half of n_samples, rounded up.",
    )
    beam_size: int = Field(
        default=2,
        ge=1,
        description="arpo: a path may spawn up to beam_size - 1 branches at each boundary (1: never branch).",
    )
    branch_probability: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="arpo: branch chance at dH = 0; a branch is made unless clip(u - entropy_weight * dH, 0, 1) > branch_probability.",
    )
    entropy_weight: float = Field(
        default=0.2,
        ge=0.0,
        description="arpo: how much a rise in entropy after a boundary raises the branch chance (0.2).",
    )
    entropy_top_k: int = Field(
        default=10,
        ge=1,
        description="arpo: top log-probs per position that the entropy is computed over (10).",
    )
    entropy_tokens: int = Field(
        default=20,
        ge=1,
        description="arpo: the entropy is measured over the first this many tokens of a segment (20); a branch needs room for them.",
    )
    attribution: Literal["soft", "hard"] = Field(
        default="soft",
        description="arpo: soft, every leaf's tokens get its group advantage; hard, tokens shared by several leaves get their mean (trainers/tree_advantages.py).",
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return check_registered(value, STRATEGIES, "rollout strategy")

    @model_validator(mode="after")
    def _tree_fits(self) -> RolloutConfig:
        if self.initial_samples is not None and self.initial_samples > self.n_samples:
            raise ValueError(
                f"initial_samples={self.initial_samples} exceeds n_samples={self.n_samples}: "
                "a tree starts with at most its n_samples leaves"
            )
        return self

    @property
    def tree_initial_samples(self) -> int:
        """M: the global samples an ARPO tree starts with (``initial_samples`` or half of N)."""
        if self.initial_samples is not None:
            return self.initial_samples
        return (self.n_samples + 1) // 2


ProgressCallback = Callable[[int, int, Trajectory], None]


class RolloutDriver:
    """Runs groups of consult episodes concurrently and records their trajectories.

    ``env_factory`` builds one fresh environment per episode (episodes hold state);
    by default it is ``ConsultEnv(task, agents, generator.tokenizer, env_config,
    mask_rule=mask_rule)``.
    """

    def __init__(
        self,
        generator: Generator,
        task: Task | None = None,
        agents: ConsultService | None = None,
        env_config: EnvConfig | None = None,
        config: RolloutConfig | None = None,
        env_factory: Callable[[], ConsultEnv] | None = None,
        mask_rule: MaskRule | None = None,
    ) -> None:
        if env_factory is None and task is None:
            raise ValueError("RolloutDriver needs a task or an env_factory; got neither")
        self.generator = generator
        self.task = task
        self.config = config or RolloutConfig()
        self.env_config = env_config or EnvConfig()
        #: The strategy that ran the last :meth:`run`, with what it cost and decided.
        self.last_strategy: RolloutStrategy | None = None
        self._factory = env_factory or (
            lambda: ConsultEnv(
                task, agents, generator.tokenizer, self.env_config, mask_rule=mask_rule
            )
        )

    @property
    def sampling(self) -> SamplingParams:
        """The policy's sampling parameters (temperature, top-p, top-k)."""
        return SamplingParams(
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            top_k=self.config.top_k,
            exact_logprobs=self.config.exact_logprobs,
        )

    async def run_episode(self, options: dict[str, Any]) -> Trajectory:
        """One episode to its end (:func:`aipo_env.episode.run_episode`); failures become ``error:<kind>``."""
        return await run_episode(
            self._factory(),
            self.generator,
            options,
            sampling=self.sampling,
            max_new_tokens=self.config.max_new_tokens,
            seed=self.config.seed,
        )

    def plan(
        self, problems: Sequence[int | str] | None = None, step: int = 0
    ) -> list[dict[str, Any]]:
        """The reset options of every episode of a batch, in (group, sample) order."""
        if problems is None:
            if self.task is None:
                raise ValueError("pass problems explicitly when the driver has no task")
            problems = list(range(len(self.task)))
        n = self.config.n_samples
        allowed = self.config.schedule.allowed(step, n)
        out = []
        for position, ref in enumerate(problems):
            key = "problem_index" if isinstance(ref, int) else "problem_id"
            group = f"s{step}-g{position}-{ref}"
            for sample in range(n):
                option: dict[str, Any] = {
                    key: ref,
                    "group_id": group,
                    "sample_index": sample,
                    "trajectory_id": f"{group}-n{sample}",
                    "allow_consult": sample < allowed,
                }
                out.append(option)
        return out

    async def run(
        self,
        problems: Sequence[int | str] | None = None,
        *,
        step: int = 0,
        output: str | Path | None = None,
        resume: bool = False,
        progress: ProgressCallback | None = None,
        show_progress: bool = False,
    ) -> list[Trajectory]:
        """Roll out every problem ``n_samples`` times; returns trajectories by (group, sample).

        The strategy ``config.strategy`` names produces them, unit by unit
        (:meth:`~aipo_env.rollout_strategy.RolloutStrategy.units`: an episode, or under
        ``strategy: arpo`` a group's tree). With ``output`` each unit's trajectories are
        appended as the unit finishes. With ``resume`` the units whose ids are all in
        ``output`` already are not rerun (a tree is regrown unless all its leaves are
        there); they are read back and returned with the new ones. The strategy, with what
        it cost and decided, is left in :attr:`last_strategy`.
        """
        plan = self.plan(problems, step)
        done: dict[str, Trajectory] = {}
        if resume and output is not None and Path(output).exists():
            wanted = {o["trajectory_id"] for o in plan}
            done = {t.trajectory_id: t for t in read_jsonl(output) if t.trajectory_id in wanted}
        semaphore = asyncio.Semaphore(self.config.concurrency)
        strategy = STRATEGIES[self.config.strategy](
            self.generator, self._factory, self.config, self.sampling, semaphore
        )
        self.last_strategy = strategy
        units = strategy.units(plan)
        todo = [u for u in units if any(o["trajectory_id"] not in done for o in u)]
        finished = len(plan) - sum(len(u) for u in todo)
        writer = TrajectoryWriter(output) if output is not None else None
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plan), initial=finished, desc=f"rollout step {step}")

        def record(trajectory: Trajectory) -> None:
            nonlocal finished
            done[trajectory.trajectory_id] = trajectory
            if writer is not None:
                writer.write(trajectory)
            finished += 1
            if bar is not None:
                bar.update(1)
            if progress is not None:
                progress(finished, len(plan), trajectory)

        async def one(unit: list[dict[str, Any]]) -> None:
            for trajectory in await strategy.run_unit(unit):
                record(trajectory)

        try:
            await asyncio.gather(*(one(u) for u in todo))
        finally:
            if writer is not None:
                writer.close()
            if bar is not None:
                bar.close()
        return [done[o["trajectory_id"]] for o in plan]
