"""Tool services by tool name: how each tool that answers a protocol's requests is built.

A protocol that tools answer declares their names (``InteractionProtocol.tools``);
:data:`TOOL_SERVICES` says how each name's service is built from :class:`ToolsConfig`
(``tools:`` in a training config, an OpenRLHF executor or an evaluation) and what it
needs. :func:`check_tool_services` refuses, when a config is read, a tool with no
service or without its setting (a search with no index, naming ``tools.search_index``);
:func:`make_tool_set` builds the :class:`agents.tools.ToolSet` that answers the tools.

A new tool is one entry here (its build, and its check when it needs a setting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.base import ConsultService


class ToolsConfig(BaseModel):
    """The tool set behind a tool protocol: the Python sandbox and the search index."""

    model_config = ConfigDict(extra="forbid")

    search: bool = Field(
        default=True,
        description=(
            "Answer <search> requests (env.protocol tools). Then search_index is required; "
            "off, a search gets an error result (say so in env.instructions)."
        ),
    )
    search_index: str | None = Field(
        default=None,
        description=(
            'The search corpus: a JSONL file with one {"id": ..., "text": ...} per line, or '
            "the name of a packaged corpus (configs/corpora/NAME.jsonl, e.g. 'tiny')."
        ),
    )
    search_k: int = Field(default=3, ge=1, description="Passages one search result holds.")
    python_timeout_s: float = Field(
        default=5.0, gt=0.0, description="Wall-time limit of one <python> run, seconds."
    )
    python_memory_mb: int = Field(
        default=512, ge=16, description="Memory limit of one <python> run, MiB."
    )
    sandbox: Literal["auto", "bwrap", "none"] = Field(
        default="auto",
        description="Where <python> runs: auto (bubblewrap when it works here), bwrap (required) or none (tasks/sandbox.py).",
    )
    max_reply_chars: int = Field(
        default=8000,
        ge=1,
        description="A tool's output is cut to this many characters (then to env.max_reply_tokens).",
    )

    @field_validator("search_index")
    @classmethod
    def _corpus_exists(cls, value: str | None) -> str | None:
        if value is not None:
            corpus_path(value)  # a missing corpus fails when the config is read
        return value


def corpus_path(name: str) -> Path:
    """The JSONL file ``name`` names: a path, else a packaged corpus; ValueError when neither."""
    from agents.search import packaged_corpus

    path = Path(name).expanduser()
    if path.is_file():
        return path
    try:
        return packaged_corpus(name)
    except FileNotFoundError as exc:
        raise ValueError(
            f"search corpus {name!r} is neither a file nor a packaged corpus ({exc})"
        ) from None


def _no_check(config: ToolsConfig, protocol: str) -> None:
    """A tool that needs no setting."""


@dataclass(frozen=True)
class ToolService:
    """How one tool's service is built from ``tools:``, and what it needs from them."""

    #: The service answering the tool's name (``names`` holds it).
    build: Callable[[ToolsConfig], ConsultService]
    #: Raises ValueError, naming the setting, when ``tools:`` cannot serve the tool
    #: under the protocol named (checked when a config is read).
    check: Callable[[ToolsConfig, str], None] = _no_check


def _python(config: ToolsConfig) -> ConsultService:
    from agents.tools import PythonRunner

    return PythonRunner(
        config.python_timeout_s, sandbox=config.sandbox, memory_mb=config.python_memory_mb
    )


def _search(config: ToolsConfig) -> ConsultService:
    from agents.search import SearchIndex
    from agents.tools import SearchTool

    index = None
    if config.search and config.search_index is not None:
        index = SearchIndex.from_jsonl(corpus_path(config.search_index), k=config.search_k)
    return SearchTool(index)


def _search_needs_index(config: ToolsConfig, protocol: str) -> None:
    if config.search and config.search_index is None:
        raise ValueError(
            f"tools.search_index is not set, but env.protocol {protocol!r} answers <search> "
            "requests: set tools.search_index to a JSONL corpus (or 'tiny', the packaged "
            "example), or set tools.search=false"
        )


#: Tool name (a tool protocol's target) -> how its service is built.
TOOL_SERVICES: dict[str, ToolService] = {
    "python": ToolService(_python),
    "search": ToolService(_search, _search_needs_index),
}


def check_tool_services(config: ToolsConfig, tools: Sequence[str], protocol: str) -> None:
    """Refuse ``tools`` (those of ``protocol``) when one has no service or ``config`` cannot serve it.

    Raises:
        ValueError: naming the tool without a registered service (and the registered
            ones), or the setting a tool lacks.
    """
    for tool in tools:
        if tool not in TOOL_SERVICES:
            raise ValueError(
                f"env.protocol {protocol!r} calls the tool {tool!r}, which has no service: "
                f"register one as TOOL_SERVICES[{tool!r}] in agents/tool_services.py "
                f"(registered: {', '.join(TOOL_SERVICES)})"
            )
        TOOL_SERVICES[tool].check(config, protocol)


def make_tool_set(config: ToolsConfig, tools: Sequence[str], protocol: str) -> ConsultService:
    """The :class:`agents.tools.ToolSet` answering ``tools`` (those of ``protocol``), checked first."""
    from agents.tools import ToolSet

    check_tool_services(config, tools, protocol)
    services = {tool: TOOL_SERVICES[tool].build(config) for tool in tools}
    return ToolSet(services, max_reply_chars=config.max_reply_chars)
