"""Config resolution: the values one section derives from another, every one reported.

A config declares; resolution derives, once, in one place. What the user left unset and
another section decides (a tool protocol's agent names, its empty agent pool, a
``loss.agent_mode`` that may not train tool output, the episode's context) is set here,
and each value set is a :class:`Change` (path, old value, new value, why). A value the
user set is never replaced: a conflict is an error naming both settings.

Shared by the embedded trainer's ``TrainConfig`` and the OpenRLHF recipe
(``trainers/openrlhf/config.py``), which keep the changes (``.resolved``) for
``aipo train --dry-run`` to print and the run to log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agents.config import AgentPoolConfig
from aipo_env.config import EnvConfig
from aipo_env.protocols import PROTOCOLS
from trainers.losses import LossConfig


@dataclass(frozen=True)
class Change:
    """One value resolution set: where, from what, to what, and why."""

    path: str  #: the dotted config key, as an override would name it
    old: Any
    new: Any
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.old!r} -> {self.new!r} ({self.why})"


def describe(changes: Iterable[Change]) -> str:
    """The changes, one per line, for ``--dry-run`` and the run's log ("none" when empty)."""
    lines = [f"  {change}" for change in changes]
    return "\n".join(lines) if lines else "  none: every value is as declared"


@dataclass
class ProtocolSections:
    """The sections a protocol's declarations decide, as resolution leaves them."""

    env: EnvConfig
    loss: LossConfig
    agents: AgentPoolConfig
    changes: list[Change]


def resolve_protocol(
    env: EnvConfig,
    loss: LossConfig,
    agents: AgentPoolConfig,
    *,
    agents_declared: bool,
    env_path: str = "env",
    loss_path: str = "loss",
    agents_path: str = "agents",
) -> ProtocolSections:
    """Derive what ``env.protocol`` declares about itself into the env, loss and agent sections.

    A protocol that tools answer (``protocol.tools``): ``env.agent_names``, left unset,
    becomes the tools (their results are injected as ``agent:<tool>``); ``agents``, unless
    ``agents_declared``, becomes an empty pool. A protocol whose replies may not be
    trained: ``loss.agent_mode``, left unset, becomes ``mask``. ``*_path`` name the
    sections in the config the changes and errors speak of.

    Raises:
        ValueError: ``env.protocol`` names a protocol no config can build (``idea3``, played
            between peers), ``env.agent_names`` set without a tool, or ``loss.agent_mode``
            set to train replies the protocol says may not be trained.
    """
    protocol = PROTOCOLS[env.protocol]
    protocol.from_config(env)  # a protocol no config can build (idea3) is refused here
    changes: list[Change] = []
    if protocol.tools:
        tools = list(protocol.tools)
        if "agent_names" not in env.model_fields_set and env.agent_names != tools:
            changes.append(
                Change(
                    f"{env_path}.agent_names",
                    env.agent_names,
                    tools,
                    f"env.protocol {env.protocol!r} is answered by these tools",
                )
            )
            env = env.model_copy(update={"agent_names": tools})
        missing = [tool for tool in tools if tool not in env.agent_names]
        if missing:
            raise ValueError(
                f"{env_path}.agent_names {env.agent_names} lacks {missing}: {env_path}.protocol "
                f"{env.protocol!r} injects tool results as agent:<tool>; add them, or leave "
                f"{env_path}.agent_names unset"
            )
        if not agents_declared and agents.agents:
            changes.append(
                Change(
                    f"{agents_path}.agents",
                    sorted(agents.agents),
                    [],
                    f"env.protocol {env.protocol!r} is answered by tools, not the agent pool",
                )
            )
            agents = agents.model_copy(update={"agents": {}})
    if not protocol.trainable_replies:
        if "agent_mode" not in loss.model_fields_set and loss.agent_mode != "mask":
            changes.append(
                Change(
                    f"{loss_path}.agent_mode",
                    loss.agent_mode,
                    "mask",
                    f"env.protocol {env.protocol!r} replies are no model's samples",
                )
            )
            loss = loss.model_copy(update={"agent_mode": "mask"})
        if loss.agent_mode != "mask":
            raise ValueError(
                f"{loss_path}.agent_mode {loss.agent_mode!r} would train the tools' output under "
                f"{env_path}.protocol {env.protocol!r}; a tool result is no model's sample (ARPO "
                f"masks it): set {loss_path}.agent_mode=mask"
            )
    return ProtocolSections(env, loss, agents, changes)
