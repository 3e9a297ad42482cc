"""A Python-tool environment in the ARPO style, built on :class:`ConsultEnv`.

The policy writes ``<python>code</python>`` and stops; the environment runs the code
in a subprocess with a timeout and injects ``<result>stdout</result>``. Everything
else (token-exact trajectories, masks, budgets, finish reasons, the rollout driver)
is inherited: the example only swaps the protocol (stop string, parsing, injected
text) and the "agent" (a subprocess instead of a consult service).

Example::

    env = PythonToolEnv(task, tokenizer, EnvConfig(max_consults=3))
    driver = RolloutDriver(generator, env_factory=lambda: PythonToolEnv(task, tokenizer))
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import Any

from agents.base import AgentReply, ConsultRequest
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from tasks.base import Task

PYTHON_CLOSE = "</python>"
_CODE = re.compile(r"<python>(.*?)</python>\s*$", re.DOTALL)

INSTRUCTIONS = (
    "You may run Python code: write <python>code</python> and stop; its standard output "
    "comes back as <result>...</result>. You may run code at most {max_consults} times."
)


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


class PythonToolEnv(ConsultEnv):
    """``ConsultEnv`` with a ``<python>`` -> ``<result>`` protocol instead of consults."""

    def __init__(
        self,
        task: Task,
        tokenizer: Any,
        config: EnvConfig | None = None,
        runner: PythonRunner | None = None,
    ) -> None:
        config = config or EnvConfig()
        config = config.model_copy(update={"agent_names": ["python"], "instructions": INSTRUCTIONS})
        super().__init__(task, runner or PythonRunner(), tokenizer, config)

    @property
    def sampling_stop(self) -> list[str]:
        """Stop after a code block in train mode."""
        return [PYTHON_CLOSE] if self.config.mode == "train" else []

    def _ends_with_request(self, text: str) -> bool:
        return text.rstrip().endswith(PYTHON_CLOSE)

    def _parse_request(self, text: str) -> tuple[str | None, str, str | None]:
        match = _CODE.search(text)
        if match is None or not match.group(1).strip():
            return "python", "", "no code found between <python> and </python>"
        return "python", match.group(1).strip(), None

    def _feedback_texts(self, agent: str | None) -> tuple[str, str]:
        return "\n<result>\n", "\n</result>\n"

    def _error_text(self, agent: str | None, message: str) -> str:
        return f"\n<result>\nError: {message}\n</result>\n"
