"""Everything an embedded training run holds, built in one fixed order and closed in reverse.

:func:`open_run` is the set-up half of the training script: check the run directory,
write ``config.yaml``, seed, make the training and held-out tasks (refusing a held-out
set that overlaps training, :mod:`trainers.held_out`; the report in ``held_out.json``),
load the policy (and the frozen reference model when the loss has a KL term), build the
optimizer, scheduler and loss, restore the last checkpoint on ``--resume``, start the
generator and publish the weights to it, start the agents (their replies seeded from
the run's seed) and probe every remote backend (:func:`trainers.stopping.check_backends`),
then the rollout driver and the metrics logger (a caller that plays its own episodes,
ILR's peers, gets no agents and no driver). The order is part of the contract: every
seeded operation happens in it, so a fixed-seed run is repeatable and a resumed run draws
what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.base import ConsultService
from agents.pool import AgentPool
from aipo_env.config import EnvConfig
from aipo_env.masks import MaskRule
from aipo_env.rollout import RolloutConfig, RolloutDriver
from policies.base import Generator
from tasks.base import Task
from tasks.splits import Overlap
from trainers.checkpoint import restore_latest
from trainers.config import PolicySection, TrainConfig, write_config
from trainers.held_out import HELD_OUT_FILE, make_tasks
from trainers.losses import AIPOLoss
from trainers.metrics import MetricsLogger
from trainers.optim import OptimConfig, build_optimizer, build_scheduler
from trainers.peer_config import STATE
from trainers.stopping import check_backends
from trainers.tool_config import make_tool_service
from trainers.weights import publish_weights

logger = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The run directory holds a run that this invocation would overwrite."""


@dataclass
class RunState:
    """The objects one training run works with, from :func:`open_run`."""

    config: TrainConfig
    run_dir: Path
    progress: bool  #: show progress bars (rollouts, evaluation, steps)
    task: Task  #: the training problems
    eval_task: Task | None  #: the held-out problems; None when ``task.eval_size`` is 0
    model: torch.nn.Module  #: the policy being trained
    tokenizer: Any  #: the policy's tokenizer (with a pad token)
    ref_model: torch.nn.Module | None  #: frozen reference for the KL term; None without one
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: AIPOLoss
    generator: Generator  #: the policy's generator (embedded on ``model``, or SGLang)
    #: None under a tool protocol (the driver calls the tool set) and without rollouts
    agents: AgentPool | None
    env_config: EnvConfig  #: the environment settings of training rollouts
    mask_rule: MaskRule  #: which tokens the loss trains (aipo_env/masks.py)
    driver: RolloutDriver | None  #: None when the caller plays the episodes (``rollouts=False``)
    metrics_log: MetricsLogger
    start_step: int  #: the first step to run (the checkpoint's step on resume, else 0)
    checkpoint: Path | None = None  #: the last checkpoint this invocation saved
    skipped_updates: int = 0  #: optimizer steps skipped for a non-finite loss or gradient
    completed_step: int = 0  #: steps whose update is applied and logged
    saved_step: int | None = None  #: the step of the newest checkpoint on disk, if any
    saved_path: Path | None = None  #: that checkpoint's directory
    rng_state: dict[str, Any] | None = None  #: RNG states at the end of ``completed_step``
    overlap: Overlap | None = None  #: held-out against training (trainers/held_out.py)


def run_contents(run_dir: Path) -> list[str]:
    """What of a run ``run_dir`` holds: a logged step, a checkpoint or a trajectory.

    Empty files and folders do not count, so a start that failed before its first step
    (a backend that is down, a model that does not load) never blocks a rerun.
    """
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    for name in ("checkpoints", "rollouts"):
        folder = run_dir / name
        if folder.is_dir() and any(p.is_dir() or p.stat().st_size > 0 for p in folder.iterdir()):
            found.append(name)
    return found


def _foreign_entries(run_dir: Path) -> list[str]:
    """The entries of a directory that holds no run, unless a run's start left them.

    A start writes ``config.yaml`` before anything else, so a folder with that file is a
    run's, however early it failed; any other non-empty folder (``/etc``, a home
    directory, a project) is someone else's.
    """
    entries = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".write-check-"))
    if not entries or (run_dir / "config.yaml").is_file():
        return []
    return entries


