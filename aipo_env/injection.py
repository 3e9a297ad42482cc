"""Answering a request: calling the consult service and building the injected segment.

:class:`ConsultEnv` calls :func:`call_service` for the reply and :func:`reply_pieces`
for the tokens that go into the trajectory, as ``(ids, source, behaviour log-probs)``
pieces. The protocol supplies every text (markup, error replies); the format places
it: inline, inside the assistant turn, or chat, as its own message through the
chat template (delta tokenization, :mod:`aipo_env.protocols.chat`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.base import AgentReply, ConsultRequest, ConsultService
from aipo_env import sources
from aipo_env.config import EnvConfig
from aipo_env.protocols.base import InteractionProtocol, Piece, encode_injected
from aipo_env.protocols.chat import chat_feedback_pieces, template_ids
from aipo_env.trajectory import ConsultRecord

#: Characters of an error message kept before it is tokenized (then it is cut again to the
#: env's reply cap): an agent's exception text may be megabytes.
MAX_ERROR_CHARS = 500
#: Characters of reply text kept per token of the reply cap before tokenizing: a tool's
#: output may be megabytes, and tokenizing it all would block the event loop for seconds.
#: Tokens rarely span more than a few characters, so the token cap still decides the cut.
CHARS_PER_REPLY_TOKEN = 32

logger = logging.getLogger(__name__)


@dataclass
class Injection:
    """The injected segment of one reply, and what the chat format learned building it."""

    pieces: list[Piece]
    chat_content: str | None = None
    drift: bool = False
    ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.pieces = [p for p in self.pieces if p[0]]
        self.ids = [i for ids, _, _ in self.pieces for i in ids]


async def call_service(
    service: ConsultService, request: ConsultRequest, timeout_s: float
) -> tuple[AgentReply | None, str | None, float]:
    """``(reply, error, seconds)``: the service's reply or an error message; never raises."""
    began = time.monotonic()
    try:
        reply = await asyncio.wait_for(service.consult(request), timeout=timeout_s)
    except asyncio.TimeoutError:
        return (
            None,
            f"agent '{request.agent}' timed out after {timeout_s} s",
            time.monotonic() - began,
        )
    except Exception as exc:  # an agent must never crash the episode
        return (
            None,
            f"agent '{request.agent}' failed ({type(exc).__name__})",
            time.monotonic() - began,
        )
    if not isinstance(reply, AgentReply):
        return (
            None,
            f"agent '{request.agent}' returned {type(reply).__name__}, expected AgentReply",
            time.monotonic() - began,
        )
    if reply.error is not None:
        return (
            reply,
            f"agent '{request.agent}' could not answer: {reply.error}",
            time.monotonic() - began,
        )
    return reply, None, time.monotonic() - began


def short_error(tokenizer: Any, message: str, max_tokens: int) -> str:
    """``message`` cut to :data:`MAX_ERROR_CHARS` characters, then to ``max_tokens`` tokens.

    Every error the policy reads (a malformed request, a budget, an agent's exception)
    passes here, so none can fill the context; its start, which says what failed, is kept.
    """
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + " [...]"
    ids = encode_injected(tokenizer, message)
    if len(ids) > max_tokens:
        message = tokenizer.decode(ids[:max_tokens], skip_special_tokens=False) + " [...]"
    return message


def reply_ids(
    tokenizer: Any, reply: AgentReply, max_tokens: int
) -> tuple[list[int], list[float | None], bool]:
    """``(ids, behaviour log-probs, truncated)`` of ``reply``'s injected body, at most ``max_tokens``.

    The reply's own ids keep their log-probs when they are usable: aligned with the
    log-probs and inside the vocabulary. Ids outside it (negative, or past ``len(tokenizer)``)
    would end the run at the update's embedding lookup, so such a reply falls back to its
    text, as does a reply without ids. The text is cut to ``max_tokens`` times
    :data:`CHARS_PER_REPLY_TOKEN` characters before it is tokenized.
    """
    if (
        reply.token_ids is not None
        and reply.logprobs is not None
        and len(reply.logprobs) == len(reply.token_ids)
    ):
        vocab = len(tokenizer)
        outside = [i for i in reply.token_ids if not 0 <= i < vocab]
        if not outside:
            # Never a control token (a turn marker or EOS inside a reply would end the
            # policy's turn for it).
            special = set(getattr(tokenizer, "all_special_ids", ()) or ())
            kept = [
                (i, lp)
                for i, lp in zip(reply.token_ids, reply.logprobs, strict=True)
                if i not in special
            ]
            ids, lps = [i for i, _ in kept], [lp for _, lp in kept]
            return ids[:max_tokens], lps[:max_tokens], len(ids) > max_tokens
        logger.warning(
            "agent %r replied with token id %d, outside the vocabulary 0..%d; "
            "its text is injected instead",
            reply.agent,
            outside[0],
            vocab - 1,
        )
    limit = max_tokens * CHARS_PER_REPLY_TOKEN
    text = reply.text[:limit]
    ids = encode_injected(tokenizer, text)
    truncated = len(ids) > max_tokens or len(reply.text) > limit
    ids = ids[:max_tokens]
    return ids, [None] * len(ids), truncated


