"""Seconds per training step of ``aipo train`` against TRL's ``GRPOTrainer`` at the same budget.

Both trainers get one :class:`SharedBudget`: the project's default model, the default
task's problems (``rg:chain_sum_easy``, drawn in the order ``aipo train`` draws them:
TRL reads them unshuffled in that order, so step k of both sides sees the same four
problems), prompts x samples per step, new tokens at most, temperature, learning rate,
PPO epochs, micro-batch size, dtype, device and seed. ``aipo train`` runs
``configs/default.yaml`` with :func:`aipo_overrides` (consulting off: independent
mode, no auto consult, only the oracle verifier in the pool, which loads no model,
``agent_mode=mask``; no held-out evaluation, no plot, a checkpoint only after the last
step); the TRL ``GRPOConfig`` is read off
the resolved ``TrainConfig`` by :func:`trl_settings`, so a change to the budget (or to
``default.yaml``'s lr, clipping, grad-norm, Adam settings) reaches both sides. TRL's
CPU-unfriendly defaults are turned off to match: ``activation_checkpointing=False`` and
``bf16=False`` (TRL defaults to both; aipo does neither), no saves, no evaluation, no
reporting; ``beta=0`` (no reference model), ``loss_type='dapo'`` (aipo's
``token_mean``), ``epsilon``/``epsilon_high`` from aipo's clip range. The TRL process
checks, before training, that TRL's chat-templated prompt ids are exactly the ids
aipo's environment renders for every problem.

Each side runs ``--steps`` steps in a fresh subprocess; the sides alternate for
``--rounds`` rounds (aipo, trl, aipo, trl, ...); round ``r`` runs both sides with seed
``r`` (its own problems and draws; ``--same-seed`` keeps seed 0), since over a few
steps the lengths each side happens to sample decide much of a step's time. A step's seconds are measured
inside each process from the end of the previous step to the end of this one (aipo:
the ``time`` of consecutive ``metrics.jsonl`` records; TRL: consecutive
``on_step_end`` callbacks), so they include rollout, scoring, advantages, the update
and per-step logging on both sides. The first step has no previous end: aipo's is
its ``rollout_s + update_s``, TRL's ``on_step_begin`` to ``on_step_end``. The first
``--warmup`` steps (default 1) are left out of the ratios: step 1 pays one-time costs
on both sides (AdamW's state allocated at the first optimizer step, first-call
allocations of the generator's cache and of autograd; TRL's dataloader and
accelerate set-up). Model loading, the final checkpoint (aipo) and process start
are outside every step. The ratio is TRL/aipo of the same step in the same round.

What differs and cannot be made equal (the point of the comparison is the path each
framework takes to the same work):

* generation: TRL calls ``model.generate`` once on the left-padded batch of all
  rows (dynamic KV cache, no log-probs); aipo's embedded generator decodes the rows
  concurrently in its own batched loop and records each token's log-prob;
* sampled completions: each side samples with its own RNG, so completion lengths
  (and so tokens of work) differ step by step; both are recorded as
  ``completion_tokens`` per step;
* the update: both skip the old log-probs forward when one generation feeds one
  optimizer step (TRL: ``num_iterations=1``; aipo: ``on_policy_update``) and compute
  logits only for completion positions; aipo also groups rows of similar length into
  micro-batches cut to their longest row. TRL always computes per-token entropy (for
  logging); aipo only when ``entropy_coef > 0``;
* advantages: both normalise by the unbiased group std; TRL adds 1e-4 to it, aipo 1e-6;
* warmup: aipo's ``warmup_steps=1`` reaches the full lr at the first step, which is
  TRL's ``warmup_steps=0``; longer warmups are mapped to the same count and differ by
  one step in where the ramp starts;
* aipo writes every trajectory to ``rollouts/step_*.jsonl`` (and TensorBoard scalars
  when tensorboard is installed); TRL prints its metrics to its log.

    python benchmarks/vs_trl.py                          # 3 steps x 2 rounds, CPU, float32
    python benchmarks/vs_trl.py --steps 2 --rounds 1 --out /tmp/vs-trl-smoke
    python benchmarks/vs_trl.py --dtype bfloat16 --device cuda --tag gpu

TRL is a benchmark dependency only (``pip install -e .[bench]``); no project module
imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from aipo.config import load_config  # noqa: E402
from aipo_env.passk import mean_ci  # noqa: E402
from benchmarks.rss import status_mib  # noqa: E402
from trainers.config import TrainConfig, default_config_path  # noqa: E402


@dataclass(frozen=True)
class SharedBudget:
    """The one budget both trainers get; every field reaches both sides."""

    model: str = "default"  #: 'default' (SmolLM2-135M-Instruct), a model directory or a hub id
    task: str = "rg:chain_sum_easy"  #: a registered task; its prompts as aipo's env renders them
    prompts_per_step: int = 4  #: distinct problems per step
    samples_per_prompt: int = 4  #: the group size
    max_new_tokens: int = 64  #: most tokens a completion has
    temperature: float = 0.7
    lr: float = 1e-5
    ppo_epochs: int = 1  #: passes over each rollout batch (TRL's num_iterations)
    micro_batch_size: int = 8  #: rows per forward/backward; gradients accumulate to one step
    steps: int = 3  #: training steps per run
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0


# -- one budget, two configurations ---------------------------------------------------


def aipo_overrides(budget: SharedBudget, run_dir: str | Path) -> list[str]:
    """``aipo train`` overrides of ``configs/default.yaml`` for ``budget``, consulting off."""
    rows = budget.prompts_per_step * budget.samples_per_prompt
    return [
        f"run_dir={run_dir}",
        f"seed={budget.seed}",
        f"policy.model={budget.model}",
        f"policy.dtype={budget.dtype}",
        f"policy.device={budget.device}",
        f"task.name={budget.task}",
        "task.eval_size=0",
        # Independent mode: no consult instructions in the prompt and no stop on a
        # consult tag, so the prompt and the stopping rule are TRL's.
        "env.mode=independent",
        "env.max_consults=0",
        "env.auto_consult=null",
        "warmup.enabled=false",  # no consult warm-up: TRL has none
        "env.max_turns=1",
        f"env.max_new_tokens_per_turn={budget.max_new_tokens}",
        # The pool needs one agent: the oracle verifier loads no model (no frozen copy),
        # and with consulting off it is never called.
        "agents.agents={verify: {kind: oracle}}",
        "loss.agent_mode=mask",
        f"rollout.n_samples={budget.samples_per_prompt}",
        f"rollout.temperature={budget.temperature!r}",
        f"optim.lr={budget.lr!r}",
        f"train.steps={budget.steps}",
        f"train.prompts_per_step={budget.prompts_per_step}",
        f"train.ppo_epochs={budget.ppo_epochs}",
        f"train.minibatch_size={rows}",  # one optimizer step per rollout batch, as TRL
        f"train.micro_batch_size={budget.micro_batch_size}",
        "train.save_every=0",  # a checkpoint only after the last step, outside the timing
        "train.plot=false",
    ]


def aipo_config(budget: SharedBudget, run_dir: str | Path) -> TrainConfig:
    """The validated ``TrainConfig`` that ``aipo train`` runs for ``budget``."""
    return load_config(TrainConfig, default_config_path(), aipo_overrides(budget, run_dir))


def check_comparable(cfg: TrainConfig) -> None:
    """Refuse a config that TRL's ``GRPOTrainer`` cannot run as the same algorithm.

    Raises:
        ValueError: naming the field and what the comparison needs.
    """
    rows = cfg.train.prompts_per_step * cfg.rollout.n_samples
    needs = {
        "env.mode": (cfg.env.mode, "independent", cfg.env.mode == "independent"),
        "env.max_consults": (cfg.env.max_consults, "0", cfg.env.max_consults == 0),
        "warmup.enabled": (cfg.warmup.enabled, "false", not cfg.warmup.enabled),
        "agents.agents": (
            sorted(cfg.agents.agents),
            "oracle agents only (no model loaded)",
            all(a.kind == "oracle" for a in cfg.agents.agents.values()),
        ),
        "train.minibatch_size": (
            cfg.train.minibatch_size,
            f"{rows} (prompts x samples: one optimizer step per generation, as TRL)",
            cfg.train.minibatch_size == rows,
        ),
        "train.micro_batch_size": (
            cfg.train.micro_batch_size,
            f"a divisor of {rows}",
            rows % cfg.train.micro_batch_size == 0,
        ),
        "train.advantage": (
            cfg.train.advantage,
            "grpo or dr_grpo",
            cfg.train.advantage in ("grpo", "dr_grpo"),
        ),
        "train.dynamic_sampling": (
            cfg.train.dynamic_sampling,
            "false",
            not cfg.train.dynamic_sampling,
        ),
        "train.overlong_buffer": (cfg.train.overlong_buffer, "0", cfg.train.overlong_buffer == 0),
        "loss.rollout_correction": (
            cfg.loss.rollout_correction,
            "none",
            cfg.loss.rollout_correction == "none",
        ),
        "optim.schedule": (cfg.optim.schedule, "constant", cfg.optim.schedule == "constant"),
    }
    bad = [
        f"{key}={value!r}; expected {want}" for key, (value, want, ok) in needs.items() if not ok
    ]
    if bad:
        raise ValueError("not comparable with TRL's GRPOTrainer: " + "; ".join(bad))


#: aipo's token aggregation -> TRL's loss_type.
LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_sum_norm": "dr_grpo"}


#: TRL's vLLM generation, colocated in the trainer's process; on the CPU build the KV
#: cache is sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB, set by :func:`run_trl`).
TRL_VLLM: dict[str, Any] = {
    "use_vllm": True,
    "vllm_mode": "colocate",
    "vllm_max_model_length": 1024,
    "vllm_enable_sleep_mode": False,
}
#: KV cache of the colocated engine on a CPU, in GiB.
VLLM_CPU_KVCACHE_GIB = 1


def trl_settings(cfg: TrainConfig, output_dir: str | Path, vllm: bool = False) -> dict[str, Any]:
    """``GRPOConfig`` keyword arguments reproducing ``cfg`` (from :func:`aipo_config`).

    ``vllm``: TRL generates with vLLM in its own process (``vllm_mode='colocate'``),
    syncing the weights into the engine before each generation.
    """
    check_comparable(cfg)
    rows = cfg.train.prompts_per_step * cfg.rollout.n_samples
    device = cfg.policy.device or "cpu"
    return {
        "output_dir": str(output_dir),
        "seed": cfg.seed,
        "model_init_kwargs": {"dtype": cfg.policy.dtype},
        "use_cpu": device == "cpu",
        "bf16": False,  # the weights are in policy.dtype, as aipo's; no autocast
        "fp16": False,
        "activation_checkpointing": False,  # TRL defaults to True (transformers 5 name)
        # batch layout
        "max_steps": cfg.train.steps,
        "per_device_train_batch_size": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": rows // cfg.train.micro_batch_size,
        "num_generations": cfg.rollout.n_samples,
        "num_iterations": cfg.train.ppo_epochs,
        "shuffle_dataset": False,  # the dataset is already in aipo's problem order
        # sampling
        "max_completion_length": cfg.rollout.max_new_tokens or cfg.env.max_new_tokens_per_turn,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "top_k": max(0, cfg.rollout.top_k),  # aipo's -1 and TRL's 0 both mean off
        # loss and advantages
        "beta": cfg.loss.kl_coef,
        "epsilon": cfg.loss.eps_clip_low,
        "epsilon_high": cfg.loss.eps_clip_high,
        "loss_type": LOSS_TYPES[cfg.loss.aggregation],
        "scale_rewards": "group" if cfg.train.advantage == "grpo" else "none",
        "mask_truncated_completions": cfg.train.mask_truncated,
        # optimizer
        "learning_rate": cfg.optim.lr,
        "lr_scheduler_type": "constant" if cfg.optim.warmup_steps <= 1 else "constant_with_warmup",
        "warmup_steps": cfg.optim.warmup_steps if cfg.optim.warmup_steps > 1 else 0,
        "weight_decay": cfg.optim.weight_decay,
        "adam_beta1": cfg.optim.betas[0],
        "adam_beta2": cfg.optim.betas[1],
        "adam_epsilon": cfg.optim.eps,
        "max_grad_norm": cfg.optim.max_grad_norm or 0.0,
        # nothing else inside the timed steps
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "disable_tqdm": True,
        "log_completions": False,
        "dataloader_num_workers": 0,
    } | (TRL_VLLM if vllm else {})


# -- per-step seconds and their ratio -------------------------------------------------


def aipo_step_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Seconds of each step from ``metrics.jsonl`` records (step 1: its rollout_s + update_s)."""
    records = sorted(records, key=lambda r: r["step"])
    if not records:
        return []
    first = records[0]
    out = [first["rollout_s"] + first["update_s"]]
    out += [b["time"] - a["time"] for a, b in zip(records, records[1:], strict=False)]
    return out


