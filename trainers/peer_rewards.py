"""ILR's perception calibration: each peer's rewards adjusted by how it did against the others.

With ``m`` peers answering the same question, ``R[i][k]`` the reward of peer ``i``'s
sample ``k``, ILR (Lin et al., arXiv 2509.26306) trains each peer with GRPO on

    R'[i][k] = R[i][k] + sum over l != i of
               clip((R[i][k] - mean R[l]) / (max R[l] - min R[l]), -1/(m-1), 1/(m-1))

so a sample that beats the other peers' average earns up to one extra point in all, and
one that falls behind loses up to one. When a peer's rewards are all equal its range is
zero; the term then takes its limit, ``sign(R[i][k] - mean R[l]) / (m - 1)`` (0 when equal).
Plain GRPO on ``R`` is the ablation (``calibration: false``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def perception_calibration(rewards: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """The calibrated rewards of every peer for one question (module docstring).

    ``rewards`` maps each peer to its samples' rewards (any count, at least one each).

    Raises:
        ValueError: fewer than two peers, or a peer with no samples.
    """
    if len(rewards) < 2:
        raise ValueError(f"perception calibration needs at least two peers, got {list(rewards)}")
    empty = [name for name, values in rewards.items() if len(values) == 0]
    if empty:
        raise ValueError(f"peers {empty} have no rewards for this question")
    bound = 1.0 / (len(rewards) - 1)
    tensors = {name: torch.tensor(list(v), dtype=torch.float64) for name, v in rewards.items()}
    out: dict[str, list[float]] = {}
    for name, own in tensors.items():
        adjusted = own.clone()
        for other, theirs in tensors.items():
            if other == name:
                continue
            gap = own - theirs.mean()
            spread = theirs.max() - theirs.min()
            if float(spread) > 0:
                term = (gap / spread).clamp(-bound, bound)
            else:
                term = torch.sign(gap) * bound
            adjusted = adjusted + term
        out[name] = adjusted.tolist()
    return out
