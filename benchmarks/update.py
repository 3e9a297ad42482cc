"""The policy update against a bare forward/backward on the same tokens, as a ratio.

Two sides run on one model, one batch and one micro-batching, alternating in one
process (rounds in the order ours, bare, bare, ours, ours, ... so a drifting load
falls on both alike):

- **ours**: what ``aipo train`` does after a rollout: one ``ppo_update`` epoch with the
  AIPO loss, the optimizer (AdamW with gradient clipping) and the micro-batch size of
  ``configs/default.yaml``; before it ``compute_old_logprobs``, unless the batch makes
  a single optimizer step (``on_policy_update``: the default's 16 rows in one
  minibatch), when the update's own forward gives the old log-probs.
- **bare**: for each micro-batch a no-grad ``model(...)`` forward, then for each
  micro-batch ``model(..., labels=...).loss.backward()`` (no optimizer step): what a
  PPO update with a separate old-log-prob pass does at the least on these tokens.

The batch is built deterministically: ``--rows`` right-padded rows of about
``--prompt-tokens`` prompt tokens and ``--response-tokens`` response tokens (lengths
vary a little per row), the first ``--agent-tokens`` of every other response being
agent tokens with behaviour log-probs, as the default run's auto-consult reply is.
Token values are random (speed does not depend on them). With
``--samples-per-prompt n`` every n consecutive rows share one prompt, as the samples of
a GRPO group do: **ours** then computes each prompt once (``train.share_prefix``),
**bare** once per row.

Each round's ratio ours/bare is printed with the load average, then min/median/max,
for wall-clock seconds and for the process's CPU seconds (less sensitive to other
processes sharing the cores; not reported on CUDA). Peak RSS (and peak CUDA memory)
of each side is measured in a fresh subprocess per side, from after the model is
loaded (the load has its own transient peak). Writes ``update.json`` and
``update.png`` (``--tag`` names them ``update.<tag>.*``).

    python benchmarks/update.py                          # CPU, float32, 5 rounds
    python benchmarks/update.py --threads 1              # on cores other processes share
    python benchmarks/update.py --threads 1 --samples-per-prompt 4 --tag groups4
    python benchmarks/update.py --device cuda --dtype bfloat16 --weights random --tag cuda

On shared cores ``--threads 1`` gives steady figures: with more threads each side's
time depends on whether its threads were scheduled together. Peak memory of **ours**
includes AdamW's two moment buffers (twice the model's size), which **bare** never
allocates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from aipo.config import load_config
from benchmarks.rss import reset_peak, status_mib, write_report
from policies.default_model import DEFAULT_ARCHITECTURE
from trainers.config import TrainConfig, default_config_path
from trainers.embedded import update_options
from trainers.losses import AIPOLoss
from trainers.optim import build_optimizer
from trainers.update import UpdateBatch, compute_old_logprobs, on_policy_update, ppo_update

RESULTS = Path(__file__).resolve().parent / "results"


def load_model(weights: str, dtype: torch.dtype, device: str):
    """The default model (``weights="default"``) or a seeded random one of its architecture."""
    if weights == "default":
        from policies.default_model import resolve_model_path
        from policies.loading import load_causal_lm

        model = load_causal_lm(resolve_model_path("default"), dtype=dtype)
    elif weights == "random":
        from policies.default_model import random_default_model

        model = random_default_model(seed=0).to(dtype)
    else:
        raise ValueError(f"unknown --weights {weights!r}; expected default or random")
    return model.to(device)


def build_batch(args: argparse.Namespace, vocab_size: int, device: str) -> UpdateBatch:
    """The benchmark's deterministic batch (module docstring), old log-probs still unset."""
    gen = torch.Generator().manual_seed(args.seed)
    rows = args.rows
    group = [r // args.samples_per_prompt for r in range(rows)]  # rows of one prompt
    prompt = [args.prompt_tokens - 6 + (g * 5) % 13 for g in group]
    response = [args.response_tokens - (r * 3) % 9 for r in range(rows)]
    width = max(p + n for p, n in zip(prompt, response, strict=True))
    input_ids = torch.randint(3, vocab_size, (rows, width), generator=gen)
    for r, g in enumerate(group):
        first = g * args.samples_per_prompt
        input_ids[r, : prompt[r]] = input_ids[first, : prompt[r]]
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    agent_mask = torch.zeros(rows, width, dtype=torch.bool)
    for r, (p, n) in enumerate(zip(prompt, response, strict=True)):
        attention_mask[r, : p + n] = 1
        loss_mask[r, p : p + n] = 1.0
        if r % 2 == 0:
            agent_mask[r, p : p + args.agent_tokens] = True
    pad = DEFAULT_ARCHITECTURE["pad_token_id"]
    input_ids = torch.where(attention_mask.bool(), input_ids, pad)
    behavior = torch.where(agent_mask, -torch.rand(rows, width, generator=gen), torch.nan)
    tensors = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        agent_mask=agent_mask,
        behavior_logprobs=behavior,
        advantages=torch.randn(rows, generator=gen),
        old_logprobs=torch.zeros(rows, width),
    )
    return UpdateBatch(**{name: t.to(device) for name, t in tensors.items()})


