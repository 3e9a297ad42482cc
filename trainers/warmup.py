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
counts rather than fit a handful of examples.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from aipo_env import sources
from aipo_env.trajectory import Trajectory, TrajectoryWriter, read_jsonl

if TYPE_CHECKING:
    from trainers.run_state import RunState

logger = logging.getLogger(__name__)

__all__ = [
    "Demonstration",
    "WarmupError",
    "WarmupResult",
    "WarmupSection",
    "consult_usage",
    "demonstration",
    "fit_demonstrations",
    "run_warmup",
    "select_demonstrations",
    "spliced",
]

#: Consult errors that mean the policy's tag itself was wrong (not the agent's failure).
MALFORMED_KINDS = frozenset({"malformed", "unknown_agent", "empty_question"})


class WarmupSection(BaseModel):
    """The supervised consult warm-up that runs before the first RL step (off by default)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False, description="Run the warm-up before step 1 of a fresh run."
    )
    agent: str = Field(
        default="reasoning",
        description="The agent the demonstrations consult (must be in env.agent_names).",
    )
    problems: int = Field(
        default=64, ge=1, description="Training problems rolled out to build demonstrations."
    )
    samples: int = Field(
        default=4,
        ge=2,
        description="Episodes per problem: the first half open with a consult, the rest do not.",
    )
    consult_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of the demonstrations that consult; the rest solve alone.",
    )
    min_demonstrations: int = Field(
        default=32, ge=1, description="Fewer kept demonstrations than this stop the run."
    )
    epochs: int = Field(default=3, ge=1, description="Passes over the demonstrations.")
    batch_size: int = Field(default=8, ge=1, description="Demonstrations per optimizer step.")
    lr: float = Field(default=1.0e-4, gt=0.0, description="AdamW learning rate of the warm-up.")
    splice: bool = Field(
        default=True,
        description=(
            "When correct consult episodes are scarce, also build demonstrations from a consult "
            "episode that ended wrong followed by a correct solution the policy wrote alone for the "
            "same problem."
        ),
    )
    train_agent_tokens: bool = Field(
        default=False,
        description="Also fit the agent's reply tokens (off: the reply is context only).",
    )
    check_problems: int = Field(
        default=32,
        ge=0,
        description="Training problems (not used for demonstrations) for the after-warm-up check.",
    )


class WarmupError(RuntimeError):
    """The warm-up cannot proceed (too few demonstrations); the message has the counts."""


@dataclass(frozen=True)
class Demonstration:
    """One supervised example: ids and the positions the loss fits."""

    trajectory_id: str
    token_ids: list[int]
    train_mask: list[int]
    consulted: bool

    @property
    def trained_tokens(self) -> int:
        return sum(self.train_mask)


@dataclass
class WarmupResult:
    """What the warm-up built and what it changed; written to ``warmup/result.json``."""

    episodes: int
    consult_episodes: int
    correct_consult: int
    correct_alone: int
    spliced: int
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


# -- select ---------------------------------------------------------------------------


def _correct(t: Trajectory) -> bool:
    if t.finish_reason.startswith("error:") or t.tokenization_drift:
        return False
    if t.verifier is not None:
        return bool(t.verifier.correct)
    return t.reward > 0


def _opening_request(t: Trajectory) -> tuple[int, int] | None:
    """The span of the env-written opening consult tag, if the episode opened with one."""
    if not t.turns or t.turns[0].generation_finish != "auto_consult":
        return None
    first = t.turns[0]
    if first.feedback_start is None or first.consult is None or first.consult.error is not None:
        return None
    start = first.policy_end
    if not all(s == sources.ENV for s in t.source[start : first.feedback_start]):
        return None
    return start, first.feedback_start


def demonstration(t: Trajectory, *, train_agent_tokens: bool = False) -> Demonstration:
    """``t`` as a supervised example: policy tokens fitted, an opening request relabelled as policy.

    Raises ValueError when ``t`` opened with a consult whose tag cannot be relabelled
    (unanswered, or not env text).
    """
    span = _opening_request(t)
    if t.turns and t.turns[0].generation_finish == "auto_consult" and span is None:
        raise ValueError(f"trajectory {t.trajectory_id}: its opening consult was not answered")
    mask = []
    for i, source in enumerate(t.source):
        if span is not None and span[0] <= i < span[1]:
            mask.append(1)  # the consult tag, now the policy's own words
        elif source == sources.POLICY:
            mask.append(1)
        elif train_agent_tokens and source.startswith(sources.AGENT_PREFIX):
            mask.append(1)
        else:
            mask.append(0)
    return Demonstration(t.trajectory_id, list(t.token_ids), mask, consulted=span is not None)


def _policy_text(t: Trajectory, tokenizer: Any) -> str:
    ids = [i for i, s in zip(t.token_ids, t.source, strict=True) if s == sources.POLICY]
    return tokenizer.decode(ids, skip_special_tokens=True)


def spliced(
    opened: Trajectory, solved: Trajectory, *, train_agent_tokens: bool = False
) -> Demonstration:
    """``opened``'s prompt, consult tag (relabelled) and reply, then ``solved``'s whole response.

    For a problem the policy solved alone but not after the consult: the demonstration
    consults, then writes the solution it found alone. Both episodes must share the
    prompt ids (same problem, both allowed to consult).
    """
    if opened.token_ids[: opened.prompt_len] != solved.token_ids[: solved.prompt_len]:
        raise ValueError(
            f"cannot splice {solved.trajectory_id} after {opened.trajectory_id}: their prompts differ"
        )
    head = demonstration(opened, train_agent_tokens=train_agent_tokens)
    cut = opened.turns[0].feedback_end
    assert cut is not None  # an answered opening request has its reply injected
    tail = solved.token_ids[solved.prompt_len :]
    mask = head.train_mask[:cut] + [
        int(s == sources.POLICY) for s in solved.source[solved.prompt_len :]
    ]
    return Demonstration(
        f"{opened.trajectory_id}+{solved.trajectory_id}",
        head.token_ids[:cut] + tail,
        mask,
        consulted=True,
    )


def select_demonstrations(
    trajectories: Sequence[Trajectory],
    tokenizer: Any,
    section: WarmupSection,
    seed: int,
) -> tuple[list[Demonstration], dict[str, int]]:
    """The correct episodes as demonstrations, mixed at ``consult_share``; and the counts.

    A consult episode is kept when it opened with an answered consult and ended
    correct; a no-consult episode when it ended correct with no consult attempt and no
    ``<consult`` text from the policy. When correct consult episodes are fewer than the
    mix asks for, ``warmup.splice`` fills in with :func:`spliced` demonstrations: a
    consult episode that ended wrong, continued with a correct solution the policy
    wrote alone for the same problem (real ones are always taken first).
    """
    with_consult: list[Trajectory] = []
    wrong_consult: list[Trajectory] = []
    alone: list[Trajectory] = []
    opened = 0
    for t in trajectories:
        if t.turns and t.turns[0].generation_finish == "auto_consult":
            opened += 1
            if _opening_request(t) is None or t.consult_attempts:
                continue
            (with_consult if _correct(t) else wrong_consult).append(t)
        elif (
            _correct(t)
            and t.consult_attempts == 0
            and "<consult" not in _policy_text(t, tokenizer).lower()
        ):
            alone.append(t)
    rng = random.Random(seed)
    agent = section.train_agent_tokens
    consult_demos = [demonstration(t, train_agent_tokens=agent) for t in with_consult]
    rng.shuffle(consult_demos)
    splices: list[Demonstration] = []
    if section.splice:
        solved: dict[str, list[Trajectory]] = {}
        for t in alone:
            solved.setdefault(t.problem_id, []).append(t)
        for t in wrong_consult:
            if t.problem_id in solved:
                splices.append(
                    spliced(t, rng.choice(solved[t.problem_id]), train_agent_tokens=agent)
                )
        rng.shuffle(splices)
    pool = consult_demos + splices
    alone_demos = [demonstration(t) for t in alone]
    share = section.consult_share
    # As many as possible at the requested mix: the scarcer kind sets the total.
    if share <= 0:
        total = len(alone_demos)
    elif share >= 1:
        total = len(pool)
    else:
        total = min(math.floor(len(pool) / share), math.floor(len(alone_demos) / (1 - share)))
    n_consult = round(total * share)
    chosen = pool[:n_consult] + rng.sample(alone_demos, total - n_consult)
    rng.shuffle(chosen)
    counts = {
        "episodes": len(trajectories),
        "consult_episodes": opened,
        "correct_consult": len(with_consult),
        "correct_alone": len(alone),
        "spliced": max(0, n_consult - len(consult_demos)),
    }
    return chosen, counts


# -- fit ------------------------------------------------------------------------------


def _pad(demos: Sequence[Demonstration], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(d.token_ids) for d in demos)
    ids = torch.full((len(demos), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(demos), width), dtype=torch.long)
    mask = torch.zeros((len(demos), width), dtype=torch.float32)
    for row, d in enumerate(demos):
        n = len(d.token_ids)
        ids[row, :n] = torch.tensor(d.token_ids)
        attention[row, :n] = 1
        mask[row, :n] = torch.tensor(d.train_mask, dtype=torch.float32)
    return ids, attention, mask


def fit_demonstrations(
    model: torch.nn.Module,
    demos: Sequence[Demonstration],
    *,
    pad_id: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """Fit ``demos`` by cross-entropy on their trained tokens; the mean loss of each epoch."""
    from trainers.logprobs import token_logprobs

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order = list(range(len(demos)))
    was_training = model.training
    model.train()
    losses = []
    try:
        for _ in range(epochs):
            rng.shuffle(order)
            total, tokens = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = [demos[i] for i in order[start : start + batch_size]]
                ids, attention, mask = (x.to(device) for x in _pad(batch, pad_id))
                logprobs, _ = token_logprobs(model, ids, attention)
                n = mask.sum()
                if n == 0:
                    continue
                loss = -(logprobs * mask).sum() / n
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                total += float(loss.detach()) * int(n)
                tokens += int(n)
            losses.append(total / max(tokens, 1))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return losses


# -- check ----------------------------------------------------------------------------


def consult_usage(trajectories: Sequence[Trajectory], tokenizer: Any) -> dict[str, float]:
    """Shares of episodes allowed to consult with a well-formed / malformed consult of the policy's own.

    Well-formed: the policy wrote a tag the env parsed (an answered consult, or one
    refused only for the budget or a failing agent). Malformed: the policy wrote
    ``<consult`` and every tag was unparseable, named no known agent or asked nothing,
    or was never closed. An episode with an opening request written by the env counts
    for neither.
    """
    from trainers.summary import consult_error_kind

    allowed = [t for t in trajectories if t.allow_consult]
    good = bad = 0
    for t in allowed:
        records = [
            turn.consult
            for turn in t.turns
            if turn.consult is not None and turn.generation_finish != "auto_consult"
        ]
        kinds = [consult_error_kind(r.error) if r.error else None for r in records]
        if any(k not in MALFORMED_KINDS for k in kinds):
            good += 1
        elif kinds or "<consult" in _policy_text(t, tokenizer).lower():
            bad += 1
    n = max(len(allowed), 1)
    return {
        "episodes": float(len(allowed)),
        "consult_written_rate": good / n,
        "malformed_rate": bad / n,
        "accuracy": sum(_correct(t) for t in allowed) / n,
    }


# -- the warm-up ----------------------------------------------------------------------


def _problems(n_problems: int, count: int, offset: int, seed: int) -> list[int]:
    """``count`` problem indices from a seeded permutation, starting at ``offset``."""
    perm = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[(offset + j) % n_problems] for j in range(count)]


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


async def run_warmup(run: RunState, *, resume: bool = False) -> WarmupResult:
    """Collect, select, fit and check (module docstring); publishes the new weights as ``warmup``.

    Raises:
        WarmupError: fewer than ``warmup.min_demonstrations`` demonstrations were kept.
    """
    cfg = run.config
    section: WarmupSection = cfg.warmup  # type: ignore[attr-defined]
    started = time.perf_counter()
    folder = run.run_dir / "warmup"
    folder.mkdir(parents=True, exist_ok=True)
    n_problems = len(run.task)
    demo_problems = _problems(n_problems, min(section.problems, n_problems), 0, cfg.seed + 7919)
    collect_env = run.env_config.model_copy(
        update={"auto_consult": section.agent, "policy_version": "base"}
    )
    saved_env = run.driver.env_config
    run.driver.env_config = collect_env
    try:
        collected = await _roll(
            run,
            _options(demo_problems, section.samples, "warmup", section.samples // 2),
            folder / "rollouts.jsonl",
            resume=resume,
        )
    finally:
        run.driver.env_config = saved_env
    demos, counts = select_demonstrations(collected, run.tokenizer, section, cfg.seed)
    if len(demos) < section.min_demonstrations:
        raise WarmupError(
            f"the warm-up kept {len(demos)} demonstrations, fewer than "
            f"warmup.min_demonstrations={section.min_demonstrations}: of {counts['episodes']} "
            f"episodes, {counts['correct_consult']} of {counts['consult_episodes']} opened with "
            f"a consult and ended correct, {counts['correct_alone']} of "
            f"{counts['episodes'] - counts['consult_episodes']} ended correct without one, "
            f"{counts['spliced']} were spliced (mix warmup.consult_share={section.consult_share}); raise warmup.problems or "
            "warmup.samples, or choose a task the policy solves more often with the agent"
        )
    logger.info(
        "warm-up: %d demonstrations (%d with a consult), %d trained tokens",
        len(demos),
        sum(d.consulted for d in demos),
        sum(d.trained_tokens for d in demos),
    )
    losses = fit_demonstrations(
        run.model,
        demos,
        pad_id=run.tokenizer.pad_token_id,
        epochs=section.epochs,
        batch_size=section.batch_size,
        lr=section.lr,
        seed=cfg.seed,
        max_grad_norm=cfg.optim.max_grad_norm,
    )
    from trainers.weights import publish_weights

    await publish_weights(
        run.generator, run.model, 0, backend=cfg.policy.backend, run_dir=run.run_dir
    )
    check: dict[str, float] = {"episodes": 0.0, "consult_written_rate": 0.0, "malformed_rate": 0.0}
    check["accuracy"] = 0.0
    if section.check_problems:
        offset = len(demo_problems)
        check_problems = _problems(n_problems, section.check_problems, offset, cfg.seed + 7919)
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
