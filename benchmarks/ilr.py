"""ILR against GRPO at about the same generated tokens per step, with ILR's two ablations.

Arms (``configs/ilr.yaml``; the same model, task, problems, steps, prompts per step,
token limits, learning rate and seeds):

* ``ilr``: two peers, dynamic interaction and perception calibration;
* ``dynamic_only``: dynamic interaction, plain GRPO rewards (``peers.calibration=false``);
* ``calibration_only``: always cooperate (``peers.interaction=cooperate``), calibrated rewards;
* ``grpo``: one policy alone, plain GRPO, ``--grpo-samples`` samples per prompt. An Idea3
  episode has each peer write three stages, so GRPO gets three times the samples per
  prompt of an ILR peer (12 against 4 by default): about the same generated tokens per
  policy and step. The tokens actually generated are reported for every arm.
* ``grpo_tokens``: ``grpo`` with 21 samples per prompt (:data:`GRPO_TOKENS_SAMPLES`).
  The first two seeds showed that the estimate above was wrong: an Idea3 stage runs to
  its token limit far more often than a lone answer, so the peers generated about 2150
  tokens per step against grpo's 1210. 21 = 12 x 2150 / 1210, fixed from those token
  counts (not from any accuracy) before this arm ran: the arm the issue asked for, at
  the same generated tokens.

Each (arm, seed) is one run; reported per arm as mean ± 95% t-interval over seeds: the
held-out accuracy alone (greedy, the trainer's own evaluation) of each peer (ILR arms;
``grpo`` has one policy), before and after, and the generated tokens per step and
policy. The ILR arms are compared with ``grpo_tokens`` (the same generated tokens), and
the two ablations with ``ilr``, seed by seed (:mod:`benchmarks.seed_stats`: a seed's
value is the mean of its policies' held-out accuracy after; a t-interval over the seeds'
paired differences, the two-stage bootstrap beside it where the records keep which
problems each policy solved). Finished runs are kept in ``<out>/arms/<arm>-seed<k>.json``
and not run again.

    python benchmarks/ilr.py --no-progress            # 5 arms x 3 seeds
    python benchmarks/ilr.py --report-only            # the table from the finished runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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

BASE_CONFIG = REPO / "configs" / "ilr.yaml"
RESULTS = REPO / "benchmarks" / "results" / "ilr"

GRPO = [
    "peers=null",
    "rollout.schedule.start_fraction=0",
    "rollout.schedule.end_fraction=0",
    "rollout.schedule.decay=constant",
]
ARMS: dict[str, list[str]] = {
    "ilr": [],
    "dynamic_only": ["peers.calibration=false"],
    "calibration_only": ["peers.interaction=cooperate"],
    "grpo": GRPO,
    "grpo_tokens": GRPO,
}
GRPO_TOKENS_SAMPLES = 21  # module docstring
#: Paired comparisons: the ILR arms against plain GRPO at the peers' generated tokens, and
#: each ablation against the full method.
BASELINES: dict[str, tuple[str, ...]] = {
    "grpo_tokens": ("ilr", "dynamic_only", "calibration_only"),
    "ilr": ("dynamic_only", "calibration_only"),
}


def _single(arm: str) -> bool:
    """Whether ``arm`` trains one policy with GRPO (else two ILR peers)."""
    return ARMS[arm] is GRPO


def _grpo_samples(arm: str, args: argparse.Namespace) -> int | None:
    """Samples per prompt of a single-policy arm; None for the peer arms."""
    if not _single(arm):
        return None
    return GRPO_TOKENS_SAMPLES if arm == "grpo_tokens" else args.grpo_samples


def run_config(arm: str, seed: int, args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """The validated config of one (arm, seed)."""
    single = _grpo_samples(arm, args)
    overrides = [
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"train.steps={args.steps}",
        f"train.prompts_per_step={args.prompts}",
        f"rollout.n_samples={single or args.samples}",
        f"peers.seeds=[{seed}, {seed + 1000}]" if single is None else "train.plot=false",
        *args.extra,
        *ARMS[arm],
    ]
    if single is not None:
        # The minibatch holds the whole step, as for each ILR peer: one optimizer step.
        overrides.append(f"train.minibatch_size={args.prompts * single}")
    return load_config(TrainConfig, BASE_CONFIG, overrides)


def budget(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "steps": args.steps,
        "prompts": args.prompts,
        "samples": args.samples,
        "grpo_samples": args.grpo_samples,
        "extra": list(args.extra),
    }


def _policies(arm: str, run_dir: Path) -> dict[str, Path]:
    """Each trained policy's folder: the peers', or the single GRPO run."""
    if _single(arm):
        return {"policy": run_dir}
    return {p.name: p for p in sorted((run_dir / "peers").iterdir())}


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (arm, seed), or read its record back."""
    path = Path(args.out) / "arms" / f"{arm}-seed{seed}.json"
    if (saved := read_finished(path, budget(args))) is not None:
        return saved
    run_dir = Path(args.run_root) / f"{arm}-seed{seed}"
    config = run_config(arm, seed, args, run_dir)
    resume = run_dir.is_dir() and any(run_dir.rglob("checkpoints/step_*"))
    print(f"== {arm} seed {seed}{' (resumed)' if resume else ''}", flush=True)
    started = time.perf_counter()
    if _single(arm):
        from trainers.embedded import EmbeddedTrainer

        EmbeddedTrainer(config, resume=resume, progress=not args.no_progress).run()
    else:
        from trainers.peer_trainer import PeerTrainer

        PeerTrainer(config, resume=resume, progress=not args.no_progress).run()
    policies = {}
    for name, folder in _policies(arm, run_dir).items():
        records = read_metrics(folder / "metrics.jsonl")
        before = json.loads((folder / "eval" / "before.json").read_text())["accuracy"]
        after = json.loads((folder / "eval" / "after.json").read_text())["accuracy"]
        policies[name] = {
            "eval_before": before,
            "eval_after": after,
            "held_out_after": held_out_correct(folder / "eval" / "after.jsonl"),
            "curve": records,
            "generated_tokens_per_step": _generated(folder, args),
        }
    record = {
        "arm": arm,
        "seed": seed,
        "budget": budget(args),
        "overrides": ARMS[arm],
        "config": config.model_dump(mode="json"),
        "wall_s": time.perf_counter() - started,
        "policies": policies,
    }
    write_record(path, record)
    return record