class Sides:
    """The two timed sides on one model and batch."""

    def __init__(self, model, batch: UpdateBatch, config: TrainConfig) -> None:
        self.model, self.batch, self.config = model, batch, config
        self.optimizer = build_optimizer(model, config.optim)
        self.loss_fn = AIPOLoss(config.loss)
        self.labels = torch.where(batch.attention_mask.bool(), batch.input_ids, -100)

    def ours(self) -> None:
        """Old log-probs unless on-policy, then one PPO epoch of the AIPO loss (as ``update_policy``)."""
        cfg = self.config
        rows, minibatch = len(self.batch), cfg.train.minibatch_size
        if on_policy_update(self.model, rows, 1, minibatch):
            self.batch.old_logprobs = None  # the update's own forward gives them
        else:
            micro = cfg.train.micro_batch_size
            self.batch.old_logprobs = compute_old_logprobs(self.model, self.batch, micro)
        options = {**update_options(cfg), "ppo_epochs": 1}
        ppo_update(self.model, self.optimizer, None, self.batch, self.loss_fn, **options)

    def bare(self) -> None:
        """A no-grad forward and a ``loss.backward()`` per micro-batch; no optimizer step."""
        size = self.config.train.micro_batch_size
        b = self.batch
        micros = [slice(s, s + size) for s in range(0, len(b), size)]
        self.model.eval()
        with torch.no_grad():
            for rows in micros:
                self.model(input_ids=b.input_ids[rows], attention_mask=b.attention_mask[rows])
        self.model.train()
        for rows in micros:
            out = self.model(
                input_ids=b.input_ids[rows],
                attention_mask=b.attention_mask[rows],
                labels=self.labels[rows],
            )
            out.loss.backward()
        self.model.zero_grad(set_to_none=True)


def timed(fn, device: str) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call of ``fn``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def spread(values: list[float]) -> dict[str, float]:
    """Min, median and max, rounded."""
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def setup(args: argparse.Namespace) -> tuple[Sides, TrainConfig]:
    """Threads, config, model and batch, the same in the parent and in each RSS child."""
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(
        TrainConfig,
        default_config_path(),
        [f"train.micro_batch_size={args.micro_batch_size}"] if args.micro_batch_size else [],
    )
    model = load_model(args.weights, getattr(torch, args.dtype), args.device)
    batch = build_batch(args, model.config.vocab_size, args.device)
    return Sides(model, batch, config), config


