"""The token-exact trajectory record, its JSONL storage and its collation into tensors.

A :class:`Trajectory` holds every token the model saw, each token's source, loss mask
and behaviour log-prob, the turn boundaries with what was consulted, and the outcome.
It round-trips through JSONL losslessly (``None`` stays ``None``; floats are written by
``json`` with full precision) and collates into :class:`aipo_env.batch.TrajectoryBatch`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.base import RewardResult

if TYPE_CHECKING:
    from aipo_env.batch import TrajectoryBatch

SOURCE_PROMPT_NAME = "prompt"
SOURCE_POLICY_NAME = "policy"
SOURCE_ENV_NAME = "env"
AGENT_SOURCE_PREFIX = "agent:"


def agent_source(name: str) -> str:
    """The per-token source label of agent ``name``'s tokens."""
    return f"{AGENT_SOURCE_PREFIX}{name}"


class ConsultRecord(BaseModel):
    """What one consult asked and how the agent answered."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = Field(description="The agent named in the tag (None when unparseable).")
    question: str = Field(default="", description="The question inside the consult tag.")
    latency_s: float = Field(default=0.0, description="Wall time of the agent call, seconds.")
    cached_tokens: int = Field(default=0, description="Prompt tokens the agent's backend cached.")
    cache_hit: bool = Field(default=False, description="Served from the pool's request cache.")
    reply_truncated: bool = Field(default=False, description="Reply cut to max_reply_tokens.")
    error: str | None = Field(
        default=None,
        description="Why the consult got an error feedback (malformed, unknown agent, budget, timeout, ...); None when answered.",
    )


class Turn(BaseModel):
    """One policy segment and the feedback injected after it, as token index ranges."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="Turn number, from 0.")
    policy_start: int = Field(description="Index of the segment's first policy token.")
    policy_end: int = Field(description="One past the segment's last policy token.")
    generation_finish: str = Field(
        default="stop", description="The generator's finish reason: stop, length or abort."
    )
    policy_cached_tokens: int = Field(
        default=0, description="Prompt tokens the policy backend served from its prefix cache."
    )
    feedback_start: int | None = Field(
        default=None, description="Index of the first injected token, when feedback followed."
    )
    feedback_end: int | None = Field(default=None, description="One past the last injected token.")
    consult: ConsultRecord | None = Field(
        default=None, description="The consult that ended this segment, if any."
    )


class Trajectory(BaseModel):
    """One episode, token by token (DESIGN section 4). All per-token lists align."""

    # NaN/inf log-probs are written as JSON constants so they read back as themselves.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    trajectory_id: str = Field(description="Unique id; also the generator's session id.")
    problem_id: str = Field(description="The problem's id within its task.")
    task: str = Field(description="The task's registered name.")
    group_id: str = Field(description="Trajectories of the same prompt share it (advantages).")
    sample_index: int = Field(default=0, description="Index within the group.")
    token_ids: list[int] = Field(
        description="Prompt + response ids, exactly as the model saw them."
    )
    prompt_len: int = Field(ge=0, description="Where the response starts.")
    source: list[str] = Field(description="Per token: prompt, policy, agent:<name> or env.")
    loss_mask: list[int] = Field(description="Per token: 1 where the loss applies.")
    behavior_logprobs: list[float | None] = Field(
        description="Per token: log-prob under the producing model, None where unknown."
    )
    turns: list[Turn] = Field(default_factory=list, description="Segment boundaries.")
    reward: float = Field(default=0.0, description="Outcome reward.")
    turn_rewards: list[float] = Field(
        default_factory=list, description="Per-turn rewards (the outcome on the last turn)."
    )
    verifier: RewardResult | None = Field(default=None, description="The task's scoring result.")
    finish_reason: str = Field(
        description="eos, length, max_turns, context_overflow or error:<kind>."
    )
    error: str | None = Field(default=None, description="The error message for error:<kind>.")
    policy_version: int | str | None = Field(
        default=None, description="Weights version that generated the policy tokens."
    )
    allow_consult: bool = Field(default=True, description="Whether this episode could consult.")
    mode: str = Field(default="train", description="train or independent.")
    consults: int = Field(default=0, description="Consults answered by an agent.")
    consult_errors: int = Field(default=0, description="Consults that got an error feedback.")
    consult_attempts: int = Field(
        default=0,
        description="Complete consult tags the policy wrote (in independent mode: not honoured).",
    )
    tokenization_drift: bool = Field(
        default=False,
        description="An incremental tokenization disagreed with a full render where the format claims they match.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form extras.")

    @model_validator(mode="after")
    def _aligned(self) -> Trajectory:
        n = len(self.token_ids)
        for name in ("source", "loss_mask", "behavior_logprobs"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries for {n} tokens; they must align"
                )
        if self.prompt_len > n:
            raise ValueError(f"prompt_len {self.prompt_len} exceeds the {n} tokens")
        return self

    @property
    def response_ids(self) -> list[int]:
        """The ids after the prompt."""
        return self.token_ids[self.prompt_len :]

    def policy_token_count(self) -> int:
        """How many tokens the policy sampled."""
        return sum(s == SOURCE_POLICY_NAME for s in self.source)

    def segments(self) -> Iterator[tuple[str, list[int]]]:
        """Runs of consecutive tokens with the same source, as ``(source, ids)``."""
        start = 0
        for i in range(1, len(self.token_ids) + 1):
            if i == len(self.token_ids) or self.source[i] != self.source[start]:
                yield self.source[start], self.token_ids[start:i]
                start = i


