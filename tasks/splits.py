"""Held-out sets that are held out: a stable partition of a task's questions by content.

A held-out set built as "the same task with another seed" is mostly the training set
again when the task's question space is small (``rg:chain_sum_easy`` has about 200
distinct questions; 30 of 32 held-out problems occurred in training). Here a problem's
side is a function of *what it asks*, never of the seed, the row or the id:

1. :meth:`tasks.base.Task.content_key` gives the problem's content form (by default
   :func:`tasks.question_text.normalize_question` of its question; a task whose question
   text alone is not its identity, such as multiple choice with shuffled options,
   overrides it);
2. :func:`held_out_side` hashes that key with SHA-256 (never Python's salted ``hash``,
   so every process and machine agrees) and puts it on the held-out side when the hash,
   read as a number in [0, 1), is below ``fraction``;
3. :class:`SplitTask` wraps a task and keeps the problems of one side only, dropping
   repeated content, and otherwise behaves exactly like the task it wraps.

Two tasks built with different seeds, filtered to opposite sides, can then never share a
question. :func:`measure_overlap` checks any two problem lists (a run's training set and
whatever it is evaluated on) and says how many held-out problems occur in training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.base import Problem, RewardResult, SolutionStep, Task

Side = Literal["train", "held_out"]
SIDES: tuple[str, ...] = ("train", "held_out")

#: How many held-out questions that occur in training :class:`Overlap` keeps as examples.
MAX_EXAMPLES = 5


def held_out_side(key: str, fraction: float) -> bool:
    """Whether content ``key`` is on the held-out side of a ``fraction`` held-out partition.

    SHA-256 of the key's UTF-8, its first 8 bytes read as a number in [0, 1), compared
    with ``fraction``: stable across processes, machines and Python versions, and
    monotone in ``fraction`` (a key held out at 0.1 is held out at 0.2 as well).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class Overlap(BaseModel):
    """How much of a held-out set occurs in a training set, by content key."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(description="Held-out problems whose content key occurs in training.")
    held_out: int = Field(description="Held-out problems measured.")
    held_out_distinct: int = Field(description="Distinct content keys among them.")
    train_distinct: int = Field(description="Distinct content keys of the training problems.")
    examples: list[str] = Field(
        default_factory=list,
        description=f"Up to {MAX_EXAMPLES} held-out questions that occur in training, as written.",
    )
    held_out_duplicates: int = Field(
        default=0, description="Held-out problems dropped for repeating one already kept."
    )
    train_duplicates: int = Field(
        default=0, description="Training problems dropped for repeating one already kept."
    )

    def describe(self) -> str:
        """``"30 of 32"``: the count among the held-out problems."""
        return f"{self.count} of {self.held_out}"


def measure_overlap(
    train_problems: Iterable[Problem],
    held_out_problems: Sequence[Problem],
    key_fn: Callable[[Problem], str],
    *,
    train_key_fn: Callable[[Problem], str] | None = None,
) -> Overlap:
    """Count the held-out problems whose content key occurs among the training problems.

    ``key_fn`` keys the held-out problems, ``train_key_fn`` (default: ``key_fn``) the
    training ones, for a held-out set that is another task.
    """
    train_keys = {(train_key_fn or key_fn)(p) for p in train_problems}
    held_keys = [key_fn(p) for p in held_out_problems]
    shared = [p for p, key in zip(held_out_problems, held_keys, strict=True) if key in train_keys]
    examples: list[str] = []
    for problem in shared:
        text = " ".join(problem.question.split())
        text = text if len(text) <= 160 else text[:157] + "..."
        if text not in examples:
            examples.append(text)
        if len(examples) == MAX_EXAMPLES:
            break
    return Overlap(
        count=len(shared),
        held_out=len(held_keys),
        held_out_distinct=len(set(held_keys)),
        train_distinct=len(train_keys),
        examples=examples,
    )


class SplitTask(Task):
    """One side of a task's content partition, otherwise the task it wraps.

    Keeps the base task's problems whose :meth:`~tasks.base.Task.content_key` is on
    ``side`` (:func:`held_out_side` at ``fraction``), in the base task's order and with
    its ids, dropping a problem whose key repeats one already kept (``dedupe``).
    ``fraction=None`` filters nothing (the held-out set is another task) but still
    dedupes. ``limit`` keeps the first ``limit`` problems left.

    Everything else (answer extraction, scoring, privileged information, the leak
    guard's hooks, ``close``, ``name``, any other attribute) is the base task's, so an
    agent, the warm-up or a trainer handed a ``SplitTask`` behaves as with the base.

    After :attr:`problems` is read: :attr:`duplicates` counts the problems dropped as
    repeats, :attr:`other_side` those dropped for being on the other side, and
    :attr:`available` the problems kept before ``limit``.
    """

    def __init__(
        self,
        base: Task,
        side: Side,
        fraction: float | None,
        *,
        dedupe: bool = True,
        limit: int | None = None,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        if fraction is not None:
            held_out_side("", fraction)  # checks the range now, not at load
        super().__init__()
        self._base = base
        self.side: Side = side
        self.fraction = fraction
        self.dedupe = dedupe
        self.limit = limit
        #: Problems dropped because their content repeats a kept one.
        self.duplicates = 0
        #: Problems dropped because their content is on the other side.
        self.other_side = 0
        #: Problems kept before ``limit``.
        self.available = 0

    @property
    def base(self) -> Task:
        """The wrapped task."""
        return self._base

    def load(self) -> list[Problem]:
        """The base task's problems on this side, repeats dropped and counted."""
        kept: list[Problem] = []
        seen: set[str] = set()
        self.duplicates = self.other_side = 0
        for problem in self._base.problems:
            key = self._base.content_key(problem)
            if self.fraction is not None and held_out_side(key, self.fraction) != (
                self.side == "held_out"
            ):
                self.other_side += 1
                continue
            if self.dedupe and key in seen:
                self.duplicates += 1
                continue
            seen.add(key)
            kept.append(problem)
        self.available = len(kept)
        return kept[: self.limit] if self.limit is not None else kept

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes SplitTask lacks: the base task's own (dataset, seed, ...).
        if name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)

    @property  # type: ignore[override]
    def name(self) -> str:
        """The base task's name: a split is the same task, fewer problems."""
        return self._base.name

    @property  # type: ignore[override]
    def answer_format(self) -> str:
        """The base task's answer instruction."""
        return self._base.answer_format

    @property  # type: ignore[override]
    def skipped(self) -> int:
        """Malformed rows the base task skipped."""
        return self._base.skipped

    @property  # type: ignore[override]
    def generated(self) -> bool:
        """Whether the base task's problems are generated draws."""
        return self._base.generated

    def content_key(self, problem: Problem) -> str:
        """The base task's content key."""
        return self._base.content_key(problem)

    def extract_answer(self, response: str) -> str | None:
        """The base task's answer extraction."""
        return self._base.extract_answer(response)

    def score(self, problem: Problem, response: str) -> RewardResult:
        """The base task's verifier."""
        return self._base.score(problem, response)

    async def ascore(self, problem: Problem, response: str) -> RewardResult:
        """The base task's verifier, without blocking the event loop (its own way)."""
        return await self._base.ascore(problem, response)

    @property
    def privileged(self) -> frozenset[str]:
        """The base task's privileged information."""
        return self._base.privileged

    def facts(self, problem: Problem) -> list[str]:
        """The base task's facts for ``problem``."""
        return self._base.facts(problem)

    def solution_steps(self, problem: Problem) -> list[SolutionStep]:
        """The base task's reference steps for ``problem``."""
        return self._base.solution_steps(problem)

    def answer_direction(self, problem: Problem, candidate: str) -> str | None:
        """The base task's comparison of a wrong candidate."""
        return self._base.answer_direction(problem, candidate)

    def answer_spans(self, problem: Problem, text: str) -> list[tuple[int, int]]:
        """Where ``text`` states the answer, by the base task's rule."""
        return self._base.answer_spans(problem, text)

    def states_answer(self, problem: Problem, text: str, shown: str = "") -> bool:
        """The base task's leak test."""
        return self._base.states_answer(problem, text, shown)

    def close(self) -> None:
        """Close the base task."""
        self._base.close()

    def __repr__(self) -> str:
        return f"SplitTask({self._base.name!r}, side={self.side!r}, fraction={self.fraction})"