def peak_memory_child(args: argparse.Namespace, side: str) -> dict[str, float]:
    """Peak RSS (and CUDA memory) of a fresh process running ``side`` twice, in MiB."""
    command = [sys.executable, __file__, *sys.argv[1:], "--memory-child", side]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(args: argparse.Namespace) -> None:
    """Run one side twice in this process and print its peak memory as one JSON line.

    Loading the model has its own, higher transient peak, so the peak-RSS mark is reset
    after loading where Linux allows it; elsewhere ``getrusage``'s lifetime peak is given.
    """
    sides, _ = setup(args)
    loaded = status_mib("VmRSS")
    reset = reset_peak()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        timed(getattr(sides, args.memory_child), args.device)
    peak = status_mib("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "rss_after_load_mib": None if loaded is None else round(loaded, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_is_since_load": reset,
    }
    if args.device.startswith("cuda"):
        report["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(report))


def run(args: argparse.Namespace) -> dict:
    """Warm up both sides, time ``args.rounds`` interleaved rounds, measure memory."""
    sides, config = setup(args)
    b = sides.batch
    real = b.attention_mask.sum(dim=1)
    print(
        f"{len(b)} rows, {int(real.min())}-{int(real.max())} tokens "
        f"(mean {float(real.float().mean()):.0f}), {int(b.loss_mask.sum())} trained, "
        f"{int(b.agent_mask.sum())} agent; micro-batch {config.train.micro_batch_size}, "
        f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads"
    )
    for fn in (sides.ours, sides.bare):  # warm up kernels and allocators
        timed(fn, args.device)
    load_before = os.getloadavg()
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "bare": []}
    rounds = []
    for index in range(args.rounds):
        order = ("ours", "bare") if index % 2 == 0 else ("bare", "ours")
        for side in order:
            times[side].append(timed(getattr(sides, side), args.device))
        (ours_wall, ours_cpu), (bare_wall, bare_cpu) = times["ours"][-1], times["bare"][-1]
        load = os.getloadavg()[0]
        rounds.append(
            {
                "ours_s": round(ours_wall, 3),
                "bare_s": round(bare_wall, 3),
                "ratio": round(ours_wall / bare_wall, 3),
                "ours_cpu_s": round(ours_cpu, 3),
                "bare_cpu_s": round(bare_cpu, 3),
                "cpu_ratio": round(ours_cpu / bare_cpu, 3),
                "load_1m": round(load, 2),
            }
        )
        print(
            f"round {index + 1}/{args.rounds}: ours {ours_wall:7.2f} s  bare {bare_wall:7.2f} s  "
            f"ratio {ours_wall / bare_wall:.3f}  (CPU {ours_cpu / bare_cpu:.3f})  load {load:.2f}"
        )
    memory = {}
    if args.memory:
        memory = {side: peak_memory_child(args, side) for side in ("ours", "bare")}
        for side, figures in memory.items():
            print(f"memory {side}: {figures}")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
        "dtype": args.dtype,
        "weights": args.weights,
        "rows": len(b),
        "samples_per_prompt": args.samples_per_prompt,
        "tokens_per_row": [int(real.min()), int(real.max())],
        "trained_tokens": int(b.loss_mask.sum()),
        "agent_tokens": int(b.agent_mask.sum()),
        "micro_batch_size": config.train.micro_batch_size,
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "rounds": rounds,
        "ratio": spread([r["ratio"] for r in rounds]),
        "memory_mib": memory,
    }
    if not args.device.startswith("cuda"):
        report["cpu_ratio"] = spread([r["cpu_ratio"] for r in rounds])
    print(f"ratio ours/bare (wall): {report['ratio']}")
    if "cpu_ratio" in report:
        print(f"ratio ours/bare (CPU):  {report['cpu_ratio']}")
    return report


def plot(report: dict, out: Path) -> None:
    """Seconds per round of each side, and the per-round ratio against the 1.2 target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    x = list(range(1, len(rounds) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [r["ours_s"] for r in rounds], "o-", label="ours (old log-probs + PPO epoch)")
    left.plot(x, [r["bare_s"] for r in rounds], "s-", color="#999999", label="bare fwd + fwd/bwd")
    left.set_xlabel("round")
    left.set_ylabel("seconds (wall)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.plot(x, [r["ratio"] for r in rounds], "o-", label="wall")
    if "cpu_ratio" in report:
        right.plot(x, [r["cpu_ratio"] for r in rounds], "s--", label="process CPU time")
    right.axhline(1.2, color="#c44e52", linestyle=":", label="target 1.2")
    right.set_xlabel("round")
    for ax in (left, right):
        ax.set_xticks(x)
    right.set_ylabel("ours / bare")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    fig.suptitle(
        f"update vs bare, {report['rows']} rows x {report['tokens_per_row']} tokens, "
        f"{report['dtype']} on {report['machine']['device']}, median ratio "
        f"{report['ratio']['median']}, load {report['load_average_1m'][0]} -> "
        f"{report['load_average_1m'][1]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    """Parse flags, run, print, save JSON and PNG."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each side")
    parser.add_argument("--rows", type=int, default=16, help="rows in the batch (default 16)")
    parser.add_argument("--prompt-tokens", type=int, default=106, help="about this many per row")
    parser.add_argument("--response-tokens", type=int, default=64, help="at most this many per row")
    parser.add_argument("--agent-tokens", type=int, default=16, help="agent tokens per even row")
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="consecutive rows sharing one prompt, as a GRPO group's samples (default 1: "
        "every prompt different, nothing for train.share_prefix to share)",
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=0, help="0: configs/default.yaml's (8)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--weights",
        default="default",
        choices=["default", "random"],
        help="the default model's weights, or random ones of its architecture (no files needed)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the batch")
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the peak-memory children"
    )
    parser.add_argument("--tag", default="", help="write update.<tag>.json/png")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--memory-child", choices=["ours", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    report = run(args)
    write_report(report, args.out_dir, f"update.{args.tag}" if args.tag else "update", plot)


if __name__ == "__main__":
    main()
