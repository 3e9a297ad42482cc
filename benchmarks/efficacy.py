"""The AIPO effect, measured: what a policy keeps when it reasons alone after training with agents.

Four arms at one budget (``configs/efficacy.yaml``; the same seeds, problems, steps x
prompts x samples and token limits), each after the same warm-up where it applies:

* ``grpo``: never consults (schedule 0, ``env.max_consults=0``). Its warm-up fits the
  same demonstrations as the others' with the consults taken out
  (``warmup.consults=false``: the prompt of independent mode, the policy's own
  solution), so the warm-up is not what differs;
* ``aipo_mask``: consults; agent tokens are context only (``loss.agent_mode=mask``),
  what other frameworks do with injected tokens;
* ``aipo``: consults; agent tokens trained through the shaped coefficient (the default);
* ``aipo_ratio``: consults; agent tokens trained with the truncated IS ratio.

Two tasks where the base policy alone is weak (:data:`TASKS`): a knowledge-bound one
(``rg:leg_counting``, one animal kind, two or three of them: the legs-per-animal facts
are the Knowledge oracle's) and a reasoning-bound one (``rg:chain_sum``, three one-digit
terms: the steps are the Reasoning oracle's).

Stages, each kept on disk as it finishes, so a stopped run resumes where it was:

1. **warm** (per task, once; shared by the seeds): the consult warm-up
   (:mod:`trainers.warmup`) collects its rollouts once; the ``consult`` variant fits
   them as they are, the ``alone`` variant (for ``grpo``) the same demonstrations
   without their consults. Each warmed model is saved, with its held-out accuracy
   alone (greedy) and, for the base model, the same before any warm-up.
2. **runs** (per task, seed, arm): ``aipo train`` from the warmed model
   (:class:`~trainers.embedded.EmbeddedTrainer`), held-out accuracy alone (greedy) at
   the start, halfway (``train.eval_every``) and at the end; consult rate and
   dependency gap per step from its metrics.
3. **pass@k** of every final model (and of the base and warmed models), alone:
   ``--eval-problems`` held-out problems x ``--passk-samples`` samples at the rollout
   temperature (:func:`aipo_env.evaluation.runner.evaluate`).

Reported per task and arm, as mean ± 95% t-interval over seeds: greedy accuracy after,
pass@k for k = 1, 2, 4, 8, 16; and each consulting arm against ``grpo``, and the arms
that train the agent's tokens against ``aipo_mask``, paired by seed on the same held-out
problems (:mod:`benchmarks.seed_stats`: a t-interval over the seeds' differences, a
two-stage bootstrap beside it, the (seed, problem) pairs bootstrap as a secondary figure).
The warm-up is trained once (seed 0) and serves every seed, so every interval covers the
RL seeds only. Writes ``<out>/efficacy.json``,
``efficacy.md``, ``passk.png`` (pass@k curves: the capability-boundary picture) and
``curves.png`` (held-out accuracy, consult rate, dependency gap against step); each
finished run's record is ``<out>/arms/<task>-<arm>-seed<k>.json``.

    python benchmarks/efficacy.py --no-progress    # 2 tasks x 4 arms x 3 seeds (see docs/efficacy.md)
    python benchmarks/efficacy.py --report-only    # the tables from the runs finished so far
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from aipo.config import load_config  # noqa: E402
from aipo_env.passk import mean_ci  # noqa: E402
from benchmarks.arm_runs import add_run_arguments, read_finished, write_record  # noqa: E402
from benchmarks.seed_stats import compare_by_seed, describe, legend  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.metrics import read_metrics, save_figure  # noqa: E402
from trainers.warmup import WarmupError  # noqa: E402

BASE_CONFIG = REPO / "configs" / "efficacy.yaml"
RESULTS = REPO / "benchmarks" / "results" / "efficacy"
KS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class TaskSetting:
    """One benchmark task: the registered task, its difficulty and what the warm-up asks."""

    name: str
    kwargs: dict[str, Any]
    overrides: tuple[str, ...] = ()
    note: str = ""


TASKS: dict[str, TaskSetting] = {
    "knowledge": TaskSetting(
        "rg:leg_counting",
        {"min_animals": 1, "max_animals": 1, "min_instances": 2, "max_instances": 3},
        (
            "warmup.agent=knowledge",
            # The base policy solves about 2% alone: too few correct episodes without a
            # consult to mix in, so every demonstration consults.
            "warmup.consult_share=1.0",
            # Handed the facts it still answers 1 in 96 (benchmarks/knowledge_probe.py): the
            # consult episodes are continued with the reference solution, which shows it
            # how the facts are used (docs/warmup.md). Added after the first attempt
            # failed its warm-up (warm/knowledge-failed.json), before any run.
            "warmup.reference=true",
        ),
        "legs of two or three animals of one kind: the Knowledge oracle has the facts",
    ),
    "reasoning": TaskSetting(
        "rg:chain_sum",
        {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1},
        (
            "warmup.agent=reasoning",
            # 128 problems gave 30 demonstrations (5 of 256 consult episodes and 15 of 256
            # alone ended correct), short of the 32 required: 192 reuse those rollouts.
            "warmup.problems=192",
            # The task has steps but no facts: Knowledge answers from the policy's generator.
            "agents.agents.knowledge.kind=llm",
            "agents.agents.knowledge.backend=policy",
        ),
        "three one-digit terms added and subtracted: the Reasoning oracle has the steps",
    ),
}

CONSULTING = (
    "rollout.schedule.start_fraction=0.5",
    "rollout.schedule.end_fraction=0.25",
    "rollout.schedule.decay=linear",
    "env.max_consults=1",
)


@dataclass(frozen=True)
class ArmSetting:
    """What one arm changes on top of the task's config, and which warmed model it starts from."""

    warm: str  # "consult" or "alone"
    overrides: tuple[str, ...] = field(default_factory=tuple)


