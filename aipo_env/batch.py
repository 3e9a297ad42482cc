"""Padded tensors for a batch of trajectories: the contract between rollouts and trainers.

All per-token tensors are aligned with ``input_ids`` (not shifted): position ``t``
describes token ``t``. A trainer scores token ``t`` with the logits at ``t - 1``,
so position 0 (always a prompt token) is never trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from aipo_env import masks, sources
from aipo_env.masks import MaskRule
from aipo_env.trajectory import Trajectory


@dataclass
class TrajectoryBatch:
    """A right-padded batch of ``B`` trajectories of at most ``T`` tokens."""

    input_ids: torch.Tensor  #: [B, T] long; pad_token_id beyond each sequence
    attention_mask: torch.Tensor  #: [B, T] long; 1 on real tokens
    loss_mask: torch.Tensor  #: [B, T] float; 1 where the loss applies (aipo_env/masks.py)
    agent_mask: (
        torch.Tensor
    )  #: [B, T] bool; True on injected tokens (agents, tools, peers), trained or not
    behavior_logprobs: torch.Tensor  #: [B, T] float; log-prob under the producing model, NaN where unknown (prompt, env markup, agents without a shared tokenizer)
    prompt_lens: torch.Tensor  #: [B] long; where each response starts
    rewards: torch.Tensor  #: [B] float; outcome reward per trajectory
    group_ids: list[
        str
    ]  #: per row: trajectories of the same prompt share a group id (advantages are computed within a group)

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        """The same batch with every tensor moved to ``device``."""
        moved = {
            f.name: (
                getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
            )
            for f in fields(self)
        }
        return TrajectoryBatch(**moved)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(
    trajectories: Sequence[Trajectory],
    pad_token_id: int,
    *,
    agent_names: Sequence[str] | None = None,
    rule: MaskRule | None = None,
) -> TrajectoryBatch:
    """Right-pad trajectories into a :class:`TrajectoryBatch`.

    With ``rule`` the loss mask is decided anew from each trajectory's sources and drift
    (:func:`aipo_env.masks.loss_mask`); without, each trajectory's stored mask is kept.
    With ``agent_names`` a token from an agent outside them is an error, not a silent
    label. Unknown behaviour log-probs become NaN.
    """
    if not trajectories:
        raise ValueError("collate needs at least one trajectory; got none")
    batch, width = len(trajectories), max(len(t.token_ids) for t in trajectories)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.float32)
    agent_mask = torch.zeros((batch, width), dtype=torch.bool)
    behavior = torch.full((batch, width), math.nan, dtype=torch.float32)
    for row, t in enumerate(trajectories):
        if agent_names is not None:
            _check_sources(t, agent_names)
        n = len(t.token_ids)
        input_ids[row, :n] = torch.tensor(t.token_ids, dtype=torch.long)
        attention[row, :n] = 1
        agent_mask[row, :n] = torch.tensor(masks.injected_mask(t.source), dtype=torch.bool)
        mask = (
            t.loss_mask
            if rule is None
            else masks.loss_mask(t.source, rule, drift=t.tokenization_drift)
        )
        loss_mask[row, :n] = torch.tensor(mask, dtype=torch.float32)
        behavior[row, :n] = torch.tensor(
            [math.nan if lp is None else lp for lp in t.behavior_logprobs], dtype=torch.float32
        )
    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        agent_mask=agent_mask,
        behavior_logprobs=behavior,
        prompt_lens=torch.tensor([t.prompt_len for t in trajectories], dtype=torch.long),
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        group_ids=[t.group_id for t in trajectories],
    )


def _check_sources(trajectory: Trajectory, agent_names: Sequence[str]) -> None:
    """Every source label is known and every agent is one of ``agent_names``."""
    # Peers (another policy in the episode) are named by the episode, not configured.
    labels = [
        label
        for label in trajectory.source
        if not (label.startswith(sources.PEER_PREFIX) and len(label) > len(sources.PEER_PREFIX))
    ]
    try:
        sources.source_codes(labels, agent_names)
    except KeyError as exc:
        raise ValueError(
            f"trajectory {trajectory.trajectory_id} has source {exc.args[0]!r}; expected prompt, "
            f"policy, env, peer:<name> or agent:<one of {', '.join(agent_names)}>"
        ) from None
