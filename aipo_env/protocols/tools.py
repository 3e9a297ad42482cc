"""ARPO's tool protocol: the policy runs Python or searches a corpus in the middle of its reasoning.

As in ARPO (arXiv 2507.19849, its ``vllm_rollout_with_tools``), the policy writes
``<python>code</python>`` or ``<search>query</search>`` and stops; the environment calls
the tool of that name (the tool services ``python`` and ``search``, :mod:`agents.tools`) and
appends `` <result>\\n...\\n</result>`` (with the leading space) before the policy goes
on. The result is injected text (source ``agent:python`` or ``agent:search``), never
trained under the default :class:`~aipo_env.masks.MaskRule`; the markup around it is
``env`` text. The call limit per trajectory is ``EnvConfig.max_consults``::

    tools = ToolBox(search=SearchIndex.from_jsonl("corpus.jsonl"))
    env = ConsultEnv(task, tools, tokenizer, EnvConfig(protocol="tools", max_consults=3))
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from aipo_env.protocols.base import Request, ToolUseProtocol

PYTHON = "python"
SEARCH = "search"
#: The tools, in the order the instructions present them; each is a tag and a target.
TOOL_NAMES: tuple[str, ...] = (PYTHON, SEARCH)
#: What a result block looks like around a tool's output, exactly as ARPO writes it.
RESULT_OPEN = " <result>\n"
RESULT_CLOSE = "\n</result>"

#: A closing tool tag that ends the text (trailing whitespace allowed).
_BLOCK_END = re.compile(r"</(python|search)>\s*$")
_COMPLETE = re.compile(r"<(python|search)>.*?</\1>", re.DOTALL)
#: Tool calls and result blocks (an unclosed result runs to the end): never the answer. In
#: any case: ``<RESULT>`` is no request, but a forged answer must not be scored through it.
_NOT_ANSWER = re.compile(
    r"<(python|search)>.*?</\1>|<result>.*?(?:</result>|$)", re.DOTALL | re.IGNORECASE
)
#: A markdown fence around code, which models often write inside <python>.
_FENCE = re.compile(r"^```[A-Za-z0-9_+-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)
#: What an empty block should have held, per tool, for the error the policy reads.
_CONTENT = {PYTHON: "code", SEARCH: "a query"}

INSTRUCTIONS = (
    "You may use two tools while you reason. To run Python code, write "
    "<python>code</python> and stop: its standard output comes back as "
    "<result>...</result>. To search a reference corpus, write <search>query</search> "
    "and stop: the best-matching passages come back as <result>...</result>. You may call "
    "tools at most {max_consults} times in all; after that, continue on your own."
)


class ToolProtocol(ToolUseProtocol):
    """``<python>`` and ``<search>`` calls answered by `` <result>`` blocks (ARPO's tool protocol)."""

    name = "tools"
    tools = TOOL_NAMES
    roles = {
        PYTHON: "runs Python code and returns its standard output",
        SEARCH: "searches a reference corpus and returns the best-matching passages",
    }

    def __init__(self, instructions: str | None = None) -> None:
        self._instructions = INSTRUCTIONS if instructions is None else instructions

    def stop_strings(self) -> list[str]:
        """Generation stops after a code block or a search query."""
        return [f"</{tool}>" for tool in TOOL_NAMES]

    def parse_request(self, text: str, targets: Sequence[str]) -> Request:
        """The last tool call, which ends ``text``: its tool and its code or query.

        The innermost opening tag of the same tool before the closing one starts the
        block. An empty block, or a closing tag without an opening one, is an error.
        """
        end = _BLOCK_END.search(text)
        if end is None:
            return Request(None, "", "no <python> or <search> block ends the text")
        tool = end.group(1)
        opening = f"<{tool}>"
        start = text.rfind(opening, 0, end.start())
        if start < 0:
            return Request(tool, "", f"</{tool}> without an opening {opening} tag")
        content = text[start + len(opening) : end.start()].strip()
        if tool == PYTHON:
            fenced = _FENCE.match(content)
            content = fenced.group(1).strip() if fenced else content
        if not content:
            return Request(
                tool,
                "",
                f"empty {opening} block: write {_CONTENT[tool]} between {opening} and </{tool}>",
            )
        return Request(tool, content)

    def reply_markup(self, target: str | None) -> tuple[str, str]:
        """`` <result>\\n`` and ``\\n</result>``, as ARPO writes them."""
        return RESULT_OPEN, RESULT_CLOSE

    def error_text(self, target: str | None, message: str) -> str:
        """A result block holding ``Error: message``."""
        return f"{RESULT_OPEN}Error: {message}{RESULT_CLOSE}"

    def instructions(self, targets: Sequence[str], budget: int) -> str:
        """How to call each tool, with the budget of calls."""
        return self._instructions.format(max_consults=budget)

    def count_requests(self, text: str) -> int:
        """Complete ``<python>`` and ``<search>`` blocks in ``text``."""
        return sum(1 for _ in _COMPLETE.finditer(text))

    def answer_text(self, policy_text: str) -> str:
        """The policy's text without its tool calls and without result blocks it wrote."""
        return _NOT_ANSWER.sub("", policy_text)
