"""The embedded trainer: AIPO on one machine (CPU or one GPU), policy and agents in-process.

One training step, as in the algorithm box:

1. take the next ``prompts_per_step`` problems (a seeded order, a pure function of the step);
2. roll each out ``n_samples`` times with consults (``RolloutDriver``), every trajectory
   appended to ``rollouts/step_XXXXXX.jsonl`` as it finishes;
3. score (the environment already did), shape and turn rewards into group advantages;
4. recompute the old log-probs, run PPO epochs of the AIPO loss over minibatches;
5. tell the generator its weights changed (cached prefixes are dropped);
6. log metrics, checkpoint every ``save_every`` steps.

The embedded generator serves the very module the optimizer updates, so there is no
weight copy; updates happen while generation is paused. With ``policy.backend:
sglang://...`` rollouts run on SGLang servers instead: the trainer keeps training its
local copy and after every update saves it to ``run_dir/weights/`` (safetensors,
renamed into place only once complete), has every server load it with
``/update_weights_from_disk`` and then flushes their prefix caches, so no rollout
reuses keys/values computed under old weights. ``--resume`` restores the weights,
optimizer, scheduler and RNG states of the last checkpoint and replays the step in
progress, reusing the trajectories it had already written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.pool import AgentPool
from aipo_env.rollout import RolloutConfig, RolloutDriver
from aipo_env.trajectory import Trajectory, collate
from policies.base import Generator
from policies.default_model import resolve_model_path
from tasks.base import Task
from trainers.advantages import compute_advantages, filter_uniform_groups, overlong_penalty
from trainers.checkpoint import load_latest, restore, save_checkpoint, should_save
from trainers.config import TrainConfig
from trainers.config_io import dump_config
from trainers.losses import AIPOLoss, trained_token_masks
from trainers.metrics import MetricsLogger, plot_curves
from trainers.optim import build_optimizer, build_scheduler
from trainers.update import UpdateBatch, compute_old_logprobs, ppo_update

logger = logging.getLogger(__name__)

#: Finish reasons of episodes that ran into a budget rather than ending on their own.
TRUNCATED_REASONS = ("length", "max_turns", "context_overflow")


class RunDirError(RuntimeError):
    """The run directory holds a run that this invocation would overwrite."""


@dataclass
class EvalResult:
    """Accuracy of the policy reasoning alone on the held-out problems."""

    problems: int
    accuracy: float
    reward_mean: float
    consult_attempt_rate: float
    truncation_rate: float
    response_tokens_mean: float


@dataclass
class TrainSummary:
    """What a run did, printed at the end and written to ``summary.json``."""

    run_dir: str
    steps: int
    eval_before: EvalResult | None
    eval_after: EvalResult | None
    train_reward_first: float
    train_reward_last: float
    consult_rate_mean: float
    policy_tokens_per_s: float
    wall_s: float
    checkpoint: str | None
    plot: str | None
    metrics: str
    skipped_updates: int = 0
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """A few lines for a terminal."""

        def ev(result: EvalResult | None) -> str:
            if result is None:
                return "not evaluated"
            return f"accuracy {result.accuracy:.3f}, reward {result.reward_mean:.3f} ({result.problems} problems)"

        lines = [
            f"AIPO run finished: {self.steps} steps in {self.wall_s:.0f} s ({self.run_dir})",
            f"  eval before : {ev(self.eval_before)}",
            f"  eval after  : {ev(self.eval_after)}",
            f"  train reward: {self.train_reward_first:.3f} (first step) -> {self.train_reward_last:.3f} (last step)",
            f"  consult rate: {self.consult_rate_mean:.3f} of training episodes consulted at least once",
            f"  throughput  : {self.policy_tokens_per_s:.1f} policy tokens/s during rollouts",
            f"  metrics     : {self.metrics}",
            f"  plot        : {self.plot or 'not written'}",
            f"  checkpoint  : {self.checkpoint or 'none'}",
        ]
        if self.skipped_updates:
            lines.append(
                f"  skipped     : {self.skipped_updates} optimizer steps had a non-finite loss or gradient"
            )
        lines.extend(f"  note        : {n}" for n in self.notes)
        return "\n".join(lines)


def problem_order(step: int, per_step: int, n_problems: int, seed: int) -> list[int]:
    """The problem indices of ``step``: epochs of seeded permutations, a pure function of the step.

    Being pure, it needs no sampler state in checkpoints: a resumed run draws exactly
    the problems an uninterrupted one would.
    """
    if n_problems < 1:
        raise ValueError("the task has no problems")
    out = []
    for j in range(per_step):
        epoch, pos = divmod(step * per_step + j, n_problems)
        perm = np.random.default_rng([seed, epoch]).permutation(n_problems)
        out.append(int(perm[pos]))
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Reward, accuracy, consulting and ending statistics of a batch of trajectories."""
    n = len(trajectories)
    metrics: dict[str, float] = {
        "reward_mean": _mean([t.reward for t in trajectories]),
        "accuracy": _mean([float(bool(t.verifier and t.verifier.correct)) for t in trajectories]),
        "consult_rate": _mean([float(t.consults > 0) for t in trajectories]),
        "consults_per_episode": _mean([float(t.consults) for t in trajectories]),
        "consult_errors_per_episode": _mean([float(t.consult_errors) for t in trajectories]),
        "response_tokens_mean": _mean(
            [float(len(t.token_ids) - t.prompt_len) for t in trajectories]
        ),
        "policy_tokens_mean": _mean([float(t.policy_token_count()) for t in trajectories]),
        "drift_rate": _mean([float(t.tokenization_drift) for t in trajectories]),
    }
    allowed = [t for t in trajectories if t.allow_consult]
    if allowed:
        metrics["consult_rate_allowed"] = _mean([float(t.consults > 0) for t in allowed])
        metrics["accuracy_allowed"] = _mean(
            [float(bool(t.verifier and t.verifier.correct)) for t in allowed]
        )
    alone = [t for t in trajectories if not t.allow_consult]
    if alone:
        metrics["accuracy_alone"] = _mean(
            [float(bool(t.verifier and t.verifier.correct)) for t in alone]
        )
    reasons: dict[str, int] = {}
    for t in trajectories:
        key = t.finish_reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    for key, count in reasons.items():
        metrics[f"finish_{key}"] = count / n
    return metrics


