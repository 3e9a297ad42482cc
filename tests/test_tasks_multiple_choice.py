"""Multiple choice: seeded option permutation, reference letter, letter extraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.multiple_choice import MultipleChoiceTask, extract_letter, permutation
from tasks.sources import DatasetUnavailable


def _gpqa_file(tmp_path: Path, n: int = 6) -> Path:
    rows = [
        {
            "Question": f"Question {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong a {i}",
            "Incorrect Answer 2": f"wrong b {i}",
            "Incorrect Answer 3": f"wrong c {i}",
            "Record ID": f"rec{i}",
        }
        for i in range(n)
    ]
    path = tmp_path / "gpqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_permutation_is_seeded_and_deterministic() -> None:
    assert permutation("p1", 4, seed=0) == permutation("p1", 4, seed=0)
    assert sorted(permutation("p1", 4, seed=0)) == [0, 1, 2, 3]
    orders = {tuple(permutation(f"p{i}", 4, seed=0)) for i in range(30)}
    assert len(orders) > 5  # problems get different orders
    assert [permutation(f"p{i}", 4, 0) for i in range(10)] != [
        permutation(f"p{i}", 4, 1) for i in range(10)
    ]


def test_reference_letter_follows_the_permutation(tmp_path: Path) -> None:
    task = MultipleChoiceTask(path=_gpqa_file(tmp_path), seed=3)
    letters = set()
    for i, problem in enumerate(task.problems):
        index = "ABCD".index(problem.reference)
        assert problem.metadata["options"][index] == f"right {i}"
        assert f"({problem.reference}) right {i}" in problem.question
        letters.add(problem.reference)
    assert len(letters) > 1  # the correct option is not always in the same place
    again = MultipleChoiceTask(path=_gpqa_file(tmp_path), seed=3).problems
    assert [p.question for p in again] == [p.question for p in task.problems]


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        (r"So \boxed{C}.", "C"),
        (r"\boxed{\text{(B)}}", "B"),
        ("Thus the answer is (D).", "D"),
        ("The correct answer is: **A**", "A"),
        ("Reasoning...\nAnswer: B", "B"),
        ("answer: (c)", "C"),
        ("I cannot decide.", None),
        (r"\boxed{E}", None),
    ],
)
def test_letter_extraction(response: str, letter: str | None) -> None:
    assert extract_letter(response, 4) == letter


def test_score_is_exact_letter_match(tmp_path: Path) -> None:
    task = MultipleChoiceTask(path=_gpqa_file(tmp_path, 1))
    (problem,) = task.problems
    right = task.score(problem, f"\\boxed{{{problem.reference}}}")
    wrong_letter = next(c for c in "ABCD" if c != problem.reference)
    wrong = task.score(problem, f"The answer is ({wrong_letter})")
    assert (right.score, right.correct) == (1.0, True)
    assert (wrong.score, wrong.correct, wrong.extracted) == (0.0, False, wrong_letter)
    assert task.score(problem, "no idea").reason == "no answer letter"


def test_gated_dataset_error_says_how_to_use_a_local_file() -> None:
    with pytest.raises(DatasetUnavailable, match=r"Idavidrein/gpqa.*gated.*path=.*Correct Answer"):
        MultipleChoiceTask().load()
