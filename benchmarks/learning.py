"""Evidence that AIPO learns: the same small budget trained as GRPO alone and as AIPO.

Every arm starts from the same model, seed, problems and budget (steps, prompts per
step, samples per prompt, tokens per turn, learning rate); the arms differ only in
consulting and in how agent-injected tokens are trained:

* ``grpo``: no consulting (schedule fraction 0, ``env.max_consults=0``), ``agent_mode=mask``;
* ``aipo``: half of each group may consult at first, decaying to a quarter; the oracle
  verify agent and knowledge/reasoning agents are on hand; ``agent_mode=shaped``;
* ``aipo_mask`` (optional): the same consults, agent tokens masked out of the loss
  (what other frameworks do).

Each arm is one :class:`~trainers.embedded.EmbeddedTrainer` run; held-out accuracy
before and after comes from the trainer's own greedy evaluation. The script prints a
table, writes ``learning.json`` (per-step curves, summaries, the exact configs) and
``learning.png`` (reward and accuracy per step for each arm, consult rate of the
consulting arms).

    python benchmarks/learning.py --steps 5 --prompts 4 --samples 4 --lr 5e-5
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
from benchmarks.arm_runs import add_set_argument  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.metrics import save_figure  # noqa: E402

BASE_CONFIG = REPO / "configs" / "learning.yaml"
RESULTS = REPO / "benchmarks" / "results"

#: What each arm changes on top of the shared config; nothing else differs.
ARMS: dict[str, list[str]] = {
    "grpo": [
        "rollout.schedule.start_fraction=0",
        "rollout.schedule.end_fraction=0",
        "rollout.schedule.decay=constant",
        "env.max_consults=0",
        "loss.agent_mode=mask",
    ],
    "aipo": [
        "rollout.schedule.start_fraction=0.5",
        "rollout.schedule.end_fraction=0.25",
        "rollout.schedule.decay=linear",
        "env.max_consults=1",
        "loss.agent_mode=shaped",
    ],
    "aipo_mask": [
        "rollout.schedule.start_fraction=0.5",
        "rollout.schedule.end_fraction=0.25",
        "rollout.schedule.decay=linear",
        "env.max_consults=1",
        "loss.agent_mode=mask",
    ],
}

#: Config fields that make up the budget; every arm must agree on all of them.
BUDGET_KEYS = (
    "seed",
    "policy.model",
    "task.name",
    "task.kwargs",
    "task.eval_size",
    "train.steps",
    "train.prompts_per_step",
    "train.minibatch_size",
    "train.ppo_epochs",
    "rollout.n_samples",
    "rollout.temperature",
    "env.max_new_tokens_per_turn",
    "env.max_total_tokens",
    "optim.lr",
)


def _get(cfg: TrainConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def arm_config(
    arm: str,
    *,
    base: str | Path = BASE_CONFIG,
    run_dir: str | Path,
    steps: int,
    prompts: int,
    samples: int,
    lr: float,
    seed: int,
    extra: list[str] | None = None,
) -> TrainConfig:
    """The validated config of one arm: the base file, the shared budget, then the arm's own settings.

    The consult decay spans the whole run (``decay_steps = steps``) so that the
    consulting arms still consult at the end, at ``end_fraction``.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    overrides = [
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"train.steps={steps}",
        f"train.prompts_per_step={prompts}",
        f"rollout.n_samples={samples}",
        f"optim.lr={lr!r}",
        f"rollout.schedule.decay_steps={steps}",
        *(extra or []),
        *ARMS[arm],
    ]
    return load_config(TrainConfig, base, overrides)