def end_to_end_seconds(begins: list[float], ends: list[float]) -> list[float]:
    """Seconds of each step from its callbacks' clock readings (step 1: its begin to its end)."""
    if not ends:
        return []
    return [ends[0] - begins[0]] + [b - a for a, b in zip(ends, ends[1:], strict=False)]


def ratio_summary(
    aipo_runs: list[list[float]], trl_runs: list[list[float]], warmup: int = 1
) -> dict[str, Any]:
    """TRL/aipo per step, paired by round and step, after ``warmup`` steps of each run.

    Returns the ratios (round-major), their min/median/max, each side's median seconds
    over the kept steps and the ratio of those medians.

    Raises:
        ValueError: the sides ran different numbers of rounds or steps, or nothing is
            left after the warm-up.
    """
    if len(aipo_runs) != len(trl_runs):
        raise ValueError(f"{len(aipo_runs)} aipo runs against {len(trl_runs)} TRL runs")
    ratios, kept_aipo, kept_trl = [], [], []
    for r, (a, t) in enumerate(zip(aipo_runs, trl_runs, strict=True)):
        if len(a) != len(t):
            raise ValueError(f"round {r + 1}: aipo ran {len(a)} steps, TRL {len(t)}")
        a, t = a[warmup:], t[warmup:]
        kept_aipo += a
        kept_trl += t
        ratios += [ts / as_ for as_, ts in zip(a, t, strict=True)]
    if not ratios:
        raise ValueError(f"no step is left after {warmup} warm-up step(s); run more --steps")
    aipo_median, trl_median = statistics.median(kept_aipo), statistics.median(kept_trl)
    # The geometric mean and its 95% t-interval, from the log ratios (steps taken as
    # independent draws, which steps of one run are only roughly).
    log_mean, log_half = mean_ci([math.log(r) for r in ratios])
    return {
        "ratios": ratios,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_max": max(ratios),
        "ratio_geomean": math.exp(log_mean),
        "ratio_geomean_ci95": [math.exp(log_mean - log_half), math.exp(log_mean + log_half)],
        "aipo_median_s": aipo_median,
        "trl_median_s": trl_median,
        "ratio_of_medians": trl_median / aipo_median,
        "steps_compared": len(ratios),
    }


