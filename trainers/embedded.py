"""The embedded trainer: AIPO on one machine (CPU or one GPU), policy and agents in-process.

One training step, as in the algorithm box (:meth:`EmbeddedTrainer.arun`):

1. **rollout**: take the next ``prompts_per_step`` problems (a seeded order, a pure
   function of the step) and roll each out ``n_samples`` times with consults
   (``RolloutDriver``; under ``rollout.strategy: arpo`` as ARPO's rollout tree of
   ``n_samples`` leaves), every trajectory appended to ``rollouts/step_XXXXXX.jsonl`` as it
   finishes;
2. **advantages**: the environment already scored them; shape the rewards and turn
   them into group advantages (per token over a tree under ``arpo``,
   :mod:`trainers.tree_advantages`), choosing the rows to train;
3. **update**: recompute the old log-probs, run PPO epochs of the AIPO loss over
   minibatches, while generation is paused;
4. **publish weights**: make the generator serve the new weights
   (:mod:`trainers.weights`);
5. **log and save**: one line of ``metrics.jsonl``, a checkpoint every ``save_every``
   steps.

The run stops early, saying what it saved, when a step's failures pass
``train.max_error_rate`` or ``train.max_agent_error_rate`` (:class:`BackendFailure`:
a broken backend must not look like a finished run) or on SIGINT/SIGTERM
(:class:`TrainingInterrupted`: the step's rollout is abandoned, an update in progress
finished, and the last completed step checkpointed if it was not yet).

The run's objects (model, optimizer, generator, agents, ...) are built by
:func:`trainers.run_state.open_run`; held-out accuracy before and after training comes
from :func:`aipo_env.evaluation.runner.evaluate_alone`; the end-of-run report is
:mod:`trainers.summary`. ``--resume`` restores the weights, optimizer, scheduler and
RNG states of the last checkpoint and replays the step in progress, reusing the
trajectories it had already written.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from aipo_env.batch import collate
from aipo_env.evaluation.alone import evaluate_alone
from aipo_env.masks import trained_token_masks
from aipo_env.strategies import STRATEGIES
from aipo_env.trajectory import Trajectory
from aipo_env.tree_rollout import generation_metrics
from trainers import heap
from trainers.advantages import (
    baseline_group_ids,
    compute_advantages,
    filter_uniform_groups,
    overlong_penalty,
)
from trainers.checkpoint import capture_rng_state, save_checkpoint, should_save
from trainers.config import TrainConfig
from trainers.run_state import RunDirError, RunState, open_run
from trainers.stopping import (
    BackendFailure,
    StopRequest,
    TrainingInterrupted,
    TrainingStopped,
    backend_failure,
    failure_reason,
    interrupted,
)
from trainers.summary import (
    TRUNCATED_REASONS,
    EvalResult,
    TrainSummary,
    rollout_metrics,
    summarize,
)
from trainers.tree_advantages import tree_token_advantages
from trainers.update import (
    UpdateBatch,
    UpdateStats,
    compute_old_logprobs,
    on_policy_update,
    ppo_update,
    zero_gradient_rows,
)
from trainers.warmup import run_warmup
from trainers.weights import generation_paused, publish_weights

if TYPE_CHECKING:
    from aipo_env.batch import TrajectoryBatch

__all__ = [
    "TRUNCATED_REASONS",
    "BackendFailure",
    "EmbeddedTrainer",
    "EvalResult",
    "RunDirError",
    "TrainSummary",
    "TrainingInterrupted",
    "TrainingStopped",
    "problem_order",
    "rollout_metrics",
    "shaped_advantages",
]


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


# -- 1. rollout -----------------------------------------------------------------------


async def rollout(run: RunState, step: int) -> tuple[list[Trajectory], dict[str, float]]:
    """Roll out this step's problems under weights version ``step``; the trajectories and their metrics."""
    cfg = run.config
    t0 = time.perf_counter()
    run.driver.env_config = run.env_config.model_copy(update={"policy_version": step})
    problems = problem_order(step, cfg.train.prompts_per_step, len(run.task), cfg.seed)
    trajectories = await run.driver.run(
        problems,
        step=step,
        output=run.run_dir / "rollouts" / f"step_{step:06d}.jsonl",
        resume=True,
    )
    rollout_s = time.perf_counter() - t0
    metrics = rollout_metrics(trajectories)
    metrics.update(generation_metrics(trajectories))
    if run.driver.last_strategy is not None:  # what the strategy decided (arpo: its trees)
        metrics.update(run.driver.last_strategy.metrics())
    policy_tokens = sum(t.policy_token_count() for t in trajectories)
    metrics["policy_tokens_per_s"] = policy_tokens / max(rollout_s, 1e-9)
    metrics["rollout_s"] = rollout_s
    return trajectories, metrics


