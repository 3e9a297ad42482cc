"""The consult cold start: a supervised warm-up that teaches the policy to write its own consults.

A small policy never writes a consult tag on its own, so RL alone can never reward it
for asking. The warm-up builds demonstrations from the policy's own rollouts, by
rejection sampling, generically for any task:

1. **collect**: roll out ``warmup.problems`` training problems ``warmup.samples`` times
   each, every episode allowed to consult. Half of each group open with a consult the
   env writes for the policy (``warmup.agent``, the env's opening request, answered by
   the agent like any consult); the other half run as the policy would alone with the
   consult instructions in its prompt. Every trajectory is appended to
   ``warmup/rollouts.jsonl`` (a resumed run reads them back).
2. **select**: keep the episodes that ended correct. In a kept consult episode the
   env-written tag is *relabelled as written by the policy* (its tokens become
   trained tokens); the agent's reply stays context (trained only with
   ``warmup.train_agent_tokens``). A kept no-consult episode must contain no consult
   attempt at all. The two kinds are mixed at ``warmup.consult_share``, so the policy
   also learns that consulting is not always needed.
3. **fit**: cross-entropy on the trained tokens (mean over tokens), AdamW at
   ``warmup.lr`` for ``warmup.epochs`` epochs in a seeded order. Its own optimizer:
   the RL optimizer starts fresh afterwards.
4. **check**: ``warmup.check_problems`` other training problems, one sample each at
   the rollout temperature, allowed to consult and with no opening request: the share
   of episodes with a well-formed consult the policy wrote, the share with a malformed
   one, and the accuracy. The held-out accuracy alone is the trainer's ``warmup``
   evaluation. All of it goes to ``warmup/result.json`` and the run summary.

Too few demonstrations (under ``warmup.min_demonstrations``) stop the run with the
counts rather than fit a handful of examples. ``warmup.consults: false`` fits the same
demonstrations with their consults taken out (:func:`~trainers.demonstrations.without_consult`):
the warm-up of a baseline that never consults, so that a comparison with it is not a
comparison of warm-ups.

Its settings, the ``warmup:`` section, are :class:`~trainers.warmup_config.WarmupSection`
(imported here too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipo_env.trajectory import Trajectory, TrajectoryWriter, read_jsonl
from trainers.demonstrations import (
    Demonstration,
    consult_usage,
    fit_demonstrations,
    reference_solution,
    select_demonstrations,
    without_consult,
)
from trainers.warmup_config import WarmupSection, check_reference_steps

if TYPE_CHECKING:
    from trainers.run_state import RunState

logger = logging.getLogger(__name__)

__all__ = [
    "WarmupError",
    "collect_demonstrations",
    "WarmupResult",
    "WarmupSection",
    "check_reference_steps",
    "run_warmup",
]


class WarmupError(RuntimeError):
    """The warm-up cannot proceed (too few demonstrations); the message has the counts."""


@dataclass
class WarmupResult:
    """What the warm-up built and what it changed; written to ``warmup/result.json``."""

    episodes: int
    consult_episodes: int
    correct_consult: int
    correct_alone: int
    spliced: int
    referenced: int
    demonstrations: int
    demonstrations_consult: int
    trained_tokens: int
    loss_first_epoch: float
    loss_last_epoch: float
    check_episodes: int
    consult_written_rate: float
    malformed_rate: float
    check_accuracy: float
    seconds: float

    def as_metrics(self, prefix: str = "warmup/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")


# -- the warm-up ----------------------------------------------------------------------


def _problems(n_problems: int, count: int, offset: int, seed: int) -> list[int]:
    """``count`` problem indices from a seeded permutation, starting at ``offset``."""
    perm = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[(offset + j) % n_problems] for j in range(count)]


def _warmup_problems(run: RunState) -> tuple[list[int], list[int]]:
    """The demonstration problems, then the check's: the next ones of the same permutation."""
    section: WarmupSection = run.config.warmup  # type: ignore[attr-defined]
    n_problems = len(run.task)
    demo = min(section.problems, n_problems)
    seed = run.config.seed + 7919
    return (
        _problems(n_problems, demo, 0, seed),
        _problems(n_problems, section.check_problems, demo, seed),
    )


async def _roll(
    run: RunState, options: list[dict[str, Any]], output: Path, *, resume: bool
) -> list[Trajectory]:
    done: dict[str, Trajectory] = {}
    if output.exists():
        if resume:
            done = {t.trajectory_id: t for t in read_jsonl(output)}
        else:
            output.unlink()
    todo = [o for o in options if o["trajectory_id"] not in done]
    semaphore = asyncio.Semaphore(run.config.rollout.concurrency)
    bar = None
    if run.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(options), initial=len(done), desc=f"warm-up {output.stem}")
    with TrajectoryWriter(output) as writer:

        async def one(option: dict[str, Any]) -> None:
            async with semaphore:
                t = await run.driver.run_episode(option)
            done[t.trajectory_id] = t
            writer.write(t)
            if bar is not None:
                bar.update(1)

        try:
            await asyncio.gather(*(one(o) for o in todo))
        finally:
            if bar is not None:
                bar.close()
    return [done[o["trajectory_id"]] for o in options]


def _without_consults(run: RunState, demos: Sequence[Demonstration]) -> list[Demonstration]:
    """``demos`` with each consult taken out, on the prompt of independent mode."""
    from aipo_env.env import ConsultEnv

    env_config = run.env_config.model_copy(update={"mode": "independent", "auto_consult": None})
    env = ConsultEnv(run.task, None, run.tokenizer, env_config)
    problems = {p.id: p for p in run.task.problems}
    return [without_consult(d, env.prompt_ids(problems[d.problem_id])) for d in demos]


