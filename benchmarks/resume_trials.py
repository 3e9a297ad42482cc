"""Kill a run mid-rollout, resume it, and measure how far it lands from an uninterrupted run.

For each generator dtype (``--dtypes``, default bfloat16 and float32) this runs, each
``aipo train`` in a fresh subprocess on :func:`trial_config` (``configs/default.yaml``
made short: no warm-up, the env's auto consult to the knowledge agent, which the
policy's own generator answers, so its replies and their behaviour log-probs reach the
update; ``--steps`` steps of ``--prompts`` prompts; ``--eval-size`` held-out problems):

* ``reference``: uninterrupted;
* ``floor``: uninterrupted again, the same seed: what thread timing alone changes;
* ``trial_k`` (``--trials`` of them): killed with SIGKILL once the rollout file of step
  ``k % steps`` holds ``1 + k // steps`` finished trajectories (varying steps and
  points in the rollout), then finished by ``aipo train --resume``.

Each run is compared with ``reference``: whether every trajectory has the same token
ids; the largest |difference| of the recorded behaviour log-probs on policy tokens and on
agent tokens (where the ids agree); the largest |difference| over the final weights and
how many tensors differ; held-out accuracy after training, of both. Results go to
``--out`` (``resume_trials.json`` and ``.png``).

    python benchmarks/resume_trials.py                     # 5 trials x bfloat16, float32
    python benchmarks/resume_trials.py --trials 1 --dtypes float32 --out /tmp/rt-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aipo_env.trajectory import Trajectory, read_jsonl  # noqa: E402
from trainers.checkpoint import read_model_weights  # noqa: E402

#: Longest a single run may take before the benchmark gives up on it.
RUN_TIMEOUT_S = 3600


def trial_config(run_dir: Path, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """``configs/default.yaml`` made short, with every trajectory consulting the policy's generator."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["run_dir"] = str(run_dir)
    config["policy"]["model"] = args.model
    config["policy"]["generator_dtype"] = dtype
    config["task"]["eval_size"] = args.eval_size
    config["env"]["auto_consult"] = "knowledge"
    config["env"]["max_new_tokens_per_turn"] = args.max_new_tokens
    # A consult that times out is decided by the clock, not the seed (docs/reliability.md):
    # on a loaded machine the default 120 s is reached, so give it room.
    config["env"]["agent_timeout_s"] = 3600
    config["warmup"] = {"enabled": False}
    # Every sample may consult (the auto consult opens each episode).
    config["rollout"]["schedule"] = {"start_fraction": 1.0, "end_fraction": 1.0}
    config["train"].update(
        steps=args.steps,
        prompts_per_step=args.prompts,
        minibatch_size=args.prompts * config["rollout"]["n_samples"],
        save_every=1,
        keep_last=1,  # the latest, to resume from; the last step's is what is compared
        plot=False,
    )
    return config