# -- 2. advantages --------------------------------------------------------------------


def shaped_advantages(
    trajectories: list[Trajectory], config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Group advantages of the shaped rewards, the rows to train, and the shaping's metrics.

    Rewards get DAPO's overlong penalty when ``train.overlong_buffer`` is set. Baselines
    are per prompt, or per prompt and consulted-or-not (``train.advantage_groups``). Rows are
    dropped when their group's rewards are all equal (``train.dynamic_sampling``), when
    the episode failed, and when it was truncated (``train.mask_truncated``). Under
    ``rollout.strategy: arpo`` the advantages are per token ``[B, T]``, attributed over
    each group's tree by ``rollout.attribution``; else one per trajectory ``[B]``.
    """
    cfg = config.train
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
                for budget in [max(1, config.env.max_total_tokens - t.prompt_len)]
            ]
        )
        rewards = rewards + penalty
        metrics["overlong_penalty_mean"] = float(penalty.mean())
    # Each prompt's samples, or (prompt_and_consult) its consulting and its solo samples
    # apart; there a sample alone in its subgroup gets advantage 0.
    group_ids = baseline_group_ids(
        [t.group_id for t in trajectories],
        [t.consults > 0 for t in trajectories],
        cfg.advantage_groups,
    )
    lone = "raise" if cfg.advantage_groups == "prompt" else "zero"
    advantages = compute_advantages(rewards, group_ids, cfg.advantage, lone_groups=lone)
    if STRATEGIES[config.rollout.strategy].trees:  # a group is one tree: per token [B, T]
        advantages = tree_token_advantages(trajectories, advantages, config.rollout.attribution)
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


# -- 3. update ------------------------------------------------------------------------


def loss_masked_batch(
    run: RunState, trajectories: list[Trajectory], advantages: torch.Tensor
) -> tuple[TrajectoryBatch, torch.Tensor]:
    """The padded batch on the model's device whose ``loss_mask`` marks exactly the trained tokens.

    Returns the batch and ``advantages`` on the same device. Training exactly the
    tokens the loss counts keeps the micro-batch weights of ``ppo_update`` (shares of
    ``loss_mask``) equal to the loss's own normaliser.
    """
    batch = collate(
        trajectories,
        run.tokenizer.pad_token_id,
        agent_names=run.config.env.agent_names,
        rule=run.mask_rule,
    )
    device = next(run.model.parameters()).device
    batch = batch.to(device)
    advantages = advantages.to(device)
    policy, agent = trained_token_masks(
        run.mask_rule, batch.loss_mask, batch.agent_mask, advantages
    )
    batch.loss_mask = (policy | agent).to(batch.loss_mask.dtype)
    return batch, advantages


def update_options(config: TrainConfig) -> dict[str, object]:
    """The keyword arguments of :func:`trainers.update.ppo_update` that ``config`` sets."""
    cfg = config.train
    return dict(
        ppo_epochs=cfg.ppo_epochs,
        minibatch_size=cfg.minibatch_size,
        micro_batch_size=cfg.micro_batch_size,
        max_grad_norm=config.optim.max_grad_norm,
        accumulation="tokens" if config.loss.aggregation == "token_mean" else "rows",
        with_entropy=config.loss.entropy_coef > 0,
        chunk_size=cfg.logprob_chunk,
        share_prefix=cfg.share_prefix,
        pack=cfg.pack_rows,
        checkpoint_layers=cfg.checkpoint_layers,
    )


def update_policy(
    run: RunState,
    trajectories: list[Trajectory],
    advantages: torch.Tensor,
    keep: torch.Tensor,
    step: int,
) -> UpdateStats | None:
    """PPO epochs of the AIPO loss over the kept rows; None when no token is trained.

    Old (and reference) log-probs are computed for the kept rows only, and not for rows
    whose gradient is zero (:func:`trainers.update.zero_gradient_rows`), which the update
    leaves out of its forward; a batch of such rows only is not run at all.
    """
    cfg = run.config
    batch, advantages = loss_masked_batch(run, trajectories, advantages)
    rows = keep.nonzero(as_tuple=True)[0].to(advantages.device)
    update = UpdateBatch.from_trajectory_batch(batch, advantages, None).select(rows)
    if update.trained_tokens() == 0:
        return None
    micro, chunk = cfg.train.micro_batch_size, cfg.train.logprob_chunk
    # One optimizer step on the batch: the update's own forward gives the old log-probs.
    if not on_policy_update(run.model, len(rows), cfg.train.ppo_epochs, cfg.train.minibatch_size):
        zero = zero_gradient_rows(run.loss_fn, update)
        live = torch.arange(len(update), device=advantages.device)
        if zero is not None:
            live = (~zero).nonzero(as_tuple=True)[0]
        old = torch.zeros(update.input_ids.shape, device=advantages.device)
        if live.numel():  # zero-gradient rows are never read
            old[live] = compute_old_logprobs(
                run.model, update.select(live), micro, chunk_size=chunk
            )
        update.old_logprobs = old
    if run.ref_model is not None:
        update.ref_logprobs = compute_old_logprobs(run.ref_model, update, micro, chunk_size=chunk)
    return ppo_update(
        run.model,
        run.optimizer,
        run.scheduler,
        update,
        run.loss_fn,
        seed=cfg.seed * 1_000_003 + step,
        dump_dir=run.run_dir / "nonfinite",
        update_index=step,
        **update_options(cfg),  # type: ignore[arg-type]
    )


def update_metrics(run: RunState, stats: UpdateStats | None) -> dict[str, float]:
    """The update's metrics under ``update/``; counts its skipped optimizer steps in ``run``."""
    if stats is None:
        return {"update/optimizer_steps": 0.0}
    run.skipped_updates += stats.skipped_steps
    return stats.as_dict("update/")


# -- 4. publish weights ---------------------------------------------------------------


async def publish(run: RunState, version: int, stats: UpdateStats | None) -> None:
    """Make the generator serve the updated weights as ``version`` (:mod:`trainers.weights`).

    The embedded generator is told on every step (it drops its cached prefixes);
    servers reload only when an optimizer step changed the weights.
    """
    moved = stats is not None and stats.optimizer_steps > 0
    if run.config.policy.backend == "embedded" or moved:
        await publish_weights(
            run.generator,
            run.model,
            version,
            backend=run.config.policy.backend,
            run_dir=run.run_dir,
        )


# -- 5. log and save ------------------------------------------------------------------


def log_and_save(run: RunState, done: int, metrics: dict[str, float]) -> None:
    """Log the metrics of ``done`` completed steps; checkpoint when due (and after the last)."""
    cfg = run.config
    run.metrics_log.log(done, metrics)
    run.completed_step = done
    # Kept for a checkpoint saved later, on a stop: the states a save now would record.
    run.rng_state = capture_rng_state()
    if should_save(done, cfg.train.save_every) or done == cfg.train.steps:
        save(run)


def save(run: RunState) -> Path:
    """Checkpoint the last completed step with the RNG states it ended with; its directory."""
    cfg = run.config
    run.checkpoint = save_checkpoint(
        run.run_dir,
        run.completed_step,
        model=run.model,
        tokenizer=run.tokenizer,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        data_position={"step": run.completed_step},
        config=cfg,
        keep_last=cfg.train.keep_last,
        rng_state=run.rng_state,
    )
    run.saved_step, run.saved_path = run.completed_step, run.checkpoint
    return run.checkpoint


def save_if_pending(run: RunState) -> bool:
    """On an early stop: checkpoint the last completed step unless it is on disk; whether it saved."""
    if run.completed_step == 0 or run.saved_step == run.completed_step:
        return False
    save(run)
    return True


# -- held-out evaluation --------------------------------------------------------------


async def evaluate(run: RunState, tag: str, *, reuse: bool = False) -> EvalResult | None:
    """Greedy accuracy of the policy alone on the held-out task; None without one.

    Independent mode: no agents, no consult instructions. The samples go to
    ``eval/<tag>.jsonl``, the result to ``eval/<tag>.json``; with ``reuse`` a result
    already there (written before a resumed run was interrupted) is returned instead.
    """
    if run.eval_task is None:
        return None
    saved = run.run_dir / "eval" / f"{tag}.json"
    if reuse and (result := EvalResult.read(saved)) is not None:
        return result
    n = min(run.config.task.eval_size, len(run.eval_task))
    trajectories = await evaluate_alone(
        run.generator,
        run.eval_task,
        problems=range(n),
        output=run.run_dir / "eval" / f"{tag}.jsonl",
        env_config=run.config.env,
        max_new_tokens=run.config.rollout.max_new_tokens,
        concurrency=run.config.rollout.concurrency,
        progress=run.progress,
    )
    result = EvalResult.from_trajectories(trajectories, problems=n)
    result.write(saved)
    return result


# -- the run --------------------------------------------------------------------------


class EmbeddedTrainer:
    """Trains a policy with AIPO on one machine. Build it from a :class:`TrainConfig`, call :meth:`run`."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.resume = resume
        self.progress = progress

    def run(self) -> TrainSummary:
        """Train to ``train.steps``; returns (and writes) the summary."""
        return asyncio.run(self.arun())

    async def arun(self) -> TrainSummary:
        """The training loop: rollout -> advantages -> update -> publish weights -> log and save.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM stopped it (the message says what is saved).
            BackendFailure: a backend is down, or a step's failures passed their threshold.
        """
        cfg = self.config
        started = time.perf_counter()
        if cfg.train.map_large_tensors:  # before the model loads (trainers/heap.py)
            heap.map_large_allocations()
        stop = StopRequest()
        stop.install()
        try:
            async with open_run(cfg, resume=self.resume, progress=self.progress) as run:
                summary_inputs = await self._train(run, stop)
        finally:
            stop.uninstall()
        eval_before, eval_after = summary_inputs
        return summarize(
            run.run_dir,
            steps=cfg.train.steps,
            eval_before=eval_before,
            eval_after=eval_after,
            checkpoint=run.checkpoint,
            skipped_updates=run.skipped_updates,
            plot=cfg.train.plot,
            started=started,
        )

    async def _train(
        self, run: RunState, stop: StopRequest
    ) -> tuple[EvalResult | None, EvalResult | None]:
        """Every step from ``run.start_step``, between the held-out evaluations before and after."""
        cfg = self.config
        eval_before = await stop.abandonable(evaluate(run, "before", reuse=True))
        if cfg.warmup.enabled and run.start_step == 0 and not stop.requested:
            # A checkpoint holds the warmed-up weights; without one the warm-up runs again.
            warmed = await stop.abandonable(run_warmup(run, resume=self.resume))
            if warmed is None:
                raise interrupted(run, stop, None, saved_now=False)
            await stop.abandonable(evaluate(run, "warmup"))
        (run.run_dir / "rollouts").mkdir(exist_ok=True)
        for step in range(run.start_step, cfg.train.steps):
            if stop.requested:
                break
            rolled = await stop.abandonable(rollout(run, step))
            if rolled is None:
                raise interrupted(run, stop, step, saved_now=save_if_pending(run))
            trajectories, metrics = rolled
            reason = failure_reason(trajectories, metrics, cfg.train)
            if reason is not None:
                raise backend_failure(run, step, reason, saved_now=save_if_pending(run))
            advantages, keep, shaping = shaped_advantages(trajectories, cfg)
            metrics.update(shaping)
            t0 = time.perf_counter()
            async with generation_paused(run.generator):  # a signal waits for the update
                stats = update_policy(run, trajectories, advantages, keep, step)
                await publish(run, step + 1, stats)
            metrics["update_s"] = time.perf_counter() - t0
            metrics.update(update_metrics(run, stats))
            every = cfg.train.eval_every
            if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps:
                held_out = await stop.abandonable(evaluate(run, f"step{step + 1}", reuse=True))
                if held_out is not None:
                    metrics["eval/accuracy"] = held_out.accuracy
            log_and_save(run, step + 1, metrics)
        if stop.requested:
            raise interrupted(run, stop, None, saved_now=save_if_pending(run))
        eval_after = await stop.abandonable(evaluate(run, "after"))
        if stop.requested:
            raise interrupted(run, stop, None, saved_now=save_if_pending(run))
        return eval_before, eval_after
