"""Task registry: a short name mapped to a factory, so a task can be made anywhere.

Built-in tasks register when :mod:`tasks` is imported; users add their own with
:func:`register_task`. Factories are cheap: nothing is downloaded or loaded until
a task's ``problems`` are first read.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.base import Task


class TaskSpec(BaseModel):
    """What the registry knows about one task without making it."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(description="Registered name, e.g. 'math500'.")
    description: str = Field(description="One line: what the problems are and how they are scored.")
    source: str = Field(
        description="Where the problems come from: a Hugging Face id, 'reasoning-gym', or a path."
    )
    size: int | None = Field(default=None, description="Number of problems when known statically.")
    factory: Callable[..., Task] = Field(exclude=True, repr=False, description="Makes the task.")


class UnknownTaskError(KeyError):
    """No task is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


_REGISTRY: dict[str, TaskSpec] = {}
#: Name prefixes with a factory that takes the rest of the name (``rg:<dataset>``).
_PREFIXES: dict[str, Callable[..., Task]] = {}
#: Prefix -> the names valid after it, where the prefix's source can list them.
_PREFIX_NAMES: dict[str, Callable[[], Iterable[str]]] = {}


def register_task(
    name: str,
    factory: Callable[..., Task],
    *,
    description: str,
    source: str,
    size: int | None = None,
    overwrite: bool = False,
) -> TaskSpec:
    """Register ``factory(**kwargs) -> Task`` under ``name``; returns its spec.

    Raises ValueError when ``name`` is taken, unless ``overwrite`` is true.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"task '{name}' is already registered (pass overwrite=True to replace it)")
    spec = TaskSpec(name=name, description=description, source=source, size=size, factory=factory)
    _REGISTRY[name] = spec
    return spec


def register_prefix(
    prefix: str,
    factory: Callable[..., Task],
    names: Callable[[], Iterable[str]] | None = None,
) -> None:
    """Route every name ``<prefix><rest>`` to ``factory(rest, **kwargs)`` (e.g. ``rg:``).

    ``names`` lists the valid ``rest``s, so :func:`check_task_name` can refuse a typo
    before anything is built.
    """
    _PREFIXES[prefix] = factory
    if names is not None:
        _PREFIX_NAMES[prefix] = names


def check_task_name(name: str) -> None:
    """Refuse a task name nothing is registered under, naming the closest registered ones.

    Cheap: nothing is built or downloaded. Raises :class:`UnknownTaskError`.
    """
    if name in _REGISTRY:
        return
    for prefix in _PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            listed = _PREFIX_NAMES.get(prefix)
            if listed is None:
                return
            valid = [f"{prefix}{rest}" for rest in listed()]
            if name in valid:
                return
            raise UnknownTaskError(_unknown(name, valid + list(_REGISTRY)))
    raise UnknownTaskError(_unknown(name, list(_REGISTRY)))


def _unknown(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    prefixes = ", ".join(f"{p}<name>" for p in _PREFIXES)
    return (
        f"unknown task '{name}'{hint} (registered: {', '.join(sorted(_REGISTRY))}"
        + (f", or {prefixes}" if prefixes else "")
        + "; 'aipo tasks' lists them)"
    )


def make_task(name: str, **kwargs: Any) -> Task:
    """Make the task registered as ``name``; kwargs go to its factory.

    Raises:
        UnknownTaskError: (a ``KeyError``) no such task; the message lists the registered ones.
    """
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec.factory(**kwargs)
    for prefix, factory in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return factory(name[len(prefix) :], **kwargs)
    known = ", ".join(sorted(_REGISTRY))
    prefixes = ", ".join(f"{p}<name>" for p in _PREFIXES)
    raise UnknownTaskError(
        f"unknown task '{name}'; expected one of: {known}"
        + (f" (or {prefixes})" if prefixes else "")
    )


def list_tasks() -> list[TaskSpec]:
    """Specs of every registered task, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
