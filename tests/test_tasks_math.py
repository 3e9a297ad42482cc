"""Math task: boxed-answer extraction, math-verify equivalence, dataset loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.base import Problem
from tasks.math import MathTask, gsm8k_answer, make_gsm8k, make_math500
from tasks.sources import DatasetUnavailable
from tasks.verifier_pool import VerifierPool


@pytest.fixture(scope="module")
def math_task():
    task = MathTask("m", path="unused.jsonl", timeout_s=20.0)
    yield task
    task.close()


def _problem(reference: str) -> Problem:
    return Problem(id="m/0", task="m", question="q", reference=reference)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{\sqrt{\frac{3}{4}}}", r"\sqrt{\frac{3}{4}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"The answer is \boxed 5", "5"),
        (r"\boxed{**73**}", "73"),
        (r"\boxed{2**8}", "2^8"),
        ("no box here: 42", None),
        (r"\boxed{unbalanced", None),
    ],
)
def test_extract_last_boxed(math_task: MathTask, response: str, expected: str | None) -> None:
    assert math_task.extract_answer(response) == expected


@pytest.mark.parametrize(
    ("gold", "boxed"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"[1,2)", r"[1, 2)"),
        (r"\{1,2,3\}", r"\{3,2,1\}"),
        ("73", "**73**"),
        ("256", "2**8"),
        ("1000", "1,000"),
        ("5", "x = 5"),
    ],
)
def test_equivalent_forms_score_one(math_task: MathTask, gold: str, boxed: str) -> None:
    result = math_task.score(_problem(gold), f"Work... \\boxed{{{boxed}}}")
    assert (result.score, result.correct) == (1.0, True), result


@pytest.mark.parametrize(
    ("gold", "boxed"),
    [
        (r"\frac{1}{2}", "0.25"),
        (r"(1,2]", "[1,2]"),
        (r"\{1,2\}", r"\{1,3\}"),
        ("x-1=0", "x-2=0"),
        ("3", "4"),
    ],
)
def test_wrong_answers_score_zero(math_task: MathTask, gold: str, boxed: str) -> None:
    result = math_task.score(_problem(gold), f"\\boxed{{{boxed}}}")
    assert (result.score, result.correct) == (0.0, False)
    assert result.extracted is not None


def test_missing_box_scores_zero_with_reason(math_task: MathTask) -> None:
    result = math_task.score(_problem("2"), "The answer is 2.")
    assert (result.score, result.reason, result.extracted) == (0.0, "no boxed answer", None)


async def test_async_scores_match_references(math_task: MathTask) -> None:
    import asyncio

    problems = [_problem(str(i)) for i in range(6)]
    responses = [f"\\boxed{{{i if i % 2 else i + 1}}}" for i in range(6)]
    results = await asyncio.gather(
        *(math_task.ascore(p, r) for p, r in zip(problems, responses, strict=True))
    )
    assert [r.correct for r in results] == [False, True, False, True, False, True]


def test_verifier_timeout_returns_zero_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks_pool_fns

    import tasks.math as math_module

    # Route the pool call to a function that never returns.
    with VerifierPool(max_workers=1, timeout_s=1.0) as pool:
        task = MathTask("m", path="x.jsonl", pool=pool)
        monkeypatch.setattr(math_module, "verify_math", tasks_pool_fns.sleep_forever_2)
        result = task.score(_problem("1"), r"\boxed{1}")
    assert (result.score, result.correct, result.reason) == (0.0, False, "timeout")


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_local_jsonl_with_column_mapping(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"q": "1+1?", "final": "2", "key": "a", "difficulty": 1.5},
            {"q": "2+2?", "final": 4, "key": "b", "difficulty": 2.0},
        ],
    )
    task = make_math500(
        path=path,
        columns={"question": "q", "answer": "final", "id": "key"},
        metadata_columns=("difficulty",),
    )
    problems = task.problems
    assert [(p.id, p.question, p.reference) for p in problems] == [
        ("math500/a", "1+1?", "2"),
        ("math500/b", "2+2?", "4"),
    ]
    assert problems[1].metadata == {"difficulty": 2.0}
    assert problems[0].solution is None


def test_local_parquet_loads(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"question": ["x?", "y?"], "final_answer": ["3", "\\frac{1}{2}"]})
    pq.write_table(table, path)
    task = MathTask("deep", path=path, columns={"question": "question", "answer": "final_answer"})
    assert [(p.id, p.reference) for p in task.problems] == [
        ("deep/0", "3"),
        ("deep/1", "\\frac{1}{2}"),
    ]


def test_missing_column_error_lists_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "solution_text": "s"}])
    task = MathTask("m", path=path, columns={"question": "question"})
    with pytest.raises(ValueError, match="no column 'answer'.*question, solution_text"):
        task.load()


def test_malformed_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [
        json.dumps({"problem": "ok", "answer": "1"}),
        json.dumps({"problem": "", "answer": "2"}),
        json.dumps({"problem": "no answer", "answer": None}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"problem": "ok too", "answer": "3"}),
    ]
    path.write_text("\n".join(rows) + "\n")
    task = MathTask("m", path=path)
    assert [p.reference for p in task.problems] == ["1", "3"]
    assert task.skipped == 4


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        MathTask("m", path=tmp_path / "nope.jsonl").load()


def test_gsm8k_reference_is_after_marker(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "g.jsonl",
        [{"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7 apples\n#### 1,007"}],
    )
    (problem,) = make_gsm8k(path=path).problems
    assert problem.reference == "1007"
    assert problem.solution == "3 + 4 = <<3+4=7>>7 apples"
    with pytest.raises(ValueError, match="####"):
        gsm8k_answer("no marker")


def test_offline_hub_error_says_how_to_use_a_local_file() -> None:
    task = make_math500(hf_name="aipo-test/definitely-not-cached")
    with pytest.raises(
        DatasetUnavailable, match=r"definitely-not-cached.*path='data\.jsonl'.*problem, answer"
    ):
        task.load()
