"""The one authority on which tokens the loss trains.

The environment records facts per token (its source, :mod:`aipo_env.sources`) and per
trajectory (``tokenization_drift``); a :class:`MaskRule` turns those facts into a loss
mask. Every consumer decides through this module: the env when it stores a
trajectory's ``loss_mask``, :func:`aipo_env.batch.collate`, the embedded trainer and
the AIPO loss (:func:`trained_token_masks`), and the OpenRLHF executor and loss.

The rule:

- policy tokens are trained;
- injected tokens (agents, tools, peers) are trained only when ``train_injected``
  (AIPO's ``shaped`` and ``ratio`` agent modes), and with ``injected_positive_only``
  only in trajectories whose advantage is positive;
- prompt and env tokens (markup, error texts) are never trained;
- with ``mask_on_drift``, nothing of a trajectory with tokenization drift is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aipo_env import sources

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MaskRule:
    """Which tokens the loss trains; the default trains the policy's tokens only."""

    train_injected: bool = False
    injected_positive_only: bool = False
    mask_on_drift: bool = False


def loss_mask(labels: Sequence[str], rule: MaskRule, *, drift: bool = False) -> list[int]:
    """Per token, 1 where the loss trains it (before any advantage is known)."""
    if drift and rule.mask_on_drift:
        return [0] * len(labels)
    return [
        int(label == sources.POLICY or (rule.train_injected and sources.is_injected(label)))
        for label in labels
    ]


def injected_mask(labels: Sequence[str]) -> list[bool]:
    """Per token, whether it was injected from outside the policy (agent, tool or peer)."""
    return [sources.is_injected(label) for label in labels]


def trained_token_masks(
    rule: MaskRule,
    loss_mask: torch.Tensor,
    injected: torch.Tensor,
    advantages: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(policy, injected)`` bool ``[B, T]`` masks of the tokens the loss trains and counts.

    ``policy = loss_mask & ~injected``; ``injected = loss_mask & injected`` unless the rule
    does not train injected tokens (then empty) or trains them only where ``A > 0``.
    Their union is the normaliser of ``token_mean``: a trainer that splits a minibatch
    into micro-batches weights each by its share of ``(policy | injected).sum()``.
    ``advantages`` is ``[B]`` or ``[B, T]``.
    """
    import torch

    in_loss = loss_mask.bool()
    injected = injected.bool()
    policy = in_loss & ~injected
    if not rule.train_injected:
        return policy, torch.zeros_like(policy)
    trained = in_loss & injected
    if rule.injected_positive_only:
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        # NaN advantages compare False, so they never select a token.
        trained = trained & (adv > 0)
    return policy, trained
