"""Chat format: a reply as its own message through the tokenizer's chat template.

An option for chat models, shared by every protocol. The reply's tokens are the
*delta* between a rendered dummy conversation with and without the new message, so
the policy's sampled ids are never re-tokenized (see :func:`chat_feedback_pieces`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def template_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of chat-template text, whose turn markers must become the template's special ids."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


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
