"""Padded tensors for a batch of trajectories: the contract between rollouts and trainers.

All per-token tensors are aligned with ``input_ids`` (not shifted): position ``t``
describes token ``t``. A trainer scores token ``t`` with the logits at ``t - 1``,
so position 0 (always a prompt token) is never trained.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: source_ids values; agent tokens take SOURCE_AGENT_BASE + the agent's index in ``agent_names``.
SOURCE_PAD = -1
SOURCE_PROMPT = 0
SOURCE_POLICY = 1
SOURCE_ENV = 2
SOURCE_AGENT_BASE = 3


@dataclass
class TrajectoryBatch:
    """A right-padded batch of ``B`` trajectories of at most ``T`` tokens."""

    input_ids: torch.Tensor  #: [B, T] long; pad_token_id beyond each sequence
    attention_mask: torch.Tensor  #: [B, T] long; 1 on real tokens
    loss_mask: torch.Tensor  #: [B, T] float; 1 where the loss applies (policy tokens; agent tokens if the agent mode trains them)
    agent_mask: torch.Tensor  #: [B, T] bool; True on agent-produced tokens (whether trained or not)
    source_ids: torch.Tensor  #: [B, T] long; SOURCE_* codes, SOURCE_PAD on padding
    behavior_logprobs: torch.Tensor  #: [B, T] float; log-prob under the producing model, NaN where unknown (prompt, env markup, agents without a shared tokenizer)
    prompt_lens: torch.Tensor  #: [B] long; where each response starts
    rewards: torch.Tensor  #: [B] float; outcome reward per trajectory
    group_ids: list[
        str
    ]  #: per row: trajectories of the same prompt share a group id (advantages are computed within a group)
    agent_names: tuple[str, ...]  #: maps SOURCE_AGENT_BASE + i to an agent name

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