def check_same_budget(configs: dict[str, TrainConfig]) -> None:
    """Raise if two arms differ in any :data:`BUDGET_KEYS` field (an unfair comparison)."""
    names = list(configs)
    for key in BUDGET_KEYS:
        values = {name: _get(configs[name], key) for name in names}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            raise ValueError(f"arms disagree on {key}: {values}; every arm must share the budget")


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def summarize_arm(records: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """The table row of one arm from its metrics records and its trainer summary."""
    rewards = _finite([r.get("reward_mean") for r in records])
    consult = _finite([r.get("consult_rate") for r in records])
    tail = rewards[-3:]

    def acc(key: str) -> float:
        result = summary.get(key)
        return float(result["accuracy"]) if result else float("nan")

    return {
        "steps": len(records),
        "reward_first": rewards[0] if rewards else float("nan"),
        "reward_last": rewards[-1] if rewards else float("nan"),
        "reward_last3_mean": sum(tail) / len(tail) if tail else float("nan"),
        "eval_accuracy_before": acc("eval_before"),
        "eval_accuracy_after": acc("eval_after"),
        "consult_rate_mean": sum(consult) / len(consult) if consult else float("nan"),
        "wall_s": float(summary.get("wall_s", float("nan"))),
    }


def render_table(rows: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table, one line per arm."""
    header = (
        f"{'arm':<10} {'reward first->last':>19} {'last-3 mean':>11} "
        f"{'eval acc before->after':>23} {'consult rate':>12} {'wall s':>7}"
    )
    lines = [header, "-" * len(header)]
    for arm, row in rows.items():
        lines.append(
            f"{arm:<10} {row['reward_first']:>8.3f} -> {row['reward_last']:<6.3f} "
            f"{row['reward_last3_mean']:>11.3f} "
            f"{row['eval_accuracy_before']:>11.3f} -> {row['eval_accuracy_after']:<8.3f} "
            f"{row['consult_rate_mean']:>12.3f} {row['wall_s']:>7.0f}"
        )
    return "\n".join(lines)


def plot_arms(
    curves: dict[str, list[dict[str, Any]]],
    out_png: str | Path,
    consulting_arms: list[str] | None = None,
) -> Path:
    """Reward and accuracy per step for every arm, and consult rate for the consulting arms.

    ``consulting_arms`` names the arms that were allowed to consult (their consult rate
    is drawn even when it stayed 0); by default, the arms that consulted at all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "train reward"), ("accuracy", "train accuracy")]
    if consulting_arms is None:
        consulting_arms = [
            a for a, recs in curves.items() if any(r.get("consult_rate") for r in recs)
        ]
    consulting = {arm: curves[arm] for arm in consulting_arms if arm in curves}
    if consulting:
        panels.append(("consult_rate", "consult rate"))
    # One colour per arm in every panel.
    colors = {arm: f"C{i}" for i, arm in enumerate(curves)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        source = consulting if key == "consult_rate" else curves
        for arm, records in source.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker=".", label=arm, color=colors[arm])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    return save_figure(fig, out_png)


def consulting_arms(configs: dict[str, TrainConfig]) -> list[str]:
    """The arms whose episodes may consult at some step."""
    return [
        arm
        for arm, cfg in configs.items()
        if cfg.env.max_consults > 0
        and max(cfg.rollout.schedule.start_fraction, cfg.rollout.schedule.end_fraction) > 0
    ]


def run_arm(config: TrainConfig, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train one arm; returns its metrics records and its summary as a dict."""
    from trainers.embedded import EmbeddedTrainer
    from trainers.metrics import read_metrics

    summary = EmbeddedTrainer(config, progress=progress).run()
    print(summary.render(), flush=True)
    return read_metrics(Path(config.run_dir) / "metrics.jsonl"), asdict(summary)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="training steps per arm")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (group size)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed shared by every arm")
    p.add_argument(
        "--arms",
        default="grpo,aipo",
        help=f"comma-separated arms, run in this order; any of {', '.join(ARMS)}",
    )
    p.add_argument("--config", default=str(BASE_CONFIG), help="base YAML config shared by arms")
    add_set_argument(p, "extra override applied to every arm (e.g. task.eval_size=16); repeatable")
    p.add_argument(
        "--run-root",
        default=str(REPO / "runs" / "learning"),
        help="where run directories go (one timestamped folder per invocation)",
    )
    p.add_argument("--out", default=str(RESULTS), help="where learning.json and .png go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the arms, print the table, write ``learning.json`` and ``learning.png``."""
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        print(f"--arms: unknown {unknown or arms}; expected some of {', '.join(ARMS)}")
        return 2
    root = Path(args.run_root) / time.strftime("%Y%m%d-%H%M%S")
    configs = {
        arm: arm_config(
            arm,
            base=args.config,
            run_dir=root / arm,
            steps=args.steps,
            prompts=args.prompts,
            samples=args.samples,
            lr=args.lr,
            seed=args.seed,
            extra=args.extra,
        )
        for arm in arms
    }
    check_same_budget(configs)
    curves: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for arm, config in configs.items():
        print(f"== arm {arm}: {' '.join(ARMS[arm])}", flush=True)
        curves[arm], summaries[arm] = run_arm(config, progress=not args.no_progress)
    rows = {arm: summarize_arm(curves[arm], summaries[arm]) for arm in arms}
    table = render_table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "args": vars(args),
        "arms": {
            arm: {
                "overrides": ARMS[arm],
                "config": configs[arm].model_dump(mode="json"),
                "summary": summaries[arm],
                "row": rows[arm],
                "curve": curves[arm],
            }
            for arm in arms
        },
        "table": table,
    }
    (out / "learning.json").write_text(json.dumps(result, indent=2, default=str))
    plot = plot_arms(curves, out / "learning.png", consulting_arms(configs))
    print(f"wrote {out / 'learning.json'} and {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
