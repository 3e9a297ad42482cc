"""Multiple-choice questions (GPQA-Diamond): seeded option shuffling, letter answers.

GPQA stores the correct answer in a fixed column, so the options are shuffled
with a permutation seeded by ``(seed, problem id)``: the same problem always
shows the same order, and the reference letter follows the permutation.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.answers import last_boxed, strip_markdown
from tasks.base import Problem, RewardResult, Task
from tasks.sources import build_problems, load_rows, required_text

LETTERS = "ABCDEFGHIJ"

#: GPQA's columns: our field -> dataset column.
GPQA_COLUMNS: dict[str, str] = {
    "question": "Question",
    "correct": "Correct Answer",
    "incorrect_1": "Incorrect Answer 1",
    "incorrect_2": "Incorrect Answer 2",
    "incorrect_3": "Incorrect Answer 3",
    "id": "Record ID",
}

_PATTERNS = [
    re.compile(r"answer\s+is\s*[:：]?\s*\(?\**\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"answer\s*[:：]\s*\**\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),
]


def permutation(problem_id: str, n: int, seed: int) -> list[int]:
    """A deterministic permutation of ``range(n)`` for one problem (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def extract_letter(response: str, n_options: int = 4) -> str | None:
    """The chosen letter: ``\\boxed{C}``, "The answer is (C)", "Answer: C"; last one wins."""
    valid = LETTERS[:n_options]
    boxed = last_boxed(response)
    if boxed is not None:
        text = strip_markdown(re.sub(r"\\text\{([^}]*)\}", r"\1", boxed)).strip("() .")
        if len(text) == 1 and text.upper() in valid:
            return text.upper()
        match = re.match(r"\(?([A-J])\)", boxed.strip())
        if match and match.group(1) in valid:
            return match.group(1)
    best: tuple[int, str] | None = None
    for pattern in _PATTERNS:
        for match in pattern.finditer(response):
            letter = match.group(1).upper()
            if letter in valid and (best is None or match.start() > best[0]):
                best = (match.start(), letter)
    return None if best is None else best[1]


class MultipleChoiceTask(Task):
    """Questions with one correct option among several, scored by exact letter match.

    Args:
        name: registered task name.
        path: local ``.jsonl``/``.parquet`` file; overrides ``hf_name``.
        hf_name, hf_config, split: the Hugging Face dataset.
        columns: our field -> dataset column (see :data:`GPQA_COLUMNS`); fields
            ``correct`` and ``incorrect_*`` name the option columns.
        seed: seeds every problem's option permutation.
        limit: keep only the first ``limit`` problems.
    """

    answer_format = "Give the letter of your choice within \\boxed{}, e.g. \\boxed{A}."

    def __init__(
        self,
        name: str = "gpqa_diamond",
        *,
        path: str | Path | None = None,
        hf_name: str | None = "Idavidrein/gpqa",
        hf_config: str | None = "gpqa_diamond",
        split: str = "train",
        columns: Mapping[str, str] | None = None,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.split = split
        self.columns = {**GPQA_COLUMNS, **(columns or {})}
        self.seed = seed
        self.limit = limit
        #: Rows skipped as malformed during the last load.
        self.skipped = 0

    @property
    def option_fields(self) -> list[str]:
        """The column fields holding options, the correct one first."""
        return ["correct"] + sorted(f for f in self.columns if f.startswith("incorrect_"))

    def load(self) -> list[Problem]:
        """Read rows, shuffle each problem's options, skip malformed rows."""
        rows = load_rows(
            source_name=self.name,
            path=self.path,
            hf_name=self.hf_name,
            hf_config=self.hf_config,
            split=self.split,
            columns=self.columns,
            required=["question", *self.option_fields],
        )
        problems, self.skipped = build_problems(rows, self._problem, self.name)
        return problems[: self.limit] if self.limit is not None else problems

    def _problem(self, index: int, row: dict[str, Any]) -> Problem:
        options = [required_text(row, self.columns[f]) for f in self.option_fields]
        row_id = row.get(self.columns["id"])
        problem_id = f"{self.name}/{row_id if row_id not in (None, '') else index}"
        order = permutation(problem_id, len(options), self.seed)
        shown = [options[i] for i in order]
        reference = LETTERS[order.index(0)]  # option 0 is the correct one
        body = "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(shown))
        stem = required_text(row, self.columns["question"])
        return Problem(
            id=problem_id,
            task=self.name,
            question=f"{stem}\n\n{body}",
            reference=reference,
            metadata={"options": shown, "permutation": order, "stem": stem},
        )

    def content_key(self, problem: Problem) -> str:
        """The question's stem and its options as a set: the same whatever order a seed shows them in.

        The options are sorted after normalising, so neither the shuffle nor the letters
        change the key. A problem without ``stem``/``options`` metadata (made elsewhere)
        falls back to its question text.
        """
        from tasks.question_text import normalize_question

        stem, options = problem.metadata.get("stem"), problem.metadata.get("options")
        if not isinstance(stem, str) or not options:
            return super().content_key(problem)
        parts = [normalize_question(stem), *sorted(normalize_question(str(o)) for o in options)]
        return "\x1f".join(parts)

    def extract_answer(self, response: str) -> str | None:
        """The chosen option letter, or None."""
        return extract_letter(response, len(LETTERS))

    def score(self, problem: Problem, response: str) -> RewardResult:
        """1.0 when the chosen letter is the reference letter."""
        n = len(problem.metadata.get("options", [])) or 4
        letter = extract_letter(response, n)
        if letter is None:
            return RewardResult(score=0.0, correct=False, reason="no answer letter")
        correct = letter == problem.reference
        return RewardResult(
            score=float(correct),
            correct=correct,
            extracted=letter,
            reason="" if correct else f"chose {letter}, expected {problem.reference}",
        )

    async def ascore(self, problem: Problem, response: str) -> RewardResult:
        """Scoring is a regex match: cheap enough to run on the event loop."""
        return self.score(problem, response)

    def answer_spans(self, problem: Problem, text: str) -> list[tuple[int, int]]:
        """The reference letter as a choice ("(B)", "option B", "answer is B", ``\\boxed{B}``) or the correct option's text."""
        letter = re.escape(problem.reference)
        pattern = (
            rf"\({letter}\)|\\boxed\{{{letter}\}}"
            rf"|\b(?:option|choice|letter|answer(?:\s+is)?\s*:?)\s*{letter}(?![A-Za-z])"
        )
        spans = [m.span() for m in re.finditer(pattern, text, re.IGNORECASE)]
        options = problem.metadata.get("options") or []
        index = LETTERS.find(problem.reference)
        if 0 <= index < len(options) and str(options[index]).strip():
            correct = re.escape(str(options[index]).strip())
            spans += [m.span() for m in re.finditer(correct, text, re.IGNORECASE)]
        return sorted(spans)

    def states_answer(self, problem: Problem, text: str, shown: str = "") -> bool:
        """Like :meth:`Task.states_answer`, but the statement lists every option, so only ``shown`` sets the baseline."""
        baseline = len(self.answer_spans(problem, shown)) if shown else 0
        return len(self.answer_spans(problem, text)) > baseline


def make_gpqa_diamond(**kwargs: Any) -> MultipleChoiceTask:
    """GPQA-Diamond (198 questions; gated on the hub: accept its terms or pass ``path=``)."""
    return MultipleChoiceTask(kwargs.pop("name", "gpqa_diamond"), **kwargs)