class EmbeddedTrainer:
    """Trains a policy with AIPO on one machine. Build it from a :class:`TrainConfig`, call :meth:`run`."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.resume = resume
        self.progress = progress
        self.run_dir = Path(config.run_dir)

    # -- set-up ---------------------------------------------------------------

    def _check_run_dir(self) -> None:
        existing = [
            p for p in ("metrics.jsonl", "checkpoints", "rollouts") if (self.run_dir / p).exists()
        ]
        if existing and not self.resume:
            raise RunDirError(
                f"run_dir {str(self.run_dir)!r} already holds a run ({', '.join(existing)}); "
                "pass --resume to continue it, or choose another run_dir"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _load_policy(self) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoTokenizer

        from policies.loading import load_causal_lm

        cfg = self.config.policy
        path = resolve_model_path(cfg.model)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = load_causal_lm(path, dtype=getattr(torch, cfg.dtype)).to(device)
        return model, tokenizer

    def _make_tasks(self) -> tuple[Task, Task | None]:
        from tasks.registry import make_task

        cfg = self.config.task
        task = make_task(cfg.name, **cfg.kwargs)
        eval_task = (
            make_task(cfg.name, **{**cfg.kwargs, **cfg.eval_kwargs}) if cfg.eval_size else None
        )
        return task, eval_task

    # -- evaluation -------------------------------------------------------------

    async def evaluate(self, generator, eval_task: Task, tag: str) -> EvalResult:
        """Greedy, independent-mode accuracy (no agents, no consult instructions)."""
        n = min(self.config.task.eval_size, len(eval_task))
        env_config = self.config.env.model_copy(update={"mode": "independent"})
        driver = RolloutDriver(
            generator,
            task=eval_task,
            agents=None,
            env_config=env_config,
            config=RolloutConfig(
                n_samples=1,
                temperature=0.0,
                max_new_tokens=self.config.rollout.max_new_tokens,
                concurrency=self.config.rollout.concurrency,
            ),
        )
        out = self.run_dir / "eval" / f"{tag}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        trajectories = await driver.run(
            list(range(n)), output=out, resume=True, show_progress=self.progress
        )
        result = EvalResult(
            problems=n,
            accuracy=_mean([float(bool(t.verifier and t.verifier.correct)) for t in trajectories]),
            reward_mean=_mean([t.reward for t in trajectories]),
            consult_attempt_rate=_mean([float(t.consult_attempts > 0) for t in trajectories]),
            truncation_rate=_mean(
                [float(t.finish_reason in TRUNCATED_REASONS) for t in trajectories]
            ),
            response_tokens_mean=_mean(
                [float(len(t.token_ids) - t.prompt_len) for t in trajectories]
            ),
        )
        (self.run_dir / "eval" / f"{tag}.json").write_text(json.dumps(asdict(result), indent=2))
        return result

    def _saved_eval(self, tag: str) -> EvalResult | None:
        path = self.run_dir / "eval" / f"{tag}.json"
        return EvalResult(**json.loads(path.read_text())) if path.is_file() else None

    # -- one update ---------------------------------------------------------------

    def _advantages(
        self, trajectories: list[Trajectory]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        cfg = self.config.train
        rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
        metrics: dict[str, float] = {}
        if cfg.overlong_buffer:
            # DAPO measures the response against the longest it could have been: the
            # context left after the prompt (policy, agent and env tokens all count).
            penalty = torch.cat(
                [
                    overlong_penalty(
                        [len(t.token_ids) - t.prompt_len],
                        budget,
                        min(cfg.overlong_buffer, budget),
                        cfg.overlong_factor,
                    )
                    for t in trajectories
                    for budget in [max(1, self.config.env.max_total_tokens - t.prompt_len)]
                ]
            )
            rewards = rewards + penalty
            metrics["overlong_penalty_mean"] = float(penalty.mean())
        group_ids = [t.group_id for t in trajectories]
        advantages = compute_advantages(rewards, group_ids, cfg.advantage)
        keep = torch.ones(len(trajectories), dtype=torch.bool)
        if cfg.dynamic_sampling:
            kept = filter_uniform_groups(rewards, group_ids)
            keep &= kept.keep_mask
            metrics["groups_dropped"] = float(kept.n_groups_dropped)
        for i, t in enumerate(trajectories):
            if t.finish_reason.startswith("error:"):
                keep[i] = False  # an episode that failed has no honest reward to learn from
            elif cfg.mask_truncated and t.finish_reason in TRUNCATED_REASONS:
                keep[i] = False
        metrics["trained_trajectories"] = float(keep.sum())
        return advantages, keep, metrics

    def _update(
        self,
        model,
        optimizer,
        scheduler,
        loss_fn,
        ref_model,
        trajectories,
        advantages,
        keep,
        tokenizer,
        step,
    ):
        cfg = self.config
        batch = collate(
            trajectories,
            tokenizer.pad_token_id,
            agent_names=cfg.env.agent_names,
            train_agent_tokens=cfg.loss.agent_mode != "mask",
        )
        rows = keep.nonzero(as_tuple=True)[0]
        device = next(model.parameters()).device
        batch = batch.to(device)
        old = compute_old_logprobs(model, batch, cfg.train.micro_batch_size)
        ref = (
            compute_old_logprobs(ref_model, batch, cfg.train.micro_batch_size)
            if ref_model is not None
            else None
        )
        advantages = advantages.to(device)
        # Train exactly the tokens the loss counts, so that micro-batch weights in
        # ppo_update (shares of loss_mask) match the loss's own normaliser.
        policy, agent = trained_token_masks(cfg.loss, batch.loss_mask, batch.agent_mask, advantages)
        batch.loss_mask = (policy | agent).to(batch.loss_mask.dtype)
        update = UpdateBatch.from_trajectory_batch(batch, advantages, old, ref).select(
            rows.to(device)
        )
        if update.trained_tokens() == 0:
            return None
        return ppo_update(
            model,
            optimizer,
            scheduler,
            update,
            loss_fn,
            ppo_epochs=cfg.train.ppo_epochs,
            minibatch_size=cfg.train.minibatch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            max_grad_norm=cfg.optim.max_grad_norm,
            seed=cfg.seed * 1_000_003 + step,
            accumulation="tokens" if cfg.loss.aggregation == "token_mean" else "rows",
            with_entropy=cfg.loss.entropy_coef > 0,
            dump_dir=self.run_dir / "nonfinite",
            update_index=step,
        )

    # -- the policy's generator -------------------------------------------------------

    def _make_generator(self, model: torch.nn.Module, tokenizer: Any) -> Generator:
        """The embedded generator on ``model`` itself, or the SGLang client of ``policy.backend``."""
        cfg = self.config.policy
        if cfg.backend == "embedded":
            from policies.transformers_generator import TransformersGenerator

            return TransformersGenerator.from_model(
                model,
                tokenizer,
                max_batch_size=cfg.max_batch_size,
                max_context=cfg.max_context,
                seed=self.config.seed,
            )
        from policies import make_generator

        options = {"max_context": cfg.max_context, **cfg.sglang_options}
        # The policy's own tokenizer: the servers serve policy.model, so the ids agree.
        return make_generator(cfg.backend, tokenizer=tokenizer, **options)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _generation_paused(generator: Generator) -> AsyncIterator[None]:
        """Hold the embedded generator's decode loop while its module's weights change."""
        paused = getattr(generator, "paused", None)
        if paused is None:  # remote servers keep their own copy; nothing to hold
            yield
            return
        async with paused():
            yield

    async def _weights_changed(
        self, generator: Generator, model: torch.nn.Module, version: int
    ) -> None:
        """Make the generator serve ``model``'s current weights as ``version``."""
        if self.config.policy.backend == "embedded":
            generator.weights_updated(version)  # type: ignore[attr-defined]
            return
        await self._publish_weights(generator, model, version)

    async def _publish_weights(
        self, generator: Generator, model: torch.nn.Module, version: int
    ) -> Path:
        """Save the weights to ``run_dir/weights/step_<version>``, load them on every server, flush caches.

        The directory is written under a temporary name and renamed once complete, so a
        server never reads a half-written file; older versions are removed after every
        server has loaded the new one.
        """
        root = self.run_dir / "weights"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{version:06d}"
        final = root / name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # An absolute path: the servers' working directory is not ours.
        await generator.update_weights_from_disk(str(final.resolve()), version)  # type: ignore[attr-defined]
        # The servers' radix caches hold keys/values of the old weights; drop them.
        await generator.flush_cache()  # type: ignore[attr-defined]
        for old in root.iterdir():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    # -- the run --------------------------------------------------------------------

    def run(self) -> TrainSummary:
        """Train to ``train.steps``; returns (and writes) the summary."""
        return asyncio.run(self.arun())

    async def arun(self) -> TrainSummary:
        """The asynchronous body of :meth:`run`."""
        cfg = self.config
        started = time.perf_counter()
        self._check_run_dir()
        dump_config(cfg, self.run_dir / "config.yaml")
        _seed_everything(cfg.seed)
        task, eval_task = self._make_tasks()
        model, tokenizer = self._load_policy()
        ref_model = None
        if cfg.loss.kl_coef > 0:
            ref_model, _ = self._load_policy()
            ref_model.requires_grad_(False).eval()
        optim_cfg = (
            cfg.optim
            if cfg.optim.total_steps is not None
            else cfg.optim.model_copy(
                update={
                    "total_steps": cfg.train.steps
                    * cfg.train.ppo_epochs
                    * max(
                        1,
                        math.ceil(
                            cfg.train.prompts_per_step
                            * cfg.rollout.n_samples
                            / cfg.train.minibatch_size
                        ),
                    )
                }
            )
        )
        optimizer = build_optimizer(model, optim_cfg)
        scheduler = build_scheduler(optimizer, optim_cfg)
        loss_fn = AIPOLoss(cfg.loss)

        start_step = 0
        state = load_latest(self.run_dir) if self.resume else None
        if state is not None:
            position = restore(state, model=model, optimizer=optimizer, scheduler=scheduler)
            start_step = int(position.get("step", state.step))
            logger.info("resuming %s from step %d", self.run_dir, start_step)

        generator = self._make_generator(model, tokenizer)
        try:
            # Servers start from policy.model; a resumed run (or any run) must roll out
            # with the trainer's weights, so they are published before the first step.
            await self._weights_changed(generator, model, start_step)
            agents = AgentPool.from_config(
                cfg.agents, policy_generator=generator, policy_tokenizer=tokenizer, task=task
            )
        except BaseException:
            await generator.aclose()
            raise
        rollout_cfg = (
            cfg.rollout
            if cfg.rollout.seed is not None
            else cfg.rollout.model_copy(update={"seed": cfg.seed})
        )
        env_config = cfg.env.model_copy(
            update={"train_agent_tokens": cfg.loss.agent_mode != "mask"}
        )
        driver = RolloutDriver(
            generator, task=task, agents=agents, env_config=env_config, config=rollout_cfg
        )
        metrics_log = MetricsLogger(
            self.run_dir,
            total_steps=cfg.train.steps,
            resume_step=start_step if self.resume else None,
            progress=self.progress,
        )
        notes: list[str] = []
        checkpoint: Path | None = None
        skipped = 0
        try:
            eval_before = None
            if eval_task is not None:
                eval_before = self._saved_eval("before") or await self.evaluate(
                    generator, eval_task, "before"
                )
            (self.run_dir / "rollouts").mkdir(exist_ok=True)
            for step in range(start_step, cfg.train.steps):
                t0 = time.perf_counter()
                driver.env_config = env_config.model_copy(update={"policy_version": step})
                problems = problem_order(step, cfg.train.prompts_per_step, len(task), cfg.seed)
                trajectories = await driver.run(
                    problems,
                    step=step,
                    output=self.run_dir / "rollouts" / f"step_{step:06d}.jsonl",
                    resume=True,
                )
                rollout_s = time.perf_counter() - t0
                metrics = rollout_metrics(trajectories)
                policy_tokens = sum(t.policy_token_count() for t in trajectories)
                metrics["policy_tokens_per_s"] = policy_tokens / max(rollout_s, 1e-9)
                metrics["rollout_s"] = rollout_s
                advantages, keep, adv_metrics = self._advantages(trajectories)
                metrics.update(adv_metrics)
                t1 = time.perf_counter()
                async with self._generation_paused(generator):
                    stats = self._update(
                        model,
                        optimizer,
                        scheduler,
                        loss_fn,
                        ref_model,
                        trajectories,
                        advantages,
                        keep,
                        tokenizer,
                        step,
                    )
                    if cfg.policy.backend == "embedded" or (
                        stats is not None and stats.optimizer_steps > 0
                    ):
                        await self._weights_changed(generator, model, step + 1)
                metrics["update_s"] = time.perf_counter() - t1
                if stats is not None:
                    metrics.update(stats.as_dict("update/"))
                    skipped += stats.skipped_steps
                else:
                    metrics["update/optimizer_steps"] = 0.0
                metrics_log.log(step + 1, metrics)
                done = step + 1
                if should_save(done, cfg.train.save_every) or done == cfg.train.steps:
                    checkpoint = save_checkpoint(
                        self.run_dir,
                        done,
                        model=model,
                        tokenizer=tokenizer,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        data_position={"step": done},
                        config=cfg,
                        keep_last=cfg.train.keep_last,
                    )
            eval_after = (
                await self.evaluate(generator, eval_task, "after")
                if eval_task is not None
                else None
            )
        finally:
            metrics_log.close()
            await agents.aclose()
            await generator.aclose()
            task.close()
            if eval_task is not None:
                eval_task.close()

        from trainers.metrics import read_metrics

        records = read_metrics(self.run_dir / "metrics.jsonl")
        plot = None
        if cfg.train.plot and records:
            plot = str(plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png"))
        if checkpoint is None:
            latest = load_latest(self.run_dir)
            checkpoint = latest.path if latest else None
        summary = TrainSummary(
            run_dir=str(self.run_dir),
            steps=cfg.train.steps,
            eval_before=eval_before,
            eval_after=eval_after,
            train_reward_first=records[0].get("reward_mean", float("nan"))
            if records
            else float("nan"),
            train_reward_last=records[-1].get("reward_mean", float("nan"))
            if records
            else float("nan"),
            consult_rate_mean=_mean(
                [r["consult_rate"] for r in records if r.get("consult_rate") is not None]
            ),
            policy_tokens_per_s=_mean(
                [r["policy_tokens_per_s"] for r in records if r.get("policy_tokens_per_s")]
            ),
            wall_s=time.perf_counter() - started,
            checkpoint=str(checkpoint) if checkpoint else None,
            plot=plot,
            metrics=str(self.run_dir / "metrics.jsonl"),
            skipped_updates=skipped,
            notes=notes,
        )
        (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
        return summary
