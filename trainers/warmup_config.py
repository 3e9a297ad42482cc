"""The ``warmup:`` section of a training config: the consult warm-up's settings and checks.

The procedure is :mod:`trainers.warmup`; its settings live apart from it so that the
training config (:mod:`trainers.config`) reads them without importing the procedure,
which needs the run's objects built from that config.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class WarmupSection(BaseModel):
    """The supervised consult warm-up that runs before the first RL step (off by default)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False, description="Run the warm-up before step 1 of a fresh run."
    )
    agent: str = Field(
        default="reasoning",
        description="The agent the demonstrations consult (must be in env.agent_names).",
    )
    problems: int = Field(
        default=64, ge=1, description="Training problems rolled out to build demonstrations."
    )
    samples: int = Field(
        default=4,
        ge=2,
        description="Episodes per problem: the first half open with a consult, the rest do not.",
    )
    consult_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of the demonstrations that consult; the rest solve alone.",
    )
    min_demonstrations: int = Field(
        default=32, ge=1, description="Fewer kept demonstrations than this stop the run."
    )
    epochs: int = Field(default=3, ge=1, description="Passes over the demonstrations.")
    batch_size: int = Field(default=8, ge=1, description="Demonstrations per optimizer step.")
    lr: float = Field(default=1.0e-4, gt=0.0, description="AdamW learning rate of the warm-up.")
    splice: bool = Field(
        default=True,
        description=(
            "When correct consult episodes are scarce, also build demonstrations from a consult "
            "episode that ended wrong followed by a correct solution the policy wrote alone for the "
            "same problem."
        ),
    )
    reference: bool = Field(
        default=False,
        description=(
            "When correct consult episodes (and splices) are too few, continue the consult "
            "episodes that ended wrong with the task's reference solution, written out from its "
            "steps (tasks with privileged steps only). Teaches a policy that cannot yet use a "
            "reply what using it looks like."
        ),
    )
    train_agent_tokens: bool = Field(
        default=False,
        description="Also fit the agent's reply tokens (off: the reply is context only).",
    )
    consults: bool = Field(
        default=True,
        description=(
            "False: fit the same demonstrations with their consults taken out (the prompt as in "
            "independent mode, the consult tag and the agent's reply dropped, the policy's own "
            "solution kept): the warm-up of a baseline that never consults."
        ),
    )
    check_problems: int = Field(
        default=32,
        ge=0,
        description="Training problems (not used for demonstrations) for the after-warm-up check.",
    )


def check_reference_steps(task: Any, task_name: str) -> None:
    """Refuse ``warmup.reference`` on a task without reference steps (ValueError naming it)."""
    privileged = task.privileged
    if "steps" not in privileged:
        raise ValueError(
            f"warmup.reference needs a task with reference steps; {task_name!r} "
            f"has {', '.join(sorted(privileged)) or 'no privileged information'}"
        )
