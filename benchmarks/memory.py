"""Peak memory (RSS) per phase of a training run, and of one update step of a larger policy.

Two modes, each printing its figures and writing ``memory.<tag>.json`` and ``.png``:

- ``run`` (the default): a whole training run of ``configs/default.yaml`` (what
  ``aipo train`` runs; ``KEY=VALUE`` overrides as on its command line), through the
  trainer's own code (:class:`trainers.embedded.EmbeddedTrainer`). Its phases are marked
  by wrapping the trainer's functions: ``load`` (:func:`trainers.run_state.open_run`:
  tasks, the policy, optimizer, generator, agents), ``eval`` (each held-out
  evaluation), ``warmup`` with its ``warmup/collect`` (rollouts for demonstrations) and
  ``warmup/fit`` (the supervised fit), then per step ``rollout``, ``update``
  (``update_policy``: old log-probs, PPO epoch, optimizer step) and ``publish``. The
  rows of the first update that trains a token are saved, and after the run they go
  once through a **bare** forward/backward in a fresh process (the policy loaded as the
  run loads it, the same heap settings; ``model(..., labels=...).loss.backward()`` per
  micro-batch of ``train.micro_batch_size`` rows, full logits, no optimizer):
  ``bare``, measured from after its model loads.
- ``shape``: one update step of a randomly initialised Llama of a given shape (by default
  a 0.5B-class one: hidden 896, 24 layers, vocabulary 49152; a ``LlamaConfig`` built
  here, nothing downloaded), float32 on the CPU, on the batch of ``benchmarks/update.py``
  (16 rows of ~106 prompt and <= 64 response tokens, 4 samples per prompt, micro-batches
  of 8, ``configs/default.yaml``'s loss and optimizer): **ours** (``ppo_update`` with
  AdamW's step) and **bare** (as above), each in a fresh process.

Peak RSS per phase is the kernel's own mark (``VmHWM``), reset at every phase boundary
(``/proc/self/clear_refs``), so each phase's peak is its own and nothing between two
samples is missed; a thread samples ``VmRSS`` every ``--interval`` seconds for the plot.
"Above start" is a phase's peak minus the RSS when it began; per update token it is
divided by the real tokens of the update's rows (prompt and response; the ``update``
phase includes the old log-probs and the optimizer step, whose AdamW moments are
allocated at the first step). A guard thread ends the process (exit 3, reported) when
its RSS passes ``--limit-gib``, and the kernel is told to end this process first if the
machine runs out of memory (``oom_score_adj`` 1000), so a measurement never costs another
job its life.

RSS figures are valid with other jobs on the cores; the seconds are not (each phase's
wall time is printed for orientation only).

    python benchmarks/memory.py run --tag default           # about 8 minutes on 2 idle cores
    python benchmarks/memory.py run --tag smoke train.steps=1 warmup.enabled=false task.eval_size=4
    python benchmarks/memory.py shape --tag 0p5b            # hidden 896, 24 layers, vocab 49152
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.rss import reset_peak, status_mib, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


class Meter:
    """Peak RSS per phase (nested phases allowed), a sampled RSS curve, and a memory guard."""

    def __init__(self, interval: float, limit_mib: float) -> None:
        self.started = time.perf_counter()
        self.stack: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  #: one per phase occurrence, in order
        self.samples: list[tuple[float, float]] = []  #: (seconds, RSS MiB)
        self.overall = status_mib("VmHWM")
        self.limit_mib = limit_mib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        if not reset_peak():
            raise RuntimeError("per-phase peaks need /proc/self/clear_refs (Linux)")
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = status_mib("VmRSS")
            self.samples.append((round(time.perf_counter() - self.started, 2), round(rss, 1)))
            if rss > self.limit_mib:
                print(json.dumps({"exceeded_limit_mib": self.limit_mib, "rss_mib": rss}))
                sys.stdout.flush()
                os._exit(3)

    def _boundary(self) -> None:
        """Attribute the peak since the last boundary to every open phase, then reset it."""
        peak = status_mib("VmHWM")
        self.overall = max(self.overall, peak)
        for event in self.stack:
            event["peak_mib"] = max(event["peak_mib"], peak)
        reset_peak()

    def enter(self, name: str, **info: Any) -> None:
        """Open phase ``name`` (``info`` is kept with it)."""
        self._boundary()
        rss = status_mib("VmRSS")
        event = {"phase": name, **info, "start_mib": rss, "peak_mib": rss}
        event["t0"] = time.perf_counter() - self.started
        self.stack.append(event)

    def exit(self, **info: Any) -> dict[str, Any]:
        """Close the innermost phase; its record."""
        self._boundary()
        event = self.stack.pop()
        event.update(info)
        event["end_mib"] = status_mib("VmRSS")
        event["seconds"] = round(time.perf_counter() - self.started - event["t0"], 2)
        for key in ("start_mib", "peak_mib", "end_mib"):
            event[key] = round(event[key], 1)
        event["above_start_mib"] = round(event["peak_mib"] - event["start_mib"], 1)
        self.events.append(event)
        return event

    @contextlib.contextmanager
    def phase(self, name: str, **info: Any):
        """``with meter.phase(name):`` enter and exit around a block."""
        self.enter(name, **info)
        try:
            yield
        finally:
            self.exit()

    def close(self) -> float:
        """Stop sampling; the overall peak RSS (MiB) since the meter started."""
        self._boundary()
        self._stop.set()
        self._thread.join()
        return round(self.overall, 1)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase name: occurrences, the highest peak and the largest rise above start."""
        out: dict[str, dict[str, float]] = {}
        for e in self.events:
            s = out.setdefault(e["phase"], {"count": 0, "peak_mib": 0.0, "above_start_mib": 0.0})
            s["count"] += 1
            s["peak_mib"] = max(s["peak_mib"], e["peak_mib"])
            s["above_start_mib"] = max(s["above_start_mib"], e["above_start_mib"])
        return out