def peak_rss_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each side's median peak RSS over its runs (MiB), and TRL/aipo of the medians.

    Memory is measured per whole process (model load to exit), not per step: every
    step of a run reuses the same buffers, so its peak is the run's.
    """
    aipo = statistics.median(r["peak_rss_mib"] for r in runs["aipo"])
    trl = statistics.median(r["peak_rss_mib"] for r in runs["trl"])
    return {"aipo": aipo, "trl": trl, "ratio": trl / aipo}


def per_token_ratios(
    aipo_runs: list[dict[str, Any]], trl_runs: list[dict[str, Any]], warmup: int = 1
) -> list[float]:
    """TRL/aipo of seconds per completion token, paired by round and step, after ``warmup``.

    Each side samples its own completions, so a step's seconds also follow how long they
    happen to be; this reads the same steps per token generated. Steps where a side
    generated nothing are left out.
    """
    ratios = []
    for a, t in zip(aipo_runs, trl_runs, strict=True):
        paired = zip(
            a["step_s"], a["completion_tokens"], t["step_s"], t["completion_tokens"], strict=True
        )
        for a_s, a_tokens, t_s, t_tokens in list(paired)[warmup:]:
            if a_tokens and t_tokens:
                ratios.append((t_s / t_tokens) / (a_s / a_tokens))
    return ratios


# -- the two sides, each in a fresh process -------------------------------------------


def _run_logged(cmd: list[str], log: Path, poll_s: float = 0.2) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log``; its wall seconds and peak RSS in MiB.

    The peak is the process's own high-water mark (``VmHWM`` in ``/proc``), read every
    ``poll_s`` seconds while it runs: a peak reached in its last ``poll_s`` before exit
    is missed. Not ``ru_maxrss``: on Linux a child's counts the parent's resident set
    at the fork, here the benchmark's own imports. Raises with the log's tail when the
    command fails.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    peak = 0.0
    with log.open("w") as out:
        child = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        while child.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):  # it may have just exited
                peak = max(peak, status_mib("VmHWM", child.pid))
            time.sleep(poll_s)
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {child.returncode}; {log}:\n{tail}")
    return seconds, peak


def run_aipo(budget: SharedBudget, run_dir: Path) -> dict[str, Any]:
    """One ``aipo train`` run of ``budget``; its per-step seconds, split and tokens."""
    from trainers.metrics import read_metrics

    cmd = [sys.executable, "-m", "aipo.cli", "train", "--no-progress"]
    process_s, peak_mib = _run_logged(
        cmd + aipo_overrides(budget, run_dir), run_dir.parent / "aipo.log"
    )
    records = sorted(read_metrics(run_dir / "metrics.jsonl"), key=lambda r: r["step"])
    rows = budget.prompts_per_step * budget.samples_per_prompt
    problems = []
    for step in range(budget.steps):
        lines = (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        ids = [json.loads(line)["problem_id"] for line in lines if line.strip()]
        problems.append(sorted(set(ids)))
    return {
        "step_s": aipo_step_seconds(records),
        "rollout_s": [r["rollout_s"] for r in records],
        "update_s": [r["update_s"] for r in records],
        "completion_tokens": [round(r["response_tokens_mean"] * rows) for r in records],
        "reward_mean": [r["reward_mean"] for r in records],
        "problems": problems,
        "process_s": process_s,
        "peak_rss_mib": peak_mib,
    }


def run_trl(
    budget: SharedBudget, run_dir: Path, python: str | None = None, vllm: bool = False
) -> dict[str, Any]:
    """One TRL ``GRPOTrainer`` run of ``budget`` (this file with ``--trl-child``).

    ``python``: the interpreter of the TRL side (default: this one); ``vllm``: TRL
    generates with vLLM (:data:`TRL_VLLM`).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "spec.json"
    spec.write_text(
        json.dumps({"budget": dataclasses.asdict(budget), "run_dir": str(run_dir), "vllm": vllm})
    )
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec)]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(VLLM_CPU_KVCACHE_GIB))
    process_s, peak_mib = _run_logged(cmd, run_dir.parent / "trl.log")
    result = json.loads((run_dir / "steps.json").read_text())
    result["process_s"] = process_s
    result["peak_rss_mib"] = peak_mib
    return result


