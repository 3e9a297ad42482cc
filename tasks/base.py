"""The task abstraction: a dataset of problems, answer extraction and a reward function.

A task knows nothing about consulting, tokens or models. It turns a dataset into
:class:`Problem` records and scores a response text with :meth:`Task.ascore`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.answers import numeric_direction, reference_spans
from tasks.question_text import normalize_question


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


class SolutionStep(BaseModel):
    """One step of a problem's reference solution, as a Reasoning agent may hand it out."""

    model_config = ConfigDict(extra="forbid")

    action: str = Field(
        description="What to do, without its outcome: 'compute 1663 - 5242', 'multiply 5 spiders by 8 legs'."
    )
    result: str = Field(
        description="The step's outcome ('-3579'); the last step's result is the final answer."
    )


#: Privileged information a task may hand to agents besides its verifier (which every task
#: has): ``facts`` (:meth:`Task.facts`) and ``steps`` (:meth:`Task.solution_steps`).
PRIVILEGED_KINDS: tuple[str, ...] = ("facts", "steps")


class Task(ABC):
    """A dataset of problems plus a verifier.

    Subclasses implement :meth:`load`, :meth:`extract_answer` and :meth:`score`.
    :meth:`ascore` must never block the event loop for long: the default runs
    :meth:`score` in a worker thread; verifiers that can hang override it and
    enforce a hard timeout in a killable process (see ``tasks.verifier_pool``).

    Privileged information, for agents that know more than the policy (``kind: oracle``
    in ``agents/oracle.py``), is optional: a task lists what it has in :attr:`privileged`
    and implements the matching hooks, :meth:`facts` and :meth:`solution_steps`. Every
    task can say how a wrong answer is off (:meth:`answer_direction`) and whether a text
    gives its answer away (:meth:`states_answer`, the agents' leak guard); the defaults
    compare numbers and look for the reference as a token.
    """

    #: Registered name, e.g. ``"math500"``.
    name: str = ""
    #: The instruction appended to each question that says how to give the answer.
    answer_format: str = "Put your final answer within \\boxed{}."
    #: Dataset rows the last load skipped as malformed (dataset-backed tasks count them in
    #: :meth:`load`, through ``tasks.sources.build_problems``; results files report it).
    skipped: int = 0
    #: Whether the problems are draws of a generator (reasoning-gym), so a repeated
    #: question is a repeated draw, not a duplicate row of a dataset (``tasks.splits``).
    generated: bool = False

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

    def content_key(self, problem: Problem) -> str:
        """What ``problem`` asks, in a form two copies of the same question share.

        Held-out sets are partitioned by it and checked against training by it
        (``tasks/splits.py``). Default: :func:`tasks.question_text.normalize_question` of
        the question. A task whose question text carries more than its identity (options
        shuffled per seed) or less (data outside the text) overrides it.
        """
        return normalize_question(problem.question)

    @abstractmethod
    def extract_answer(self, response: str) -> str | None:
        """The final answer in a response text, or None when there is none."""

    @abstractmethod
    def score(self, problem: Problem, response: str) -> RewardResult:
        """Score a response to ``problem`` (synchronous; may be slow)."""

    async def ascore(self, problem: Problem, response: str) -> RewardResult:
        """Score without blocking the event loop."""
        return await asyncio.to_thread(self.score, problem, response)

    @property
    def privileged(self) -> frozenset[str]:
        """The privileged information this task's problems carry (a subset of PRIVILEGED_KINDS).

        Must be cheap, with nothing loaded: the config check asks it before any model loads.
        Default: none.
        """
        return frozenset()

    def facts(self, problem: Problem) -> list[str]:
        """Facts a Knowledge agent may state for ``problem``, one sentence each ('A spider has 8 legs.').

        Facts are what the problem needs and the policy may not know; none should state the
        answer. Implemented by tasks whose :attr:`privileged` has ``facts``; default none.
        """
        return []

    def solution_steps(self, problem: Problem) -> list[SolutionStep]:
        """The reference solution of ``problem`` as ordered steps, the last one giving the answer.

        A Reasoning agent hands them out one at a time and never the last one's result.
        Implemented by tasks whose :attr:`privileged` has ``steps``; default none.
        """
        return []

    def answer_direction(self, problem: Problem, candidate: str) -> str | None:
        """How a wrong ``candidate`` is off: ``"too large"``, ``"too small"``, or None when the task cannot tell.

        Default: a comparison when the reference and the candidate are both numbers.
        """
        return numeric_direction(problem.reference, candidate)

    def answer_spans(self, problem: Problem, text: str) -> list[tuple[int, int]]:
        """Where ``text`` states ``problem``'s reference answer, as character spans.

        Default: the reference as a number token of the same value, or as a whole word
        (:func:`tasks.answers.reference_spans`). Tasks whose answer can be written in other
        ways override it.
        """
        return reference_spans(problem.reference, text)

    def states_answer(self, problem: Problem, text: str, shown: str = "") -> bool:
        """Whether ``text`` states the reference more often than what the policy already sees does.

        ``shown`` is the policy's own request (a Verify agent may confirm the candidate it
        was shown). The baseline is the larger of the mentions in ``shown`` and in the
        problem statement, so quoting the problem ("compute 1 * 5" when the answer is 5)
        is not a leak, but "1 * 5 = 5" is.
        """
        baseline = max(
            len(self.answer_spans(problem, problem.question)),
            len(self.answer_spans(problem, shown)) if shown else 0,
        )
        return len(self.answer_spans(problem, text)) > baseline

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release worker processes or other resources (idempotent)."""
