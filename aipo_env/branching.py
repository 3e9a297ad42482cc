"""ARPO's entropy-based branching, as pure functions: how uncertain the policy is, whether to branch.

ARPO (arXiv 2507.19849) branches a rollout after a tool round when the policy's entropy
over the first ``k`` tokens it writes after the result rises above the entropy of the
trajectory's first segment:

- ``H = mean over the first k positions of (-sum_j p_j log p_j) / log |V|``, the sum
  over each position's top log-probs (:func:`normalized_entropy`);
- ``dH = H_now - H_initial``;
- a path branches (spawning ``beam_size - 1`` copies) unless
  ``clip(u - entropy_weight * dH, 0, 1) > branch_probability`` with ``u ~ U[0, 1)``
  (:func:`should_branch`); for ``branch_probability < 1`` that is
  ``u <= branch_probability + entropy_weight * dH``, so it branches with probability
  ``clip(branch_probability + entropy_weight * dH, 0, 1)``, and always with ``1``;
- while the prompt's tree has room for more of its ``N`` leaves (:class:`BranchBudget`).

The driver that forks episodes (:meth:`aipo_env.env.ConsultEnv.fork`) builds on these.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field


def normalized_entropy(
    top_logprobs: Sequence[Sequence[float]], vocab_size: int, k: int = 20
) -> float:
    """The mean entropy of the first ``k`` positions, each over its top log-probs, over ``log(vocab_size)``.

    Each position contributes ``-sum exp(lp) * lp`` over the log-probs it lists. The top
    probabilities are used raw, not renormalised to sum to one, as ARPO does: the mass
    outside the top-k simply does not count, so the value is a lower estimate of the
    full entropy that stays comparable between segments sampled with the same top-k.
    A ``-inf`` log-prob (probability 0) contributes 0. With no positions the entropy is 0.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size {vocab_size}; expected at least 2 (log |V| normalises)")
    if k < 1:
        raise ValueError(f"k {k}; expected at least 1 position")
    positions = list(top_logprobs)[:k]
    if not positions:
        return 0.0
    total = 0.0
    for logprobs in positions:
        total -= sum(math.exp(lp) * lp for lp in logprobs if lp != -math.inf)
    return total / len(positions) / math.log(vocab_size)


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def should_branch(
    rng: random.Random,
    dh: float,
    *,
    entropy_weight: float = 0.2,
    branch_probability: float = 0.5,
) -> bool:
    """ARPO's rule: branch unless ``clip(rng.random() - entropy_weight * dh, 0, 1) > branch_probability``.

    Draws exactly one ``rng.random()`` per call, so a seeded ``rng`` makes a tree's
    branching decisions reproducible.
    """
    _check_probability(branch_probability)
    return not _clip(rng.random() - entropy_weight * dh) > branch_probability


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"branch_probability {p}; expected a value in [0, 1]")


@dataclass
class BranchBudget:
    """The leaves of one prompt's rollout tree: ``leaves`` (N) in all, ``initial`` (M) sampled first.

    Every branch takes its copies from the budget (:meth:`take`); when the tree stops
    branching, :meth:`fill` says how many fresh samples bring it to exactly N leaves.
    """

    leaves: int
    initial: int
    used: int = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.initial <= self.leaves:
            raise ValueError(
                f"initial samples {self.initial} and leaves {self.leaves}; "
                "expected 1 <= initial <= leaves"
            )
        self.used = self.initial

    def room(self) -> int:
        """How many more leaves the tree may grow."""
        return self.leaves - self.used

    def take(self, n: int) -> int:
        """Take up to ``n`` leaves for a branch's copies; returns how many were granted (maybe 0)."""
        if n < 0:
            raise ValueError(f"cannot take {n} leaves; expected n >= 0")
        granted = min(n, self.room())
        self.used += granted
        return granted

    def fill(self) -> int:
        """Take the rest: how many fresh samples complete the tree to exactly ``leaves``."""
        return self.take(self.room())
