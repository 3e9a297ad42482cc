"""A rollout strategy as a contributor adds one (the contributor test, issue 27).

``group``: a prompt's samples are one unit, run together and written and resumed whole
(a run killed mid-group redoes the group). Registering it is one ``STRATEGIES`` entry
(``tests/test_contributor_recipes.py`` adds it, as a contributor would in
``aipo_env/strategies.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aipo_env.episode import run_episode
from aipo_env.rollout_strategy import RolloutStrategy
from aipo_env.trajectory import Trajectory


class GroupRollout(RolloutStrategy):
    """A group's independent samples as one unit."""

    name = "group"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = 0

    def units(self, plan: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """One unit per ``group_id``, in plan order."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for option in plan:
            groups.setdefault(option["group_id"], []).append(option)
        return list(groups.values())

    async def run_unit(self, options: Sequence[dict[str, Any]]) -> list[Trajectory]:
        """The group's episodes, concurrently, each under the semaphore."""

        async def one(option: dict[str, Any]) -> Trajectory:
            async with self.semaphore:
                return await run_episode(
                    self.env_factory(),
                    self.generator,
                    option,
                    sampling=self.sampling,
                    max_new_tokens=self.config.max_new_tokens,
                    seed=self.config.seed,
                )

        self.groups += 1
        return list(await asyncio.gather(*(one(option) for option in options)))

    def metrics(self) -> dict[str, float]:
        """How many groups ran."""
        return {"group/units": float(self.groups)}
