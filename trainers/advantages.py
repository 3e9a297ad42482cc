"""Sequence-level advantages from a group of rollouts of the same prompt, and reward shaping.

Every trajectory gets one scalar advantage ``A`` (the loss broadcasts it over its tokens).
Trajectories of the same prompt share a *group id*; each estimator compares a reward with
the other rewards of its group (``R`` a reward, ``g`` its group, ``n`` the group's size):

============================ ===================================================================
estimator                    advantage
============================ ===================================================================
``grpo``                     ``(R - mean_g) / (std_g + eps)``; ``std_g`` is the *unbiased*
                             (``n - 1``) standard deviation, as ``torch.std`` in OpenRLHF's
                             ``group_norm``; ``eps`` is 1e-6 here (OpenRLHF uses 1e-9; pass
                             ``eps=1e-9`` to reproduce it exactly)
``dr_grpo``                  ``R - mean_g`` (Dr. GRPO: no division by the group's std)
``rloo``                     ``R - (sum_g - R) / (n - 1)`` (leave-one-out baseline)
``reinforce_baseline``       ``R - mean_g``, then whitened over the whole batch:
                             ``(a - mean) / sqrt(max(var, 1e-8))`` with the biased variance, as
                             OpenRLHF's ``reinforce_baseline`` (which whitens over action tokens:
                             pass each response's token count as ``token_weights`` to match it)
============================ ===================================================================

Groups may have different sizes and need not be contiguous. Every estimator here needs at
least two rollouts per group; a group of one raises ``ValueError``, unless
``lone_groups="zero"``: then its rollout gets advantage 0 (nothing to compare it with) and the
estimator runs on the other rows.

Baseline groups (:func:`baseline_group_ids`, ``train.advantage_groups``): ``prompt`` compares
a sample with every sample of its prompt; ``prompt_and_consult`` only with the samples of its
prompt that consulted as it did (at least once, or never), so a solo attempt is not judged
against rewards raised by an agent's help, nor a consulting one against solo failures. A
subgroup of one (the only sample of its prompt that consulted, or the only one that did not)
gets advantage 0.

A group whose rewards are all equal gets advantage exactly 0 from ``grpo``, ``dr_grpo`` and
``rloo`` (not a rounding of it), so the update can leave its rows out of the forward
(:func:`trainers.update.zero_gradient_rows`); ``reinforce_baseline``'s whitening moves it.

Also here: dynamic sampling (DAPO), which drops groups whose rewards are all equal (their
group advantages are all zero, so they carry no gradient), and DAPO's overlong reward shaping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Names accepted by :func:`compute_advantages`.
ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")
#: Names accepted by :func:`baseline_group_ids`.
ADVANTAGE_GROUPS: tuple[str, ...] = ("prompt", "prompt_and_consult")

GroupIds = Sequence[str] | torch.Tensor


def group_index(group_ids: GroupIds, batch_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Map group ids to dense indices ``0..G-1`` (in order of first appearance).

    Returns ``(index [B] long, G)``. ``group_ids`` is a list of strings (as in
    ``TrajectoryBatch.group_ids``) or an integer tensor ``[B]``.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1 or group_ids.dtype.is_floating_point:
            raise ValueError(
                f"group_ids tensor must be 1-D integer, got shape {tuple(group_ids.shape)} "
                f"dtype {group_ids.dtype}"
            )
        keys: list[object] = group_ids.tolist()
    else:
        keys = list(group_ids)
    if batch_size is not None and len(keys) != batch_size:
        raise ValueError(
            f"got {len(keys)} group ids for {batch_size} rewards; expected one per row"
        )
    dense: dict[object, int] = {}
    index = [dense.setdefault(key, len(dense)) for key in keys]
    return torch.tensor(index, dtype=torch.long), len(dense)


def baseline_group_ids(
    group_ids: Sequence[str], consulted: Sequence[bool], advantage_groups: str = "prompt"
) -> list[str]:
    """The groups whose rewards form each sample's baseline (module docstring).

    ``group_ids`` are the prompts' groups, ``consulted`` whether each sample consulted at
    least once. ``prompt`` returns ``group_ids``; ``prompt_and_consult`` splits each group
    into its consulting and its solo samples.
    """
    if len(consulted) != len(group_ids):
        raise ValueError(
            f"got {len(consulted)} consulted flags for {len(group_ids)} group ids; expected one per row"
        )
    if advantage_groups == "prompt":
        return list(group_ids)
    if advantage_groups == "prompt_and_consult":
        return [
            f"{g} ({'consult' if c else 'solo'})" for g, c in zip(group_ids, consulted, strict=True)
        ]
    raise ValueError(
        f"unknown advantage_groups {advantage_groups!r}; expected one of {', '.join(ADVANTAGE_GROUPS)}"
    )


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    return rewards.float() if not rewards.dtype.is_floating_point else rewards


def _group_stats(
    rewards: torch.Tensor, group_ids: GroupIds
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(index, group size, group sum)``; raises on groups of one."""
    rewards = _check_rewards(rewards)
    index, n_groups = group_index(group_ids, rewards.shape[0])
    index = index.to(rewards.device)
    counts = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device)
    counts.index_add_(0, index, torch.ones_like(rewards))
    if (counts < 2).any():
        singles = [
            str(group_ids[i] if not isinstance(group_ids, torch.Tensor) else group_ids[i].item())
            for i in range(rewards.shape[0])
            if counts[index[i]] < 2
        ]
        raise ValueError(
            f"group estimators need at least 2 rollouts per group; groups of size 1: {singles}"
        )
    sums = torch.zeros_like(counts).index_add_(0, index, rewards)
    return index, counts[index], sums[index]


