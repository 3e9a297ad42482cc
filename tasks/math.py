"""Math word problems with a final ``\\boxed{}`` answer, scored by math-verify.

One class, :class:`MathTask`, covers MATH-500, AIME, GSM8K, DeepMath-103K and any
local JSONL/parquet file: they differ only in the dataset name, split and column
mapping. math-verify runs in a :class:`~tasks.verifier_pool.VerifierPool` with a
hard per-call timeout, because sympy can hang on adversarial answers and
math-verify's own timeouts (``signal.alarm``) fail off the main thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tasks.answers import last_boxed, strip_markdown
from tasks.base import Problem, RewardResult, Task
from tasks.sources import build_problems, load_rows, required_text
from tasks.verifier_pool import VerifierCrash, VerifierPool, VerifierTimeout

logger = logging.getLogger(__name__)

#: Default column names: our field -> dataset column.
DEFAULT_COLUMNS: dict[str, str] = {
    "question": "problem",
    "answer": "answer",
    "solution": "solution",
    "id": "unique_id",
}

_shared_pool: VerifierPool | None = None
_shared_lock = threading.Lock()


_PYTHON_POWER = re.compile(r"(?<=[\w)\]}])\*\*(?=[\w(\[{])")


def shared_math_pool() -> VerifierPool:
    """The process-wide pool math tasks share unless given their own (2 workers, 10 s)."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None:
            _shared_pool = VerifierPool(
                max_workers=2, timeout_s=10.0, warmup_modules=("tasks.math", "math_verify")
            )
        return _shared_pool


