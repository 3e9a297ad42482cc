"""The codebook task of the fair efficacy experiment: facts only an agent gives, splits by content."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from agents import ConsultRequest, OracleKnowledgeAgent
from tasks import make_task
from tasks.codebook import WORD_SETS, CodebookTask, held_out_pair
from tasks.splits import measure_overlap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import codebook as experiment  # noqa: E402


def test_word_sets_are_disjoint_and_fixed() -> None:
    names = list(WORD_SETS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(WORD_SETS[a]) & set(WORD_SETS[b]), (a, b)
    assert all(len(set(words)) == len(words) for words in WORD_SETS.values())
    # The words are the same in every process: derived from a fixed seed, not hash().
    assert WORD_SETS["rl"][:3] == ("dazu", "susa", "fazu")


def test_train_and_held_out_are_disjoint_by_content_and_share_every_word() -> None:
    train = make_task("codebook", words="rl", split="train")
    held = make_task("codebook", words="rl", split="held_out")
    everything = make_task("codebook", words="rl", split="all")
    assert len(train) + len(held) == len(everything) == 12 * 11
    overlap = measure_overlap(train.problems, held.problems, train.content_key)
    assert overlap.count == 0
    # The check can fail: the whole set against its held-out part overlaps completely.
    assert measure_overlap(everything.problems, held.problems, train.content_key).count == len(held)
    trained_words = {w for p in train.problems for w in p.metadata["words"]}
    assert {w for p in held.problems for w in p.metadata["words"]} <= trained_words
    assert all(held_out_pair(*p.metadata["words"], 0.25) for p in held.problems)


def test_facts_are_seeded_and_only_the_reply_states_them() -> None:
    a = CodebookTask(words="rl", fact_seed=0)
    b = CodebookTask(words="rl", fact_seed=1)
    assert a.book != b.book
    assert sorted(set(a.book.values())) == list(range(10))  # every digit is some word's
    problem = a.problems[0]
    first, second = problem.metadata["words"]
    assert a.facts(problem) == [f"{first} = {a.book[first]}.", f"{second} = {a.book[second]}."]
    assert problem.solution.startswith(" ".join(a.facts(problem)))
    # The facts give each digit but not the code; the code is what the leak guard blocks.
    assert not a.states_answer(problem, " ".join(a.facts(problem)), shown=f"{first} {second}")
    assert a.states_answer(problem, f"the code is {problem.reference}")
    # The question never carries a digit.
    assert not any(ch.isdigit() for ch in problem.question)


def test_scoring_reads_the_boxed_code_exactly() -> None:
    task = CodebookTask(words="floor", fact_seed=3)
    problem = task.problems[0]
    assert task.score(problem, problem.solution).correct
    assert task.score(
        problem, f"\\boxed{{ {problem.reference[0]} {problem.reference[1]} }}"
    ).correct
    wrong = str((int(problem.reference) + 1) % 100).zfill(2)
    assert not task.score(problem, f"\\boxed{{{wrong}}}").correct
    assert task.score(problem, "no idea").reason == "no answer"


def test_the_knowledge_oracle_replies_with_the_start_of_the_solo_solution() -> None:
    task = CodebookTask(words="rl", fact_seed=2)
    problem = task.problems[5]
    agent = OracleKnowledgeAgent(task)
    words = " ".join(problem.metadata["words"])
    reply = asyncio.run(
        agent.consult(ConsultRequest(agent="knowledge", question=words, problem=problem))
    )
    assert reply.error is None
    assert problem.solution.startswith(reply.text)


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="'nouns'"):
        CodebookTask(words="nouns")
    with pytest.raises(ValueError, match="'test'"):
        CodebookTask(split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size 500"):
        CodebookTask(words="rl", split="held_out", size=500).load()


def test_the_calibration_rule_picks_the_first_step_with_most_of_the_gain() -> None:
    # Gains 0.05, 0.30, 0.38, 0.40, 0.40: 80% of 0.40 is 0.32, first reached at step 16.
    chosen = experiment.choose_steps(
        {0: 0.1, 4: 0.12, 8: 0.15, 12: 0.40, 16: 0.48, 20: 0.5, 24: 0.5}
    )
    assert chosen == {"steps": 16, "moved": True, "largest_gain": pytest.approx(0.4)}
    flat = experiment.choose_steps({0: 0.1, 8: 0.12, 12: 0.13, 16: 0.15, 20: 0.14, 24: 0.15})
    assert flat["steps"] == 24 and flat["moved"] is False


def test_the_experiment_refuses_overlapping_splits() -> None:
    record = experiment.check_splits([0, 1, 2])
    assert record["overlap"]["count"] == 0
    assert record["held_out_words_met_in_training"] == record["held_out_words"] == 12
    assert record["train_questions"] + record["held_out_questions"] == 132
