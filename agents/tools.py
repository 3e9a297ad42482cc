"""Tools that answer requests like agents do: the consult service behind a tool protocol.

:class:`PythonRunner` answers :mod:`aipo_env.protocols.python_tool`'s ``<python>``
requests. The code runs in the project's code sandbox (:mod:`tasks.sandbox`:
bubblewrap where it runs, with no network, a private filesystem view and process,
CPU, wall-time and memory limits; else the documented weaker fallback), and its
standard output, or the last line of its error, is the reply.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time

from agents.base import AgentReply, ConsultRequest
from tasks.sandbox import Limits, resolve_sandbox, run_python


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