ARMS: dict[str, ArmSetting] = {
    "grpo": ArmSetting(
        "alone",
        (
            "rollout.schedule.start_fraction=0",
            "rollout.schedule.end_fraction=0",
            "rollout.schedule.decay=constant",
            "env.max_consults=0",
            "loss.agent_mode=mask",
        ),
    ),
    "aipo_mask": ArmSetting("consult", (*CONSULTING, "loss.agent_mode=mask")),
    "aipo": ArmSetting("consult", (*CONSULTING, "loss.agent_mode=shaped")),
    "aipo_ratio": ArmSetting("consult", (*CONSULTING, "loss.agent_mode=ratio")),
}

# Paired comparisons: every consulting arm against the arm that never consults, and the
# arms that train the agent's tokens against the one that masks them (what other
# frameworks do with injected tokens).
BASELINES: dict[str, tuple[str, ...]] = {
    "grpo": ("aipo_mask", "aipo", "aipo_ratio"),
    "aipo_mask": ("aipo", "aipo_ratio"),
}


def task_overrides(task: str) -> list[str]:
    """The overrides that make ``task``'s config from :data:`BASE_CONFIG`."""
    setting = TASKS[task]
    return [
        f"task.name={setting.name}",
        f"task.kwargs={json.dumps({'size': 500, 'seed': 0, **setting.kwargs})}",
        *setting.overrides,
    ]


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """The shared budget from the command line."""
    return [
        f"train.steps={args.steps}",
        f"train.prompts_per_step={args.prompts}",
        f"rollout.n_samples={args.samples}",
        f"rollout.schedule.decay_steps={args.steps}",
        f"train.eval_every={max(1, args.steps // 2)}",
        f"task.eval_size={args.eval_problems}",
        *args.extra,
    ]


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """What a finished record must match to be reused."""
    return {
        "steps": args.steps,
        "prompts": args.prompts,
        "samples": args.samples,
        "eval_problems": args.eval_problems,
        "passk_samples": args.passk_samples,
        "extra": list(args.extra),
    }


def run_config(
    task: str, arm: str, seed: int, args: argparse.Namespace, run_dir: Path, model: str
) -> TrainConfig:
    """The validated config of one (task, arm, seed) run from the warmed ``model``."""
    overrides = [
        *task_overrides(task),
        *budget_overrides(args),
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"policy.model={model}",
        "warmup.enabled=false",
        *ARMS[arm].overrides,
    ]
    return load_config(TrainConfig, BASE_CONFIG, overrides)


