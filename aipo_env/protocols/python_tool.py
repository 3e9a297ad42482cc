"""A Python-tool protocol in the ARPO style: the policy runs code and reads its output.

The policy writes ``<python>code</python>`` and stops; the environment runs the code
(the consult service named ``python``, e.g. :class:`agents.tools.PythonRunner`) and
injects ``<result>stdout</result>``. Everything else (token-exact trajectories, masks,
budgets, finish reasons, the rollout driver) is :class:`~aipo_env.env.ConsultEnv`'s::

    env = ConsultEnv(task, PythonRunner(), tokenizer, EnvConfig(protocol="python_tool"))
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from aipo_env.protocols.base import InteractionProtocol, Request

PYTHON_CLOSE = "</python>"
TOOL_NAME = "python"
_CODE = re.compile(r"<python>(.*?)</python>\s*$", re.DOTALL)
_COMPLETE = re.compile(r"<python>.*?</python>", re.DOTALL)
#: Code blocks and result blocks (an unclosed result runs to the end): never the answer,
#: in any case (a forged ``<RESULT>`` must not be scored either).
_NOT_ANSWER = re.compile(
    r"<python>.*?</python>|<result>.*?(?:</result>|$)", re.DOTALL | re.IGNORECASE
)

INSTRUCTIONS = (
    "You may run Python code: write <python>code</python> and stop; its standard output "
    "comes back as <result>...</result>. You may run code at most {max_consults} times."
)


class PythonToolProtocol(InteractionProtocol):
    """``<python>`` code blocks answered by ``<result>`` blocks; the only target is ``python``."""

    name = "python_tool"
    roles = {TOOL_NAME: "runs Python code and returns its standard output"}

    def __init__(self, instructions: str | None = None) -> None:
        self._instructions = INSTRUCTIONS if instructions is None else instructions

    def targets(self, configured: Sequence[str]) -> list[str]:
        """Only the Python tool, whatever agents are configured."""
        return [TOOL_NAME]

    def stop_strings(self) -> list[str]:
        """Generation stops after a code block."""
        return [PYTHON_CLOSE]

    def parse_request(self, text: str, targets: Sequence[str]) -> Request:
        """The code of the block ending ``text``; an empty block is an error."""
        match = _CODE.search(text)
        if match is None or not match.group(1).strip():
            return Request(TOOL_NAME, "", "no code found between <python> and </python>")
        return Request(TOOL_NAME, match.group(1).strip())

    def reply_markup(self, target: str | None) -> tuple[str, str]:
        """``<result>`` and ``</result>``, each on its own line."""
        return "\n<result>\n", "\n</result>\n"

    def error_text(self, target: str | None, message: str) -> str:
        """A result block holding ``Error: message``."""
        return f"\n<result>\nError: {message}\n</result>\n"

    def instructions(self, targets: Sequence[str], budget: int) -> str:
        """How to run code, with the budget of runs."""
        return self._instructions.format(max_consults=budget)

    def count_requests(self, text: str) -> int:
        """Complete code blocks in ``text``."""
        return len(_COMPLETE.findall(text))

    def answer_text(self, policy_text: str) -> str:
        """The policy's text without its code blocks and without result blocks it wrote."""
        return _NOT_ANSWER.sub("", policy_text)