def _as_latex(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify's LaTeX extractor sees it."""
    text = text.strip()
    if text.startswith("$") or "\\boxed" in text:
        return text
    return f"${text}$"


def verify_math(gold: str, answer: str) -> dict[str, Any]:
    """Compare two answers with math-verify (runs inside a pool worker).

    Gold comes first: ``verify`` is not symmetric. Timeouts are disabled here
    because they rely on ``signal.alarm``; the pool enforces them instead.
    """
    from math_verify import parse, verify

    # math-verify warns on every call that its timeouts are off; that is intended here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=None)
    pred_parsed = parse(_as_latex(answer), parsing_timeout=None)
    if not pred_parsed:
        pred_parsed = parse(answer, parsing_timeout=None)
    ok = bool(gold_parsed and pred_parsed) and verify(
        gold_parsed, pred_parsed, timeout_seconds=None
    )
    return {"correct": bool(ok), "gold": str(gold_parsed[:1]), "parsed": str(pred_parsed[:1])}


def gsm8k_answer(text: str) -> str:
    """The number after ``####`` in a GSM8K answer cell (commas dropped)."""
    if "####" not in text:
        raise ValueError(f"GSM8K answer has no '####' marker: {text[-60:]!r}")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_solution(text: str) -> str:
    """The worked solution before ``####`` in a GSM8K answer cell."""
    return text.rsplit("####", 1)[0].strip()


class MathTask(Task):
    """A math dataset with a single final answer, by Hugging Face name or local file.

    Args:
        name: registered task name (problem ids are prefixed with it).
        path: a local ``.jsonl``/``.json``/``.parquet`` file; overrides ``hf_name``.
        hf_name: Hugging Face dataset id, e.g. ``HuggingFaceH4/MATH-500``.
        hf_config: dataset config name, e.g. ``main`` for GSM8K.
        split: dataset split.
        columns: our field (question, answer, solution, id) -> dataset column; merged
            over :data:`DEFAULT_COLUMNS`. A solution or id column may be absent.
        answer_fn: turns the answer cell into the reference (GSM8K: text after ``####``).
        solution_fn: turns the answer cell into a solution when there is no solution column.
        metadata_columns: extra columns copied into ``Problem.metadata``.
        limit: keep only the first ``limit`` problems.
        pool: verifier pool; default: one shared by all math tasks.
        timeout_s: when given, the task gets its own pool with this per-call timeout.
    """

    def __init__(
        self,
        name: str = "math",
        *,
        path: str | Path | None = None,
        hf_name: str | None = None,
        hf_config: str | None = None,
        split: str = "test",
        columns: Mapping[str, str] | None = None,
        answer_fn: Callable[[str], str] | None = None,
        solution_fn: Callable[[str], str] | None = None,
        metadata_columns: tuple[str, ...] = (),
        data_files: str | list[str] | None = None,
        limit: int | None = None,
        pool: VerifierPool | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.split = split
        self.data_files = data_files
        unknown = set(columns or {}) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError(
                f"unknown column field(s) {sorted(unknown)}; expected some of {list(DEFAULT_COLUMNS)}"
            )
        self.columns = {**DEFAULT_COLUMNS, **(columns or {})}
        self.answer_fn = answer_fn
        self.solution_fn = solution_fn
        self.metadata_columns = metadata_columns
        self.limit = limit
        self._own_pool = pool is None and timeout_s is not None
        if self._own_pool:
            pool = VerifierPool(
                max_workers=2, timeout_s=timeout_s, warmup_modules=("tasks.math", "math_verify")
            )
        self._pool = pool
        #: Rows skipped as malformed during the last load.
        self.skipped = 0

    @property
    def pool(self) -> VerifierPool:
        """The verifier pool this task scores in."""
        return self._pool if self._pool is not None else shared_math_pool()

    def load(self) -> list[Problem]:
        """Read the rows and build problems; malformed rows are skipped and counted."""
        rows = load_rows(
            source_name=self.name,
            path=self.path,
            hf_name=self.hf_name,
            hf_config=self.hf_config,
            split=self.split,
            columns=self.columns,
            required=("question", "answer"),
            data_files=self.data_files,
        )
        problems, self.skipped = build_problems(rows, self._problem, self.name)
        return problems[: self.limit] if self.limit is not None else problems

    def _problem(self, index: int, row: dict[str, Any]) -> Problem:
        cols = self.columns
        answer_cell = required_text(row, cols["answer"])
        reference = self.answer_fn(answer_cell) if self.answer_fn else answer_cell
        if not reference:
            raise ValueError("empty reference answer")
        solution = row.get(cols["solution"])
        if not isinstance(solution, str) or not solution.strip():
            solution = self.solution_fn(answer_cell) if self.solution_fn else None
        row_id = row.get(cols["id"])
        return Problem(
            id=f"{self.name}/{row_id if row_id not in (None, '') else index}",
            task=self.name,
            question=required_text(row, cols["question"]),
            reference=reference,
            solution=solution,
            metadata={c: row[c] for c in self.metadata_columns if c in row},
        )

    def extract_answer(self, response: str) -> str | None:
        """The content of the last ``\\boxed{}``/``\\fbox{}``, markdown stripped.

        A Python power between operands (``2**8``) becomes LaTeX's ``2^8``, which the
        verifier reads as the power it is.
        """
        boxed = last_boxed(response)
        if boxed is None:
            return None
        boxed = _PYTHON_POWER.sub("^", strip_markdown(boxed))
        return boxed or None

    def _result(self, extracted: str | None, outcome: dict[str, Any] | str) -> RewardResult:
        if isinstance(outcome, str):
            return RewardResult(score=0.0, correct=False, extracted=extracted, reason=outcome)
        correct = bool(outcome["correct"])
        return RewardResult(
            score=1.0 if correct else 0.0,
            correct=correct,
            extracted=extracted,
            reason="" if correct else "not equivalent",
            details={"gold_parsed": outcome["gold"], "parsed": outcome["parsed"]},
        )

    def score(self, problem: Problem, response: str) -> RewardResult:
        """Score synchronously (blocks up to the pool's timeout)."""
        extracted = self.extract_answer(response)
        if extracted is None:
            return RewardResult(score=0.0, correct=False, reason="no boxed answer")
        try:
            outcome = self.pool.run_sync(verify_math, problem.reference, extracted)
        except VerifierTimeout:
            outcome = "timeout"
        except VerifierCrash as exc:
            logger.warning("%s: math-verify failed on %r: %s", self.name, extracted, exc)
            outcome = "verifier error"
        return self._result(extracted, outcome)

    async def ascore(self, problem: Problem, response: str) -> RewardResult:
        """Score in the pool without blocking the event loop."""
        extracted = self.extract_answer(response)
        if extracted is None:
            return RewardResult(score=0.0, correct=False, reason="no boxed answer")
        try:
            outcome = await self.pool.run(verify_math, problem.reference, extracted)
        except VerifierTimeout:
            outcome = "timeout"
        except VerifierCrash as exc:
            logger.warning("%s: math-verify failed on %r: %s", self.name, extracted, exc)
            outcome = "verifier error"
        return self._result(extracted, outcome)

    def close(self) -> None:
        """Stop this task's own pool (the shared pool lives for the process)."""
        if self._own_pool and self._pool is not None:
            self._pool.close()


def _math_factory(
    name: str, hf_name: str, split: str, columns: Mapping[str, str], **defaults: Any
) -> Callable[..., MathTask]:
    def factory(**kwargs: Any) -> MathTask:
        merged_columns = {**columns, **kwargs.pop("columns", {})}
        options = {"hf_name": hf_name, "split": split, **defaults, **kwargs}
        return MathTask(options.pop("name", name), columns=merged_columns, **options)

    factory.__doc__ = f"Make the '{name}' task ({hf_name}, split {split}); kwargs go to MathTask."
    return factory


make_math500 = _math_factory(
    "math500",
    "HuggingFaceH4/MATH-500",
    "test",
    {"question": "problem", "answer": "answer", "solution": "solution", "id": "unique_id"},
    metadata_columns=("subject", "level"),
)
make_aime2024 = _math_factory(
    "aime2024",
    "HuggingFaceH4/aime_2024",
    "train",
    {"question": "problem", "answer": "answer", "solution": "solution", "id": "id"},
)
make_aime2025 = _math_factory(
    "aime2025",
    "MathArena/aime_2025",
    "train",
    {"question": "problem", "answer": "answer", "solution": "solution", "id": "problem_idx"},
)
make_gsm8k = _math_factory(
    "gsm8k",
    "openai/gsm8k",
    "test",
    {"question": "question", "answer": "answer", "solution": "solution", "id": "id"},
    hf_config="main",
    answer_fn=gsm8k_answer,
    solution_fn=gsm8k_solution,
)
make_deepmath = _math_factory(
    "deepmath",
    "zwhe99/DeepMath-103K",
    "train",
    {"question": "question", "answer": "final_answer", "solution": "r1_solution_1", "id": "id"},
    metadata_columns=("difficulty", "topic"),
)
