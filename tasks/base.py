"""The task abstraction: a dataset of problems, answer extraction and a reward function.

A task knows nothing about consulting, tokens or models. It turns a dataset into
:class:`Problem` records and scores a response text with :meth:`Task.ascore`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """One problem of a task, as the policy sees it and as the verifier scores it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        description="Stable id, unique within the task (used for grouping and resuming)."
    )
    task: str = Field(description="Name of the task this problem belongs to.")
    question: str = Field(
        description="The problem statement shown to the policy (options included for multiple choice)."
    )
    reference: str = Field(
        description="The gold answer the verifier compares against (a letter for multiple choice)."
    )
    solution: str | None = Field(
        default=None,
        description="A reference solution, when the dataset has one (the Reasoning Agent may draw on it).",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Anything else: difficulty, source row, tests for code problems.",
    )


class RewardResult(BaseModel):
    """The outcome of scoring one response."""

    model_config = ConfigDict(extra="forbid")

    score: float = Field(
        description="The reward: 1.0 correct, 0.0 wrong, fractions where the task defines them."
    )
    correct: bool = Field(
        description="Whether the answer counts as correct for accuracy and pass@k."
    )
    extracted: str | None = Field(
        default=None,
        description="The answer extracted from the response, or None when none was found.",
    )
    reason: str = Field(
        default="",
        description="Why the score is what it is when that is not plain: 'no boxed answer', 'timeout', ...",
    )
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="Verifier-specific details (per-test results, parse output).",
    )


class Task(ABC):
    """A dataset of problems plus a verifier.

    Subclasses implement :meth:`load`, :meth:`extract_answer` and :meth:`score`.
    :meth:`ascore` must never block the event loop for long: the default runs
    :meth:`score` in a worker thread; verifiers that can hang override it and
    enforce a hard timeout in a killable process (see ``tasks.verifier_pool``).
    """

    #: Registered name, e.g. ``"math500"``.
    name: str = ""
    #: The instruction appended to each question that says how to give the answer.
    answer_format: str = "Put your final answer within \\boxed{}."
    #: Dataset rows the last load skipped as malformed (dataset-backed tasks count them in
    #: :meth:`load`, through ``tasks.sources.build_problems``; results files report it).
    skipped: int = 0

    def __init__(self) -> None:
        self._problems: list[Problem] | None = None

    @abstractmethod
    def load(self) -> list[Problem]:
        """Read the dataset and return its problems (malformed rows skipped and counted)."""

    @property
    def problems(self) -> list[Problem]:
        """The task's problems, loaded once."""
        if self._problems is None:
            self._problems = self.load()
        return self._problems

    def __len__(self) -> int:
        return len(self.problems)

    @abstractmethod
    def extract_answer(self, response: str) -> str | None:
        """The final answer in a response text, or None when there is none."""

    @abstractmethod
    def score(self, problem: Problem, response: str) -> RewardResult:
        """Score a response to ``problem`` (synchronous; may be slow)."""

    async def ascore(self, problem: Problem, response: str) -> RewardResult:
        """Score without blocking the event loop."""
        return await asyncio.to_thread(self.score, problem, response)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release worker processes or other resources (idempotent)."""
