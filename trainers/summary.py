"""What an embedded training run reports: per-step rollout metrics, held-out accuracy, the summary.

:func:`rollout_metrics` turns one step's trajectories into the scalars logged to
``metrics.jsonl``, failures by kind included (``errors/<kind>`` of episodes,
``consult_errors/<kind>`` of consults) and whether consulting pays
(:func:`consulting_metrics`: consult rate by difficulty, the dependency gap, leaks); :class:`EvalResult` is the held-out accuracy of
the policy alone, written to ``eval/before.json`` and ``eval/after.json``;
:func:`summarize` reads the run back at the end (with ``held_out.json``, the held-out
set's overlap with training) and writes ``summary.json`` (and ``curves.png``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aipo_env.trajectory import Trajectory
from trainers.checkpoint import load_latest
from trainers.consulting import (
    agent_coef_summary,
    consulting_metrics,
    consulting_summary,
)
from trainers.consulting import correct as _correct
from trainers.consulting import mean as _mean
from trainers.held_out import HELD_OUT_FILE
from trainers.metrics import plot_curves, read_metrics

#: Finish reasons of episodes that ran into a budget rather than ending on their own.
TRUNCATED_REASONS = ("length", "max_turns", "context_overflow")
#: Consult error kinds where an agent was asked and failed (the rest are the policy's doing).
AGENT_FAILURES = ("timeout", "agent_error")


def consult_error_kind(message: str) -> str:
    """The kind of a consult's error feedback (``ConsultRecord.error``), read from its message.

    ``timeout`` and ``agent_error``: the agent was asked and failed. ``malformed``,
    ``unknown_agent``, ``empty_question``, ``budget``, ``unavailable``: the policy's
    request could not be sent. ``leak``: the agent answered, but the leak guard withheld
    the reply (it stated the answer). ``other``: anything else.
    """
    text = message.lower()
    if "timed out" in text or "timeout after" in text:
        return "timeout"
    for needle, kind in (
        ("withheld", "leak"),
        ("empty question", "empty_question"),
        ("unknown agent", "unknown_agent"),
        ("malformed", "malformed"),
        ("budget", "budget"),
        ("not available", "unavailable"),
        ("no agents are available", "unavailable"),
    ):
        if needle in text:
            return kind
    if text.startswith("agent "):  # the env's wording for a failed call to an agent
        return "agent_error"
    return "other"


def error_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Failures by kind, as shares: ``errors/<kind>`` and ``consult_errors/<kind>``.

    ``errors/<kind>``: episodes that ended in ``error:<kind>``; ``consult_errors/<kind>``:
    consults whose feedback was an error of that kind (:func:`consult_error_kind`);
    ``agent_error_rate``: consults that reached an agent and failed, among those that
    reached one (absent when none did).
    """
    metrics: dict[str, float] = {}
    n = len(trajectories)
    kinds = Counter(
        t.finish_reason.partition(":")[2]
        for t in trajectories
        if t.finish_reason.startswith("error:")
    )
    for kind, count in sorted(kinds.items()):
        metrics[f"errors/{kind}"] = count / n
    records = [turn.consult for t in trajectories for turn in t.turns if turn.consult is not None]
    consult_kinds = Counter(consult_error_kind(r.error) for r in records if r.error is not None)
    for kind, count in sorted(consult_kinds.items()):
        metrics[f"consult_errors/{kind}"] = count / len(records)
    failed = sum(consult_kinds[kind] for kind in AGENT_FAILURES)
    reached = failed + sum(r.error is None for r in records)
    if reached:
        metrics["agent_error_rate"] = failed / reached
    return metrics


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
    metrics.update(error_metrics(trajectories))
    metrics.update(consulting_metrics(trajectories))
    metrics.update(consult_cost_metrics(trajectories))
    return metrics


