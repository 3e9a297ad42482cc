"""pass@k, avg@n and bootstrap confidence intervals over problems.

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
Models Trained on Code"): with ``n`` samples of a problem of which ``c`` are
correct, ``pass@k = 1 - C(n-c, k) / C(n, k)``, the chance that a random subset of
``k`` of the ``n`` samples holds at least one correct one. It is computed as a
product, ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms the huge binomials.

A task's metric is the mean of the per-problem values; confidence intervals come
from resampling problems (not samples), since problems are the unit the benchmark
draws. :func:`compare` pairs two runs on the problems both contain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Metric key for the mean correctness over the n samples of a problem.
AVG_KEY = "avg@n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct."""
    if n < 1:
        raise ValueError(f"n must be at least 1; got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must lie in [0, n]; got c={c} with n={n}")
    if k < 1:
        raise ValueError(f"k must be at least 1; got k={k}")
    if k > n:
        raise ValueError(
            f"pass@{k} needs at least k={k} samples per problem; got n={n} (raise --n or lower k)"
        )
    if n - c < k:
        # Every subset of k samples contains a correct one.
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def default_ks(n: int) -> list[int]:
    """The k values reported by default: 1, 2, 4, ... up to ``n``, and ``n`` itself."""
    if n < 1:
        raise ValueError(f"n must be at least 1; got n={n}")
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def check_ks(n: int, ks: Sequence[int]) -> None:
    """Refuse any k larger than ``n`` (or below 1), naming the values."""
    bad = [k for k in ks if k > n or k < 1]
    if bad:
        raise ValueError(
            f"pass@k needs 1 <= k <= n; got k={', '.join(map(str, bad))} with n={n} "
            f"(raise --n to at least {max(bad)} or drop those k)"
        )


def problem_metrics(correct: Sequence[bool], ks: Sequence[int]) -> dict[str, float]:
    """avg@n and pass@k of one problem from the correctness of each of its samples."""
    n = len(correct)
    if n == 0:
        raise ValueError("a problem needs at least one sample to be scored; got none")
    check_ks(n, ks)
    c = sum(1 for x in correct if x)
    metrics = {AVG_KEY: c / n}
    for k in ks:
        metrics[f"pass@{k}"] = pass_at_k(n, c, k)
    return metrics


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metric keys :func:`problem_metrics` returns for ``ks``, in order."""
    return [AVG_KEY] + [f"pass@{k}" for k in ks]


def aggregate(per_problem: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over problems (the metrics the first problem has)."""
    if not per_problem:
        return {}
    keys = list(per_problem[0])
    return {key: float(np.mean([p[key] for p in per_problem])) for key in keys}


def overall(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Macro average over tasks: each task weighs the same, whatever its size.

    Only metrics every task reports are averaged (tasks may differ in n).
    """
    if not per_task:
        return {}
    tasks = list(per_task.values())
    keys = [key for key in tasks[0] if all(key in t for t in tasks)]
    return {key: float(np.mean([t[key] for t in tasks])) for key in keys}


def bootstrap_ci(
    values: Sequence[float],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per problem)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}")
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("bootstrap needs at least one problem; got none")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    means = arr[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def metrics_with_ci(
    per_problem: Sequence[Mapping[str, float]],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """For each metric: ``{"mean", "ci_low", "ci_high"}`` over problems."""
    out: dict[str, dict[str, float]] = {}
    if not per_problem:
        return out
    for key in per_problem[0]:
        values = [p[key] for p in per_problem]
        low, high = bootstrap_ci(values, n_boot=n_boot, confidence=confidence, seed=seed)
        out[key] = {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high}
    return out


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Difference of means ``b - a`` over paired problems, with a paired bootstrap interval.

    Resampling the problems (the same indices for both runs) keeps the pairing, so
    the interval reflects the per-problem differences, not each run's own spread.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values must align; got {len(a)} and {len(b)}")
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    low, high = bootstrap_ci(diff, n_boot=n_boot, confidence=confidence, seed=seed)
    return {
        "a": float(np.mean(a)),
        "b": float(np.mean(b)),
        "diff": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
        "problems": len(diff),
    }


def _per_problem_correct(task_result: Mapping[str, Any]) -> dict[str, list[bool]]:
    """``{problem id: [correct per sample]}`` from one task's section of a results file."""
    return {
        str(p["id"]): [bool(s["correct"]) for s in p["samples"]]
        for p in task_result.get("problems", [])
        if p.get("samples")
    }


def compare(
    results_a: Mapping[str, Any],
    results_b: Mapping[str, Any],
    *,
    ks: Sequence[int] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per task and metric, run B minus run A over the problems both runs share.

    ``results_a``/``results_b`` are results files as :mod:`aipo_env.evaluation`
    writes them (``{"tasks": {name: {"problems": [{"id", "samples": [{"correct"}]}]}}}``).
    ``ks`` defaults to the k values both runs can estimate (k up to the smaller n).
    Returns ``{task: {metric: {"a", "b", "diff", "ci_low", "ci_high", "problems"}}}``;
    tasks with no shared problem are left out.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    tasks_a = results_a.get("tasks", {})
    tasks_b = results_b.get("tasks", {})
    for task in sorted(set(tasks_a) & set(tasks_b)):
        corr_a = _per_problem_correct(tasks_a[task])
        corr_b = _per_problem_correct(tasks_b[task])
        shared = sorted(set(corr_a) & set(corr_b))
        if not shared:
            continue
        min_n = min(min(len(corr_a[i]), len(corr_b[i])) for i in shared)
        task_ks = list(ks) if ks is not None else default_ks(min_n)
        check_ks(min_n, task_ks)
        metrics_a = [problem_metrics(corr_a[i], task_ks) for i in shared]
        metrics_b = [problem_metrics(corr_b[i], task_ks) for i in shared]
        out[task] = {
            key: paired_bootstrap(
                [m[key] for m in metrics_a],
                [m[key] for m in metrics_b],
                n_boot=n_boot,
                confidence=confidence,
                seed=seed,
            )
            for key in metric_names(task_ks)
        }
    return out


def format_comparison(diffs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A plain-text table of :func:`compare`'s output, one row per task and metric."""
    lines = [
        f"{'task':<20} {'metric':<10} {'A':>8} {'B':>8} {'B-A':>8}  95% CI             problems"
    ]
    for task, metrics in diffs.items():
        for key, d in metrics.items():
            ci = f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
            lines.append(
                f"{task:<20} {key:<10} {d['a']:>8.4f} {d['b']:>8.4f} {d['diff']:>+8.4f}  "
                f"{ci:<18} {int(d['problems'])}"
            )
    if len(lines) == 1:
        lines.append("(no task has problems in common between the two runs)")
    return "\n".join(lines)


#: Two-sided 95% Student t quantiles by degrees of freedom (normal beyond 30).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
_T95 += [2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086]
_T95 += [2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% t-interval (NaN half-width for one value)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    df = len(finite) - 1
    t = _T95[df - 1] if df <= len(_T95) else 1.96
    return mean, t * math.sqrt(var / len(finite))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``successes / n`` (within [0, 1]).

    Unlike a t-interval on 0/1 values it stays inside [0, 1] and is not zero-width at 0
    or ``n`` successes, which matters for rare events (1 correct in 96).
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)