def end_me_first() -> None:
    """Make this process (and its children) the one the kernel ends if the machine runs out of memory.

    The measurement then never costs another job its life; the guard thread (``--limit-gib``)
    only watches this process's own RSS.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def machine() -> dict[str, Any]:
    """Where the figures were taken."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


# -- bare forward/backward -------------------------------------------------------------


def bare_forward_backward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    micro: int,
) -> None:
    """``model(..., labels=).loss.backward()`` per micro-batch of ``micro`` rows; gradient dropped."""
    labels = torch.where(loss_mask.bool(), input_ids, -100)
    was_training = model.training
    model.train()
    try:
        for start in range(0, input_ids.shape[0], micro):
            rows = slice(start, start + micro)
            out = model(
                input_ids=input_ids[rows],
                attention_mask=attention_mask[rows],
                labels=labels[rows],
                use_cache=False,
            )
            out.loss.backward()
            del out
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


# -- run mode --------------------------------------------------------------------------


def instrument(meter: Meter, state: dict[str, Any]) -> None:
    """Wrap the trainer's phase functions so each is a phase of ``meter``."""
    import trainers.embedded as embedded
    import trainers.warmup as warmup
    from aipo_env.batch import collate

    real_open_run = embedded.open_run

    @contextlib.asynccontextmanager
    async def open_run(*args: Any, **kwargs: Any):
        meter.enter("load")
        manager = real_open_run(*args, **kwargs)
        run = await manager.__aenter__()
        meter.exit()
        state["run"] = run
        try:
            yield run
        except BaseException as exc:
            if not await manager.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            await manager.__aexit__(None, None, None)

    def async_phase(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            with meter.phase(name):
                return await fn(*args, **kwargs)

        return wrapped

    def sync_phase(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with meter.phase(name):
                return fn(*args, **kwargs)

        return wrapped

    real_update = embedded.update_policy

    def update_policy(run, trajectories, advantages, keep, step):  # noqa: ANN001, ANN202
        cfg = run.config
        kept = [t for t, k in zip(trajectories, keep.tolist(), strict=True) if k]
        batch = None
        if kept:
            batch = collate(
                kept,
                run.tokenizer.pad_token_id,
                agent_names=cfg.env.agent_names,
                rule=run.mask_rule,
            )
        tokens = int(batch.attention_mask.sum()) if batch is not None else 0
        meter.enter("update", step=step, rows=int(keep.sum()), tokens=tokens)
        stats = real_update(run, trajectories, advantages, keep, step)
        extra = {}
        if stats is not None:
            extra = {
                k: float(v)
                for k, v in stats.as_dict().items()
                if k in ("optimizer_steps", "skipped", "skipped_rows")
            }
        event = meter.exit(**extra)
        if tokens:
            event["above_start_mib_per_1k_tokens"] = round(
                event["above_start_mib"] / tokens * 1000, 1
            )
        trained = stats is not None and getattr(stats, "optimizer_steps", 0) > 0
        if trained and batch is not None and "bare_rows" not in state:
            state["bare_rows"] = {
                "step": step,
                "input_ids": batch.input_ids.cpu(),
                "attention_mask": batch.attention_mask.cpu(),
                "loss_mask": batch.loss_mask.cpu(),
            }
        return stats

    embedded.open_run = open_run
    embedded.update_policy = update_policy
    embedded.rollout = async_phase("rollout", embedded.rollout)
    embedded.evaluate = async_phase("eval", embedded.evaluate)
    embedded.run_warmup = async_phase("warmup", embedded.run_warmup)
    embedded.publish = async_phase("publish", embedded.publish)
    warmup.collect_demonstrations = async_phase("warmup/collect", warmup.collect_demonstrations)
    warmup.fit_demonstrations = sync_phase("warmup/fit", warmup.fit_demonstrations)


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    """A training run with its phases measured (module docstring)."""
    from aipo.config import load_config
    from trainers.config import TrainConfig, default_config_path
    from trainers.embedded import EmbeddedTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"run_dir={args.run_dir}", *args.overrides]
    config = load_config(TrainConfig, default_config_path(), overrides)
    meter = Meter(args.interval, args.limit_gib * 1024)
    start_rss = status_mib("VmRSS")
    state: dict[str, Any] = {}
    instrument(meter, state)
    started = time.perf_counter()
    summary = EmbeddedTrainer(config, progress=False).run()
    seconds = time.perf_counter() - started
    overall = meter.close()
    model = state["run"].model
    params = sum(p.numel() for p in model.parameters())
    bare = {}
    if "bare_rows" in state:
        rows_file = Path(args.run_dir) / "memory_bare_rows.pt"
        torch.save(state["bare_rows"], rows_file)
        bare = bare_in_child(args, rows_file)
        print(f"bare: {bare}")
    return {
        "mode": "run",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "overrides": args.overrides,
        "model_parameters": params,
        "rss_before_load_mib": round(start_rss, 1),
        "peak_rss_mib": overall,
        "seconds_not_comparable_under_load": round(seconds, 1),
        "accuracy": {
            "before": getattr(summary.eval_before, "accuracy", None),
            "after": getattr(summary.eval_after, "accuracy", None),
        },
        "phases": meter.summary(),
        "bare": bare,
        "events": meter.events,
        "samples": meter.samples,
    }


def bare_in_child(args: argparse.Namespace, rows_file: Path) -> dict[str, Any]:
    """The bare forward/backward on the saved rows, in a fresh process; its figures."""
    import subprocess

    command = [sys.executable, __file__, *sys.argv[1:], "--bare-child", str(rows_file)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    figures = json.loads(last) if last.startswith("{") else {}
    if done.returncode == 3:
        figures["failed"] = f"passed the guard's {args.limit_gib} GiB"
    elif done.returncode != 0:
        raise RuntimeError(f"bare child failed:\n{done.stderr[-3000:]}")
    return figures


def bare_child(args: argparse.Namespace) -> None:
    """Load the run's policy as the run does, run the bare side on the saved rows, print JSON."""
    from aipo.config import load_config
    from policies.default_model import resolve_model_path
    from policies.loading import load_causal_lm
    from trainers.config import TrainConfig, default_config_path

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(TrainConfig, default_config_path(), list(args.overrides))
    if getattr(config.train, "map_large_tensors", False):
        from trainers import heap

        heap.map_large_allocations()
    model = load_causal_lm(
        resolve_model_path(config.policy.model), dtype=getattr(torch, config.policy.dtype)
    )
    rows = torch.load(args.bare_child)
    meter = Meter(args.interval, args.limit_gib * 1024)
    loaded = status_mib("VmRSS")
    with meter.phase("bare"):
        bare_forward_backward(
            model,
            rows["input_ids"],
            rows["attention_mask"],
            rows["loss_mask"],
            config.train.micro_batch_size,
        )
    meter.close()
    event = meter.events[-1]
    tokens = int(rows["attention_mask"].sum())
    print(
        json.dumps(
            {
                "step": rows["step"],
                "rows": int(rows["input_ids"].shape[0]),
                "tokens": tokens,
                "rss_after_load_mib": round(loaded, 1),
                "peak_mib": event["peak_mib"],
                "above_start_mib": event["above_start_mib"],
                "above_start_mib_per_1k_tokens": round(event["above_start_mib"] / tokens * 1000, 1),
            }
        )
    )


# -- shape mode ------------------------------------------------------------------------


def llama_shape(args: argparse.Namespace) -> Any:
    """The ``LlamaConfig`` of ``--hidden``, ``--layers``, ... (random weights; nothing downloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )


def shape_child(args: argparse.Namespace) -> None:
    """One side of the shape mode in this process; its peak memory as one JSON line."""
    from transformers import LlamaForCausalLM

    from aipo.config import load_config
    from benchmarks.update import Sides, build_batch
    from trainers.config import TrainConfig, default_config_path

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(TrainConfig, default_config_path(), list(args.overrides))
    if getattr(config.train, "map_large_tensors", False):  # as the trainer, before the model
        from trainers import heap

        heap.map_large_allocations()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_shape(args)).float()
    batch_args = argparse.Namespace(
        seed=0,
        rows=args.rows,
        samples_per_prompt=args.samples_per_prompt,
        prompt_tokens=args.prompt_tokens,
        response_tokens=args.response_tokens,
        agent_tokens=16,
    )
    batch = build_batch(batch_args, model.config.vocab_size, "cpu")
    sides = Sides(model, batch, config)
    meter = Meter(args.interval, args.limit_gib * 1024)
    loaded = status_mib("VmRSS")
    t0 = time.perf_counter()
    if args.shape_child == "ours":
        with meter.phase("update"):
            sides.ours()
    else:
        with meter.phase("bare"):
            bare_forward_backward(
                model, batch.input_ids, batch.attention_mask, batch.loss_mask, args.micro
            )
    meter.close()
    event = meter.events[-1]
    print(
        json.dumps(
            {
                "rss_after_load_mib": round(loaded, 1),
                "peak_rss_mib": event["peak_mib"],
                "above_start_mib": event["above_start_mib"],
                "seconds_not_comparable_under_load": round(time.perf_counter() - t0, 1),
                "parameters": sum(p.numel() for p in model.parameters()),
                "tokens": int(batch.attention_mask.sum()),
            }
        )
    )


def shape_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Each side of the shape mode in a fresh process (module docstring)."""
    import subprocess

    sides = {}
    for side in args.sides:
        command = [sys.executable, __file__, *sys.argv[1:], "--shape-child", side]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
        figures = json.loads(last) if last.startswith("{") else {}
        if done.returncode == 3:
            figures["failed"] = f"passed the guard's {args.limit_gib} GiB"
        elif done.returncode != 0:
            raise RuntimeError(f"shape child {side} failed:\n{done.stderr[-3000:]}")
        sides[side] = figures
        print(f"{side}: {figures}")
    return {
        "mode": "shape",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "shape": llama_shape(args).to_diff_dict(),
        "batch": {
            "rows": args.rows,
            "samples_per_prompt": args.samples_per_prompt,
            "prompt_tokens": args.prompt_tokens,
            "response_tokens": args.response_tokens,
            "micro_batch_size": args.micro,
        },
        "overrides": args.overrides,
        "sides": sides,
    }


# -- output ----------------------------------------------------------------------------


def print_run(report: dict[str, Any]) -> None:
    """The run mode's table."""
    print(f"peak RSS of the run: {report['peak_rss_mib']:.0f} MiB")
    print(f"{'phase':16s} {'count':>5s} {'peak MiB':>9s} {'above start':>12s}")
    for name, s in report["phases"].items():
        print(f"{name:16s} {s['count']:5d} {s['peak_mib']:9.0f} {s['above_start_mib']:12.0f}")
    for e in report["events"]:
        if e["phase"] == "update" and "above_start_mib_per_1k_tokens" in e:
            print(
                f"update step {e['step']}: {e['rows']} rows, {e['tokens']} tokens, "
                f"{e['above_start_mib']:.0f} MiB above start, "
                f"{e['above_start_mib_per_1k_tokens']:.0f} MiB per 1k tokens"
            )
    bare = report.get("bare") or {}
    if "above_start_mib" in bare:
        print(
            f"bare forward/backward, step {bare['step']}'s rows ({bare['tokens']} tokens), fresh "
            f"process: {bare['above_start_mib']:.0f} MiB above its loaded model, "
            f"{bare['above_start_mib_per_1k_tokens']:.0f} MiB per 1k tokens"
        )


def plot(report: dict[str, Any], out: Path) -> None:
    """Run mode: the RSS curve with its phases shaded. Shape mode: peak per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers.metrics import save_figure

    if report["mode"] == "shape":
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(report["sides"])
        peaks = [report["sides"][n].get("peak_rss_mib", 0) / 1024 for n in names]
        ax.bar(names, peaks, color=["#4c72b0", "#999999"][: len(names)])
        ax.axhline(16, color="#c44e52", linestyle=":", label="16 GiB")
        ax.set_ylabel("peak RSS (GiB)")
        shape = report["shape"]
        ax.set_title(
            f"one update step, Llama hidden {shape.get('hidden_size')}, "
            f"{shape.get('num_hidden_layers')} layers",
            fontsize=9,
        )
        ax.legend(fontsize=8)
        save_figure(fig, out)
        return
    fig, ax = plt.subplots(figsize=(11, 4.5))
    colors = {
        "load": "#dddddd",
        "eval": "#c6dbef",
        "warmup/collect": "#fdd0a2",
        "warmup/fit": "#fd8d3c",
        "rollout": "#c7e9c0",
        "update": "#fc9272",
        "publish": "#dadaeb",
    }
    for e in report["events"]:
        if e["phase"] in colors:
            ax.axvspan(e["t0"], e["t0"] + e["seconds"], color=colors[e["phase"]], lw=0)
    t = [s[0] for s in report["samples"]]
    ax.plot(t, [s[1] / 1024 for s in report["samples"]], color="black", lw=1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=7, loc="upper left", ncol=4)
    ax.set_xlabel("seconds (not comparable under load)")
    ax.set_ylabel("RSS (GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"RSS over a training run, peak {report['peak_rss_mib'] / 1024:.2f} GiB", fontsize=9
    )
    save_figure(fig, out)


def main() -> None:
    """Parse flags, measure, print, save JSON and PNG."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "shape"])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    parser.add_argument("--run-dir", default="/tmp/aipo-memory-run", help="run mode's run_dir")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling period (s)")
    parser.add_argument(
        "--limit-gib", type=float, default=14.0, help="end a process whose RSS passes this"
    )
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=106)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--micro", type=int, default=8, help="bare side's rows per micro-batch")
    parser.add_argument("--sides", nargs="+", default=["ours", "bare"], choices=["ours", "bare"])
    parser.add_argument("--tag", default="", help="write memory.<tag>.json/png")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--shape-child", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--bare-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()
    end_me_first()
    if args.shape_child:
        shape_child(args)
        return
    if args.bare_child:
        bare_child(args)
        return
    report = run_mode(args) if args.mode == "run" else shape_mode(args)
    if args.mode == "run":
        print_run(report)
    write_report(report, args.out_dir, f"memory.{args.tag}" if args.tag else "memory", plot)


if __name__ == "__main__":
    main()
