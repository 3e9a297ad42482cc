"""The policy alone on held-out problems: what the embedded trainer reports before and after."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aipo_env.config import EnvConfig
from aipo_env.rollout import RolloutConfig, RolloutDriver
from aipo_env.trajectory import Trajectory
from policies.base import Generator
from tasks.base import Task


async def evaluate_alone(
    generator: Generator,
    task: Task,
    *,
    problems: Sequence[int | str],
    output: str | Path,
    env_config: EnvConfig,
    max_new_tokens: int,
    concurrency: int,
    progress: bool = False,
) -> list[Trajectory]:
    """The policy reasoning alone: one greedy sample per problem, in independent mode.

    ``problems``: indices or ids of ``task``'s problems. ``env_config``: the run's
    :class:`~aipo_env.config.EnvConfig`, switched to independent mode here (no agents,
    no consult instructions). Every trajectory is appended to ``output`` as it finishes;
    samples already in ``output`` are read back instead of generated again. Returns
    the trajectories, one per problem.
    """
    driver = RolloutDriver(
        generator,
        task=task,
        agents=None,
        env_config=env_config.model_copy(update={"mode": "independent"}),
        config=RolloutConfig(
            n_samples=1,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            concurrency=concurrency,
        ),
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return await driver.run(list(problems), output=output, resume=True, show_progress=progress)