def reply_pieces(
    protocol: InteractionProtocol,
    tokenizer: Any,
    config: EnvConfig,
    target: str | None,
    reply: AgentReply | None,
    error: str | None,
    record: ConsultRecord,
) -> Injection:
    """The injected segment for ``reply`` (or for ``error`` when there is no usable reply).

    The reply's body comes from :func:`reply_ids`: its own ids and log-probs when they are
    usable, its text tokenized otherwise, cut to ``config.max_reply_tokens``
    (``record.reply_truncated``). ``error`` should have passed :func:`short_error`.
    """

    def env(text: str) -> Piece:
        ids = encode_injected(tokenizer, text)
        return ids, sources.ENV, [None] * len(ids)

    body: Piece | None = None
    if reply is None:
        open_text, close_text = protocol.error_text(target, error or "no reply"), ""
    else:
        ids, lps, truncated = reply_ids(tokenizer, reply, config.max_reply_tokens)
        record.reply_truncated = truncated or reply.truncated
        # Labelled by the agent the policy asked, whatever name the reply carries.
        body = (ids, sources.agent(target or reply.agent or "unknown"), lps)
        open_text, close_text = protocol.reply_markup(target)
    if config.format == "inline":
        return Injection([env(open_text), *([body, env(close_text)] if body else [])])
    return _chat_pieces(tokenizer, config, open_text, close_text, body)


def _chat_pieces(
    tokenizer: Any, config: EnvConfig, open_text: str, close_text: str, body: Piece | None
) -> Injection:
    """Chat format: the reply block becomes the content of its own message."""
    content_open, content_close = open_text.strip("\n"), close_text.strip("\n")
    if body is not None:
        body_text = tokenizer.decode(body[0], skip_special_tokens=False)
        content = f"{content_open}\n{body_text}\n{content_close}"
    else:
        content = content_open
    chat = chat_feedback_pieces(tokenizer, content, config.chat_feedback_role, config.system_prompt)

    def template(text: str) -> Piece:
        ids = template_ids(tokenizer, text)
        return ids, sources.ENV, [None] * len(ids)

    if body is None:
        pieces = [template(chat.before + content + chat.after)]
    else:
        pieces = [
            template(chat.before + content_open + "\n"),
            body,
            template("\n" + content_close + chat.after),
        ]
    injection = Injection(pieces, chat_content=content)
    if config.check_drift:
        injection.drift = injection.ids != template_ids(
            tokenizer, chat.before + content + chat.after
        )
    return injection


def full_render_drift(
    tokenizer: Any,
    config: EnvConfig,
    messages: list[dict[str, str]],
    token_ids: Sequence[int],
    segments: Sequence[tuple[int, int, str | None]],
) -> bool:
    """Chat format: whether the incremental ids differ from a full render of the conversation.

    ``segments`` are ``(policy_start, policy_end, reply_content)`` per turn, the
    content being the reply message that followed the turn (None when none did).
    """
    eos_text = tokenizer.eos_token or ""
    messages = list(messages)
    for start, end, reply_content in segments:
        content = tokenizer.decode(list(token_ids[start:end]), skip_special_tokens=False)
        if eos_text and content.endswith(eos_text):
            content = content[: -len(eos_text)]
        messages.append({"role": "assistant", "content": content})
        if reply_content is not None:
            messages.append({"role": config.chat_feedback_role, "content": reply_content})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = template_ids(tokenizer, rendered)
    return ids[: len(token_ids)] != list(token_ids)
