"""The consult protocol: how the policy asks an agent and how the answer comes back.

Inline format (the default): the whole trajectory is one assistant turn in which the
policy writes ``<consult agent="NAME">question</consult>`` and stops; the environment
injects ``<feedback agent="NAME">answer</feedback>`` and the policy goes on.

Chat format (an option for chat models): the feedback is a separate ``user`` (or
``tool``) message rendered through the tokenizer's chat template. Its tokens are the
*delta* between a rendered dummy conversation with and without the new message, so
the policy's sampled ids are never re-tokenized (see :func:`chat_feedback_pieces`).

Parsing only ever looks at text the environment decoded from the policy's ids; the
ids themselves are kept verbatim.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CONSULT_OPEN = "<consult"
CONSULT_CLOSE = "</consult>"
FEEDBACK_CLOSE = "</feedback>"

#: What each agent is for, as the consult instructions describe it.
AGENT_ROLES: dict[str, str] = {
    "verify": "checks a claim, a step or a candidate answer you show it and says whether and where it is wrong",
    "knowledge": "supplies domain knowledge: definitions, theorems, formulas and facts",
    "reasoning": "gives strategic guidance: a plan, the next step, or a way out of a dead end",
}

_OPEN_TAG = re.compile(r"<consult\b([^<>]*)>", re.IGNORECASE)
_AGENT_ATTR = re.compile(r"""agent\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedConsult:
    """The outcome of parsing a policy segment for a consult.

    Exactly one of ``question`` (with ``agent``) or ``error`` is meaningful: ``error``
    says why the consult could not be honoured, in words the policy can read.
    """

    agent: str | None
    question: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the consult is well-formed and names a known agent."""
        return self.error is None


def ends_with_consult(text: str) -> bool:
    """Whether ``text`` ends with a closing consult tag (trailing whitespace allowed).

    Generation stops on the stop string ``</consult>``; the token that completes it may
    carry a little trailing whitespace, which is harmless.
    """
    return text.rstrip().endswith(CONSULT_CLOSE)


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


def parse_last_consult(text: str, agent_names: Sequence[str]) -> ParsedConsult:
    """Parse the LAST complete consult at the end of a generated segment.

    Robust to what models write: repeated tags (the last one wins), nested or stray
    open tags (the innermost open tag before the close wins), missing or unquoted
    ``agent`` attributes, odd case. Anything that cannot be honoured comes back with
    ``error`` set instead of raising.
    """
    lowered = text.lower()
    close = lowered.rfind(CONSULT_CLOSE)
    if close < 0:
        return ParsedConsult(None, "", f"malformed consult: no closing {CONSULT_CLOSE} tag")
    # The innermost open tag before the close: nested opens are treated as text.
    opens = list(_OPEN_TAG.finditer(text, 0, close))
    if not opens:
        return ParsedConsult(
            None,
            "",
            f'malformed consult: {CONSULT_CLOSE} without an opening <consult agent="..."> tag',
        )
    tag = opens[-1]
    question = text[tag.end() : close].strip()
    attr = _AGENT_ATTR.search(tag.group(1))
    names = ", ".join(agent_names)
    if attr is None:
        return ParsedConsult(
            None, question, f'malformed consult: missing agent="..."; expected one of {names}'
        )
    agent = next(g for g in attr.groups() if g is not None).strip().lower()
    if agent not in agent_names:
        return ParsedConsult(agent, question, f"unknown agent '{agent}'; expected one of {names}")
    if not question:
        return ParsedConsult(agent, "", "empty question; write the question inside the tag")
    return ParsedConsult(agent, question)


def feedback_open(agent: str) -> str:
    """The markup that opens an agent's feedback (source ``env``)."""
    return f'\n<feedback agent="{agent}">\n'


def feedback_close() -> str:
    """The markup that closes an agent's feedback (source ``env``)."""
    return f"\n{FEEDBACK_CLOSE}\n"


def error_feedback(agent: str | None, message: str) -> str:
    """A whole error feedback segment (source ``env``), short enough not to distract."""
    return f'\n<feedback agent="{agent or "env"}">\nError: {message}\n{FEEDBACK_CLOSE}\n'


def strip_feedback(text: str) -> str:
    """``text`` with every ``<feedback ...>...</feedback>`` block removed.

    The environment scores only the policy's own tokens; this is for text that arrives
    already joined (an answer inside an agent's reply must never count).
    """
    return re.sub(r"<feedback\b[^>]*>.*?</feedback>", "", text, flags=re.DOTALL | re.IGNORECASE)


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


def _render(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@dataclass(frozen=True)
class ChatFeedbackPieces:
    """The injected text of one chat-format feedback, split by source.

    ``before`` (template markup closing the assistant turn and opening the feedback
    message) and ``after`` (closing it and opening the next assistant turn) are
    ``env`` text; ``content`` is the message content.
    """

    before: str
    content: str
    after: str


def chat_feedback_pieces(
    tokenizer: Any, content: str, role: str = "user", system_prompt: str | None = None
) -> ChatFeedbackPieces:
    """Split the chat-template delta that a new feedback message adds.

    Renders a dummy conversation ending in an *open* assistant message
    (``continue_final_message``) with and without the new message; the delta is the
    suffix the full render adds. Raises ``ValueError`` when the template does not
    render the prefix as a prefix of the full conversation (delta tokenization is then
    impossible and the inline format must be used).
    """
    base: list[dict[str, str]] = []
    if system_prompt is not None:
        base.append({"role": "system", "content": system_prompt})
    base += [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    prefix = _render(tokenizer, base, continue_final_message=True)
    full = _render(
        tokenizer, base + [{"role": role, "content": content}], add_generation_prompt=True
    )
    if not full.startswith(prefix):
        raise ValueError(
            "the chat template does not render a conversation's prefix as a prefix of the "
            "whole; delta tokenization is impossible with it, use format='inline'"
        )
    delta = full[len(prefix) :]
    at = delta.find(content) if content else delta.find("\n") + 1
    if content and at < 0:
        raise ValueError(
            f"the chat template rewrote the message content {content[:40]!r}...; "
            "delta tokenization cannot tell markup from content, use format='inline'"
        )
    return ChatFeedbackPieces(delta[:at], content, delta[at + len(content) :])
