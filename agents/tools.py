"""Tools that answer requests like agents do: the consult service behind a tool protocol.

:class:`PythonRunner` answers :mod:`aipo_env.protocols.python_tool`'s ``<python>``
requests. The code runs in the project's code sandbox (:mod:`tasks.sandbox`:
bubblewrap where it runs, with no network, a private filesystem view and process,
CPU, wall-time and memory limits; else the documented weaker fallback), and its
standard output, or the last line of its error, is the reply.

:class:`SearchTool` answers ``<search>`` through an :class:`agents.search.SearchIndex`.
:class:`ToolSet` routes a protocol's requests to the tools it names; :class:`ToolBox` is
ARPO's set (:mod:`aipo_env.protocols.tools`): ``python`` and ``search``. Which service
answers which tool name is ``agents.tool_services.TOOL_SERVICES``.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Mapping

from agents.base import AgentReply, ConsultRequest, ConsultService
from agents.search import SearchIndex
from tasks.sandbox import Limits, resolve_sandbox, run_python

#: The error of a search request when no index was given, naming the setting that is missing.
NO_SEARCH_INDEX = (
    "no search index configured: pass ToolBox(search=SearchIndex.from_jsonl(PATH)) "
    "or ToolBox(search=SearchIndex([...passages]))"
)


class PythonRunner:
    """A consult service with one agent, ``python``: runs code in the code sandbox.

    ``sandbox``: ``"auto"`` (bubblewrap when it runs here), ``"bwrap"`` (required) or
    ``"none"``; resolved at the first request.
    """

    def __init__(self, timeout_s: float = 5.0, *, sandbox: str = "auto", memory_mb: int = 512):
        self.timeout_s = timeout_s
        # The CPU limit sits past the wall-time limit: a busy loop is reported as a timeout.
        self.limits = Limits(cpu_s=math.ceil(timeout_s) + 1, wall_s=timeout_s, memory_mb=memory_mb)
        self._requested = sandbox
        self._sandbox: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The single tool name."""
        return ("python",)

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Run ``request.question`` as a Python program; stdout (or the error) is the reply."""
        began = time.monotonic()
        if self._sandbox is None:  # probes bubblewrap once: off the event loop
            self._sandbox = await asyncio.to_thread(resolve_sandbox, self._requested)
        run = await run_python(
            request.question, stdin="", limits=self.limits, sandbox=self._sandbox
        )
        if run.failure.startswith("wall-time") or run.signal == signal.SIGXCPU:
            return AgentReply(agent="python", error=f"timed out after {self.timeout_s} s")
        if run.signal is not None:
            return AgentReply(agent="python", error=f"killed by signal {run.signal}")
        if run.failure:
            return AgentReply(agent="python", error=run.failure)
        text = run.stdout.strip()
        if run.exit_code != 0:
            last = run.stderr.strip().splitlines()[-1:] or ["error"]
            text = last[0]
        return AgentReply(agent="python", text=text, latency_s=time.monotonic() - began)


class SearchTool:
    """A consult service with one tool, ``search``: the best passages of an index for a query.

    Without an index (``index`` None) every search gets an error reply naming the missing
    setting; a training config that answers searches without one is refused when it is
    read (the search tool's check in ``agents/tool_services.py``).
    """

    def __init__(self, index: SearchIndex | None) -> None:
        self.index = index

    @property
    def names(self) -> tuple[str, ...]:
        """The single tool name."""
        return ("search",)

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """The passages best matching ``request.question``; never raises."""
        if self.index is None:
            return AgentReply(agent="search", error=NO_SEARCH_INDEX)
        # BM25 scoring is CPU work: off the event loop, so other episodes go on.
        text = await asyncio.to_thread(self.index.reply_text, request.question)
        return AgentReply(agent="search", text=text)


class ToolSet:
    """A consult service over named tools: routes each request to the tool it names.

    ``tools`` maps a tool name to the service answering it (each answers that one name).
    A reply's text is cut to ``max_reply_chars`` (a program may print megabytes; the env
    then cuts it again to ``EnvConfig.max_reply_tokens``), and every reply records its
    latency. A request naming no tool of the set gets an error reply.
    """

    def __init__(self, tools: Mapping[str, ConsultService], *, max_reply_chars: int = 8000) -> None:
        if max_reply_chars < 1:
            raise ValueError(f"max_reply_chars={max_reply_chars}; expected at least 1")
        self.tools = dict(tools)
        self.max_reply_chars = max_reply_chars

    @property
    def names(self) -> tuple[str, ...]:
        """The tool names, in the order given."""
        return tuple(self.tools)

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Route ``request`` to the tool it names; never raises."""
        began = time.monotonic()
        tool = request.agent
        service = self.tools.get(tool) if tool is not None else None
        if service is None:
            reply = AgentReply(
                agent=tool,
                error=f"unknown tool {(tool or '')[:32]!r}; expected one of {', '.join(self.tools)}",
            )
        else:
            reply = await service.consult(request)
        cut = len(reply.text) > self.max_reply_chars
        return reply.model_copy(
            update={
                "text": reply.text[: self.max_reply_chars],
                "truncated": reply.truncated or cut,
                "latency_s": time.monotonic() - began,
            }
        )


class ToolBox(ToolSet):
    """ARPO's tool set: ``python`` (a :class:`PythonRunner`, a default one when None) and ``search``.

    ``search`` ranks the passages of ``search`` (a :class:`SearchIndex`); without one, a
    search request gets an error reply naming the missing setting (:class:`SearchTool`).
    """

    def __init__(
        self,
        python: PythonRunner | None = None,
        search: SearchIndex | None = None,
        *,
        max_reply_chars: int = 8000,
    ) -> None:
        self.python = python if python is not None else PythonRunner()
        self.search = search
        super().__init__(
            {"python": self.python, "search": SearchTool(search)}, max_reply_chars=max_reply_chars
        )