def _options(problems: Sequence[int], samples: int, tag: str, opened: int) -> list[dict[str, Any]]:
    out = []
    for position, index in enumerate(problems):
        group = f"{tag}-g{position}-{index}"
        for sample in range(samples):
            out.append(
                {
                    "problem_index": index,
                    "group_id": group,
                    "sample_index": sample,
                    "trajectory_id": f"{group}-n{sample}",
                    "allow_consult": True,
                    "auto_consult": sample < opened,
                }
            )
    return out


async def collect_demonstrations(
    run: RunState, *, resume: bool = False
) -> tuple[list[Demonstration], dict[str, int]]:
    """Stages 1 and 2 (module docstring): the demonstrations kept, and the counts behind them.

    The rollouts go to ``<run_dir>/warmup/rollouts.jsonl`` (read back with ``resume``).
    """
    cfg = run.config
    section: WarmupSection = cfg.warmup  # type: ignore[attr-defined]
    folder = run.run_dir / "warmup"
    folder.mkdir(parents=True, exist_ok=True)
    demo_problems, _ = _warmup_problems(run)
    reference = _reference_ids(run) if section.reference else None
    saved_env = run.driver.env_config
    run.driver.env_config = saved_env.model_copy(
        update={"auto_consult": section.agent, "policy_version": "base"}
    )
    try:
        collected = await _roll(
            run,
            _options(demo_problems, section.samples, "warmup", section.samples // 2),
            folder / "rollouts.jsonl",
            resume=resume,
        )
    finally:
        run.driver.env_config = saved_env
    return select_demonstrations(collected, run.tokenizer, section, cfg.seed, reference)


def _reference_ids(run: RunState) -> Any:
    """``problem_id -> token ids`` of the task's reference solution (and EOS)."""
    check_reference_steps(run.task, run.task.name)
    problems = {p.id: p for p in run.task.problems}
    eos = run.tokenizer.eos_token_id

    def ids(problem_id: str) -> list[int]:
        text = reference_solution(run.task.solution_steps(problems[problem_id]))
        return run.tokenizer.encode(text, add_special_tokens=False) + [eos]

    return ids


async def run_warmup(run: RunState, *, resume: bool = False) -> WarmupResult:
    """Collect, select, fit and check (module docstring); publishes the new weights as ``warmup``.

    Raises:
        WarmupError: fewer than ``warmup.min_demonstrations`` demonstrations were kept.
    """
    cfg = run.config
    section: WarmupSection = cfg.warmup  # type: ignore[attr-defined]
    started = time.perf_counter()
    folder = run.run_dir / "warmup"
    demos, counts = await collect_demonstrations(run, resume=resume)
    saved_env = run.driver.env_config
    if len(demos) < section.min_demonstrations:
        raise WarmupError(
            f"the warm-up kept {len(demos)} demonstrations, fewer than "
            f"warmup.min_demonstrations={section.min_demonstrations}: of {counts['episodes']} "
            f"episodes, {counts['correct_consult']} of {counts['consult_episodes']} opened with "
            f"a consult and ended correct, {counts['correct_alone']} of "
            f"{counts['episodes'] - counts['consult_episodes']} ended correct without one, "
            f"{counts['spliced']} were spliced, {counts['referenced']} continued with the "
            f"reference (mix warmup.consult_share={section.consult_share}); raise warmup.problems or "
            "warmup.samples, or choose a task the policy solves more often with the agent"
        )
    logger.info(
        "warm-up: %d demonstrations (%d with a consult), %d trained tokens",
        len(demos),
        sum(d.consulted for d in demos),
        sum(d.trained_tokens for d in demos),
    )
    if not section.consults:
        demos = _without_consults(run, demos)
    from trainers.weights import generation_paused, publish_weights

    async with generation_paused(run.generator):  # and its caches dropped for the fit
        losses = fit_demonstrations(
            run.model,
            demos,
            pad_id=run.tokenizer.pad_token_id,
            epochs=section.epochs,
            batch_size=section.batch_size,
            lr=section.lr,
            seed=cfg.seed,
            max_grad_norm=cfg.optim.max_grad_norm,
            checkpoint_layers=cfg.train.checkpoint_layers,
        )

    await publish_weights(
        run.generator, run.model, 0, backend=cfg.policy.backend, run_dir=run.run_dir
    )
    check: dict[str, float] = {"episodes": 0.0, "consult_written_rate": 0.0, "malformed_rate": 0.0}
    check["accuracy"] = 0.0
    if section.check_problems:
        _, check_problems = _warmup_problems(run)
        run.driver.env_config = run.env_config.model_copy(update={"policy_version": "warmup"})
        try:
            checked = await _roll(
                run,
                _options(check_problems, 1, "warmup-check", 0),
                folder / "check.jsonl",
                resume=False,
            )
        finally:
            run.driver.env_config = saved_env
        check = consult_usage(checked, run.tokenizer)
    result = WarmupResult(
        episodes=counts["episodes"],
        consult_episodes=counts["consult_episodes"],
        correct_consult=counts["correct_consult"],
        correct_alone=counts["correct_alone"],
        spliced=counts["spliced"],
        referenced=counts["referenced"],
        demonstrations=len(demos),
        demonstrations_consult=sum(d.consulted for d in demos),
        trained_tokens=sum(d.trained_tokens for d in demos),
        loss_first_epoch=losses[0],
        loss_last_epoch=losses[-1],
        check_episodes=int(check["episodes"]),
        consult_written_rate=check["consult_written_rate"],
        malformed_rate=check["malformed_rate"],
        check_accuracy=check["accuracy"],
        seconds=time.perf_counter() - started,
    )
    result.write(folder / "result.json")
    return result
