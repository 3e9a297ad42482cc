"""Rollout strategies by name: ``rollout.strategy`` selects one (contract in :mod:`.rollout_strategy`).

A new strategy is one new module with a :class:`~aipo_env.rollout_strategy.RolloutStrategy`
subclass and one entry in :data:`STRATEGIES`; :class:`~aipo_env.rollout.RolloutConfig`
accepts the names listed here and :class:`~aipo_env.rollout.RolloutDriver` builds the one
named for each batch.
"""

from __future__ import annotations

from aipo_env.independent_rollout import IndependentRollout
from aipo_env.rollout_strategy import RolloutStrategy
from aipo_env.tree_rollout import TreeRollout

#: Strategy name (``rollout.strategy``) -> class.
STRATEGIES: dict[str, type[RolloutStrategy]] = {
    IndependentRollout.name: IndependentRollout,
    TreeRollout.name: TreeRollout,
}

__all__ = ["STRATEGIES", "IndependentRollout", "RolloutStrategy", "TreeRollout"]
