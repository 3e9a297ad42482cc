"""Whether consulting is used where it pays: metrics per step and their summary over a run.

:func:`consulting_metrics` (consult rate by difficulty, the dependency gap, the leak
rate) is part of every step's rollout metrics (:func:`trainers.summary.rollout_metrics`);
:func:`consulting_summary` and :func:`agent_coef_summary` read them back for the run's
summary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aipo_env.trajectory import Trajectory

__all__ = [
    "CONSULTING_KEYS",
    "DIFFICULTY_BUCKETS",
    "agent_coef_summary",
    "consulting_metrics",
    "consulting_summary",
    "difficulty_bucket",
]


def mean(values: list[float]) -> float:
    """The mean, NaN for none."""
    return float(sum(values) / len(values)) if values else float("nan")


def correct(t: Trajectory) -> float:
    """1.0 when the verifier counted the episode correct, else 0.0."""
    return float(bool(t.verifier and t.verifier.correct))


#: Difficulty of a problem at this step, by its group's solve rate r (share of its
#: episodes correct): unsolved r = 0, hard 0 < r <= 0.5, easy 0.5 < r < 1, solved r = 1.
DIFFICULTY_BUCKETS = ("unsolved", "hard", "easy", "solved")


def difficulty_bucket(solve_rate: float) -> str:
    """The bucket of a group's solve rate (:data:`DIFFICULTY_BUCKETS`)."""
    if solve_rate <= 0.0:
        return "unsolved"
    if solve_rate >= 1.0:
        return "solved"
    return "hard" if solve_rate <= 0.5 else "easy"


def _scored_groups(trajectories: list[Trajectory]) -> list[list[Trajectory]]:
    """Episodes by group (the same problem at the same step), without those that ended in error."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        if not t.finish_reason.startswith("error:"):
            groups.setdefault(t.group_id or t.problem_id, []).append(t)
    return list(groups.values())


def _paired_gap(
    groups: list[list[Trajectory]], treated: Callable[[Trajectory], bool]
) -> tuple[float, int]:
    """Mean over groups having both kinds of ``acc(treated) - acc(untreated)``, and how many groups."""
    gaps = []
    for group in groups:
        yes = [correct(t) for t in group if treated(t)]
        no = [correct(t) for t in group if not treated(t)]
        if yes and no:
            gaps.append(mean(yes) - mean(no))
    return mean(gaps), len(gaps)


def consulting_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Whether consulting is used where it pays: by difficulty, the dependency gap, leaks.

    - ``consult_rate/<bucket>``: among the episodes allowed to consult whose group falls in
      ``bucket`` (:func:`difficulty_bucket`), the share in which the policy wrote a consult
      itself (``consult_attempts > 0``; the env's auto consult is not the policy's choice).
      A policy that learned when to ask consults more on ``unsolved``/``hard`` problems
      than on ``easy``/``solved`` ones. Absent for a bucket without such episodes.
    - ``dependency_gap``: accuracy of the episodes that got at least one agent reply
      (``consults > 0``, auto consults included) minus that of the episodes of the same
      group that got none, averaged over the groups that have both (their number is
      ``dependency_gap/groups``). Positive: on the same problems the policy does better
      with the agents than alone, it depends on them; it should shrink as the guidance is
      internalised. Whether to consult is the policy's choice, so this compares
      self-selected episodes (a policy that asks only when stuck shows a smaller gap).
    - ``dependency_gap/allowed``: the same with "allowed to consult" (the schedule's
      assignment, which does not depend on the policy) in place of "got a reply".
    - ``agents/leak_rate``: among consults an agent answered (leak-guarded ones included),
      the share whose reply the leak guard blocked or rewritten (``ConsultRecord.leak``).

    Episodes that ended in ``error:*`` are left out of the first three (no honest verdict).
    """
    metrics: dict[str, float] = {}
    groups = _scored_groups(trajectories)
    by_bucket: dict[str, list[float]] = {}
    for group in groups:
        bucket = difficulty_bucket(mean([correct(t) for t in group]))
        by_bucket.setdefault(bucket, []).extend(
            float(t.consult_attempts > 0) for t in group if t.allow_consult
        )
    for bucket in DIFFICULTY_BUCKETS:
        if by_bucket.get(bucket):
            metrics[f"consult_rate/{bucket}"] = mean(by_bucket[bucket])
    gap, pairs = _paired_gap(groups, lambda t: t.consults > 0)
    if pairs:
        metrics["dependency_gap"] = gap
        metrics["dependency_gap/groups"] = float(pairs)
    gap, pairs = _paired_gap(groups, lambda t: t.allow_consult)
    if pairs:
        metrics["dependency_gap/allowed"] = gap
    answered = [
        turn.consult
        for t in trajectories
        for turn in t.turns
        if turn.consult is not None and (turn.consult.error is None or turn.consult.leak)
    ]
    if answered:
        metrics["agents/leak_rate"] = mean([float(r.leak is not None) for r in answered])
    return metrics


#: The consulting metrics :func:`consulting_summary` averages (``consult_rate/<bucket>`` too).
CONSULTING_KEYS = ("dependency_gap", "dependency_gap/allowed", "agents/leak_rate")


def consulting_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each consulting metric (:func:`consulting_metrics`) averaged over the steps that logged it."""
    keys = [f"consult_rate/{bucket}" for bucket in DIFFICULTY_BUCKETS] + list(CONSULTING_KEYS)
    summary = {}
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[key] = mean(values)
    return summary


def agent_coef_summary(records: list[dict[str, Any]], prefix: str = "update/") -> dict[str, float]:
    """The AIPO coefficient on agent tokens over the run: ``mean`` (of the steps' means), ``min``, ``max``.

    Read from the loss's ``agent/coef_{mean,min,max}`` as each step's update logged them
    (``update/agent/coef_*``), over the steps that trained agent tokens (a step whose
    coefficients are all 0 trained none: mask mode, or no agent token in its batch). A
    step's values are averages over its micro-batches, weighted by trained tokens, so a
    step's min and max are averages of micro-batch minima and maxima, and a micro-batch
    without agent tokens counts as 0 (see ``trainers/update.py``).
    """
    keys = {stat: f"{prefix}agent/coef_{stat}" for stat in ("mean", "min", "max")}
    steps = [r for r in records if (r.get(keys["max"]) or 0.0) > 0.0]
    if not steps:
        return {}
    return {
        "mean": mean([r[keys["mean"]] for r in steps if r.get(keys["mean"]) is not None]),
        "min": min(r[keys["min"]] for r in steps if r.get(keys["min"]) is not None),
        "max": max(r[keys["max"]] for r in steps),
    }