def _dump(trajectory: Trajectory) -> str:
    return trajectory.model_dump_json()


def write_jsonl(path: str | Path, trajectories: Iterable[Trajectory], append: bool = False) -> int:
    """Write trajectories one per line; returns how many were written."""
    count = 0
    with TrajectoryWriter(path, append=append) as writer:
        for trajectory in trajectories:
            writer.write(trajectory)
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[Trajectory]:
    """Read every trajectory of a JSONL file; a torn last line (killed writer) is skipped."""
    out: list[Trajectory] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(Trajectory.model_validate_json(line))
        except ValueError:
            if number == len(lines):  # written up to a kill: the episode is simply lost
                break
            raise
    return out


def read_ids(path: str | Path) -> set[str]:
    """The trajectory ids already in a JSONL file (empty when it does not exist)."""
    if not Path(path).exists():
        return set()
    return {t.trajectory_id for t in read_jsonl(path)}


class TrajectoryWriter:
    """Appends one trajectory per line, flushed and fsynced, so a kill loses only episodes in flight."""

    def __init__(self, path: str | Path, append: bool = True, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w", encoding="utf-8")
        self._fsync = fsync
        self.written = 0

    def write(self, trajectory: Trajectory) -> None:
        """Append ``trajectory`` as one line and make it durable."""
        self._file.write(_dump(trajectory) + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self.written += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collate(
    trajectories: Sequence[Trajectory],
    pad_token_id: int,
    agent_names: Sequence[str] = ("verify", "knowledge", "reasoning"),
    train_agent_tokens: bool | None = None,
) -> TrajectoryBatch:
    """Right-pad trajectories into a :class:`~aipo_env.batch.TrajectoryBatch`.

    ``train_agent_tokens`` overrides the stored loss mask on agent tokens (True: 1,
    False: 0); None keeps each trajectory's own mask. Unknown behaviour log-probs become
    NaN. An agent missing from ``agent_names`` is an error, not a silent code.
    """
    import torch

    from aipo_env.batch import (
        SOURCE_AGENT_BASE,
        SOURCE_ENV,
        SOURCE_PAD,
        SOURCE_POLICY,
        SOURCE_PROMPT,
        TrajectoryBatch,
    )

    if not trajectories:
        raise ValueError("collate needs at least one trajectory; got none")
    names = tuple(agent_names)
    codes = {SOURCE_PROMPT_NAME: SOURCE_PROMPT, SOURCE_POLICY_NAME: SOURCE_POLICY}
    codes[SOURCE_ENV_NAME] = SOURCE_ENV
    for i, name in enumerate(names):
        codes[agent_source(name)] = SOURCE_AGENT_BASE + i
    batch, width = len(trajectories), max(len(t.token_ids) for t in trajectories)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.float32)
    agent_mask = torch.zeros((batch, width), dtype=torch.bool)
    source_ids = torch.full((batch, width), SOURCE_PAD, dtype=torch.long)
    behavior = torch.full((batch, width), math.nan, dtype=torch.float32)
    for row, t in enumerate(trajectories):
        n = len(t.token_ids)
        input_ids[row, :n] = torch.tensor(t.token_ids, dtype=torch.long)
        attention[row, :n] = 1
        try:
            src = [codes[s] for s in t.source]
        except KeyError as exc:
            raise ValueError(
                f"trajectory {t.trajectory_id} has source {exc.args[0]!r}; expected prompt, "
                f"policy, env or agent:<one of {', '.join(names)}>"
            ) from None
        source_ids[row, :n] = torch.tensor(src, dtype=torch.long)
        is_agent = [s.startswith(AGENT_SOURCE_PREFIX) for s in t.source]
        agent_mask[row, :n] = torch.tensor(is_agent, dtype=torch.bool)
        mask = list(t.loss_mask)
        if train_agent_tokens is not None:
            mask = [
                int(train_agent_tokens) if a else m for m, a in zip(mask, is_agent, strict=True)
            ]
        loss_mask[row, :n] = torch.tensor(mask, dtype=torch.float32)
        behavior[row, :n] = torch.tensor(
            [math.nan if lp is None else lp for lp in t.behavior_logprobs], dtype=torch.float32
        )
    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        agent_mask=agent_mask,
        source_ids=source_ids,
        behavior_logprobs=behavior,
        prompt_lens=torch.tensor([t.prompt_len for t in trajectories], dtype=torch.long),
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        group_ids=[t.group_id for t in trajectories],
        agent_names=names,
    )


def render(trajectory: Trajectory, tokenizer: Any, show_prompt: bool = True) -> str:
    """A text view for people: each run of tokens labelled by its source and mask."""
    head = (
        f"# trajectory {trajectory.trajectory_id} task={trajectory.task} "
        f"problem={trajectory.problem_id} finish={trajectory.finish_reason} "
        f"reward={trajectory.reward} consults={trajectory.consults} "
        f"errors={trajectory.consult_errors} drift={trajectory.tokenization_drift}"
    )
    parts = [head]
    pos = 0
    for source, ids in trajectory.segments():
        start, pos = pos, pos + len(ids)
        if source == SOURCE_PROMPT_NAME and not show_prompt:
            continue
        trained = sum(trajectory.loss_mask[start:pos])
        text = tokenizer.decode(ids, skip_special_tokens=False)
        parts.append(f"[{source} | {len(ids)} tok | trained {trained}]\n{text}")
    return "\n".join(parts)