def _uniform(rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: rows whose group's rewards are all equal."""
    groups = int(index.max()) + 1
    hi = torch.full((groups,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    lo = torch.full((groups,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    hi = hi.scatter_reduce(0, index, rewards, reduce="amax")
    lo = lo.scatter_reduce(0, index, rewards, reduce="amin")
    return (hi == lo)[index]


def _exact_zero(
    advantages: torch.Tensor, rewards: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """``advantages`` with exactly 0 where the group's rewards are all equal.

    The estimator is 0 there; its floats need not be (``mean_g`` of equal rewards can
    round off them), and an exact 0 lets the update skip the row (its gradient is zero).
    """
    return torch.where(_uniform(rewards, index), torch.zeros_like(advantages), advantages)


def grpo_advantages(rewards: torch.Tensor, group_ids: GroupIds, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(R - mean_g) / (std_g + eps)`` with the unbiased (``n - 1``) group std."""
    rewards = _check_rewards(rewards)
    index, n, total = _group_stats(rewards, group_ids)
    centred = rewards - total / n
    sq = torch.zeros(int(index.max()) + 1, dtype=rewards.dtype, device=rewards.device)
    sq.index_add_(0, index, centred**2)
    std = (sq[index] / (n - 1)).sqrt()
    return _exact_zero(centred / (std + eps), rewards, index)


def dr_grpo_advantages(rewards: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """Dr. GRPO: ``R - mean_g``."""
    rewards = _check_rewards(rewards)
    index, n, total = _group_stats(rewards, group_ids)
    return _exact_zero(rewards - total / n, rewards, index)


def rloo_advantages(rewards: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """RLOO: ``R - (sum_g - R) / (n - 1)``, the mean of the *other* rollouts as baseline."""
    rewards = _check_rewards(rewards)
    index, n, total = _group_stats(rewards, group_ids)
    return _exact_zero(rewards - (total - rewards) / (n - 1), rewards, index)


def reinforce_baseline_advantages(
    rewards: torch.Tensor,
    group_ids: GroupIds,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE++-baseline: ``a = R - mean_g``, then ``(a - m) / sqrt(max(v, 1e-8))``.

    ``m`` and ``v`` (biased) are the batch mean and variance of ``a``, each row weighted by
    ``token_weights[i]`` (OpenRLHF whitens over action tokens, so a row counts once per
    response token); ``None`` weights every row equally.
    """
    centred = dr_grpo_advantages(rewards, group_ids)
    if token_weights is None:
        weights = torch.ones_like(centred)
    else:
        weights = token_weights.to(device=centred.device, dtype=centred.dtype)
        if weights.shape != centred.shape or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"token_weights must be non-negative with shape {tuple(centred.shape)} and a "
                f"positive sum, got {weights.tolist()}"
            )
    total = weights.sum()
    mean = (centred * weights).sum() / total
    var = ((centred - mean) ** 2 * weights).sum() / total
    return (centred - mean) * var.clamp(min=1e-8).rsqrt()


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: GroupIds,
    estimator: str = "grpo",
    *,
    eps: float = 1e-6,
    token_weights: torch.Tensor | None = None,
    lone_groups: str = "raise",
) -> torch.Tensor:
    """Advantages ``[B]`` for ``rewards [B]`` grouped by ``group_ids`` with ``estimator``.

    ``estimator`` is one of :data:`ESTIMATORS` (formulas in the module docstring). ``eps``
    applies to ``grpo``; ``token_weights`` to ``reinforce_baseline``. A group of one
    raises ``ValueError`` (``lone_groups="raise"``) or gets advantage 0 (``"zero"``; the
    estimator, ``reinforce_baseline``'s whitening included, runs on the other rows).
    """
    if lone_groups not in ("raise", "zero"):
        raise ValueError(f"unknown lone_groups {lone_groups!r}; expected 'raise' or 'zero'")
    if lone_groups == "zero":
        rewards = _check_rewards(rewards)
        index, n_groups = group_index(group_ids, rewards.shape[0])
        sizes = torch.bincount(index, minlength=n_groups)[index]
        if (sizes < 2).any():
            rows = (sizes >= 2).nonzero(as_tuple=True)[0]
            advantages = torch.zeros_like(rewards)
            if rows.numel():
                advantages[rows.to(rewards.device)] = compute_advantages(
                    rewards[rows.to(rewards.device)],
                    index[rows],
                    estimator,
                    eps=eps,
                    token_weights=None if token_weights is None else token_weights[rows],
                )
            return advantages
    if estimator == "grpo":
        return grpo_advantages(rewards, group_ids, eps=eps)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards, group_ids)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_ids)
    if estimator == "reinforce_baseline":
        return reinforce_baseline_advantages(rewards, group_ids, token_weights=token_weights)
    raise ValueError(
        f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}"
    )


@dataclass(frozen=True)
class GroupFilter:
    """Which rows dynamic sampling keeps, and how many groups it dropped."""

    keep_mask: torch.Tensor  #: [B] bool; True on rows of groups whose rewards differ
    kept_indices: torch.Tensor  #: [K] long; the indices of the kept rows, ascending
    n_groups: int  #: groups in the batch
    n_groups_kept: int  #: groups with at least two distinct rewards
    n_groups_dropped: int  #: groups whose rewards are all equal (all solved or all failed)


def filter_uniform_groups(
    rewards: torch.Tensor, group_ids: GroupIds, atol: float = 0.0
) -> GroupFilter:
    """Dynamic sampling (DAPO): drop groups whose rewards are all equal (within ``atol``).

    Such a group has zero group-relative advantage on every row, so it only dilutes the
    batch. A group of one is uniform by definition and is dropped.
    """
    rewards = _check_rewards(rewards)
    index, n_groups = group_index(group_ids, rewards.shape[0])
    index = index.to(rewards.device)
    hi = torch.full((n_groups,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    lo = torch.full((n_groups,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    hi = hi.scatter_reduce(0, index, rewards, reduce="amax")
    lo = lo.scatter_reduce(0, index, rewards, reduce="amin")
    varied = (hi - lo) > atol
    keep = varied[index]
    kept = int(varied.sum())
    return GroupFilter(
        keep_mask=keep,
        kept_indices=keep.nonzero(as_tuple=True)[0],
        n_groups=n_groups,
        n_groups_kept=kept,
        n_groups_dropped=n_groups - kept,
    )


def overlong_penalty(
    response_lengths: torch.Tensor | Sequence[int],
    max_len: int,
    buffer_len: int,
    factor: float = 1.0,
) -> torch.Tensor:
    """DAPO overlong reward shaping, a penalty ``[B]`` (<= 0) to add to the rewards.

    With ``L = max_len - buffer_len``: ``0`` if ``len <= L``; ``-(len - L) / buffer_len *
    factor`` inside the buffer; ``-factor`` at ``max_len`` and beyond. This is OpenRLHF's
    ``-min(len - L, buffer_len) / buffer_len * factor`` (``length_penalty.py``).
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    if lengths.dim() != 1:
        raise ValueError(f"response_lengths must have shape [B], got {tuple(lengths.shape)}")
    exceed = (lengths - (max_len - buffer_len)).clamp(min=0.0, max=float(buffer_len))
    return -exceed / buffer_len * factor
