"""GRPO's rollout (``rollout.strategy: grpo``): every sample is its own episode from the prompt.

The ``n_samples`` episodes of a prompt share nothing but the prompt; each is run,
written and resumed on its own, under the driver's semaphore
(:mod:`aipo_env.rollout_strategy` holds the contract).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aipo_env.episode import run_episode
from aipo_env.rollout_strategy import RolloutStrategy
from aipo_env.trajectory import Trajectory


class IndependentRollout(RolloutStrategy):
    """Independent samples: one episode per reset option, each to its end."""

    name = "grpo"

    async def run_unit(self, options: Sequence[dict[str, Any]]) -> list[Trajectory]:
        """The episode of the unit's one option (:func:`aipo_env.episode.run_episode`)."""
        (option,) = options
        async with self.semaphore:
            trajectory = await run_episode(
                self.env_factory(),
                self.generator,
                option,
                sampling=self.sampling,
                max_new_tokens=self.config.max_new_tokens,
                seed=self.config.seed,
            )
        return [trajectory]
