"""ARPO's tree rollout against trajectory-level GRPO at the same number of leaves per prompt.

Two arms share one base config and budget (model, task, steps, prompts per step, leaves per
prompt ``N``, tokens, learning rate, loss, seed) and differ in one setting only:

* ``grpo``: ``rollout.strategy=grpo``, ``N`` independent samples per prompt;
* ``arpo``: ``rollout.strategy=arpo``, a tree of ``N`` leaves per prompt (``N/2`` global
  samples, beam 2, ARPO's entropy rule, soft attribution; :mod:`aipo_env.tree_rollout`).

Each arm runs once per seed (``--seeds``, default 0 1 2) as one
:class:`~trainers.embedded.EmbeddedTrainer` run. Reported per arm, as the mean over seeds
with a 95% t-interval: held-out accuracy of the policy alone after training (the trainer's
own greedy evaluation, :func:`aipo_env.evaluation.alone.evaluate_alone`), tool calls per
trajectory and per step, generated tokens per step (a tree's shared prefix counted once,
:func:`aipo_env.tree_rollout.generation_metrics`), branches per step and wall time; and
``arpo`` against ``grpo`` seed by seed on held-out accuracy after (:mod:`benchmarks.seed_stats`:
a t-interval over the seeds' paired differences, the two-stage bootstrap beside it where
the records keep which held-out problems each run solved).

Settings (``--setting``):

* ``consult`` (default): AIPO's consult protocol on ``configs/learning.yaml``, every
  episode opened by the env with a consult to the oracle reasoning agent
  (``env.auto_consult``) so that every path has a reply boundary to branch at: ARPO's
  branching after agent feedback (issue 12, item 5);
* ``tools``: ARPO's own setting, ``configs/arpo.yaml`` (the ``<python>`` tool on
  three-term sums). SmolLM2-135M-Instruct almost never writes a ``<python>`` call by
  itself, so there the trees rarely branch (docs/arpo.md).

Budget: one run of the default settings (5 steps x 4 prompts x N = 4, 16 held-out problems
before and after) used 260 CPU-seconds on two busy cores, so the six runs take about
1600 CPU-seconds: 20-25 minutes on two idle cores.

Resumable: each finished (arm, seed) writes ``<out>/arms/<setting>-<arm>-seed<k>.json`` and
is skipped by a later invocation with the same settings; an unfinished run resumes from
its run directory. Writes ``<out>/<setting>.json``, ``.png`` and ``.md``::

    python benchmarks/arpo.py                      # 2 arms x 3 seeds: about 20-25 min, 2 idle cores
    python benchmarks/arpo.py --seeds 0 --steps 1 --prompts 2 --set task.eval_size=4  # smoke
    python benchmarks/arpo.py --report-only        # the table from the finished runs only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from aipo.config import load_config  # noqa: E402
from aipo_env.passk import mean_ci  # noqa: E402
from benchmarks.arm_runs import (  # noqa: E402
    add_run_arguments,
    held_out_correct,
    read_finished,
    write_record,
)
from benchmarks.seed_stats import compare_baselines, describe, legend  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.metrics import read_metrics, save_figure  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "arpo"

#: Base config and the overrides that make each setting; both arms share them.
SETTINGS: dict[str, tuple[Path, list[str]]] = {
    "consult": (
        REPO / "configs" / "learning.yaml",
        [
            "env.auto_consult=reasoning",
            "agents.agents.reasoning.kind=oracle",
            "rollout.schedule.start_fraction=1",
            "rollout.schedule.end_fraction=1",
            "rollout.schedule.decay=constant",
        ],
    ),
    "tools": (REPO / "configs" / "arpo.yaml", []),
}
#: What each arm changes on top of the shared config; nothing else differs.
ARMS: dict[str, list[str]] = {
    "grpo": ["rollout.strategy=grpo"],
    "arpo": ["rollout.strategy=arpo"],
}
#: Paired comparisons: the tree against independent samples.
BASELINES: dict[str, tuple[str, ...]] = {"grpo": ("arpo",)}
#: Per-run figures taken from the metrics (mean over steps) and the summary.
FIGURES = {
    "eval_accuracy_after": "held-out accuracy alone, after",
    "eval_accuracy_before": "held-out accuracy alone, before",
    "reward_mean": "train reward (mean over steps)",
    "tool_calls_per_trajectory": "tool calls per trajectory",
    "tool_calls": "tool calls per step",
    "generated_tokens": "generated tokens per step",
    "prefix_reused_tokens": "prefix-reused tokens per step",
    "arpo/branches": "branches per step",
    "wall_s": "wall time per run (s)",
}


def run_config(
    setting: str, arm: str, seed: int, args: argparse.Namespace, run_dir: Path
) -> TrainConfig:
    """The validated config of one (arm, seed): the setting's base and overrides, the budget, the arm."""
    base, setting_overrides = SETTINGS[setting]
    overrides = [
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"train.steps={args.steps}",
        f"train.prompts_per_step={args.prompts}",
        f"rollout.n_samples={args.samples}",
        f"rollout.initial_samples={max(1, args.samples // 2)}",
        "train.plot=false",
        *setting_overrides,
        *args.extra,
        *ARMS[arm],
    ]
    return load_config(TrainConfig, base, overrides)


