"""A one-tag tool protocol: ``<TAG>content</TAG>`` answered by a ``<result>`` block.

The base of every tool the policy calls with one tag (``<python>``, a ``<calc>``...): a
subclass names itself, its tag, what the tool does and how to teach it, and is one
:data:`~aipo_env.protocols.PROTOCOLS` entry plus one tool service
(``agents.tool_services.TOOL_SERVICES[tag]``) away from training::

    class CalcProtocol(OneTagToolProtocol):
        name = "calc"
        tag = "calc"
        role = "evaluates an arithmetic expression"
        content = "an expression"
        default_instructions = "Write <calc>expression</calc> and stop; at most {max_consults} times."

The policy writes ``<TAG>content</TAG>`` and stops; the env asks the tool named ``TAG``
and injects ``\\n<result>\\nOUTPUT\\n</result>\\n``. Parsing, markup, counting and the
answer's text (tool calls and result blocks removed) follow from the tag.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from aipo_env.protocols.base import Request, ToolUseProtocol


class OneTagToolProtocol(ToolUseProtocol):
    """``<TAG>`` requests answered by ``<result>`` blocks; the only target is the tool ``TAG``."""

    #: The tag, which is also the tool's name (its target and its service).
    tag: ClassVar[str] = ""
    #: What the tool does, for the roles.
    role: ClassVar[str] = ""
    #: What a block holds, for the error an empty one gets ("code", "an expression").
    content: ClassVar[str] = "content"
    #: The instructions (train mode); may use ``{max_consults}``.
    default_instructions: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.tag:
            cls.tools = (cls.tag,)
            cls.roles = {cls.tag: cls.role}
            tag = re.escape(cls.tag)
            cls._block = re.compile(rf"<{tag}>(.*?)</{tag}>\s*$", re.DOTALL)
            cls._complete = re.compile(rf"<{tag}>.*?</{tag}>", re.DOTALL)
            # Tool calls and result blocks (an unclosed result runs to the end): never the
            # answer, in any case (a forged <RESULT> must not be scored either).
            cls._not_answer = re.compile(
                rf"<{tag}>.*?</{tag}>|<result>.*?(?:</result>|$)", re.DOTALL | re.IGNORECASE
            )

    def __init__(self, instructions: str | None = None) -> None:
        self._instructions = self.default_instructions if instructions is None else instructions

    def stop_strings(self) -> list[str]:
        """Generation stops after a closing tag."""
        return [f"</{self.tag}>"]

    def parse_request(self, text: str, targets: Sequence[str]) -> Request:
        """The content of the block ending ``text``; an empty block is an error."""
        match = self._block.search(text)
        if match is None or not match.group(1).strip():
            return Request(
                self.tag, "", f"no {self.content} found between <{self.tag}> and </{self.tag}>"
            )
        return Request(self.tag, match.group(1).strip())

    def reply_markup(self, target: str | None) -> tuple[str, str]:
        """``<result>`` and ``</result>``, each on its own line."""
        return "\n<result>\n", "\n</result>\n"

    def error_text(self, target: str | None, message: str) -> str:
        """A result block holding ``Error: message``."""
        return f"\n<result>\nError: {message}\n</result>\n"

    def instructions(self, targets: Sequence[str], budget: int) -> str:
        """How to call the tool, with the budget of calls."""
        return self._instructions.format(max_consults=budget)

    def count_requests(self, text: str) -> int:
        """Complete blocks in ``text``."""
        return len(self._complete.findall(text))

    def answer_text(self, policy_text: str) -> str:
        """The policy's text without its tool calls and without result blocks it wrote."""
        return self._not_answer.sub("", policy_text)