def consult_cost_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """What the step's consult turns cost: agent calls' time, reply tokens, tokens after a reply.

    ``agents/latency_s_total`` sums the agent calls' wall times (they overlap other
    episodes' decoding, so it is not added to the step's time); ``agents/reply_tokens``
    counts injected agent tokens; ``policy_tokens_after_reply`` the policy's tokens in
    the turns that follow a reply, which an episode without the consult would not have.
    """
    records = [turn.consult for t in trajectories for turn in t.turns if turn.consult is not None]
    metrics: dict[str, float] = {
        "agents/reply_tokens": float(
            sum(1 for t in trajectories for label in t.source if label.startswith("agent:"))
        ),
        "policy_tokens_after_reply": float(
            sum(turn.policy_end - turn.policy_start for t in trajectories for turn in t.turns[1:])
        ),
    }
    if records:
        metrics["agents/latency_s_total"] = sum(r.latency_s for r in records)
        metrics["agents/latency_s_mean"] = metrics["agents/latency_s_total"] / len(records)
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
    #: Mean over steps of every failure rate logged (finish_error, errors/<kind>,
    #: consult_errors/<kind>, agent_error_rate); empty when nothing failed.
    errors: dict[str, float] = field(default_factory=dict)
    #: Mean over the steps that logged it of each consulting metric
    #: (:func:`consulting_metrics`: consult_rate/<bucket>, dependency_gap, agents/leak_rate).
    consulting: dict[str, float] = field(default_factory=dict)
    #: The AIPO coefficient on agent tokens over the run (:func:`agent_coef_summary`);
    #: empty when no step trained agent tokens.
    agent_coef: dict[str, float] = field(default_factory=dict)
    #: The consult warm-up's ``warmup/result.json`` (trainers/warmup.py); empty without one.
    warmup: dict[str, float] = field(default_factory=dict)
    #: Held-out accuracy alone right after the warm-up (``eval/warmup.json``).
    eval_warmup: EvalResult | None = None
    #: The held-out set against the training set (``held_out.json``, trainers/held_out.py):
    #: how it was split, the overlap count, distinct problems on each side, examples and
    #: duplicates dropped; empty for a run that wrote none.
    held_out: dict[str, Any] = field(default_factory=dict)

    def _overlap_note(self) -> str:
        """`` [held-out overlaps training: 30 of 32]`` when the run allowed an overlap; else empty."""
        count = self.held_out.get("count") or 0
        if not count:
            return ""
        return f" [held-out overlaps training: {count} of {self.held_out['held_out']}]"

    def _held_out_line(self) -> list[str]:
        h = self.held_out
        if "count" not in h:
            return []
        how = (
            f"partition, {h['fraction']:.0%} of the content held out"
            if h.get("mode") == "partition"
            else "another task"
        )
        dropped = h.get("held_out_duplicates", 0) + h.get("train_duplicates", 0)
        return [
            f"  held-out    : {h['held_out']} problems ({h['held_out_distinct']} distinct) "
            f"against {h['train_distinct']} distinct training ones ({how}); overlap "
            f"{h['count']}" + (f", {dropped} duplicates dropped" if dropped else "")
        ]

    def _warmup_lines(self, ev: Any) -> list[str]:
        if not self.warmup:
            return []
        w = self.warmup
        return [
            f"  eval warm-up: {ev(self.eval_warmup)}",
            f"  warm-up     : {w['demonstrations']:.0f} demonstrations ({w['demonstrations_consult']:.0f} "
            f"consult, {w['spliced']:.0f} of them spliced) in {w['seconds']:.0f} s; then the policy "
            f"wrote a well-formed consult in {w['consult_written_rate']:.1%} of "
            f"{w['check_episodes']:.0f} episodes, a malformed one in {w['malformed_rate']:.1%}",
        ]

    def render(self) -> str:
        """A few lines for a terminal."""

        def ev(result: EvalResult | None) -> str:
            if result is None:
                return "not evaluated"
            return (
                f"accuracy {result.accuracy:.3f}, reward {result.reward_mean:.3f} "
                f"({result.problems} problems)" + self._overlap_note()
            )

        lines = [
            f"AIPO run finished: {self.steps} steps in {self.wall_s:.0f} s ({self.run_dir})",
            f"  eval before : {ev(self.eval_before)}",
            *self._warmup_lines(ev),
            f"  eval after  : {ev(self.eval_after)}",
            *self._held_out_line(),
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
        if self.errors:
            shown = ", ".join(f"{key} {value:.1%}" for key, value in self.errors.items())
            lines.append(f"  errors      : {shown} (mean over steps)")
        if self.consulting:
            shown = ", ".join(f"{key} {value:.3f}" for key, value in self.consulting.items())
            lines.append(f"  consulting  : {shown} (mean over steps)")
        if self.agent_coef:
            shown = ", ".join(f"{key} {value:.3f}" for key, value in self.agent_coef.items())
            lines.append(f"  agent coef  : {shown} (AIPO coefficient on agent tokens)")
        return "\n".join(lines)


def error_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each failure rate of the run's metrics records, averaged over steps (absent: 0); only those above 0."""
    keys = sorted(
        {
            key
            for r in records
            for key in r
            if key in ("finish_error", "agent_error_rate")
            or key.startswith(("errors/", "consult_errors/"))
        }
    )
    means = {key: sum(r.get(key) or 0.0 for r in records) / len(records) for key in keys}
    return {key: value for key, value in means.items() if value > 0}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


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
        errors=error_summary(records),
        consulting=consulting_summary(records),
        agent_coef=agent_coef_summary(records),
        warmup=_read_json(run_dir / "warmup" / "result.json"),
        eval_warmup=EvalResult.read(run_dir / "eval" / "warmup.json"),
        held_out=_read_json(run_dir / HELD_OUT_FILE),
    )
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
