"""The results file, its Markdown table and its pass@k figure."""

from __future__ import annotations

import json

import pytest

from aipo_env.evaluation.results import (
    SampleRecord,
    TrajectoryRef,
    build_results,
    load_results,
    plot_passk,
    task_summary,
    to_markdown,
    write_json,
)


def _sample(pid: str, i: int, correct: bool, **kw) -> SampleRecord:
    fields = {
        "problem_id": pid,
        "sample_index": i,
        "reward": 1.0 if correct else 0.0,
        "correct": correct,
        "response_tokens": 10,
        "finish_reason": "eos",
        "trajectory": TrajectoryRef(path="trajectories.jsonl", id=f"{pid}-{i}"),
    }
    fields.update(kw)
    return SampleRecord(**fields)


def _math_samples() -> list[SampleRecord]:
    # p1: 1 of 4 correct; p2: 4 of 4; p3: 0 of 4, two truncated, one consult attempt.
    return [
        _sample("p1", 0, True, response_tokens=20),
        _sample("p1", 1, False),
        _sample("p1", 2, False),
        _sample("p1", 3, False),
        *[_sample("p2", i, True) for i in range(4)],
        _sample("p3", 0, False, finish_reason="length", response_tokens=30),
        _sample("p3", 1, False, finish_reason="length", response_tokens=30),
        _sample("p3", 2, False, consult_attempts=2),
        _sample("p3", 3, False, finish_reason="error:generation"),
    ]


def test_task_summary_aggregates() -> None:
    samples = _math_samples()
    # Out-of-order samples are grouped and sorted.
    summary = task_summary(list(reversed(samples)), [1, 2, 4], references={"p1": "7"}, seed=0)
    m = summary["metrics"]
    assert summary["problems_evaluated"] == 3 and summary["samples"] == 12 and summary["n"] == 4
    assert m["avg@n"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert m["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert m["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["pass@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["truncation_rate"] == pytest.approx(2 / 12)
    assert m["consult_attempt_rate"] == pytest.approx(1 / 12)
    assert m["error_rate"] == pytest.approx(1 / 12)
    assert m["mean_response_tokens"] == pytest.approx((20 + 30 + 30 + 9 * 10) / 12)
    assert m["mean_reward"] == pytest.approx(5 / 12)
    p1 = next(p for p in summary["problems"] if p["id"] == "p1")
    assert p1["reference"] == "7"
    assert [s["sample_index"] for s in p1["samples"]] == [0, 1, 2, 3]
    assert p1["samples"][0]["trajectory"] == {"path": "trajectories.jsonl", "id": "p1-0"}
    ci = summary["ci"]["pass@1"]
    assert ci["ci_low"] <= m["pass@1"] <= ci["ci_high"]


def test_task_summary_refuses_too_few_samples() -> None:
    with pytest.raises(ValueError, match=r"problem 'p1' has 2 samples.*pass@4"):
        task_summary([_sample("p1", 0, True), _sample("p1", 1, False)], [1, 4])


def test_results_json_markdown_png_roundtrip(tmp_path) -> None:
    tasks = {
        "math": task_summary(_math_samples(), [1, 2, 4]),
        "gsm": task_summary([_sample("g", i, i == 0) for i in range(4)], [1, 2, 4]),
    }
    results = build_results({"model": "tiny", "n": 4}, tasks, [1, 2, 4])
    assert results["overall"]["pass@1"] == pytest.approx(
        (tasks["math"]["metrics"]["pass@1"] + 0.25) / 2
    )
    path = write_json(results, tmp_path / "results.json")
    loaded = load_results(path)
    assert loaded == json.loads(json.dumps(results))

    md = to_markdown(loaded)
    lines = md.splitlines()
    assert lines[0].startswith("| task | problems | n | avg@n | pass@1 | pass@2 | pass@4 |")
    math_row = next(line for line in lines if line.startswith("| math |"))
    cells = [c.strip() for c in math_row.strip("|").split("|")]
    assert cells[:7] == ["math", "3", "4", "0.417", "0.417", "0.500", "0.667"]
    assert cells[7:] == ["0.083", "14.2", "0.167"]
    assert any(line.startswith("| **overall (macro)** |") for line in lines)

    png = plot_passk(loaded, tmp_path / "passk.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_load_results_rejects_other_files(tmp_path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"tasks": {}}))
    with pytest.raises(ValueError, match="not an aipo eval results file"):
        load_results(other)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_results(tmp_path / "missing.json")
