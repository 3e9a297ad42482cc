"""``aipo data``: a recipe's JSONL from a local file, with field mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aipo.cli import main as cli_main
from aipo.commands import data as prepare_data

ROWS = [  # DeepMath-103K's column names: the answer is final_answer
    {"question": "What is 1+1?", "final_answer": "2", "difficulty": 7.5, "topic": "arith"},
    {"question": "What is 2+2?", "final_answer": "4", "difficulty": 3.0, "topic": "arith"},
    {"question": "Solve x+1=3.", "final_answer": "2", "difficulty": 8, "topic": "algebra"},
    {"question": "No answer here", "final_answer": "", "difficulty": 9, "topic": "x"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_deepmath_file_becomes_the_recipes_dataset_with_its_keys(here, capsys) -> None:
    source = _jsonl(here / "deepmath.jsonl", ROWS)
    code = cli_main(
        ["data", "--config", "grpo_1node", "--source", str(source), "--where", "difficulty>=7"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    written = here / "data" / "deepmath_train.jsonl"  # the recipe's data.prompt_dataset
    rows = _read(written)
    # The recipe's data.input_key/label_key (question, answer), from DeepMath's final_answer.
    assert [(r["question"], r["answer"], r["difficulty"]) for r in rows] == [
        ("What is 1+1?", "2", 7.5),
        ("Solve x+1=3.", "2", 8),
    ]
    assert "1 malformed, 1 by --where" in out.out


def test_other_field_names_a_seeded_draw_and_an_excluded_held_out_set(here, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = here / "mine.parquet"
    pq.write_table(
        pa.table(
            {
                "problem": [f"What is {i}+{i}?" for i in range(10)],
                "gold": [str(2 * i) for i in range(10)],
            }
        ),
        source,
    )
    held_out = _jsonl(here / "held.jsonl", [{"question": "What is 3+3?", "answer": "6"}])
    argv = [
        "--config", "grpo_1node", "--source", str(source), "--question-field", "problem",
        "--answer-field", "gold", "--exclude", str(held_out), "--limit", "4", "--seed", "3",
        "--out", "out/a.jsonl",
    ]  # fmt: skip
    assert prepare_data.main(argv) == 0
    first = _read(here / "out" / "a.jsonl")
    assert prepare_data.main([*argv[:-1], "out/b.jsonl"]) == 0
    assert _read(here / "out" / "b.jsonl") == first  # the same seed draws the same rows
    assert len(first) == 4
    assert all(r["answer"] == str(2 * int(r["question"].split()[2].split("+")[0])) for r in first)
    assert "What is 3+3?" not in {r["question"] for r in first}
    assert "1 by --exclude" in capsys.readouterr().out


def test_the_evaluation_file_of_a_recipe(here) -> None:
    source = _jsonl(here / "m.jsonl", [{"problem": "1+2?", "answer": "3", "level": 2}])
    argv = ["--config", "efficacy_7b_math", "--target", "eval.dataset", "--task", "math500"]
    assert prepare_data.main([*argv, "--source", str(source)]) == 0
    assert _read(here / "data" / "math500.jsonl")[0] == {
        "question": "1+2?",
        "answer": "3",
        "id": "math500/0",
        "level": 2,
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--where", "level>=7"], "'level' is not in the rows' metadata; they have: difficulty"),
        (["--where", "difficulty~7"], "is not FIELD OP VALUE"),
        (["--answer-field", "gold"], "has no column 'gold' (needed for answer)"),
        (["--where", "difficulty>=100"], "no row left to write"),
    ],
)
def test_bad_options_exit_2_and_say_what_to_change(here, capsys, extra, message) -> None:
    source = _jsonl(here / "deepmath.jsonl", ROWS)
    code = prepare_data.main(["--config", "grpo_1node", "--source", str(source), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (here / "data").exists()
