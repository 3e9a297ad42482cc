"""Arm comparisons over seeds: the seed, not the problem, is the unit of replication.

The arm-comparison benchmarks (``efficacy.py``, ``ilr.py``, ``arpo.py``) run every arm
once per seed and score each run on the same held-out problems. A seed's *paired
difference* is arm B's mean over its problems minus arm A's mean over the same problems
(B the arm, A its baseline). Three 95% intervals of the mean difference, in the order the
reports give them:

1. :func:`seed_paired_t`, the primary figure: a Student t-interval over the per-seed
   differences, ``mean ± t(0.975, n - 1) * sd / sqrt(n)`` with ``n`` seeds. What another
   seed would give is the question, and the seeds are what the benchmark replicates.
2. :func:`two_stage_bootstrap`: resample the seeds, then the problems within each drawn
   seed (the same problems for both arms); the percentile interval of the mean
   difference. It adds the problems' sampling error to the seeds' spread; with as few
   seeds as these benchmarks run it is narrower than the t-interval (it can only redraw
   the seeds it saw, and has no t quantile's allowance for that), which is why it is not
   the primary figure.
3. The pairs bootstrap (:func:`aipo_env.passk.paired_bootstrap` over every (seed,
   problem) pair pooled), a secondary figure only: it treats the problems of every seed
   as independent draws, so when seeds disagree it is too narrow.

With one seed the spread between seeds is unknown: both seed-level intervals are NaN and
reported as "no interval", never as a zero-width interval.

What the seeds do not vary, they do not cover: where the arms start from a stage trained
once for all seeds (the efficacy benchmark's warm-up), the intervals are over the RL
seeds only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from aipo_env.passk import mean_ci, paired_bootstrap

#: How a report names the secondary figure wherever it prints it.
PAIRS_LABEL = "pairs bootstrap, treats problems as independent"


def legend(pairs: bool = False) -> str:
    """The sentence a report prints once, before its comparisons: what each figure is."""
    text = (
        "Arm comparisons are paired by seed (arm minus baseline, 95%): first the t-interval "
        "over the per-seed differences (each seed's mean over its problems; n = seeds), the "
        "primary figure; then the two-stage bootstrap (seeds resampled, then problems within "
        "each seed)"
    )
    if pairs:
        text += (
            f"; last, as a secondary figure, the {PAIRS_LABEL} (every (seed, problem) pair "
            "resampled as one unit: too narrow when seeds disagree)"
        )
    return text + "."


class SeedInterval(NamedTuple):
    """A mean difference over seeds and its 95% interval (``low``/``high`` NaN when undefined)."""

    mean: float
    low: float
    high: float
    n: int


def seed_paired_t(diffs_per_seed: Sequence[float]) -> SeedInterval:
    """The mean of the per-seed paired differences and its 95% t-interval over seeds.

    One difference per seed (arm B's mean over problems minus arm A's, same seed). With a
    single seed the interval is undefined: ``low`` and ``high`` are NaN.
    """
    diffs = [float(d) for d in diffs_per_seed]
    if not diffs:
        raise ValueError("seed_paired_t needs one difference per seed; got none")
    bad = [d for d in diffs if not math.isfinite(d)]
    if bad:
        raise ValueError(f"every seed's difference must be finite; got {diffs}")
    mean, half = mean_ci(diffs)  # the 95% t quantile for df = n - 1; NaN half for n = 1
    return SeedInterval(mean, mean - half, mean + half, len(diffs))


def two_stage_bootstrap(
    values_a: Sequence[Sequence[float]],
    values_b: Sequence[Sequence[float]],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SeedInterval:
    """Seeds resampled, then problems within each drawn seed: the interval of mean ``b - a``.

    ``values_a[s][p]`` and ``values_b[s][p]`` are the two arms' scores of problem ``p`` in
    seed ``s``: paired, so one problem index draws both. A replicate's statistic is the
    mean over its drawn seeds of each seed's mean difference over its drawn problems (a
    seed drawn twice gets two independent problem draws); the point estimate is the same
    with nothing resampled. A fixed ``seed`` makes reports reproducible. With one seed
    ``low`` and ``high`` are NaN: resampling problems alone would hide the seeds' spread.
    """
    if len(values_a) != len(values_b):
        raise ValueError(f"both arms need the same seeds; got {len(values_a)} and {len(values_b)}")
    if not values_a:
        raise ValueError("two_stage_bootstrap needs at least one seed; got none")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}")
    diffs = []
    for s, (a, b) in enumerate(zip(values_a, values_b, strict=True)):
        if len(a) != len(b) or not a:
            raise ValueError(
                f"seed {s}: the arms need the same problems, at least one; got {len(a)} and {len(b)}"
            )
        diffs.append(np.asarray(b, dtype=float) - np.asarray(a, dtype=float))
    mean = float(np.mean([d.mean() for d in diffs]))
    n_seeds = len(diffs)
    if n_seeds < 2:
        return SeedInterval(mean, math.nan, math.nan, n_seeds)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    seed_means = np.empty((n_boot, n_seeds))
    for slot in range(n_seeds):  # each (replicate, slot) gets its own problem draw
        for s, d in enumerate(diffs):
            rows = drawn[:, slot] == s
            picks = rng.integers(0, d.size, size=(int(rows.sum()), d.size))
            seed_means[rows, slot] = d[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(seed_means.mean(axis=1), [tail, 100.0 - tail])
    return SeedInterval(mean, float(low), float(high), n_seeds)


def _interval(result: SeedInterval) -> dict[str, float]:
    return {"mean": result.mean, "ci_low": result.low, "ci_high": result.high, "seeds": result.n}


def compare_over_seeds(
    values_a: Sequence[Sequence[float] | float],
    values_b: Sequence[Sequence[float] | float],
    seeds: Sequence[int],
    *,
    pairs: bool = False,
) -> dict[str, Any]:
    """Arm B against arm A, seed by seed: every figure a report prints, JSON-ready.

    Per seed, either the per-problem scores (the same problems for both arms) or, where a
    record keeps no per-problem results, the seed's mean score alone; then there is no
    two-stage bootstrap (``None``). ``pairs`` adds the pairs bootstrap (secondary).
    Returns ``a``, ``b`` (means over seeds), ``diff`` (mean per-seed difference),
    ``per_seed`` (``{seed: difference}``), ``seed_t``, ``two_stage_bootstrap`` and, with
    ``pairs``, ``pairs_bootstrap`` (its ``a``, ``b``, ``diff``, ``ci_low``, ``ci_high``,
    ``problems`` as :func:`aipo_env.passk.paired_bootstrap` gives them, and ``label``).
    """
    if not len(values_a) == len(values_b) == len(seeds):
        raise ValueError(
            f"one value list per seed and arm; got {len(values_a)}, {len(values_b)} "
            f"for seeds {list(seeds)}"
        )
    means_a = [float(np.mean(v)) for v in values_a]
    means_b = [float(np.mean(v)) for v in values_b]
    diffs = [b - a for a, b in zip(means_a, means_b, strict=True)]
    t = seed_paired_t(diffs)
    per_problem = all(np.ndim(v) == 1 for v in (*values_a, *values_b))
    out: dict[str, Any] = {
        "a": float(np.mean(means_a)),
        "b": float(np.mean(means_b)),
        "diff": t.mean,
        "per_seed": {str(s): d for s, d in zip(seeds, diffs, strict=True)},
        "seed_t": _interval(t),
        "two_stage_bootstrap": (
            _interval(two_stage_bootstrap(values_a, values_b))  # type: ignore[arg-type]
            if per_problem
            else None
        ),
    }
    if pairs:
        if not per_problem:
            raise ValueError("the pairs bootstrap needs per-problem values for every seed")
        pooled_a = [x for v in values_a for x in v]  # type: ignore[union-attr]
        pooled_b = [x for v in values_b for x in v]  # type: ignore[union-attr]
        out["pairs_bootstrap"] = {
            **paired_bootstrap(pooled_a, pooled_b, seed=0),
            "label": PAIRS_LABEL,
        }
    return out


def compare_by_seed(
    base: Mapping[int, float | Mapping[str, float]],
    arm: Mapping[int, float | Mapping[str, float]],
    *,
    pairs: bool = False,
) -> dict[str, Any] | None:
    """``arm`` against ``base`` on the seeds both ran (:func:`compare_over_seeds`); None if none.

    Per seed, either ``{problem id: score}`` (both arms on the same problems, paired by id)
    or the seed's mean score alone, where a record keeps no per-problem results.
    """
    seeds = sorted(set(base) & set(arm))
    if not seeds:
        return None
    values_a: list[Sequence[float] | float] = []
    values_b: list[Sequence[float] | float] = []
    for s in seeds:
        a, b = base[s], arm[s]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            if set(a) != set(b):
                raise ValueError(
                    f"seed {s}: the arms were scored on different problems; only one has "
                    f"{sorted(set(a) ^ set(b))}"
                )
            ids = list(a)  # the baseline's order: a pairs bootstrap draws the same pairs
            values_a.append([float(a[p]) for p in ids])
            values_b.append([float(b[p]) for p in ids])
        else:
            values_a.append(float(np.mean(list(a.values()))) if isinstance(a, Mapping) else a)
            values_b.append(float(np.mean(list(b.values()))) if isinstance(b, Mapping) else b)
    return compare_over_seeds(values_a, values_b, seeds, pairs=pairs)


def _bounds(low: float, high: float) -> str:
    return f"[{low:+.3f}, {high:+.3f}]"


def describe(comparison: dict[str, Any]) -> str:
    """One line of a report: the seed t-interval, the two-stage bootstrap, the pairs bootstrap."""
    t = comparison["seed_t"]
    n = t["seeds"]
    per_seed = ", ".join(f"{d:+.3f}" for d in comparison["per_seed"].values())
    if math.isnan(t["ci_low"]):
        parts = [f"{t['mean']:+.3f}, no interval ({n} seed: the spread between seeds is unknown)"]
    else:
        parts = [
            f"{t['mean']:+.3f} {_bounds(t['ci_low'], t['ci_high'])} "
            f"(t over {n} seeds; per seed {per_seed})"
        ]
    two = comparison.get("two_stage_bootstrap")
    if two is None:
        parts.append("two-stage bootstrap n/a (the records keep no per-problem results)")
    elif math.isnan(two["ci_low"]):
        parts.append("two-stage bootstrap: no interval (1 seed)")
    else:
        parts.append(f"two-stage bootstrap {_bounds(two['ci_low'], two['ci_high'])}")
    pairs = comparison.get("pairs_bootstrap")
    if pairs is not None:
        parts.append(
            f"{PAIRS_LABEL}: {_bounds(pairs['ci_low'], pairs['ci_high'])} "
            f"over {pairs['problems']} pairs"
        )
    return "; ".join(parts)


def compare_baselines(
    by_arm: Mapping[str, Mapping[int, float | Mapping[str, float]]],
    baselines: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, Any]]:
    """Each arm against its baseline (:func:`compare_by_seed`), ``{baseline: {arm: comparison}}``.

    Arms or baselines with no shared seed are left out, and so is a baseline with none.
    """
    out: dict[str, dict[str, Any]] = {}
    for baseline, arms in baselines.items():
        against = {
            arm: compare_by_seed(by_arm.get(baseline, {}), by_arm.get(arm, {})) for arm in arms
        }
        against = {arm: c for arm, c in against.items() if c is not None}
        if against:
            out[baseline] = against
    return out
