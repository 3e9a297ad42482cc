"""AIPO's consult protocol: the policy asks a named agent; the answer comes back as feedback.

The whole trajectory is one assistant turn in which the policy writes
``<consult agent="NAME">question</consult>`` and stops; the environment injects
``<feedback agent="NAME">answer</feedback>`` and the policy goes on. Parsing is
robust to what models write: repeated tags (the last wins), nested or stray open
tags, missing or unquoted ``agent`` attributes, odd case.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from agents.base import AGENT_ROLES
from aipo_env.protocols.base import InteractionProtocol, ProtocolSettings, Request

CONSULT_OPEN = "<consult"
CONSULT_CLOSE = "</consult>"
FEEDBACK_CLOSE = "</feedback>"

#: Protocol markup the policy may write but that is never its answer: complete consult
#: requests, and feedback blocks (forged; an unclosed one runs to the end of the text).
_NOT_ANSWER = re.compile(
    r"<consult\b[^<>]*>.*?</consult>|<feedback\b.*?(?:</feedback>|$)", re.DOTALL | re.IGNORECASE
)
#: Longest agent name an error message echoes.
_NAME_ECHO = 32
_OPEN_TAG = re.compile(r"<consult\b([^<>]*)>", re.IGNORECASE)
_AGENT_ATTR = re.compile(r"""agent\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)


def consult_tag(agent: str, question: str) -> str:
    """A complete consult request, as the policy would write it."""
    return f'<consult agent="{agent}">{question}</consult>'


def count_consults(text: str) -> int:
    """Number of complete ``<consult ...>...</consult>`` tags in ``text``.

    Used in independent mode, where tags are not honoured but attempts are reported.
    """
    count = 0
    pos = 0
    lowered = text.lower()
    while True:
        start = lowered.find(CONSULT_OPEN, pos)
        if start < 0:
            return count
        end = lowered.find(CONSULT_CLOSE, start)
        if end < 0:
            return count
        count += 1
        pos = end + len(CONSULT_CLOSE)


def parse_last_consult(text: str, agent_names: Sequence[str]) -> Request:
    """Parse the LAST complete consult at the end of a generated segment.

    Robust to what models write: repeated tags (the last one wins), nested or stray
    open tags (the innermost open tag before the close wins), missing or unquoted
    ``agent`` attributes, odd case. Anything that cannot be honoured comes back with
    ``error`` set instead of raising.
    """
    lowered = text.lower()
    close = lowered.rfind(CONSULT_CLOSE)
    if close < 0:
        return Request(None, "", f"malformed consult: no closing {CONSULT_CLOSE} tag")
    # The innermost open tag before the close: nested opens are treated as text.
    opens = list(_OPEN_TAG.finditer(text, 0, close))
    if not opens:
        return Request(
            None,
            "",
            f'malformed consult: {CONSULT_CLOSE} without an opening <consult agent="..."> tag',
        )
    tag = opens[-1]
    question = text[tag.end() : close].strip()
    attr = _AGENT_ATTR.search(tag.group(1))
    names = ", ".join(agent_names)
    if attr is None:
        return Request(
            None, question, f'malformed consult: missing agent="..."; expected one of {names}'
        )
    agent = next(g for g in attr.groups() if g is not None).strip().lower()
    if agent not in agent_names:
        shown = agent if len(agent) <= _NAME_ECHO else agent[:_NAME_ECHO] + "..."
        return Request(agent, question, f"unknown agent '{shown}'; expected one of {names}")
    if not question:
        return Request(agent, "", "empty question; write the question inside the tag")
    return Request(agent, question)


def consult_instructions(
    agent_names: Sequence[str],
    max_consults: int,
    roles: dict[str, str] | None = None,
) -> str:
    """The prompt section that teaches the policy how and when to consult, and its budget."""
    roles = {**AGENT_ROLES, **(roles or {})}
    lines = [
        "While you reason you may consult collaborative agents when you hit a bottleneck:",
    ]
    for name in agent_names:
        lines.append(f"- {name}: {roles.get(name, 'answers questions about the problem')}")
    example = agent_names[0] if agent_names else "verify"
    lines += [
        f'To consult, write <consult agent="NAME">your question</consult> and stop; '
        f'the answer arrives as <feedback agent="NAME">...</feedback>. '
        f'For example: <consult agent="{example}">Is 17 * 23 = 391?</consult>',
        "Ask one self-contained question per consult. Never write a feedback block yourself. "
        f"You may consult at most {max_consults} time{'s' if max_consults != 1 else ''}; "
        "consult only when it helps, then finish the solution on your own.",
    ]
    return "\n".join(lines)


class ConsultProtocol(InteractionProtocol):
    """``<consult agent=...>`` requests answered by ``<feedback agent=...>`` blocks.

    ``roles`` adds to or replaces the agents' role descriptions
    (:data:`agents.base.AGENT_ROLES`); ``instructions`` replaces the generated
    instructions (it may use ``{max_consults}``).
    """

    name = "consult"

    def __init__(
        self, roles: Mapping[str, str] | None = None, instructions: str | None = None
    ) -> None:
        self.roles = {**AGENT_ROLES, **(roles or {})}
        self._instructions = instructions

    @classmethod
    def from_config(cls, config: ProtocolSettings) -> ConsultProtocol:
        """The consult protocol with the config's instructions and extra agent roles."""
        return cls(roles=config.agent_roles, instructions=config.instructions)

    def stop_strings(self) -> list[str]:
        """Generation stops after a closing consult tag."""
        return [CONSULT_CLOSE]

    def parse_request(self, text: str, targets: Sequence[str]) -> Request:
        """The last complete consult of ``text`` (:func:`parse_last_consult`)."""
        return parse_last_consult(text, targets)

    def reply_markup(self, target: str | None) -> tuple[str, str]:
        """``<feedback agent="NAME">`` and ``</feedback>``, each on its own line."""
        return f'\n<feedback agent="{target or "env"}">\n', f"\n{FEEDBACK_CLOSE}\n"

    def error_text(self, target: str | None, message: str) -> str:
        """A feedback block holding ``Error: message``."""
        opening, closing = self.reply_markup(target)
        return f"{opening}Error: {message}{closing}"

    def instructions(self, targets: Sequence[str], budget: int) -> str:
        """The configured instructions, or :func:`consult_instructions` for ``targets``."""
        if self._instructions is not None:
            return self._instructions.format(max_consults=budget)
        return consult_instructions(targets, budget, self.roles)

    def opening_request(self, target: str, content: str) -> str:
        """A consult tag the env writes for the policy (``EnvConfig.auto_consult``)."""
        return consult_tag(target, content)

    def count_requests(self, text: str) -> int:
        """Complete consult tags in ``text`` (:func:`count_consults`)."""
        return count_consults(text)

    def answer_text(self, policy_text: str) -> str:
        """The policy's text without its consult requests and without feedback blocks it wrote."""
        return _NOT_ANSWER.sub("", policy_text)
