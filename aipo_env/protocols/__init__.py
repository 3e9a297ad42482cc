"""Interaction protocols: the language of an episode, one module each (contract in :mod:`.base`).

A new protocol is one new module with an :class:`~aipo_env.protocols.base.InteractionProtocol`
subclass and one entry in :data:`PROTOCOLS`; ``EnvConfig.protocol`` selects it by name. A
protocol tools answer declares them (:attr:`~aipo_env.protocols.base.InteractionProtocol.tools`);
a one-tag tool subclasses :class:`~aipo_env.protocols.one_tag.OneTagToolProtocol` and
needs a tool service of the tag's name (``agents.tool_services.TOOL_SERVICES``). ILR's
``idea3`` is played between peers (:mod:`aipo_env.peer_episode`), never built from a config.
"""

from __future__ import annotations

from aipo_env.protocols.base import (
    InteractionProtocol,
    ProtocolSettings,
    Request,
    ToolUseProtocol,
    encode_injected,
)
from aipo_env.protocols.consult import ConsultProtocol
from aipo_env.protocols.one_tag import OneTagToolProtocol
from aipo_env.protocols.peer import Idea3Protocol
from aipo_env.protocols.python_tool import PythonToolProtocol
from aipo_env.protocols.tools import ToolProtocol
from configs.registry import check_registered

#: Protocol name (``EnvConfig.protocol``) -> class.
PROTOCOLS: dict[str, type[InteractionProtocol]] = {
    ConsultProtocol.name: ConsultProtocol,
    PythonToolProtocol.name: PythonToolProtocol,
    ToolProtocol.name: ToolProtocol,
    Idea3Protocol.name: Idea3Protocol,
}


def make_protocol(config: ProtocolSettings) -> InteractionProtocol:
    """The protocol ``config.protocol`` names, built from the config's instructions and roles."""
    check_registered(config.protocol, PROTOCOLS, "protocol")
    return PROTOCOLS[config.protocol].from_config(config)


__all__ = [
    "PROTOCOLS",
    "ConsultProtocol",
    "Idea3Protocol",
    "InteractionProtocol",
    "OneTagToolProtocol",
    "ProtocolSettings",
    "PythonToolProtocol",
    "Request",
    "ToolProtocol",
    "ToolUseProtocol",
    "encode_injected",
    "make_protocol",
]
