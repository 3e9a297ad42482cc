"""Procedural tasks from reasoning-gym: offline, seeded, scored by the dataset."""

from __future__ import annotations

import pytest

import tasks
from tasks.procedural import ProceduralTask


def test_chain_sum_loads_offline_and_scores_its_own_answer() -> None:
    task = tasks.make_task("rg:chain_sum", size=5, seed=7, min_terms=2, max_terms=2, max_digits=1)
    problems = task.problems
    assert len(problems) == 5 and problems[0].id == "rg:chain_sum/7/0"
    for problem in problems:
        right = task.score(problem, f"Adding up... \\boxed{{{problem.reference}}}")
        assert (right.score, right.correct) == (1.0, True)
        wrong = task.score(problem, f"\\boxed{{{int(problem.reference) + 1}}}")
        assert (wrong.score, wrong.correct) == (0.0, False)


def test_same_seed_same_problems_other_seed_differs() -> None:
    a = ProceduralTask("basic_arithmetic", size=4, seed=1).problems
    b = ProceduralTask("basic_arithmetic", size=4, seed=1).problems
    c = ProceduralTask("basic_arithmetic", size=4, seed=2).problems
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]


def test_difficulty_kwargs_reach_the_generator() -> None:
    task = tasks.make_task("rg:chain_sum_easy", size=10, seed=0)
    for problem in task.problems:
        expression = problem.metadata["entry"]["metadata"]["expression"]
        terms = expression.replace("-", "+").split("+")
        assert len(terms) == 2 and all(len(t.strip()) == 1 for t in terms), expression


def test_answer_fallbacks_without_box() -> None:
    task = tasks.make_task("rg:gsm_symbolic", size=1, seed=3)
    (problem,) = task.problems
    assert task.score(problem, f"Work.\nAnswer: {problem.reference}").correct
    assert task.score(problem, f"Work.\n{problem.reference}").correct
    assert not task.score(problem, "Work.\nAnswer: -123456789").correct


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(
        KeyError, match="unknown reasoning-gym dataset 'chain_summ'.*basic_arithmetic"
    ):
        tasks.make_task("rg:chain_summ")


def test_bad_difficulty_option_is_named() -> None:
    task = tasks.make_task("rg:chain_sum", size=2, no_such_knob=3)
    with pytest.raises((ValueError, TypeError), match="no_such_knob"):
        task.load()


def test_unboxed_sentence_scores_its_last_number_for_numeric_references() -> None:
    task = tasks.make_task("rg:chain_sum_easy", size=3, seed=0)
    problem = task.problems[0]
    answer = int(problem.reference)
    right = task.score(problem, f"The final answer to the problem is {answer}.")
    assert right.correct and right.score == 1.0 and right.extracted == str(answer)
    equation = task.score(problem, f"{problem.question.split(':')[-1].strip()} {answer}")
    assert equation.correct
    wrong = task.score(problem, f"so it equals {answer + 1}")
    assert not wrong.correct and wrong.score == 0.0
    # A box still wins over the fallback, even when the sentence ends in the right number.
    boxed = task.score(problem, f"\\boxed{{{answer + 2}}} ... {answer}")
    assert boxed.extracted == str(answer + 2) and not boxed.correct
