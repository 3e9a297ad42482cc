"""Procedurally generated problems from reasoning-gym: no download, any size, seeded.

Each problem keeps its reasoning-gym entry in ``metadata["entry"]`` so the
dataset's own ``score_answer`` can score it. Difficulty knobs (chain_sum's
``min_terms``, ``max_digits``, ...) pass straight through to
``reasoning_gym.create_dataset`` so a tiny model can be given problems it can learn.
"""

from __future__ import annotations

import re
from typing import Any

from tasks.answers import answer_line, last_boxed, strip_markdown
from tasks.base import Problem, RewardResult, SolutionStep, Task

#: A plain (optionally signed, decimal) number.
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

#: reasoning-gym gives 0.01 (sometimes 0.0) for a wrong answer; 1.0 for a right one.
CORRECT_THRESHOLD = 0.99


def reasoning_gym_names() -> list[str]:
    """Every dataset name the installed reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ProceduralTask(Task):
    """A reasoning-gym dataset scored by its own ``score_answer``.

    Args:
        dataset: reasoning-gym dataset name, e.g. ``"chain_sum"``.
        size: number of problems generated.
        seed: generation seed (same seed, same problems).
        name: registered task name; default ``rg:<dataset>``.
        **dataset_kwargs: passed to ``reasoning_gym.create_dataset`` (difficulty knobs).

    Another seed draws from the same question space, so it is no held-out set by
    itself: a held-out set is the held-out side of the content partition
    (``tasks/splits.py``). A question is its whole text (the animals of a leg count, the
    expression of a chain sum), so the default content key is the problem's identity.
    """

    #: Problems are draws: the same question may come up twice in one task.
    generated = True

    def __init__(
        self,
        dataset: str,
        *,
        size: int = 500,
        seed: int = 0,
        name: str | None = None,
        **dataset_kwargs: Any,
    ) -> None:
        super().__init__()
        names = reasoning_gym_names()
        if dataset not in names:
            raise KeyError(
                f"unknown reasoning-gym dataset '{dataset}'; valid ones include "
                f"{', '.join(names[:12])}, ... ({len(names)} in all; see "
                "tasks.procedural.reasoning_gym_names())"
            )
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.dataset = dataset
        self.name = name or f"rg:{dataset}"
        self.size = size
        self.seed = seed
        self.dataset_kwargs = dataset_kwargs
        self._rg_dataset: Any = None
        #: Always 0: generated problems are never malformed.
        self.skipped = 0

    @property
    def rg_dataset(self) -> Any:
        """The reasoning-gym dataset object (created once)."""
        if self._rg_dataset is None:
            import reasoning_gym

            try:
                self._rg_dataset = reasoning_gym.create_dataset(
                    self.dataset, size=self.size, seed=self.seed, **self.dataset_kwargs
                )
            except TypeError as exc:
                raise ValueError(
                    f"reasoning-gym dataset '{self.dataset}' rejected options "
                    f"{self.dataset_kwargs}: {exc}"
                ) from exc
        return self._rg_dataset

    def load(self) -> list[Problem]:
        """Generate ``size`` problems."""
        problems = []
        for index in range(self.size):
            entry = self.rg_dataset[index]
            problems.append(
                Problem(
                    id=f"{self.name}/{self.seed}/{index}",
                    task=self.name,
                    question=entry["question"],
                    reference=str(entry["answer"]),
                    metadata={"entry": entry},
                )
            )
        return problems

    def extract_answer(self, response: str) -> str | None:
        """``\\boxed{}`` content, else an ``Answer:`` line, else the last non-empty line."""
        return self._extract(response)[0]

    @staticmethod
    def _extract(response: str) -> tuple[str | None, bool]:
        """The answer and whether it is only the last-line fallback."""
        boxed = last_boxed(response)
        if boxed is not None:
            return strip_markdown(boxed), False
        line = answer_line(response)
        if line is not None:
            return strip_markdown(line), False
        lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
        return (strip_markdown(lines[-1]), True) if lines else (None, False)

    def score(self, problem: Problem, response: str) -> RewardResult:
        """The dataset's own score; ``correct`` when it is at least 0.99.

        Without a box or an ``Answer:`` line, the last line is the answer; when the
        reference is a number, that line's last number is (``4 + 2 = 6`` answers 6),
        since scoring the whole sentence would fail every unboxed correct answer.
        """
        extracted, fallback = self._extract(response)
        if fallback and extracted is not None and _NUMBER.fullmatch(problem.reference.strip()):
            numbers = _NUMBER.findall(extracted)
            extracted = numbers[-1] if numbers else extracted
        if extracted is None:
            return RewardResult(score=0.0, correct=False, reason="no answer")
        entry = problem.metadata.get("entry") or {
            "question": problem.question,
            "answer": problem.reference,
            "metadata": {},
        }
        try:
            raw = float(self.rg_dataset.score_answer(extracted, entry))
        except Exception as exc:  # noqa: BLE001 - a scorer bug must not crash a rollout
            return RewardResult(
                score=0.0, correct=False, extracted=extracted, reason=f"scorer error: {exc!r}"
            )
        correct = raw >= CORRECT_THRESHOLD
        # Keep the dataset's partial credit, but not its 0.01 for a plain wrong answer.
        partial = raw if raw > 0.011 else 0.0
        return RewardResult(
            score=1.0 if correct else partial,
            correct=correct,
            extracted=extracted,
            reason="" if correct else "wrong answer",
            details={"rg_score": raw},
        )

    @property
    def privileged(self) -> frozenset[str]:
        """Facts and/or reference steps, for the datasets ``tasks/privileged.py`` covers."""
        from tasks.privileged import privileged_kinds

        return privileged_kinds(self.dataset)

    def facts(self, problem: Problem) -> list[str]:
        """The facts the problem's entry carries (``leg_counting``: legs per animal)."""
        from tasks.privileged import FACTS

        provider = FACTS.get(self.dataset)
        entry = problem.metadata.get("entry")
        return provider(entry) if provider is not None and entry else []

    def solution_steps(self, problem: Problem) -> list[SolutionStep]:
        """The reference steps the problem's entry yields (chain sums, products, ...)."""
        from tasks.privileged import STEPS

        provider = STEPS.get(self.dataset)
        entry = problem.metadata.get("entry")
        return provider(entry) if provider is not None and entry else []


def make_procedural(dataset: str, **kwargs: Any) -> ProceduralTask:
    """``make_task("rg:<dataset>", size=..., seed=..., **difficulty)``."""
    return ProceduralTask(dataset, **kwargs)
