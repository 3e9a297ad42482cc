"""What an embedded training run reports: per-step rollout metrics, held-out accuracy, the summary.

:func:`rollout_metrics` turns one step's trajectories into the scalars logged to
``metrics.jsonl``; :class:`EvalResult` is the held-out accuracy of the policy alone,
written to ``eval/before.json`` and ``eval/after.json``; :func:`summarize` reads the
run back at the end and writes ``summary.json`` (and ``curves.png``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from aipo_env.trajectory import Trajectory
from trainers.checkpoint import load_latest
from trainers.metrics import plot_curves, read_metrics

#: Finish reasons of episodes that ran into a budget rather than ending on their own.
TRUNCATED_REASONS = ("length", "max_turns", "context_overflow")


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _correct(t: Trajectory) -> float:
    return float(bool(t.verifier and t.verifier.correct))


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Reward, accuracy, consulting and ending statistics of a batch of trajectories."""
    n = len(trajectories)
    metrics: dict[str, float] = {
        "reward_mean": _mean([t.reward for t in trajectories]),
        "accuracy": _mean([_correct(t) for t in trajectories]),
        "consult_rate": _mean([float(t.consults > 0) for t in trajectories]),
        "consults_per_episode": _mean([float(t.consults) for t in trajectories]),
        "consult_errors_per_episode": _mean([float(t.consult_errors) for t in trajectories]),
        "response_tokens_mean": _mean(
            [float(len(t.token_ids) - t.prompt_len) for t in trajectories]
        ),
        "policy_tokens_mean": _mean([float(t.policy_token_count()) for t in trajectories]),
        "drift_rate": _mean([float(t.tokenization_drift) for t in trajectories]),
    }
    allowed = [t for t in trajectories if t.allow_consult]
    if allowed:
        metrics["consult_rate_allowed"] = _mean([float(t.consults > 0) for t in allowed])
        metrics["accuracy_allowed"] = _mean([_correct(t) for t in allowed])
    alone = [t for t in trajectories if not t.allow_consult]
    if alone:
        metrics["accuracy_alone"] = _mean([_correct(t) for t in alone])
    reasons: dict[str, int] = {}
    for t in trajectories:
        key = t.finish_reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    for key, count in reasons.items():
        metrics[f"finish_{key}"] = count / n
    return metrics


@dataclass
class EvalResult:
    """Accuracy of the policy reasoning alone on the held-out problems."""

    problems: int
    accuracy: float
    reward_mean: float
    consult_attempt_rate: float
    truncation_rate: float
    response_tokens_mean: float

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory], problems: int) -> EvalResult:
        """The result of one greedy sample per problem (``problems`` of them)."""
        return cls(
            problems=problems,
            accuracy=_mean([_correct(t) for t in trajectories]),
            reward_mean=_mean([t.reward for t in trajectories]),
            consult_attempt_rate=_mean([float(t.consult_attempts > 0) for t in trajectories]),
            truncation_rate=_mean(
                [float(t.finish_reason in TRUNCATED_REASONS) for t in trajectories]
            ),
            response_tokens_mean=_mean(
                [float(len(t.token_ids) - t.prompt_len) for t in trajectories]
            ),
        )

    def write(self, path: Path) -> None:
        """Write the result as JSON (``eval/<tag>.json``)."""
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: Path) -> EvalResult | None:
        """The result written to ``path`` by an earlier (interrupted) run, or None."""
        return cls(**json.loads(path.read_text())) if path.is_file() else None


@dataclass
class TrainSummary:
    """What a run did, printed at the end and written to ``summary.json``."""

    run_dir: str
    steps: int
    eval_before: EvalResult | None
    eval_after: EvalResult | None
    train_reward_first: float
    train_reward_last: float
    consult_rate_mean: float
    policy_tokens_per_s: float
    wall_s: float
    checkpoint: str | None
    plot: str | None
    metrics: str
    skipped_updates: int = 0

    def render(self) -> str:
        """A few lines for a terminal."""

        def ev(result: EvalResult | None) -> str:
            if result is None:
                return "not evaluated"
            return f"accuracy {result.accuracy:.3f}, reward {result.reward_mean:.3f} ({result.problems} problems)"

        lines = [
            f"AIPO run finished: {self.steps} steps in {self.wall_s:.0f} s ({self.run_dir})",
            f"  eval before : {ev(self.eval_before)}",
            f"  eval after  : {ev(self.eval_after)}",
            f"  train reward: {self.train_reward_first:.3f} (first step) -> {self.train_reward_last:.3f} (last step)",
            f"  consult rate: {self.consult_rate_mean:.3f} of training episodes consulted at least once",
            f"  throughput  : {self.policy_tokens_per_s:.1f} policy tokens/s during rollouts",
            f"  metrics     : {self.metrics}",
            f"  plot        : {self.plot or 'not written'}",
            f"  checkpoint  : {self.checkpoint or 'none'}",
        ]
        if self.skipped_updates:
            lines.append(
                f"  skipped     : {self.skipped_updates} optimizer steps had a non-finite loss or gradient"
            )
        return "\n".join(lines)


def summarize(
    run_dir: Path,
    *,
    steps: int,
    eval_before: EvalResult | None,
    eval_after: EvalResult | None,
    checkpoint: Path | None,
    skipped_updates: int,
    plot: bool,
    started: float,
) -> TrainSummary:
    """Read the run's ``metrics.jsonl`` back, plot it, write and return ``summary.json``.

    ``checkpoint``: the last one this invocation saved; None falls back to the run's
    latest. ``started``: ``time.perf_counter()`` at the start of the run.
    """
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_path = None
    if plot and records:
        plot_path = str(plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png"))
    if checkpoint is None:
        latest = load_latest(run_dir)
        checkpoint = latest.path if latest else None
    summary = TrainSummary(
        run_dir=str(run_dir),
        steps=steps,
        eval_before=eval_before,
        eval_after=eval_after,
        train_reward_first=records[0].get("reward_mean", float("nan")) if records else float("nan"),
        train_reward_last=records[-1].get("reward_mean", float("nan")) if records else float("nan"),
        consult_rate_mean=_mean(
            [r["consult_rate"] for r in records if r.get("consult_rate") is not None]
        ),
        policy_tokens_per_s=_mean(
            [r["policy_tokens_per_s"] for r in records if r.get("policy_tokens_per_s")]
        ),
        wall_s=time.perf_counter() - started,
        checkpoint=str(checkpoint) if checkpoint else None,
        plot=plot_path,
        metrics=str(run_dir / "metrics.jsonl"),
        skipped_updates=skipped_updates,
    )
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