def _shown(run_dir: Path) -> str:
    """``'run_dir'``, with the directory it resolves to when that differs (a symlink)."""
    resolved = run_dir.resolve()
    return f"'{run_dir}'" + ("" if resolved == run_dir.absolute() else f" (-> {resolved})")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Create ``run_dir`` and check it is writable, or refuse it with :class:`RunDirError`.

    Refused: a folder that holds a run unless resuming it, and a non-empty folder that
    holds no run's files (someone else's: ``/etc``, a home directory). Symlinks are
    followed, and the message names the target too.
    """
    resolved, shown = run_dir.resolve(), _shown(run_dir)
    existing = run_contents(resolved) if resolved.is_dir() else []
    if existing and not resume:
        raise RunDirError(
            f"run_dir {shown} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, or choose another run_dir"
        )
    foreign = _foreign_entries(resolved) if resolved.is_dir() and not existing else []
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunDirError(
            f"run_dir {shown} is not empty and holds no run ({len(foreign)} entries: {listed}); "
            "choose a new or empty directory"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"run_dir {shown} is not writable: {exc.strerror or exc}") from None


def check_resumable(config: TrainConfig) -> None:
    """Refuse ``--resume`` of a run dir that holds nothing to resume, with :class:`RunDirError`.

    Resuming there would silently train from scratch. Something to resume is a logged
    step, a checkpoint or a trajectory; under ``peers:``, the shared state of a committed
    step or any peer's.
    """
    run_dir = Path(config.run_dir)
    places = [run_dir]
    if config.peers is not None:
        if (run_dir / STATE).is_file():
            return
        places += [run_dir / "peers" / name for name in config.peers.names]
    if not any(run_contents(place.resolve()) for place in places):
        raise RunDirError(
            f"--resume: run_dir {_shown(run_dir)} holds no run to resume (no logged step, "
            "checkpoint or trajectory); start the run without --resume"
        )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_policy(cfg: PolicySection) -> tuple[torch.nn.Module, Any]:
    """The policy model on its device, and its tokenizer with a pad token."""
    from policies.default_model import resolve_model_path
    from policies.loading import load_causal_lm, load_tokenizer

    path = resolve_model_path(cfg.model)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(path, pad_to_eos=True)
    model = load_causal_lm(path, dtype=getattr(torch, cfg.dtype)).to(device)
    return model, tokenizer


def optimizer_config(config: TrainConfig) -> OptimConfig:
    """``optim`` with ``total_steps`` filled in (the run's optimizer steps) when unset."""
    if config.optim.total_steps is not None:
        return config.optim
    minibatches = max(
        1,
        math.ceil(
            config.train.prompts_per_step * config.rollout.n_samples / config.train.minibatch_size
        ),
    )
    total = config.train.steps * config.train.ppo_epochs * minibatches
    return config.optim.model_copy(update={"total_steps": total})


def make_policy_generator(config: TrainConfig, model: torch.nn.Module, tokenizer: Any) -> Generator:
    """The embedded generator on ``model`` itself, an in-process vLLM engine, or the SGLang client."""
    cfg = config.policy
    if cfg.backend == "embedded":
        from policies.transformers_generator import TransformersGenerator

        return TransformersGenerator.from_model(
            model,
            tokenizer,
            max_batch_size=cfg.max_batch_size,
            max_context=cfg.max_context,
            seed=config.seed,
            generator_dtype=cfg.generator_dtype,
        )
    if cfg.backend == "vllm":
        from policies.base import GenerationError
        from policies.vllm_generator import VLLMGenerator
        from trainers.stopping import BackendFailure

        try:
            return VLLMGenerator(
                cfg.model,
                tokenizer=tokenizer,
                max_context=cfg.max_context,
                seed=config.seed,
                **cfg.vllm_options,
            )
        except GenerationError as exc:  # one message, before step 1
            raise BackendFailure(str(exc), completed_step=0, checkpoint=None) from None
    from policies import make_generator

    options = {"max_context": cfg.max_context, **cfg.sglang_options}
    # The policy's own tokenizer: the servers serve policy.model, so the ids agree.
    return make_generator(cfg.backend, tokenizer=tokenizer, **options)


def _close_tasks(task: Task, eval_task: Task | None) -> None:
    task.close()
    if eval_task is not None:
        eval_task.close()


def rollout_settings(config: TrainConfig) -> RolloutConfig:
    """The rollout section as the driver runs it: the run's seed, exact log-probs where read.

    The update reads the policy's own behaviour log-probs only under
    ``loss.rollout_correction``; then they must not depend on which requests shared a
    decode step, or a resumed run would weigh the same tokens differently.
    """
    seed = config.rollout.seed if config.rollout.seed is not None else config.seed
    exact = config.rollout.exact_logprobs or config.loss.rollout_correction != "none"
    return config.rollout.model_copy(update={"seed": seed, "exact_logprobs": exact})


def load_models(config: TrainConfig) -> tuple[torch.nn.Module, Any, torch.nn.Module | None]:
    """The policy, its tokenizer, and the frozen reference for the KL term (None without one)."""
    model, tokenizer = load_policy(config.policy)
    ref_model = None
    if config.loss.kl_coef > 0:
        ref_model, _ = load_policy(config.policy)
        ref_model.requires_grad_(False).eval()
    return model, tokenizer, ref_model


def make_answerers(
    config: TrainConfig, generator: Generator, tokenizer: Any, task: Task
) -> tuple[ConsultService | None, AgentPool | None]:
    """Who answers the policy's requests: ``(tools, None)`` or ``(None, agent pool)``.

    A protocol that declares tools is answered by them (:mod:`trainers.tool_config`);
    otherwise by the agent pool, its replies seeded from the run's seed. The caller
    closes the pool.
    """
    tools = make_tool_service(config.tools, config.env.protocol)
    if tools is not None:
        return tools, None
    pool = AgentPool.from_config(
        config.agents,
        policy_generator=generator,
        policy_tokenizer=tokenizer,
        task=task,
        max_reply_tokens=config.env.max_reply_tokens,
        timeout_s=config.env.agent_timeout_s,
        seed=config.seed,
    )
    return None, pool


@contextlib.asynccontextmanager
async def open_run(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    resume_at: int | None = None,
    rollouts: bool = True,
) -> AsyncIterator[RunState]:
    """Build the :class:`RunState` of ``config`` (module docstring); close it on exit.

    ``resume``: continue the run in ``run_dir`` from its last checkpoint (else a
    directory holding a run is refused with :class:`RunDirError`). ``resume_at``: from
    its last checkpoint at or before that step instead (0: from the start), for a run
    whose progress is committed elsewhere (the peers of ``trainers/peer_trainer.py``).
    ``rollouts=False``: the caller plays the episodes itself (ILR's peers), so neither
    the answerers (agent pool, tools) nor the rollout driver are built.
    """
    run_dir = Path(config.run_dir)
    check_run_dir(run_dir, resume)
    for change in config.resolved:  # derived from other settings (trainers/resolve.py)
        logger.info("resolved %s", change)
    write_config(config, run_dir / "config.yaml")
    seed_everything(config.seed)
    async with contextlib.AsyncExitStack() as stack:
        # Both sides, measured against each other and refused on overlap, before the
        # policy loads; the warm-up draws from ``task``, so it is covered too.
        split = make_tasks(config.task)
        task, eval_task = split.task, split.eval_task
        stack.callback(_close_tasks, task, eval_task)
        (run_dir / HELD_OUT_FILE).write_text(json.dumps(split.report(config.task), indent=2))
        model, tokenizer, ref_model = load_models(config)
        optim_cfg = optimizer_config(config)
        optimizer = build_optimizer(model, optim_cfg)
        scheduler = build_scheduler(optimizer, optim_cfg)
        loss_fn = AIPOLoss(config.loss)
        saved = None
        if resume and resume_at != 0:
            saved = restore_latest(
                run_dir, model=model, optimizer=optimizer, scheduler=scheduler, max_step=resume_at
            )
        start_step = int(saved.data_position.get("step", saved.step)) if saved is not None else 0
        if saved is not None:
            logger.info("resuming %s from step %d", run_dir, start_step)
        generator = make_policy_generator(config, model, tokenizer)
        stack.push_async_callback(generator.aclose)
        # Servers start from policy.model; a resumed run (or any run) must roll out
        # with the trainer's weights, so they are published before the first step.
        await publish_weights(
            generator, model, start_step, backend=config.policy.backend, run_dir=run_dir
        )
        tools, agents = (
            make_answerers(config, generator, tokenizer, task) if rollouts else (None, None)
        )
        if agents is not None:
            stack.push_async_callback(agents.aclose)
        await check_backends(config, generator, agents)
        mask_rule = config.loss.mask_rule(mask_on_drift=config.env.mask_on_drift)
        driver = None
        if rollouts:
            answerer = agents if tools is None else tools
            driver = RolloutDriver(
                generator, task, answerer, config.env, rollout_settings(config), mask_rule=mask_rule
            )
        resume_step = start_step if resume else None
        metrics_log = MetricsLogger(
            run_dir, total_steps=config.train.steps, resume_step=resume_step, progress=progress
        )
        stack.callback(metrics_log.close)
        yield RunState(
            config=config,
            run_dir=run_dir,
            progress=progress,
            task=task,
            eval_task=eval_task,
            model=model,
            tokenizer=tokenizer,
            ref_model=ref_model,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            generator=generator,
            agents=agents,
            env_config=config.env,
            mask_rule=mask_rule,
            driver=driver,
            metrics_log=metrics_log,
            start_step=start_step,
            completed_step=start_step,
            saved_step=saved.step if saved is not None else None,
            saved_path=saved.path if saved is not None else None,
            overlap=split.overlap,
        )