def run_figures(records: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, float]:
    """One run's figures (:data:`FIGURES`): metric means over steps, accuracy and wall time."""

    def mean(key: str) -> float:
        values = [float(r[key]) for r in records if isinstance(r.get(key), int | float)]
        return sum(values) / len(values) if values else float("nan")

    def accuracy(key: str) -> float:
        result = summary.get(key)
        return float(result["accuracy"]) if result else float("nan")

    figures = {key: mean(key) for key in FIGURES}
    figures["eval_accuracy_after"] = accuracy("eval_after")
    figures["eval_accuracy_before"] = accuracy("eval_before")
    figures["wall_s"] = float(summary.get("wall_s", float("nan")))
    if math.isnan(figures["arpo/branches"]):
        figures["arpo/branches"] = 0.0  # the grpo arm never branches
    return figures


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """What a finished arm's JSON must match to be reused."""
    return {
        "steps": args.steps,
        "prompts": args.prompts,
        "samples": args.samples,
        "extra": list(args.extra),
    }


def run_arm(
    setting: str, arm: str, seed: int, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    """Train one (arm, seed), or read its finished JSON back; the record with its figures."""
    from trainers.embedded import EmbeddedTrainer

    path = Path(args.out) / "arms" / f"{setting}-{arm}-seed{seed}.json"
    if (saved := read_finished(path, budget(args))) is not None:
        return saved
    run_dir = root / setting / f"{arm}-seed{seed}"
    config = run_config(setting, arm, seed, args, run_dir)
    resume = run_dir.is_dir() and any(run_dir.iterdir())
    print(f"== {setting} {arm} seed {seed}{' (resumed)' if resume else ''}", flush=True)
    summary = asdict(EmbeddedTrainer(config, resume=resume, progress=not args.no_progress).run())
    records = read_metrics(run_dir / "metrics.jsonl")
    record = {
        "setting": setting,
        "arm": arm,
        "seed": seed,
        "budget": budget(args),
        "overrides": ARMS[arm],
        "config": config.model_dump(mode="json"),
        "summary": summary,
        "curve": records,
        "figures": run_figures(records, summary),
        "held_out_after": held_out_correct(run_dir / "eval" / "after.jsonl"),
    }
    write_record(path, record)
    return record


def aggregate(records: list[dict[str, Any]], arms: list[str]) -> dict[str, dict[str, Any]]:
    """Per arm and figure: the per-seed values, their mean and 95% half-width."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        runs = [r for r in records if r["arm"] == arm]
        out[arm] = {"seeds": [r["seed"] for r in runs]}
        for key in FIGURES:
            values = [float(r["figures"][key]) for r in runs]
            mean, half = mean_ci(values)
            out[arm][key] = {"values": values, "mean": mean, "ci95": half}
    return out


def seed_score(record: dict[str, Any]) -> float | dict[str, float]:
    """One run's held-out result after training: ``{problem id: 1.0 or 0.0}`` where the
    record keeps it, else its accuracy (records written before ``held_out_after`` was kept).
    """
    solved = record.get("held_out_after")
    if solved:
        return {pid: float(ok) for pid, ok in solved.items()}
    return float(record["figures"]["eval_accuracy_after"])


def paired(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each arm of :data:`BASELINES` against its baseline, seed by seed: held-out accuracy after.

    A run without a held-out evaluation (accuracy NaN) is left out of its seed's pair.
    """
    by_arm: dict[str, dict[int, float | dict[str, float]]] = {arm: {} for arm in ARMS}
    for r in records:
        score = seed_score(r)
        if isinstance(score, dict) or math.isfinite(score):
            by_arm[r["arm"]][r["seed"]] = score
    return compare_baselines(by_arm, BASELINES)


def render_markdown(
    table: dict[str, dict[str, Any]],
    command: str,
    setting: str,
    vs: dict[str, dict[str, Any]] | None = None,
) -> str:
    """A Markdown table, one row per figure and one column per arm: mean ± 95% half-width."""
    arms = list(table)
    seeds = ", ".join(str(s) for s in table[arms[0]]["seeds"])
    lines = [
        f"ARPO vs trajectory-level GRPO, setting `{setting}`, seeds {seeds} "
        "(mean ± 95% t-interval half-width over seeds).",
        "",
        f"Command: `{command}`",
        "",
        "| figure | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for key, label in FIGURES.items():
        cells = []
        for arm in arms:
            cell = table[arm][key]
            half = "" if math.isnan(cell["ci95"]) else f" ± {cell['ci95']:.3g}"
            cells.append(f"{cell['mean']:.3g}{half}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if vs:
        lines += ["", f"Held-out accuracy alone, after. {legend()}"]
    for baseline, against in (vs or {}).items():
        lines += ["", f"Against `{baseline}` (arm minus `{baseline}`):", ""]
        lines += [f"- {arm}: {describe(c)}" for arm, c in against.items()]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, Any]], out_png: Path) -> Path:
    """One bar panel per headline figure, one bar per arm with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["eval_accuracy_after", "tool_calls", "generated_tokens", "wall_s"]
    arms = list(table)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0))
    for ax, key in zip(axes, keys, strict=True):
        means = [table[a][key]["mean"] for a in arms]
        errors = [0.0 if math.isnan(table[a][key]["ci95"]) else table[a][key]["ci95"] for a in arms]
        ax.bar(arms, means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(arms))])
        for i, arm in enumerate(arms):
            values = table[arm][key]["values"]
            ax.plot([i] * len(values), values, "k.", alpha=0.6)
        ax.set_title(FIGURES[key], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_png)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="consult")
    p.add_argument("--arms", default="grpo,arpo", help=f"comma-separated, of {', '.join(ARMS)}")
    add_run_arguments(
        p,
        steps=5,
        samples_help="leaves per prompt (N)",
        run_root=REPO / "runs" / "arpo_bench",
        out=RESULTS,
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the report from the finished runs under --out with this budget",
    )
    return p.parse_args(argv)


def finished(setting: str, arms: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The finished (arm, seed) records under ``<out>/arms/`` with this budget; none trained."""
    records = []
    for seed in args.seeds:
        for arm in arms:
            path = Path(args.out) / "arms" / f"{setting}-{arm}-seed{seed}.json"
            record = json.loads(path.read_text()) if path.is_file() else {}
            if record.get("budget") == budget(args):
                records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every (arm, seed), then write the JSON, the PNG and the Markdown table."""
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        print(f"--arms {args.arms!r}: expected some of {', '.join(ARMS)}", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/arpo.py", *(sys.argv[1:] if argv is None else argv)])
    began = time.perf_counter()
    root = Path(args.run_root)
    if args.report_only:
        records = finished(args.setting, arms, args)
        if not records:
            print(
                f"no finished {args.setting} runs with this budget under {Path(args.out) / 'arms'}",
                file=sys.stderr,
            )
            return 1
    else:
        records = [
            run_arm(args.setting, arm, seed, args, root) for seed in args.seeds for arm in arms
        ]
    table = aggregate(records, arms)
    vs = paired(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(table, command, args.setting, vs)
    (out / f"{args.setting}.md").write_text(markdown)
    result = {
        "command": command,
        "setting": args.setting,
        "budget": budget(args),
        "seeds": args.seeds,
        "arms": table,
        "vs": vs,
        "runs": [{k: r[k] for k in ("arm", "seed", "figures")} for r in records],
        "wall_s": time.perf_counter() - began,
    }
    (out / f"{args.setting}.json").write_text(json.dumps(result, indent=2))
    png = plot(table, out / f"{args.setting}.png")
    print(markdown)
    print(f"wrote {out / args.setting}.json, .md and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