def warm_config(task: str, variant: str, args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """The config of ``task``'s warm-up (seed 0), consulting or ``alone``."""
    overrides = [
        *task_overrides(task),
        *budget_overrides(args),
        f"run_dir={run_dir}",
        "seed=0",
        f"warmup.consults={str(variant == 'consult').lower()}",
    ]
    return load_config(TrainConfig, BASE_CONFIG, overrides)


# -- stage 1: the warm-up ---------------------------------------------------------------


async def _warm(
    config: TrainConfig, model_dir: Path, progress: bool, base_eval: bool
) -> dict[str, Any]:
    from trainers.embedded import evaluate
    from trainers.run_state import open_run
    from trainers.warmup import run_warmup

    out: dict[str, Any] = {}
    async with open_run(config, resume=True, progress=progress) as run:
        if base_eval:
            out["eval_base"] = asdict(await evaluate(run, "base", reuse=True))
        out["warmup"] = asdict(await run_warmup(run, resume=True))
        out["eval_warm"] = asdict(await evaluate(run, "warm", reuse=True))
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run.model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.replace(model_dir)
    return out


def warm(task: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """``task``'s warmed model of ``variant`` (trained now, or read back): its record."""
    root = Path(args.run_root) / task / f"warm-{variant}"
    record_path = Path(args.out) / "warm" / f"{task}-{variant}.json"
    if record_path.is_file() and (root / "model").is_dir():
        saved = json.loads(record_path.read_text())
        if saved.get("budget") == budget(args) and saved.get("setting") == task_overrides(task):
            return saved
    print(f"== {task}: warm-up ({variant})", flush=True)
    if variant == "alone":
        # The same collected rollouts as the consulting variant: read back, not rolled again.
        source = Path(args.run_root) / task / "warm-consult" / "warmup" / "rollouts.jsonl"
        target = root / "warmup" / "rollouts.jsonl"
        if source.is_file() and not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    config = warm_config(task, variant, args, root)
    started = time.perf_counter()
    out = asyncio.run(_warm(config, root / "model", not args.no_progress, variant == "consult"))
    record = {
        "task": task,
        "variant": variant,
        "budget": budget(args),
        "setting": task_overrides(task),
        "model": str(root / "model"),
        "config": config.model_dump(mode="json"),
        "wall_s": time.perf_counter() - started,
        **out,
    }
    record["passk"] = passk(root / "model", task, 0, root / "passk", args)
    write_record(record_path, record)
    return record


def _failure_path(task: str, args: argparse.Namespace) -> Path:
    return Path(args.out) / "warm" / f"{task}-failed.json"


def record_warm_failure(task: str, message: str, args: argparse.Namespace) -> None:
    """Keep why ``task``'s warm-up failed (the counts), so the report can say it."""
    record = {
        "task": task,
        "budget": budget(args),
        "setting": task_overrides(task),
        "error": message,
    }
    write_record(_failure_path(task, args), record)


def warm_failure(task: str, args: argparse.Namespace) -> str | None:
    """The recorded warm-up failure of ``task`` under this budget, if any."""
    path = _failure_path(task, args)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    same = saved.get("budget") == budget(args) and saved.get("setting") == task_overrides(task)
    return saved["error"] if same else None


# -- stage 2: the RL runs ---------------------------------------------------------------


def run_arm(task: str, arm: str, seed: int, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (task, arm, seed) from the warmed ``model``, or read its record back."""
    from trainers.embedded import EmbeddedTrainer

    path = Path(args.out) / "arms" / f"{task}-{arm}-seed{seed}.json"
    if (saved := read_finished(path, budget(args))) is not None:
        return saved
    run_dir = Path(args.run_root) / task / f"{arm}-seed{seed}"
    config = run_config(task, arm, seed, args, run_dir, model)
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    print(f"== {task} {arm} seed {seed}{' (resumed)' if resume else ''}", flush=True)
    summary = asdict(EmbeddedTrainer(config, resume=resume, progress=not args.no_progress).run())
    records = read_metrics(run_dir / "metrics.jsonl")
    record = {
        "task": task,
        "arm": arm,
        "seed": seed,
        "budget": budget(args),
        "overrides": list(ARMS[arm].overrides),
        "config": config.model_dump(mode="json"),
        "summary": summary,
        "curve": [_curve_point(r) for r in records],
        "passk": passk(Path(summary["checkpoint"]), task, seed, run_dir / "passk", args),
    }
    write_record(path, record)
    return record


CURVE_KEYS = ("reward_mean", "consult_rate", "dependency_gap", "eval/accuracy", "agents/leak_rate")


def _curve_point(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"step": metrics["step"], **{k: metrics[k] for k in CURVE_KEYS if k in metrics}}


# -- stage 3: pass@k alone --------------------------------------------------------------


def passk(
    model: Path, task: str, seed: int, output: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """pass@k of ``model`` alone on the held-out problems: per-problem correctness and the metrics."""
    from aipo_env.evaluation.runner import EvalConfig, evaluate

    setting = TASKS[task]
    config = EvalConfig(
        model=str(model),
        tasks=[setting.name],
        task_args={setting.name: {"size": 500, "seed": 10000, **setting.kwargs}},
        n=args.passk_samples,
        ks=[k for k in KS if k <= args.passk_samples],
        temperature=0.7,
        top_p=1.0,
        max_new_tokens=64,
        limit=args.eval_problems,
        concurrency=64,
        seed=seed,
    )
    resume = (output / "trajectories.jsonl").is_file()
    results = asyncio.run(evaluate(config, output, resume=resume, progress=not args.no_progress))
    section = results["tasks"][setting.name]
    return {
        "metrics": {k: v for k, v in section["metrics"].items() if k.startswith("pass@")},
        "correct": {
            str(p["id"]): [bool(s["correct"]) for s in p["samples"]] for p in section["problems"]
        },
    }


# -- the report -------------------------------------------------------------------------


def _problem_passk(correct: list[bool], k: int) -> float:
    from aipo_env.passk import pass_at_k

    return pass_at_k(len(correct), sum(correct), k)


def _seed_scores(runs: list[dict[str, Any]], k: int) -> dict[int, dict[str, float]]:
    """``{seed: {problem id: pass@k}}`` of one arm's runs."""
    return {
        r["seed"]: {p: _problem_passk(c, k) for p, c in r["passk"]["correct"].items()} for r in runs
    }


def paired_against(
    by_arm: dict[str, list[dict[str, Any]]], baseline: str, arms: tuple[str, ...], ks: list[int]
) -> dict[str, dict[str, Any]]:
    """Each arm against ``baseline``, seed by seed on the same problems: pass@1 and pass@k_max.

    Per arm and metric, :func:`benchmarks.seed_stats.compare_by_seed` over the seeds
    both arms ran: the t-interval over the seeds' paired differences (``seed_t``, the
    primary figure), the two-stage bootstrap, and the (seed, problem) pairs bootstrap
    (``pairs_bootstrap``, secondary: it treats problems as independent).
    """
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        figures = {
            f"pass@{k}": compare_by_seed(
                _seed_scores(by_arm[baseline], k), _seed_scores(by_arm.get(arm, []), k), pairs=True
            )
            for k in (1, ks[-1])
        }
        if all(figures.values()):  # None: no seed in common
            out[arm] = figures
    return out


def aggregate(
    runs: list[dict[str, Any]], warms: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Per task and arm: the figures' per-seed values, means and 95% half-widths; paired comparisons."""
    ks = [k for k in KS if k <= args.passk_samples]
    table: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        table[task] = {"arms": {}, "vs": {}, "reference": {}}
        for record in warms.values():
            if record["task"] == task:
                ref = {f"pass@{k}": record["passk"]["metrics"].get(f"pass@{k}") for k in ks}
                ref["greedy"] = record["eval_warm"]["accuracy"]
                table[task]["reference"][f"warm-{record['variant']}"] = ref
                if "eval_base" in record:
                    table[task]["reference"]["base_greedy"] = record["eval_base"]["accuracy"]
        by_arm: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            if r["task"] == task:
                by_arm.setdefault(r["arm"], []).append(r)
        by_arm = {arm: by_arm[arm] for arm in ARMS if arm in by_arm}
        for arm, records in by_arm.items():
            figures: dict[str, list[float]] = {"greedy_after": [], "greedy_start": []}
            for r in records:
                figures["greedy_after"].append(r["summary"]["eval_after"]["accuracy"])
                figures["greedy_start"].append(r["summary"]["eval_before"]["accuracy"])
                for k in ks:
                    figures.setdefault(f"pass@{k}", []).append(r["passk"]["metrics"][f"pass@{k}"])
                for key in ("consult_rate", "dependency_gap"):
                    values = [p[key] for p in r["curve"] if isinstance(p.get(key), int | float)]
                    figures.setdefault(key, []).append(
                        sum(values) / len(values) if values else math.nan
                    )
            table[task]["arms"][arm] = {
                "seeds": [r["seed"] for r in records],
                **{
                    key: dict(zip(("mean", "ci95"), mean_ci(v), strict=True), values=v)
                    for key, v in figures.items()
                },
            }
        table[task]["vs"] = {
            baseline: paired_against(by_arm, baseline, arms, ks)
            for baseline, arms in BASELINES.items()
            if baseline in by_arm
        }
    return table


def _cell(cell: dict[str, Any]) -> str:
    half = "" if math.isnan(cell["ci95"]) else f" ± {cell['ci95']:.3f}"
    return f"{cell['mean']:.3f}{half}"


def render_markdown(table: dict[str, Any], command: str, args: argparse.Namespace) -> str:
    """One table per task: arms as rows; the paired comparisons below."""
    ks = [k for k in KS if k <= args.passk_samples]
    lines = [
        "Held-out accuracy of the policy **alone** after training (mean ± 95% t-interval "
        f"half-width over seeds; {args.eval_problems} held-out problems, pass@k from "
        f"{args.passk_samples} samples at temperature 0.7).",
        "",
        "The warm-up is not replicated (one warm-up serves all seeds): intervals cover RL "
        "seeds only.",
        "",
        legend(pairs=True),
        "",
        f"Command: `{command}`" + (" (this report: `--report-only`)" if args.report_only else ""),
        "",
    ]
    for task, section in table.items():
        setting = TASKS[task]
        lines += [f"### {task}: `{setting.name}` ({setting.note})", ""]
        ref = section["reference"]
        if "base_greedy" in ref:
            lines.append(f"Base model alone, greedy: {ref['base_greedy']:.3f}.")
        for name in ("warm-consult", "warm-alone"):
            if name in ref:
                passes = ", ".join(f"pass@{k} {ref[name][f'pass@{k}']:.3f}" for k in ks)
                lines.append(
                    f"After the warm-up ({name}): greedy {ref[name]['greedy']:.3f}; {passes}."
                )
        lines += [
            "",
            "| arm | seeds | greedy at start | greedy after | "
            + " | ".join(f"pass@{k}" for k in ks)
            + " | consult rate | dependency gap |",
            "|---|---|" + "---|" * (4 + len(ks)),
        ]
        for arm, row in section["arms"].items():
            cells = [_cell(row["greedy_start"]), _cell(row["greedy_after"])]
            cells += [_cell(row[f"pass@{k}"]) for k in ks]
            cells += [_cell(row["consult_rate"]), _cell(row["dependency_gap"])]
            seeds = ",".join(str(s) for s in row["seeds"])
            lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
        for baseline, against in section["vs"].items():
            if not against:
                continue
            lines += [
                "",
                f"Against `{baseline}` (arm minus `{baseline}`, on the same seeds and "
                "held-out problems):",
                "",
            ]
            for arm, diffs in against.items():
                lines += [f"- {arm}, {metric}: {describe(d)}" for metric, d in diffs.items()]
        lines.append("")
    return "\n".join(lines)


def plot_passk(table: dict[str, Any], path: Path, ks: list[int]) -> Path:
    """pass@k against k per task: one line per arm (mean, 95% band), the warmed models dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5.0 * len(table), 3.6), squeeze=False)
    for ax, (task, section) in zip(axes[0], table.items(), strict=True):
        for i, (arm, row) in enumerate(section["arms"].items()):
            means = [row[f"pass@{k}"]["mean"] for k in ks]
            halves = [
                0.0 if math.isnan(row[f"pass@{k}"]["ci95"]) else row[f"pass@{k}"]["ci95"]
                for k in ks
            ]
            ax.plot(ks, means, marker="o", color=f"C{i}", label=arm)
            ax.fill_between(
                ks,
                [m - h for m, h in zip(means, halves, strict=True)],
                [m + h for m, h in zip(means, halves, strict=True)],
                color=f"C{i}",
                alpha=0.15,
            )
        for name, style in (("warm-consult", "k--"), ("warm-alone", "k:")):
            if name in section["reference"]:
                ax.plot(
                    ks,
                    [section["reference"][name][f"pass@{k}"] for k in ks],
                    style,
                    label=f"{name} (start)",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k alone (held-out)")
        ax.set_title(f"{task}: {TASKS[task].name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_curves(runs: list[dict[str, Any]], path: Path) -> Path:
    """Per task: held-out accuracy, consult rate and dependency gap against step, mean over seeds per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    panels = (
        ("eval/accuracy", "held-out accuracy alone (greedy)"),
        ("consult_rate", "consult rate"),
        ("dependency_gap", "dependency gap"),
    )
    fig, axes = plt.subplots(
        len(tasks), len(panels), figsize=(4.2 * len(panels), 3.0 * len(tasks)), squeeze=False
    )
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    for row, task in enumerate(tasks):
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for i, arm in enumerate(arms):
                series: dict[int, list[float]] = {}
                for r in runs:
                    if r["task"] != task or r["arm"] != arm:
                        continue
                    points = list(r["curve"])
                    if key == "eval/accuracy":  # start and end come from the trainer's summary
                        points = [
                            {"step": 0, key: r["summary"]["eval_before"]["accuracy"]},
                            *points,
                        ]
                        points.append(
                            {
                                "step": r["summary"]["steps"],
                                key: r["summary"]["eval_after"]["accuracy"],
                            }
                        )
                    for p in points:
                        if isinstance(p.get(key), int | float) and math.isfinite(p[key]):
                            series.setdefault(int(p["step"]), []).append(float(p[key]))
                steps = sorted(series)
                ax.plot(
                    steps,
                    [sum(series[s]) / len(series[s]) for s in steps],
                    marker=".",
                    color=f"C{i}",
                    label=arm,
                )
            ax.set_title(f"{task}: {label}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    return save_figure(fig, path)


def report(
    runs: list[dict[str, Any]],
    warms: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    command: str,
    wall_s: float,
) -> str:
    """Write efficacy.json, efficacy.md, passk.png and curves.png from the finished records."""
    out = Path(args.out)
    ks = [k for k in KS if k <= args.passk_samples]
    table = aggregate(runs, warms, args)
    markdown = render_markdown(table, command, args)
    failed = {t: warm_failure(t, args) for t in TASKS}
    for task, error in failed.items():
        if error is not None:
            markdown += (
                f"\n### {task}: `{TASKS[task].name}`: no runs, the warm-up failed\n\n{error}\n"
            )
    (out / "efficacy.md").write_text(markdown)
    write_record(
        out / "efficacy.json",
        {
            "command": command,
            "budget": budget(args),
            "seeds": args.seeds,
            "tasks": table,
            "wall_s": wall_s,
        },
    )
    if table:
        plot_passk(table, out / "passk.png", ks)
        plot_curves(runs, out / "curves.png")
    return markdown


def _finished(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The run and warm-up records already on disk for this budget."""
    out = Path(args.out)
    runs = [json.loads(p.read_text()) for p in sorted((out / "arms").glob("*.json"))]
    runs = [r for r in runs if r.get("budget") == budget(args)]
    warms = {
        p.stem: json.loads(p.read_text())
        for p in sorted((out / "warm").glob("*.json"))
        if not p.stem.endswith("-failed")
    }
    warms = {k: w for k, w in warms.items() if w.get("budget") == budget(args)}
    return runs, warms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}"
    )
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    add_run_arguments(
        p,
        steps=8,
        samples_help="samples per prompt",
        run_root=REPO / "runs" / "efficacy",
        out=RESULTS,
    )
    p.add_argument("--eval-problems", type=int, default=64, help="held-out problems")
    p.add_argument(
        "--passk-samples", type=int, default=16, help="samples per held-out problem for pass@k"
    )
    p.add_argument(
        "--report-only", action="store_true", help="only the tables and plots of finished runs"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Warm up, run every (seed, task, arm) not finished yet, then report."""
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [t for t in tasks if t not in TASKS] + [a for a in arms if a not in ARMS]
    if bad or not tasks or not arms:
        print(
            f"unknown task or arm {bad}; tasks: {', '.join(TASKS)}; arms: {', '.join(ARMS)}",
            file=sys.stderr,
        )
        return 2
    given = sys.argv[1:] if argv is None else argv
    # The command that runs (or resumes) the runs reported; --report-only only reads them.
    command = " ".join(
        ["python benchmarks/efficacy.py", *(a for a in given if a != "--report-only")]
    )
    began = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        variants = sorted({ARMS[a].warm for a in arms}, key=lambda v: v != "consult")
        warmed: dict[tuple[str, str], str] = {}
        for task in list(tasks):
            failure = warm_failure(task, args)
            if failure is not None:
                print(f"== {task}: skipped, its warm-up failed before: {failure}", flush=True)
                tasks.remove(task)
                continue
            try:
                for variant in variants:
                    warmed[(task, variant)] = warm(task, variant, args)["model"]
            except WarmupError as exc:  # a task the policy cannot be warmed up on
                record_warm_failure(task, str(exc), args)
                print(f"== {task}: warm-up failed, its arms are skipped: {exc}", flush=True)
                tasks.remove(task)
        for seed in args.seeds:  # seed by seed: a stopped run has whole seeds to report
            for task in tasks:
                for arm in arms:
                    run_arm(task, arm, seed, warmed[(task, ARMS[arm].warm)], args)
    runs, warms = _finished(args)
    print(report(runs, warms, args, command, time.perf_counter() - began))
    print(f"wrote {Path(args.out) / 'efficacy.md'}, efficacy.json, passk.png, curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