def _generated(folder: Path, args: argparse.Namespace) -> float:
    """Policy tokens this policy generated per step (every stage, every episode)."""
    from aipo_env.trajectory import read_jsonl

    totals = []
    for step in range(args.steps):
        path = folder / "rollouts" / f"step_{step:06d}.jsonl"
        if path.is_file():
            totals.append(sum(t.policy_token_count() for t in read_jsonl(path)))
    return sum(totals) / len(totals) if totals else float("nan")


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: held-out accuracy after (every policy of every seed) and tokens, mean ± 95%."""
    table: dict[str, Any] = {}
    for arm in ARMS:
        runs = [r for r in records if r["arm"] == arm]
        if not runs:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for key in ("eval_before", "eval_after", "generated_tokens_per_step"):
            values = [float(p[key]) for r in runs for p in r["policies"].values()]
            mean, half = mean_ci(values)
            row[key] = {"mean": mean, "ci95": half, "values": values}
        table[arm] = row
    return table


def seed_score(record: dict[str, Any]) -> float | dict[str, float]:
    """One run's held-out result after training, the mean over its policies (both peers).

    Per problem (``{problem id: share of the policies that solved it}``) where the record
    keeps which problems each policy solved; else the mean of their accuracies (records
    written before ``held_out_after`` was kept).
    """
    policies = list(record["policies"].values())
    solved = [p.get("held_out_after") for p in policies]
    if not all(solved):
        return sum(float(p["eval_after"]) for p in policies) / len(policies)
    if any(set(s) != set(solved[0]) for s in solved):
        raise ValueError(
            f"{record['arm']} seed {record['seed']}: its policies were evaluated on "
            "different held-out problems"
        )
    return {pid: sum(float(s[pid]) for s in solved) / len(solved) for pid in solved[0]}


def paired(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each arm of :data:`BASELINES` against its baseline, seed by seed: held-out accuracy after."""
    by_arm = {arm: {r["seed"]: seed_score(r) for r in records if r["arm"] == arm} for arm in ARMS}
    return compare_baselines(by_arm, BASELINES)


def render_markdown(table: dict[str, Any], command: str, vs: dict[str, dict[str, Any]]) -> str:
    """The table of arms, then each comparison of :func:`paired` on one line."""
    lines = [
        "Held-out accuracy of each trained policy alone (greedy), mean ± 95% t-interval over "
        "policies and seeds (two peers per seed for the ILR arms, one policy for grpo). The "
        "two peers of a seed share its problems and its exchanges, so this interval counts "
        "them as independent; the comparisons below pair the arms by seed instead.",
        "",
        f"Command: `{command}`",
        "",
        "| arm | seeds | before | after | generated tokens per policy and step |",
        "|---|---|---|---|---|",
    ]
    for arm, row in table.items():
        cells = []
        for key in ("eval_before", "eval_after", "generated_tokens_per_step"):
            c = row[key]
            half = "" if c["ci95"] != c["ci95"] else f" ± {c['ci95']:.3g}"
            cells.append(f"{c['mean']:.3g}{half}")
        lines.append(f"| {arm} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    if vs:
        lines += [
            "",
            "Held-out accuracy after, a seed's value being the mean of its policies. " + legend(),
        ]
    for baseline, against in vs.items():
        lines += ["", f"Against `{baseline}` (arm minus `{baseline}`):", ""]
        lines += [f"- {arm}: {describe(c)}" for arm, c in against.items()]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for i, arm in enumerate(arms):
        after = table[arm]["eval_after"]
        ax.bar(
            i,
            after["mean"],
            yerr=0 if after["ci95"] != after["ci95"] else after["ci95"],
            color=f"C{i}",
            capsize=4,
        )
        ax.plot([i] * len(after["values"]), after["values"], "k.", alpha=0.6)
    starts = [v for arm in arms for v in table[arm]["eval_before"]["values"]]
    if starts:
        ax.axhline(sum(starts) / len(starts), color="k", ls="--", lw=1, label="before (mean)")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("held-out accuracy alone, after")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    add_run_arguments(
        p,
        steps=4,
        samples_help="Idea3 episodes per prompt (ILR arms)",
        run_root=REPO / "runs" / "ilr_bench",
        out=RESULTS,
    )
    p.add_argument(
        "--grpo-samples", type=int, default=12, help="samples per prompt of the grpo arm"
    )
    p.add_argument("--report-only", action="store_true", help="only the table of finished runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        print(f"--arms {args.arms!r}: expected some of {', '.join(ARMS)}", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/ilr.py", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            for arm in arms:
                run_arm(arm, seed, args)
    records = [json.loads(p.read_text()) for p in sorted((out / "arms").glob("*.json"))]
    records = [r for r in records if r.get("budget") == budget(args)]
    table = aggregate(records)
    vs = paired(records)
    markdown = render_markdown(table, command, vs)
    (out / "ilr.md").write_text(markdown)
    (out / "ilr.json").write_text(
        json.dumps({"command": command, "budget": budget(args), "arms": table, "vs": vs}, indent=2)
    )
    if table:
        plot(table, out / "ilr.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
