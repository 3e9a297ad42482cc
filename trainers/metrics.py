"""The training logger: one JSON line per step, TensorBoard when available, a progress bar.

``run_dir/metrics.jsonl`` holds one object per step, ``{"step": 12, "time": ..., "reward_mean": ...}``,
flushed as written so a crashed run keeps every completed step; a line torn by a kill is
dropped before the next run appends. Non-finite values are written as ``null`` (strict
JSON). On resume the file is cut back to the resumed step, so steps replayed after the
checkpoint are not duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aipo_env.jsonl import open_for_append, read_lines

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Shown in the progress bar when present in a step's metrics.
DEFAULT_POSTFIX_KEYS = ("reward_mean", "accuracy", "consult_rate")


def _scalar(value: Any) -> float | int | None:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file (a torn last line is ignored)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for _, line in read_lines(path):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a malformed line in %s: %.80s", path, line)
    return records


def truncate_after(path: str | Path, step: int) -> int:
    """Drop records with ``step`` greater than ``step`` (atomically); return how many were dropped."""
    path = Path(path)
    records = read_metrics(path)
    kept = [r for r in records if int(r.get("step", -1)) <= step]
    if len(kept) == len(records) and path.is_file():
        # Still rewrite if a torn line was skipped, so appends start on a fresh line.
        if path.read_text().count("\n") == len(records):
            return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return len(records) - len(kept)


class MetricsLogger:
    """Writes each step's scalar metrics to JSONL, TensorBoard (optional) and a tqdm bar.

    Args:
        run_dir: directory of the run; ``metrics.jsonl`` and ``tensorboard/`` go there.
        total_steps: length of the progress bar (``None``: open-ended).
        resume_step: on resume, the checkpoint's step; records after it are dropped
            before appending. ``None``: append to whatever is there.
        progress: show a tqdm progress bar.
        tensorboard: also write TensorBoard scalars if ``torch.utils.tensorboard`` imports.
        postfix_keys: metrics shown live in the progress bar.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int | None = None,
        resume_step: int | None = None,
        progress: bool = True,
        tensorboard: bool = True,
        postfix_keys: Iterable[str] = DEFAULT_POSTFIX_KEYS,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            dropped = truncate_after(self.path, resume_step)
            if dropped:
                logger.info("dropped %d metric records after resumed step %d", dropped, resume_step)
        # A torn last line (a killed run) is dropped first, or this step's record would be glued to it.
        self._file = open_for_append(self.path)
        self.postfix_keys = tuple(postfix_keys)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; JSONL is the record
                logger.debug("tensorboard is not installed; writing JSONL only")
            else:
                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, desc="train", unit="step")

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record ``metrics`` for ``step``; return the record written."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            if key in ("step", "time"):
                raise ValueError(f"metric name {key!r} is reserved; rename it")
            record[key] = _scalar(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and value is not None:
                    self._writer.add_scalar(key, value, global_step=int(step))
        if self._bar is not None:
            shown = {k: record[k] for k in self.postfix_keys if record.get(k) is not None}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(max(0, int(step) - self._bar.n))
        return record

    def close(self) -> None:
        """Flush and close the JSONL file, the TensorBoard writer and the progress bar."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_curves(
    metrics_jsonl: str | Path,
    out_png: str | Path,
    keys: Iterable[str] = ("reward_mean", "accuracy", "consult_rate"),
) -> Path:
    """Plot each of ``keys`` against step, one panel per key, into ``out_png``.

    Keys absent from every record are left out; if none of them is present the
    error names the keys the file does have.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    wanted = list(keys)
    series = {}
    for key in wanted:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            series[key] = points
    if not series:
        available = sorted({k for r in records for k in r} - {"step", "time"})
        raise ValueError(
            f"none of {wanted} is in {metrics_jsonl}; it has: {', '.join(available) or 'no records'}"
        )
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.4 * len(series)), sharex=True)
    axes = [axes] if len(series) == 1 else list(axes)
    for ax, (key, points) in zip(axes, series.items(), strict=True):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return save_figure(fig, out_png)


def save_figure(fig: Any, out_png: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG (creating the folder) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out