def grpo_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` under the names the installed ``GRPOConfig`` takes.

    transformers 5.24 renamed ``gradient_checkpointing`` to ``activation_checkpointing``;
    a TRL side installed beside vLLM's CPU build has an older transformers.
    """
    import dataclasses

    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    renamed = {"activation_checkpointing": "gradient_checkpointing"}
    out = {}
    for key, value in settings.items():
        if key not in names and renamed.get(key) in names:
            key = renamed[key]
        out[key] = value
    return out


def trl_child(spec_path: Path) -> None:
    """The TRL side, in its own process: train ``budget`` and write ``steps.json``."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from aipo_env.env import ConsultEnv
    from policies.default_model import resolve_model_path
    from policies.loading import load_tokenizer
    from trainers.embedded import problem_order
    from trainers.held_out import make_train_task

    spec = json.loads(spec_path.read_text())
    budget = SharedBudget(**spec["budget"])
    run_dir = Path(spec["run_dir"])
    cfg = aipo_config(budget, run_dir / "aipo-config")  # the config aipo runs, never run here
    model_path = resolve_model_path(cfg.policy.model)
    task = make_train_task(cfg.task)  # the problems the aipo arm trains on: the train side
    env = ConsultEnv(task, None, load_tokenizer(model_path, pad_to_eos=True), cfg.env)
    order = [
        i
        for step in range(cfg.train.steps)
        for i in problem_order(step, cfg.train.prompts_per_step, len(task), cfg.seed)
    ]
    rows = [{"prompt": env.prompt_messages(task.problems[i]), "problem_index": i} for i in order]
    seen: list[dict[str, Any]] = []

    def reward(completions, problem_index, completion_ids, **_: Any) -> list[float]:
        """The task's score of each completion, as aipo's env scores the policy's text."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        problems = [task.problems[i] for i in problem_index]
        seen.append(
            {
                "problems": sorted({p.id for p in problems}),
                "tokens": sum(len(ids) for ids in completion_ids),
            }
        )
        return [
            task.score(p, env.protocol.answer_text(t)).score
            for p, t in zip(problems, texts, strict=True)
        ]

    class StepClock(TrainerCallback):
        """Clock readings at the begin and end of every optimizer step."""

        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=reward,
        args=GRPOConfig(**grpo_kwargs(trl_settings(cfg, run_dir / "trl-output", spec["vllm"]))),
        train_dataset=datasets.Dataset.from_list(rows),
        callbacks=[clock],
    )
    for i in sorted(set(order)):  # the budget is equal only if the prompts are
        theirs = list(trainer._tokenize_prompts([env.prompt_messages(task.problems[i])])[0][0])
        if theirs != env.prompt_ids(task.problems[i]):
            raise RuntimeError(f"problem {i}: TRL's prompt ids differ from aipo's env's")
    rollout_s: list[float] = []
    generate = trainer._generate_and_score_completions

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            rollout_s.append(time.perf_counter() - t0)

    trainer._generate_and_score_completions = timed_generate
    trainer.train()
    step_s = end_to_end_seconds(clock.begins, clock.ends)
    result = {
        "step_s": step_s,
        "rollout_s": rollout_s,
        "update_s": [s - r for s, r in zip(step_s, rollout_s, strict=False)],
        "completion_tokens": [s["tokens"] for s in seen],
        "reward_mean": [
            entry["rewards/reward/mean"]
            for entry in trainer.state.log_history
            if "rewards/reward/mean" in entry
        ],
        "problems": [s["problems"] for s in seen],
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),  # the TRL side's own (it may run in another environment)
    }
    (run_dir / "steps.json").write_text(json.dumps(result))


# -- the machine, the versions, the figure --------------------------------------------


def machine() -> dict[str, Any]:
    """The CPU model, core counts and the GPU, if any."""
    model = ""
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in out.splitlines()
                if line.startswith("Model name")
            ),
            "",
        )
    info: dict[str, Any] = {
        "cpu": model,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
    }
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        info["gpu"] = out.strip()
    return info


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the comparison depends on."""
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "accelerate", "vllm", "aipo"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def plot(
    runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], warmup: int, out_png: Path
) -> Path:
    """Per-step seconds of each side, round by round, and the TRL/aipo ratio of each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers.metrics import save_figure

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    colours = {"aipo": "tab:blue", "trl": "tab:orange"}
    steps = len(runs["aipo"][0]["step_s"])
    # One position per (round, step); a gap between rounds, and no line across it.
    where = [[r * (steps + 1) + s for s in range(steps)] for r in range(len(runs["aipo"]))]
    for side, side_runs in runs.items():
        for r, run in enumerate(side_runs):
            label = side if r == 0 else None
            top.plot(where[r], run["step_s"], marker="o", color=colours[side], label=label)
    top.set_ylabel("seconds per step")
    top.legend()
    top.grid(alpha=0.3)
    kept = [x for xs in where for x in xs[warmup:]]
    bottom.bar(kept, summary["ratios"], width=0.6, color="tab:green")
    median = summary["ratio_median"]
    bottom.axhline(median, color="black", lw=1, ls="--", label=f"median {median:.2f}")
    bottom.set_ylabel("TRL / aipo")
    bottom.set_xticks([x for xs in where for x in xs])
    bottom.set_xticklabels(
        [f"r{r + 1}s{s + 1}" for r, xs in enumerate(where) for s in range(len(xs))]
    )
    bottom.set_xlabel(f"round, step (the first {warmup} step(s) of each run: warm-up, no ratio)")
    bottom.legend()
    bottom.grid(alpha=0.3)
    rss = summary.get("peak_rss_mib")
    if rss is not None:
        fig.suptitle(
            f"peak RSS per run (median): aipo {rss['aipo']:.0f} MiB, TRL {rss['trl']:.0f} MiB",
            fontsize=9,
        )
    return save_figure(fig, out_png)


# -- the command ----------------------------------------------------------------------


def _figure(value: float | None) -> str:
    return "n/a (no step where both sides generated)" if value is None else f"{value:.2f}"


def same_problems(runs: dict[str, list[dict[str, Any]]]) -> bool:
    """Whether, in every round, both sides trained on the same problems at every step."""
    return all(
        a["problems"] == t["problems"] for a, t in zip(runs["aipo"], runs["trl"], strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    """Alternate the two sides, print the ratios, write ``vs_trl.json`` and ``vs_trl.png``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="aipo-then-TRL rounds (default 2)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="first steps of each run left out (default 1)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for vs_trl.json and vs_trl.png"
    )
    parser.add_argument("--tag", default="", help="name the files vs_trl.<tag>.json / .png")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="run folders (default: a temporary one, removed)",
    )
    parser.add_argument(
        "--same-seed",
        action="store_true",
        help="every round with seed 0 (the same problems and draws each round); default: "
        "round r uses seed r on both sides, so sampled lengths average out over rounds",
    )
    parser.add_argument(
        "--trl-vllm",
        action="store_true",
        help="TRL generates with vLLM, colocated (use_vllm, vllm_mode='colocate'); needs "
        "vLLM in the TRL side's environment (--trl-python)",
    )
    parser.add_argument(
        "--trl-python",
        default=None,
        help="interpreter of the TRL side, e.g. a venv with TRL and vLLM's CPU build "
        "(default: this one)",
    )
    parser.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_child is not None:
        trl_child(args.trl_child)
        return 0
    if args.trl_python is None and versions()["trl"] is None:
        parser.error("TRL is not installed; pip install -e '.[bench]'")

    budget = SharedBudget(steps=args.steps, dtype=args.dtype, device=args.device)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="aipo-vs-trl-"))
    load_before = os.getloadavg()
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {"aipo": [], "trl": []}
    print(
        f"vs_trl: aipo train vs TRL GRPOTrainer {versions()['trl'] or '(--trl-python)'}"
        f"{' with vLLM (colocate)' if args.trl_vllm else ''}: {budget.prompts_per_step} prompts x "
        f"{budget.samples_per_prompt} samples, {budget.max_new_tokens} new tokens, {budget.dtype} on "
        f"{budget.device}; {args.steps} steps x {args.rounds} rounds; load {load_before[0]:.2f}",
        flush=True,
    )
    try:
        for r in range(args.rounds):
            seeded = budget if args.same_seed else dataclasses.replace(budget, seed=budget.seed + r)
            sides = {
                "aipo": run_aipo,
                "trl": lambda b, d: run_trl(b, d, args.trl_python, args.trl_vllm),
            }
            for side, run in sides.items():
                result = run(seeded, work / f"round{r + 1}" / side)
                result["seed"] = seeded.seed
                result["load_after"] = os.getloadavg()[0]
                runs[side].append(result)
                steps = " ".join(f"{s:.1f}" for s in result["step_s"])
                print(
                    f"  round {r + 1} {side:4s}: {steps} s/step  (rollout "
                    f"{' '.join(f'{s:.1f}' for s in result['rollout_s'])}; completion tokens "
                    f"{result['completion_tokens']}; process {result['process_s']:.0f} s, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB)",
                    flush=True,
                )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = ratio_summary(
        [r["step_s"] for r in runs["aipo"]], [r["step_s"] for r in runs["trl"]], args.warmup
    )
    same = same_problems(runs)
    tokens = {
        side: sum(sum(run["completion_tokens"][args.warmup :]) for run in side_runs)
        for side, side_runs in runs.items()
    }
    summary["completion_tokens"] = tokens
    summary["peak_rss_mib"] = peak_rss_summary(runs)
    per_token = per_token_ratios(runs["aipo"], runs["trl"], args.warmup)
    summary["per_token_ratio_median"] = statistics.median(per_token) if per_token else None
    print(
        f"per-step ratio TRL/aipo: min {summary['ratio_min']:.2f}, median {summary['ratio_median']:.2f}, "
        f"max {summary['ratio_max']:.2f} over {summary['steps_compared']} steps (warm-up {args.warmup} left out); "
        f"geometric mean {summary['ratio_geomean']:.2f}, 95% CI "
        f"{summary['ratio_geomean_ci95'][0]:.2f} to {summary['ratio_geomean_ci95'][1]:.2f}\n"
        f"median s/step: aipo {summary['aipo_median_s']:.1f}, TRL {summary['trl_median_s']:.1f} "
        f"(ratio {summary['ratio_of_medians']:.2f}); completion tokens in those steps: "
        f"aipo {tokens['aipo']}, TRL {tokens['trl']}; same problems each step: {same}\n"
        f"seconds per completion token, TRL/aipo: median {_figure(summary['per_token_ratio_median'])}\n"
        f"peak RSS per run (median over rounds): aipo {summary['peak_rss_mib']['aipo']:.0f} MiB, "
        f"TRL {summary['peak_rss_mib']['trl']:.0f} MiB (ratio {summary['peak_rss_mib']['ratio']:.2f})"
    )
    stem = f"vs_trl.{args.tag}" if args.tag else "vs_trl"
    cfg = aipo_config(budget, "runs/vs_trl")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "budget": dataclasses.asdict(budget),
        "rounds": args.rounds,
        "round_seeds": [run["seed"] for run in runs["aipo"]],
        "warmup": args.warmup,
        "aipo_overrides": aipo_overrides(budget, "<run_dir>"),
        "trl_settings": trl_settings(cfg, "<output_dir>", args.trl_vllm),
        "trl_python": args.trl_python or sys.executable,
        "machine": machine() | {"load_before": load_before, "load_after": os.getloadavg()},
        "versions": versions(),
        "summary": summary,
        "same_problems": same,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(runs, summary, args.warmup, args.out / f"{stem}.png")
    print(f"wrote {args.out / f'{stem}.json'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
