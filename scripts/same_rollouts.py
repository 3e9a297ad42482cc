"""Same rollouts before and after a refactor: run a short fixed-seed training run in two trees, compare.

A structural change (issue 27) must leave what a run samples and trains on exactly as it
was. This script runs ``aipo train`` with the packaged default config (warm-up included),
``train.steps`` short, in a source tree given by path (a ``git worktree`` at the commit
before the change, and the tree after it), and compares the two runs' rollouts step by
step: token ids, sources, loss masks, rewards, finish reasons and consult records must be
identical; behaviour log-probs are compared up to a tolerance, because the update path
(batching, packing) may change their float rounding. ``metrics.jsonl``'s rollout-side
keys are compared exactly too.

    python scripts/same_rollouts.py run /work/arch_before /tmp/before [KEY=VALUE ...] [--config F]
    python scripts/same_rollouts.py run /work/arch_after /tmp/after [KEY=VALUE ...] [--config F]
    python scripts/same_rollouts.py compare /tmp/before /tmp/after

A run with a ``peers:`` section (ILR, ``--config configs/ilr.yaml``) is compared peer by
peer (``run/peers/<name>/rollouts``, ``metrics.jsonl``), trajectory metadata (Idea3's
stages) and turns included, and each peer's rollout-side metrics (``PEER_METRICS``).

Overrides come right after the two paths. Run the episodes one at a time
(``rollout.concurrency=1``): at higher concurrency which requests share a decode step
moves the batched log-probs, and so the samples, from run to run.
The tree's own modules are imported (``PYTHONPATH`` and the working directory are the
tree), so one virtual environment serves both; the run prints which ``aipo_env`` it used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: Trajectory fields that must match exactly.
EXACT = (
    "trajectory_id",
    "problem_id",
    "group_id",
    "sample_index",
    "token_ids",
    "prompt_len",
    "source",
    "loss_mask",
    "reward",
    "finish_reason",
    "consults",
    "consult_errors",
    "consult_attempts",
)
#: Metrics computed from the rollouts alone (no update in them).
ROLLOUT_METRICS = ("reward", "consult", "finish", "tokens", "episode", "leak")
#: A peer's metrics computed from its rollouts alone (trainers/peer_trainer.py).
PEER_METRICS = (
    "accuracy",
    "raw_reward",
    "cooperate_rate",
    "stage_failure_rate",
    "error_rate",
    "context_overflow_rate",
    "response_tokens",
    "ability",
)


def run(tree: Path, out: Path, steps: int, overrides: list[str], config: str | None = None) -> int:
    """Train ``steps`` steps of ``config`` (the default's, else) with ``tree``'s code into ``out/run``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    where = subprocess.run(
        [sys.executable, "-c", "import aipo_env; print(aipo_env.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"aipo_env from {where}", flush=True)
    if not where.startswith(str(tree.resolve())):
        print(f"refusing: {tree} is not the tree imported", file=sys.stderr)
        return 2
    command = [
        sys.executable,
        "-m",
        "aipo",
        "train",
        f"run_dir={out / 'run'}",
        f"train.steps={steps}",
        "train.save_every=0",
        *overrides,
        "--no-progress",
        *(["--config", str(tree / config)] if config else []),
    ]
    with open(out / "train.log", "w") as log:
        code = subprocess.run(
            command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    print(f"aipo train exited with {code} (log: {out / 'train.log'})")
    return code


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _runs(out: Path) -> dict[str, Path]:
    """The run's folders with rollouts: each peer's under ILR, else the run's own."""
    peers = out / "run" / "peers"
    if peers.is_dir():
        return {f"peer {p.name}": p for p in sorted(peers.iterdir()) if p.is_dir()}
    return {"run": out / "run"}


def compare(a: Path, b: Path, logprob_tol: float) -> int:
    """Compare two runs' rollouts and rollout-side metrics; print the result; 0 when equal."""
    runs_a, runs_b = _runs(a), _runs(b)
    if list(runs_a) != list(runs_b):
        print(f"the runs differ in their peers: {list(runs_a)} vs {list(runs_b)}")
        return 1
    peers = list(runs_a) != ["run"]
    problems: list[str] = []
    counted, steps, worst = 0, 0, 0.0
    for name in runs_a:
        found: list[str] = []
        n_rows, n_steps, largest = _compare_run(runs_a[name], runs_b[name], peers, found)
        counted, steps, worst = counted + n_rows, steps + n_steps, max(worst, largest)
        problems += [f"{name}: {p}" if peers else p for p in found]
    if worst > logprob_tol:
        problems.append(f"behaviour log-probs differ by up to {worst:.3g} (> {logprob_tol})")
    extra = ", metadata, turns" if peers else ""
    print(
        f"{counted} trajectories in {steps} rollout files ({', '.join(runs_a)}) compared; "
        f"token ids, sources, masks, rewards, finish reasons, consults{extra}: "
        f"{'identical' if not problems else 'DIFFERENT'}; "
        f"largest behaviour log-prob difference {worst:.3g}"
    )
    for line in problems[:40]:
        print(f"  {line}")
    return 1 if problems else 0


def _compare_run(
    run_a: Path, run_b: Path, peers: bool, problems: list[str]
) -> tuple[int, int, float]:
    """``(trajectories, rollout files, largest log-prob difference)`` of one run's folder pair."""
    steps_a = sorted((run_a / "rollouts").glob("step_*.jsonl"))
    steps_b = sorted((run_b / "rollouts").glob("step_*.jsonl"))
    if [p.name for p in steps_a] != [p.name for p in steps_b] or not steps_a:
        problems.append(
            f"rollout files differ: {[p.name for p in steps_a]} vs {[p.name for p in steps_b]}"
        )
    counted = 0
    worst = 0.0
    for pa, pb in zip(steps_a, steps_b, strict=False):
        # Written as episodes finish, so in no fixed order: matched by trajectory id.
        rows_a = {r["trajectory_id"]: r for r in _rows(pa)}
        rows_b = {r["trajectory_id"]: r for r in _rows(pb)}
        if sorted(rows_a) != sorted(rows_b):
            problems.append(f"{pa.name}: trajectory ids differ")
        for tid in sorted(rows_a.keys() & rows_b.keys()):
            ra, rb = rows_a[tid], rows_b[tid]
            counted += 1
            for key in EXACT + (("metadata",) if peers else ()):
                if ra.get(key) != rb.get(key):
                    problems.append(f"{pa.name} {ra.get('trajectory_id')}: {key} differs")
            if peers and _turns(ra) != _turns(rb):
                problems.append(f"{pa.name} {ra.get('trajectory_id')}: turns differ")
            if [t.get("consult") for t in ra["turns"]] != [t.get("consult") for t in rb["turns"]]:
                # latency differs run to run; compare what the agent was asked and answered
                for ta, tb in zip(ra["turns"], rb["turns"], strict=False):
                    ca, cb = ta.get("consult") or {}, tb.get("consult") or {}
                    for key in ("agent", "question", "error", "leak", "reply_truncated"):
                        if ca.get(key) != cb.get(key):
                            problems.append(
                                f"{pa.name} {ra.get('trajectory_id')}: consult {key} differs"
                            )
            for la, lb in zip(ra["behavior_logprobs"], rb["behavior_logprobs"], strict=False):
                if (la is None) != (lb is None):
                    problems.append(
                        f"{pa.name} {ra.get('trajectory_id')}: log-prob presence differs"
                    )
                elif la is not None:
                    worst = max(worst, abs(la - lb))
    metrics_a, metrics_b = _rows(run_a / "metrics.jsonl"), _rows(run_b / "metrics.jsonl")
    if len(metrics_a) != len(metrics_b):
        problems.append(f"metrics: {len(metrics_a)} vs {len(metrics_b)} steps logged")
    prefixes = ROLLOUT_METRICS + (PEER_METRICS if peers else ())
    for ma, mb in zip(metrics_a, metrics_b, strict=False):
        for key in sorted(set(ma) | set(mb)):
            if key.startswith(prefixes) and ma.get(key) != mb.get(key):
                problems.append(
                    f"metrics step {ma.get('step')}: {key} {ma.get(key)} vs {mb.get(key)}"
                )
    return counted, len(steps_a), worst


def _turns(row: dict) -> list[dict]:
    """A trajectory's turns, less what differs run to run (a consult's latency)."""
    return [
        {k: v for k, v in turn.items() if k != "consult"}
        | {"consult": {k: v for k, v in (turn.get("consult") or {}).items() if k != "latency_s"}}
        for turn in row["turns"]
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run TREE OUT`` or ``compare A B``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="train a short default run with a tree's code")
    run_p.add_argument("tree", type=Path)
    run_p.add_argument("out", type=Path)
    run_p.add_argument("--steps", type=int, default=2)
    run_p.add_argument("--config", help="a config file, relative to the tree (configs/arpo.yaml)")
    run_p.add_argument(
        "overrides", nargs="*", help="more KEY=VALUE overrides, the same for both trees"
    )
    cmp_p = sub.add_parser("compare", help="compare two runs' rollouts")
    cmp_p.add_argument("a", type=Path)
    cmp_p.add_argument("b", type=Path)
    cmp_p.add_argument("--logprob-tol", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.tree, args.out, args.steps, args.overrides, args.config)
    return compare(args.a, args.b, args.logprob_tol)


if __name__ == "__main__":
    sys.exit(main())
