"""The token-exact trajectory record and its JSONL storage.

A :class:`Trajectory` holds every token the model saw, each token's source, loss mask
and behaviour log-prob, the turn boundaries with what was consulted, and the outcome.
It round-trips through JSONL losslessly (``None`` stays ``None``; floats are written by
``json`` with full precision); :func:`aipo_env.batch.collate` turns a batch into tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aipo_env import sources
from aipo_env.jsonl import JsonlError, escape_line_breaks, open_for_append, read_lines
from tasks.base import RewardResult


class ConsultRecord(BaseModel):
    """What one consult asked and how the agent answered."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = Field(description="The agent named in the tag (None when unparseable).")
    question: str = Field(default="", description="The question inside the consult tag.")
    latency_s: float = Field(default=0.0, description="Wall time of the agent call, seconds.")
    cached_tokens: int = Field(default=0, description="Prompt tokens the agent's backend cached.")
    cache_hit: bool = Field(default=False, description="Served from the pool's request cache.")
    reply_truncated: bool = Field(default=False, description="Reply cut to max_reply_tokens.")
    leak: Literal["blocked", "rewritten"] | None = Field(
        default=None,
        description="What the agents' leak guard did to a reply that stated the answer (agents/leak_guard.py); None when nothing.",
    )
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
    dropped_after_eos: int = Field(
        default=0,
        description="Tokens the generator produced after an EOS in this segment; cut, never recorded.",
    )
    feedback_start: int | None = Field(
        default=None, description="Index of the first injected token, when feedback followed."
    )
    feedback_end: int | None = Field(default=None, description="One past the last injected token.")
    consult: ConsultRecord | None = Field(
        default=None, description="The consult that ended this segment, if any."
    )


class Trajectory(BaseModel):
    """One episode, token by token. All per-token lists align."""

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
    source: list[str] = Field(
        description="Per token: prompt, policy, env, agent:<name> or peer:<name> (aipo_env/sources.py)."
    )
    loss_mask: list[int] = Field(
        description="Per token: 1 where the loss applies, as aipo_env/masks.py decided it."
    )
    behavior_logprobs: list[float | None] = Field(
        description="Per token: log-prob under the producing model, None where unknown."
    )
    turns: list[Turn] = Field(default_factory=list, description="Segment boundaries.")
    reward: float = Field(default=0.0, description="Outcome reward.")
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
    parent_id: str | None = Field(
        default=None,
        description="The trajectory this one was forked from (a rollout tree), None for a root.",
    )
    branch_point: int | None = Field(
        default=None,
        ge=0,
        description="Token index where it left its parent: ids before it are the parent's, verbatim.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_fields(cls, data: Any) -> Any:
        # Files written before turn_rewards was retired (it only ever repeated the reward).
        if isinstance(data, dict) and "turn_rewards" in data:
            data = {k: v for k, v in data.items() if k != "turn_rewards"}
        return data

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

    @model_validator(mode="after")
    def _tree_record(self) -> Trajectory:
        # A fork is only meaningful with both: whom it left and where.
        if (self.parent_id is None) != (self.branch_point is None):
            raise ValueError(
                f"trajectory {self.trajectory_id}: parent_id ({self.parent_id!r}) and branch_point "
                f"({self.branch_point!r}) must both be set (a fork) or both be None (a root)"
            )
        if self.parent_id == self.trajectory_id:
            raise ValueError(f"trajectory {self.trajectory_id} names itself as its parent")
        if self.branch_point is not None and self.branch_point > len(self.token_ids):
            raise ValueError(
                f"trajectory {self.trajectory_id}: branch_point {self.branch_point} exceeds its "
                f"{len(self.token_ids)} tokens"
            )
        return self

    def policy_token_count(self) -> int:
        """How many tokens the policy sampled."""
        return sum(s == sources.POLICY for s in self.source)

    def segments(self) -> Iterator[tuple[str, list[int]]]:
        """Runs of consecutive tokens with the same source, as ``(source, ids)``."""
        start = 0
        for i in range(1, len(self.token_ids) + 1):
            if i == len(self.token_ids) or self.source[i] != self.source[start]:
                yield self.source[start], self.token_ids[start:i]
                start = i


def _dump(trajectory: Trajectory) -> str:
    return escape_line_breaks(trajectory.model_dump_json())


def _is_trajectory(line: bytes) -> bool:
    """Whether ``line`` is a whole trajectory record (what :func:`read_jsonl` accepts)."""
    try:
        Trajectory.model_validate_json(line)
    except ValueError:
        return False
    return True


def write_jsonl(path: str | Path, trajectories: Iterable[Trajectory], append: bool = False) -> int:
    """Write trajectories one per line; returns how many were written."""
    count = 0
    with TrajectoryWriter(path, append=append) as writer:
        for trajectory in trajectories:
            writer.write(trajectory)
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[Trajectory]:
    """Read every trajectory of a JSONL file; a torn last line (killed writer) is skipped.

    Lines end at ``\n`` only and a leading byte-order mark is skipped
    (:func:`aipo_env.jsonl.read_lines`).

    Raises:
        JsonlError: a line other than the last is not a trajectory record (a record glued
            onto a torn line, a hand edit); the message names the file, the line and why.
    """
    out: list[Trajectory] = []
    lines = read_lines(path)
    for position, (number, line) in enumerate(lines, 1):
        try:
            out.append(Trajectory.model_validate_json(line))
        except ValidationError as exc:
            if position == len(lines):  # written up to a kill: the episode is simply lost
                break
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise JsonlError(
                f"{path}:{number}: not a trajectory record: {first['msg']}"
                + (f" at '{where}'" if where else "")
                + "; the file is damaged (e.g. a record glued onto a torn line): move the "
                "line out, or the file, to go on"
            ) from None
    return out


class TrajectoryWriter:
    """Appends one trajectory per line, flushed and fsynced, so a kill loses only episodes in flight.

    In append mode a torn last line left by a killed writer is removed first
    (:func:`aipo_env.jsonl.open_for_append`), so the new records start on a line of
    their own and the file stays readable.
    """

    def __init__(self, path: str | Path, append: bool = True, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = (
            open_for_append(self.path, _is_trajectory)
            if append
            else self.path.open("w", encoding="utf-8")
        )
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
