"""MetricsLogger: JSONL per step, resume truncation, progress bar postfix, PNG curves."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainers.metrics import METRICS_FILE, MetricsLogger, plot_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_one_flushed_json_line_per_step(tmp_path):
    logger = MetricsLogger(tmp_path, progress=False, tensorboard=False)
    logger.log(1, {"reward_mean": torch.tensor(0.25), "accuracy": 0.5, "skipped": 0})
    # Flushed as written: readable before close.
    assert lines(tmp_path)[0]["reward_mean"] == 0.25
    logger.log(2, {"reward_mean": 0.75, "loss": float("nan"), "done": True})
    logger.close()
    records = lines(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["accuracy"] == 0.5 and records[0]["skipped"] == 0
    assert records[1]["loss"] is None  # strict JSON: non-finite becomes null
    assert records[1]["done"] == 1
    assert all(isinstance(r["time"], float) for r in records)


def test_resume_drops_steps_after_the_checkpoint_and_appends(tmp_path):
    with MetricsLogger(tmp_path, progress=False, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward_mean": step / 10})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "rew')  # torn line from a killed process
    with MetricsLogger(tmp_path, resume_step=3, progress=False, tensorboard=False) as logger:
        logger.log(4, {"reward_mean": 0.44})
        logger.log(5, {"reward_mean": 0.55})
    records = lines(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["reward_mean"] for r in records] == [0.1, 0.2, 0.3, 0.44, 0.55]


def test_progress_bar_shows_live_postfix(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=3, tensorboard=False)
    logger.log(1, {"reward_mean": 0.5, "accuracy": 0.25, "consult_rate": 0.125, "loss": 3.0})
    postfix = logger._bar.postfix
    assert logger._bar.n == 1
    logger.close()
    assert "reward_mean=0.5" in postfix and "consult_rate=0.125" in postfix
    assert "loss" not in postfix


def test_reserved_names_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, progress=False, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 3})


def test_plot_curves_writes_a_png(tmp_path):
    with MetricsLogger(tmp_path, progress=False, tensorboard=False) as logger:
        for step in range(1, 8):
            logger.log(step, {"reward_mean": math.sin(step), "accuracy": step / 8})
    out = plot_curves(tmp_path / METRICS_FILE, tmp_path / "plots" / "curves.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert len(read_metrics(tmp_path / METRICS_FILE)) == 7


def test_plot_curves_names_available_keys_when_none_requested_exist(tmp_path):
    with MetricsLogger(tmp_path, progress=False, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
    with pytest.raises(ValueError, match="it has: loss"):
        plot_curves(tmp_path / METRICS_FILE, tmp_path / "x.png", keys=("reward_mean",))
