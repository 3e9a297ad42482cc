"""The evaluation results: per-sample records, aggregates, and their JSON, Markdown and PNG forms.

A results file is plain JSON so that it can be read without this package::

    {
      "format": "aipo-eval-results/1",
      "config": {...},                      # how the run was made
      "ks": [1, 2, 4],
      "tasks": {
        "math500": {
          "n": 4,                           # samples per problem requested
          "skipped_rows": 0,                # dataset rows skipped as malformed
          "overlap": {"count": 0, ...},     # with --train-config: problems seen in training
          "metrics": {"avg@n": .., "pass@1": .., ..., "consult_attempt_rate": ..,
                      "mean_response_tokens": .., "truncation_rate": .., ...},
          "ci": {"pass@1": {"mean": .., "ci_low": .., "ci_high": ..}, ...},
          "problems": [{"id": "...", "reference": "...", "samples": [SampleRecord, ...]}]
        }
      },
      "overall": {...}                      # macro average over tasks
    }

Each sample points back at its trajectory (JSONL path and trajectory id), so
``aipo show --id`` can render the reasoning behind any number in the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aipo_env.passk import (
    aggregate,
    metric_names,
    metrics_with_ci,
    overall,
    problem_metrics,
)

RESULTS_FORMAT = "aipo-eval-results/1"
#: Finish reasons that mean the response was cut short rather than finished.
TRUNCATED_FINISH_REASONS = frozenset({"length", "context_overflow", "max_turns"})


class TrajectoryRef(BaseModel):
    """Where a sample's full trajectory is stored."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="The trajectories JSONL file (relative to the results file).")
    id: str = Field(description="The trajectory's id within that file.")


class SampleRecord(BaseModel):
    """One sampled response to one problem, as the results file keeps it."""

    model_config = ConfigDict(extra="forbid")

    problem_id: str = Field(description="Id of the problem within its task.")
    sample_index: int = Field(ge=0, description="Which of the n samples of the problem this is.")
    reward: float = Field(description="The task's reward for the response.")
    correct: bool = Field(description="Whether the answer counts as correct for pass@k.")
    response_tokens: int = Field(ge=0, description="Tokens after the prompt.")
    finish_reason: str = Field(
        description="eos, length, max_turns, context_overflow or error:<kind>."
    )
    consult_attempts: int = Field(
        default=0,
        ge=0,
        description="Consult tags the policy wrote (in independent mode they are not answered).",
    )
    extracted: str | None = Field(
        default=None, description="The answer the verifier extracted, when known."
    )
    trajectory: TrajectoryRef | None = Field(
        default=None, description="Where the full trajectory is stored."
    )


def task_summary(
    samples: Sequence[SampleRecord],
    ks: Sequence[int],
    *,
    references: Mapping[str, str] | None = None,
    n: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    skipped_rows: int = 0,
    overlap: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One task's section of the results: problems with their samples, metrics and CIs.

    ``skipped_rows``: dataset rows the task skipped as malformed (``Task.skipped``), so
    a results file says when it covers less than the whole dataset. ``overlap``: the
    problems measured against a run's training set (``aipo eval --train-config``;
    :class:`tasks.splits.Overlap` as a dict), kept as ``overlap`` when given.
    Raises ValueError naming the problem when one has fewer samples than the largest k.
    """
    by_problem: dict[str, list[SampleRecord]] = {}
    for s in samples:
        by_problem.setdefault(s.problem_id, []).append(s)
    problems = []
    per_problem_metrics = []
    for pid, group in by_problem.items():
        group = sorted(group, key=lambda s: s.sample_index)
        if ks and len(group) < max(ks):
            raise ValueError(
                f"problem '{pid}' has {len(group)} samples but pass@{max(ks)} needs "
                f"n >= {max(ks)}; finish the run (--resume) or lower k"
            )
        per_problem_metrics.append(problem_metrics([s.correct for s in group], ks))
        problems.append(
            {
                "id": pid,
                "reference": (references or {}).get(pid),
                "samples": [s.model_dump(mode="json") for s in group],
            }
        )
    metrics: dict[str, float] = aggregate(per_problem_metrics)
    total = len(samples)
    if total:
        metrics["mean_reward"] = sum(s.reward for s in samples) / total
        metrics["consult_attempt_rate"] = sum(1 for s in samples if s.consult_attempts) / total
        metrics["mean_response_tokens"] = sum(s.response_tokens for s in samples) / total
        metrics["truncation_rate"] = (
            sum(1 for s in samples if s.finish_reason in TRUNCATED_FINISH_REASONS) / total
        )
        metrics["error_rate"] = (
            sum(1 for s in samples if s.finish_reason.startswith("error")) / total
        )
    summary = {
        "n": n if n is not None else max((len(p["samples"]) for p in problems), default=0),
        "problems_evaluated": len(problems),
        "skipped_rows": skipped_rows,
        "samples": total,
        "metrics": metrics,
        "ci": metrics_with_ci(per_problem_metrics, n_boot=n_boot, seed=seed),
        "problems": problems,
    }
    if overlap is not None:
        summary["overlap"] = dict(overlap)
    return summary


def build_results(
    config: Mapping[str, Any],
    tasks: Mapping[str, dict[str, Any]],
    ks: Sequence[int],
) -> dict[str, Any]:
    """The whole results document from each task's :func:`task_summary`."""
    return {
        "format": RESULTS_FORMAT,
        "config": dict(config),
        "ks": list(ks),
        "tasks": dict(tasks),
        "overall": overall({name: t["metrics"] for name, t in tasks.items()}),
    }


