"""Tools that answer requests like agents do: the consult service behind a tool protocol.

:class:`PythonRunner` answers :mod:`aipo_env.protocols.python_tool`'s ``<python>``
requests: the code runs in a subprocess (isolated mode) with a timeout, and its
standard output, or the last line of its error, is the reply.
"""

from __future__ import annotations

import asyncio
import sys
import time

from agents.base import AgentReply, ConsultRequest


class PythonRunner:
    """A consult service with one agent, ``python``: runs code in a subprocess with a timeout."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s

    @property
    def names(self) -> tuple[str, ...]:
        """The single tool name."""
        return ("python",)

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Run ``request.question`` as a Python program; stdout (or the error) is the reply."""
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-c",
            request.question,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return AgentReply(agent="python", error=f"timed out after {self.timeout_s} s")
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip().splitlines()[-1:] or ["error"]
            text = text[0]
        return AgentReply(agent="python", text=text, latency_s=time.monotonic() - began)
