"""The tools a run's tool protocols call: ``tools:`` in a training config or an OpenRLHF executor.

Under ``env.protocol: tools`` (ARPO's ``<python>`` and ``<search>``) or ``python_tool``
the consult service is a tool set, not the agent pool: :func:`make_tool_service`
builds it from :class:`ToolsConfig` (:class:`agents.tools.ToolBox` with its
:class:`~agents.tools.PythonRunner` and :class:`~agents.search.SearchIndex`). A search
with no index is refused when the config is read, naming ``tools.search_index``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.base import ConsultService

#: Protocols whose requests a tool set answers, not the agent pool.
TOOL_PROTOCOLS = ("tools", "python_tool")
#: The agent names a tool protocol's injected tokens carry (``agent:<name>``).
TOOL_NAMES = {"tools": ["python", "search"], "python_tool": ["python"]}


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

    def check_for(self, protocol: str) -> None:
        """Refuse a search-enabled tool set without an index under ``protocol`` (ValueError)."""
        if protocol == "tools" and self.search and self.search_index is None:
            raise ValueError(
                "tools.search_index is not set, but env.protocol 'tools' answers <search> "
                "requests: set tools.search_index to a JSONL corpus (or 'tiny', the packaged "
                "example), or set tools.search=false"
            )


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


def make_tool_service(config: ToolsConfig, protocol: str) -> ConsultService | None:
    """The tool set answering ``protocol``'s requests; None for a protocol tools do not answer."""
    if protocol not in TOOL_PROTOCOLS:
        return None
    from agents.search import SearchIndex
    from agents.tools import PythonRunner, ToolBox

    config.check_for(protocol)
    python = PythonRunner(
        config.python_timeout_s, sandbox=config.sandbox, memory_mb=config.python_memory_mb
    )
    if protocol == "python_tool":
        return python
    search = None
    if config.search and config.search_index is not None:
        search = SearchIndex.from_jsonl(corpus_path(config.search_index), k=config.search_k)
    return ToolBox(python, search, max_reply_chars=config.max_reply_chars)