def command(config_file: Path, resume: bool) -> list[str]:
    """The ``aipo train`` command line of one run."""
    cmd = [sys.executable, "-m", "aipo", "train", "--config", str(config_file), "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def run_to_end(config_file: Path, log: Path, resume: bool = False) -> None:
    """Run ``aipo train`` to its end; raise with the log's tail if it fails."""
    with log.open("a") as out:
        code = subprocess.call(
            command(config_file, resume),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            timeout=RUN_TIMEOUT_S,
        )
    if code != 0:
        raise RuntimeError(f"{' '.join(command(config_file, resume))} exited {code}:\n{_tail(log)}")
    # A finished run is only compared: its optimizer states (1.1 GB a checkpoint of the
    # default model) would fill a small disk over a dozen runs.
    run_dir = Path(yaml.safe_load(config_file.read_text())["run_dir"])
    for state in run_dir.glob("checkpoints/*/optimizer.pt"):
        state.unlink()


def run_killed(config_file: Path, run_dir: Path, log: Path, step: int, after: int) -> int:
    """Start a run and SIGKILL it once step ``step``'s rollout file holds ``after`` trajectories.

    Returns how many trajectories the file held when the process was dead (the kill
    lands mid-rollout when that is fewer than the step's episodes).
    """
    rollout = run_dir / "rollouts" / f"step_{step:06d}.jsonl"
    with log.open("a") as out:
        proc = subprocess.Popen(
            command(config_file, False), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
        try:
            while _lines(rollout) < after:
                if proc.poll() is not None:
                    raise RuntimeError(f"the run ended before the kill point:\n{_tail(log)}")
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)  # this process only: the one this function started
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    return _lines(rollout)


def compare(reference: Path, other: Path, steps: int) -> dict[str, Any]:
    """How ``other``'s trajectories, final weights and held-out accuracy differ from ``reference``'s."""
    differing: list[int] = []  # per step: trajectories whose token ids differ
    policy_steps: list[float] = []  # per step: the largest log-prob difference, policy tokens
    agent_steps: list[float] = []  # and agent tokens
    for step in range(steps):
        name = Path("rollouts") / f"step_{step:06d}.jsonl"
        ref = _by_id(read_jsonl(reference / name))
        oth = _by_id(read_jsonl(other / name))
        differing.append(len(ref.keys() ^ oth.keys()))
        policy_diff = agent_diff = 0.0
        for key, a in ref.items():
            b = oth.get(key)
            if b is None:
                continue
            if a.token_ids != b.token_ids:
                differing[-1] += 1
                continue
            for source, x, y in zip(
                a.source, a.behavior_logprobs, b.behavior_logprobs, strict=True
            ):
                if x is None or y is None:
                    continue
                d = abs(x - y)
                if source == "policy":
                    policy_diff = max(policy_diff, d)
                elif source.startswith("agent:"):
                    agent_diff = max(agent_diff, d)
        policy_steps.append(policy_diff)
        agent_steps.append(agent_diff)
    # Steps up to the first with other ids start from equal weights: there the recorded
    # log-probs of the same tokens can be compared as they were sampled.
    same_weights = next((i + 1 for i, n in enumerate(differing) if n), steps)
    final = Path("checkpoints") / f"step_{steps:06d}"
    wa, wb = read_model_weights(reference / final), read_model_weights(other / final)
    diffs = {k: float((wa[k].float() - wb[k].float()).abs().max()) for k in wa}
    return {
        "token_ids_equal": not any(differing),
        "trajectories_with_other_ids": differing,
        "max_policy_logprob_diff": max(policy_steps),
        "max_agent_logprob_diff": max(agent_steps),
        "policy_logprob_diff_per_step": policy_steps,
        "agent_logprob_diff_per_step": agent_steps,
        "steps_from_equal_weights": same_weights,
        "max_agent_logprob_diff_from_equal_weights": max(agent_steps[:same_weights]),
        "max_policy_logprob_diff_from_equal_weights": max(policy_steps[:same_weights]),
        "max_weight_diff": max(diffs.values()),
        "tensors_differing": sum(d > 0 for d in diffs.values()),
        "tensors": len(diffs),
        "held_out_reference": _accuracy(reference),
        "held_out": _accuracy(other),
    }


def run_dtype(dtype: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The reference, the noise floor and every trial of one generator dtype."""
    runs: dict[str, Path] = {}

    def prepare(name: str) -> tuple[Path, Path, Path]:
        run_dir = work / dtype / name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        config_file = work / dtype / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(trial_config(run_dir, dtype, args)))
        runs[name] = run_dir
        return run_dir, config_file, work / dtype / f"{name}.log"

    episodes = args.prompts * 4
    results: dict[str, Any] = {"trials": []}
    for name in ("reference", "floor"):
        run_dir, config_file, log = prepare(name)
        if args.reuse and _finished(run_dir, args.steps):
            continue
        t0 = time.perf_counter()
        run_to_end(config_file, log)
        print(f"[{dtype}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    results["floor"] = compare(runs["reference"], runs["floor"], args.steps)
    print(f"[{dtype}] floor: {json.dumps(results['floor'])}", flush=True)
    for k in range(args.trials):
        step, after = k % args.steps, 1 + (k // args.steps) % (episodes - 1)
        run_dir, config_file, log = prepare(f"trial_{k}")
        t0 = time.perf_counter()
        kill_file = work / dtype / f"trial_{k}.kill.json"
        if not (args.reuse and _finished(run_dir, args.steps) and kill_file.is_file()):
            written = run_killed(config_file, run_dir, log, step, after)
            kill_file.write_text(json.dumps({"step": step, "written": written}))
            run_to_end(config_file, log, resume=True)
        written = json.loads(kill_file.read_text())["written"]
        trial = {"killed_in_step": step, "trajectories_on_disk": written, "episodes": episodes}
        trial.update(compare(runs["reference"], run_dir, args.steps))
        results["trials"].append(trial)
        print(
            f"[{dtype}] trial {k} ({time.perf_counter() - t0:.0f} s): {json.dumps(trial)}",
            flush=True,
        )
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """Per dtype: each trial's log-prob and weight differences against the noise floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(results["dtypes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    keys = [
        ("max_agent_logprob_diff_from_equal_weights", "agent tokens,\nbefore another id"),
        ("max_agent_logprob_diff", "agent tokens,\nall steps"),
        ("max_policy_logprob_diff", "policy tokens,\nall steps"),
    ]
    for d, dtype in enumerate(dtypes):
        res = results["dtypes"][dtype]
        for j, (key, label) in enumerate(keys):
            ys = [max(t[key], 1e-12) for t in res["trials"]]
            axes[0].scatter(
                [d * 4 + j] * len(ys), ys, label=f"{dtype}: {label}" if d == 0 else None
            )
            if res.get("floor"):
                axes[0].hlines(max(res["floor"][key], 1e-12), d * 4 + j - 0.3, d * 4 + j + 0.3)
        ys = [max(t["max_weight_diff"], 1e-12) for t in res["trials"]]
        axes[1].scatter([d] * len(ys), ys)
        if res.get("floor"):
            axes[1].hlines(max(res["floor"]["max_weight_diff"], 1e-12), d - 0.3, d + 0.3)
    axes[0].set_xticks(
        [d * 4 + j for d in range(len(dtypes)) for j in range(len(keys))],
        [f"{dt}\n{lab}" for dt in dtypes for _, lab in keys],
        fontsize=7,
    )
    axes[0].set_yscale("log")
    axes[0].set_title(
        "max |Δ behaviour log-prob| vs reference\n(dots: resumed trials; bar: 2nd uninterrupted)"
    )
    axes[1].set_xticks(range(len(dtypes)), dtypes)
    axes[1].set_yscale("log")
    axes[1].set_title("max |Δ weight| after the last step\n(1e-12 stands for 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (4 samples each)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="policy tokens per turn")
    parser.add_argument("--eval-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (a temp dir)")
    parser.add_argument(
        "--reuse", action="store_true", help="compare runs already finished in --work again"
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="resume-trials-"))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/resume_trials.py", *(argv or sys.argv[1:])]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "config": trial_config(Path("<run_dir>"), "<dtype>", args),
        "dtypes": {},
    }
    for dtype in args.dtypes:
        results["dtypes"][dtype] = run_dtype(dtype, args, work)
        (args.out / "resume_trials.json").write_text(json.dumps(results, indent=2))
    for dtype, res in results["dtypes"].items():
        trials = res["trials"]
        print(
            f"{dtype}: {sum(t['token_ids_equal'] for t in trials)}/{len(trials)} trials with equal "
            f"token ids; max |Δ log-prob| agent tokens "
            f"{max(t['max_agent_logprob_diff'] for t in trials):.3g}, policy tokens "
            f"{max(t['max_policy_logprob_diff'] for t in trials):.3g}; max |Δ weight| "
            f"{max(t['max_weight_diff'] for t in trials):.3g}; floor (2nd uninterrupted run): "
            f"agent {res['floor']['max_agent_logprob_diff']:.3g}, policy "
            f"{res['floor']['max_policy_logprob_diff']:.3g}, weight "
            f"{res['floor']['max_weight_diff']:.3g}"
        )
    plot(results, args.out / "resume_trials.png")
    print(f"wrote {args.out / 'resume_trials.json'} and .png; runs in {work}")
    return 0


def _finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{steps:06d}").is_dir()


def _by_id(trajectories: list[Trajectory]) -> dict[str, Trajectory]:
    return {t.trajectory_id: t for t in trajectories}


def _accuracy(run_dir: Path) -> float:
    path = run_dir / "eval" / "after.json"
    return json.loads(path.read_text())["accuracy"] if path.is_file() else math.nan


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


if __name__ == "__main__":
    raise SystemExit(main())
