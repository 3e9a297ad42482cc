"""The tools behind a run's protocol: ``tools:`` in a training config or an OpenRLHF executor.

A protocol that tools answer declares them (``InteractionProtocol.tools``: ARPO's
``tools`` protocol ``python`` and ``search``, ``python_tool`` ``python``); the consult
service is then a tool set, not the agent pool. How each tool is built, and the
``tools:`` settings, are :mod:`agents.tool_services` (:data:`TOOL_SERVICES`, keyed by
tool name); this module asks the protocol which tools it needs:
:func:`check_tools` refuses, when a config is read, a protocol whose tool has no service
or lacks a setting, and :func:`make_tool_service` builds a protocol's tool set.
"""

from __future__ import annotations

from agents.base import ConsultService
from agents.tool_services import (
    TOOL_SERVICES,
    ToolsConfig,
    ToolService,
    check_tool_services,
    corpus_path,
    make_tool_set,
)
from aipo_env.protocols import PROTOCOLS


def check_tools(config: ToolsConfig, protocol: str) -> None:
    """Refuse ``protocol`` when one of its tools has no service or ``config`` cannot serve it.

    Raises:
        ValueError: naming the tool without a registered service (and the registered
            ones), or the setting a tool lacks.
    """
    check_tool_services(config, PROTOCOLS[protocol].tools, protocol)


def make_tool_service(config: ToolsConfig, protocol: str) -> ConsultService | None:
    """The tool set answering ``protocol``'s requests; None for a protocol the agent pool answers."""
    tools = PROTOCOLS[protocol].tools
    return make_tool_set(config, tools, protocol) if tools else None


__all__ = [
    "TOOL_SERVICES",
    "ToolService",
    "ToolsConfig",
    "check_tools",
    "corpus_path",
    "make_tool_service",
]
