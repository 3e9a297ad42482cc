"""The rollout strategy contract: how the episodes of a batch come to be (``rollout.strategy``).

:class:`~aipo_env.rollout.RolloutDriver` plans a batch (``n_samples`` reset options per
prompt, in group and sample order), skips what a resumed run already wrote, and records
and writes every trajectory. A strategy decides only how the trajectories are produced:

- :meth:`~RolloutStrategy.units`: how the plan splits into units that are run, written
  and resumed whole (one episode each, unless the strategy says otherwise);
- :meth:`~RolloutStrategy.run_unit`: a unit's trajectories, one per option, in order;
  a failing episode is an ``error:<kind>`` trajectory, never an exception;
- :attr:`~RolloutStrategy.trees`: whether a group's trajectories form a rollout tree
  (``Trajectory.parent_id``/``branch_point``), whose advantages the trainer attributes
  per token;
- :meth:`~RolloutStrategy.metrics`: what the units run so far cost and decided, as
  step metrics.

A strategy is built per batch with the driver's generator, a factory of fresh envs,
the rollout settings, the policy's sampling and the semaphore that bounds the work in
flight. A new strategy is one module with a subclass and one entry in
:data:`aipo_env.strategies.STRATEGIES`; ``rollout.strategy`` names it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

from aipo_env.env import ConsultEnv
from aipo_env.trajectory import Trajectory
from policies.base import Generator, SamplingParams


class RolloutSettings(Protocol):
    """What every strategy reads of :class:`~aipo_env.rollout.RolloutConfig`.

    A structural type: a strategy never imports the config, which checks
    ``rollout.strategy`` against the registry of strategies.
    """

    @property
    def seed(self) -> int | None:
        """Base seed of the per-turn sampling seeds."""

    @property
    def max_new_tokens(self) -> int | None:
        """Per-turn token cap of the policy; None: the env's."""


class RolloutStrategy(ABC):
    """Produces the trajectories of a batch's episodes (the contract is the module docstring)."""

    #: Registered name (``rollout.strategy``).
    name: ClassVar[str]
    #: Whether a group's trajectories form a rollout tree (advantages attributed per token).
    trees: ClassVar[bool] = False

    def __init__(
        self,
        generator: Generator,
        env_factory: Callable[[], ConsultEnv],
        config: RolloutSettings,
        sampling: SamplingParams,
        semaphore: asyncio.Semaphore,
    ) -> None:
        self.generator = generator
        self.env_factory = env_factory
        self.config = config
        self.sampling = sampling
        self.semaphore = semaphore

    def units(self, plan: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The plan's reset options split into units run, written and resumed whole: one each."""
        return [[option] for option in plan]

    @abstractmethod
    async def run_unit(self, options: Sequence[dict[str, Any]]) -> list[Trajectory]:
        """The trajectories of one unit, one per option of ``options``, in order."""

    def metrics(self) -> dict[str, float]:
        """What the units run so far cost and decided, as step metrics (none by default)."""
        return {}