def write_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` atomically (a killed run never leaves a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file, checking that it is one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"results file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(
            f"{path} is not an aipo eval results file (expected format '{RESULTS_FORMAT}')"
        )
    return data


def _fmt(x: float | None, key: str = "") -> str:
    if x is None:
        return "–"
    return f"{x:.1f}" if key == "mean_response_tokens" else f"{x:.3f}"


def to_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables: metrics per task (plus the macro average) and their bootstrap CIs."""
    ks = list(results.get("ks", []))
    keys = metric_names(ks)
    extra = [
        ("consult_attempt_rate", "consult rate"),
        ("mean_response_tokens", "mean tokens"),
        ("truncation_rate", "truncated"),
    ]
    head = ["task", "problems", "n", *keys, *(label for _, label in extra)]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    tasks = results.get("tasks", {})
    for name, t in tasks.items():
        m = t["metrics"]
        row = [name, str(t["problems_evaluated"]), str(t["n"])]
        row += [_fmt(m.get(k)) for k in keys]
        row += [_fmt(m.get(k), k) for k, _ in extra]
        lines.append("| " + " | ".join(row) + " |")
    if len(tasks) > 1:
        o = results.get("overall", {})
        row = ["**overall (macro)**", "", ""] + [_fmt(o.get(k)) for k in keys]
        row += [_fmt(o.get(k), k) for k, _ in extra]
        lines.append("| " + " | ".join(row) + " |")
    skipped = {name: t.get("skipped_rows", 0) for name, t in tasks.items()}
    if any(skipped.values()):
        lines += [
            "",
            "Dataset rows skipped as malformed (not evaluated): "
            + ", ".join(f"{name} {count}" for name, count in skipped.items() if count)
            + ".",
        ]
    overlaps = {name: t["overlap"] for name, t in tasks.items() if t.get("overlap")}
    if overlaps:
        source = next(iter(overlaps.values())).get("train_config") or "the run"
        lines += [
            "",
            f"Problems that occur in the training set of {source} (by content): "
            + ", ".join(
                f"{name} {o['count']} of {o['held_out']}" + (" (allowed)" if o["count"] else "")
                for name, o in overlaps.items()
            )
            + ".",
        ]
    lines += ["", "95% bootstrap confidence intervals over problems:", ""]
    lines.append("| task | " + " | ".join(keys) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(keys)) + "|")
    for name, t in tasks.items():
        ci = t.get("ci", {})
        cells = [
            f"[{ci[k]['ci_low']:.3f}, {ci[k]['ci_high']:.3f}]" if k in ci else "–" for k in keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    config = results.get("config", {})
    if config:
        lines += ["", "Run: " + ", ".join(f"{k}={v}" for k, v in config.items() if v is not None)]
    return "\n".join(lines) + "\n"


def plot_passk(results: Mapping[str, Any], path: str | Path) -> Path:
    """Save pass@k against k (log2 axis) per task, with the bootstrap band, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    ks = list(results.get("ks", []))
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for name, t in results.get("tasks", {}).items():
        xs = [k for k in ks if f"pass@{k}" in t["metrics"]]
        if not xs:
            continue
        ys = [t["metrics"][f"pass@{k}"] for k in xs]
        ax.plot(xs, ys, marker="o", label=name)
        ci = t.get("ci", {})
        if all(f"pass@{k}" in ci for k in xs):
            ax.fill_between(
                xs,
                [ci[f"pass@{k}"]["ci_low"] for k in xs],
                [ci[f"pass@{k}"]["ci_high"] for k in xs],
                alpha=0.15,
            )
    if len(ks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    model = results.get("config", {}).get("model")
    ax.set_title(f"pass@k ({model})" if model else "pass@k")
    ax.grid(True, alpha=0.3)
    if results.get("tasks"):
        ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
