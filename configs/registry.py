"""Config values that name a registry entry: one check, one error for every registry.

The project's registries (protocols, rollout strategies, agent kinds, loss modes,
advantage estimators) are plain dicts from a name to what it builds; a config field
naming one is checked here, so every unknown name fails the same way, listing the
names the registry holds.
"""

from __future__ import annotations

from collections.abc import Mapping


def check_registered(value: str, registry: Mapping[str, object], what: str) -> str:
    """``value`` when ``registry`` holds it.

    Raises:
        ValueError: ``unknown <what> '<value>'; expected one of <the registry's names>``.
    """
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(registry)}")
    return value
