"""The peer protocol: ILR's Idea3, the texts two or more policies exchange on one question.

ILR (Lin et al., arXiv 2509.26306) has peers work on a question in three stages:

1. **Idea sharing**: each peer says how it would solve the problem;
2. **Idea analysis**: each reads the others' ideas and analyses them;
3. **Idea fusion**: each writes its final solution, drawing on the exchange.

What a peer is asked depends on its interaction mode
(:mod:`aipo_env.interaction_mode`): a peer that *cooperates* is told the others are
partners and asked to build on their ideas; one that *competes* is told they are
rivals and asked to find their mistakes. Only the final stage's text is scored.

Each peer's side of an episode is a :class:`~aipo_env.env.ConsultEnv` episode with an
:class:`Idea3Protocol`: its instructions are stage 1's (so the prompt is the problem and
stage 1's instruction), every segment but the last ends its stage whatever it says, and
the env injects the next stage's message (:meth:`Idea3Protocol.next_message`), built
from what the *other* peers wrote, as the driver (:mod:`aipo_env.peer_episode`) posted it
on the episode's :class:`Board`. Every other peer's words enter a peer's trajectory as
``peer:<name>`` tokens between ``env`` text from here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aipo_env import sources
from aipo_env.interaction_mode import Mode
from aipo_env.protocols.base import (
    InteractionProtocol,
    Piece,
    ProtocolSettings,
    Request,
    encode_injected,
)
from aipo_env.protocols.chat import chat_feedback_pieces, template_ids

#: The stages, in order.
STAGES: tuple[str, ...] = ("share", "analyze", "fuse")

_ROLE = {"cooperate": "partner", "compete": "rival"}

_SHARE = {
    "cooperate": (
        "You are solving this together with a partner. Stage 1 of 3, idea sharing: in two or "
        "three sentences, say how you would solve it. Do not give the final answer yet."
    ),
    "compete": (
        "You are competing with a rival on this problem. Stage 1 of 3, idea sharing: in two or "
        "three sentences, say how you would solve it. Do not give the final answer yet."
    ),
}
_ANALYZE = {
    "cooperate": (
        "Stage 2 of 3, idea analysis: say what is right in your partner's idea and what it "
        "misses, so that together you get the answer right. Do not give the final answer yet."
    ),
    "compete": (
        "Stage 2 of 3, idea analysis: point out the mistakes in your rival's idea and say why "
        "your approach is better. Do not give the final answer yet."
    ),
}
_FUSE = {
    "cooperate": (
        "Stage 3 of 3, idea fusion: write your final solution, using the best of both ideas."
    ),
    "compete": (
        "Stage 3 of 3, idea fusion: write your final solution; make it better than your rival's."
    ),
}
#: Stands in for a peer's text when it gave none at a stage (empty, cut off, or failed).
SILENT = "({name} gave no answer at this stage.)"


def stage_message(
    stage: str, mode: Mode, others: Mapping[str, str | None]
) -> list[tuple[str, str | None]]:
    """The user message that opens ``stage`` (``analyze`` or ``fuse``), as ``(text, peer)`` parts.

    ``others`` maps every other peer to what it wrote at the previous stage (None: it
    gave nothing usable). A part's ``peer`` is None for the protocol's own text, else
    the peer whose words the part is; a silent peer's placeholder is protocol text.
    """
    if stage not in ("analyze", "fuse"):
        raise ValueError(f"stage {stage!r} has no incoming message; expected analyze or fuse")
    role = _ROLE[mode]
    what = "idea" if stage == "analyze" else "analysis"
    parts: list[tuple[str, str | None]] = []
    for name, text in others.items():
        parts.append((f"Your {role} {name}'s {what}:\n", None))
        if text is None or not text.strip():
            parts.append((SILENT.format(name=name), None))
        else:
            parts.append((text.strip(), name))
        parts.append(("\n\n", None))
    parts.append(((_ANALYZE if stage == "analyze" else _FUSE)[mode], None))
    return parts


def eos_ids(tokenizer: Any) -> set[int]:
    """The ids that end a turn of ``tokenizer``'s model."""
    return {tokenizer.eos_token_id} - {None}


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two peers' tokenizers give the same ids (so one's samples are the other's ids)."""
    return a is b or (
        getattr(a, "name_or_path", None) == getattr(b, "name_or_path", None) and len(a) == len(b)
    )


@dataclass
class Board:
    """What every peer of one episode wrote at the stage just played.

    The driver posts each peer's output (:meth:`post`) once every peer has generated
    the stage; each peer's :class:`Idea3Protocol` reads the others' from here.
    """

    tokenizers: dict[str, Any]  #: each peer's tokenizer, in the episode's order
    #: peer -> its output ids (cut after EOS), their log-probs, and its text (None: nothing usable)
    posts: dict[str, tuple[list[int], list[float | None], str | None]] = field(default_factory=dict)

    def post(
        self, peer: str, ids: Sequence[int], logprobs: Sequence[float | None], text: str | None
    ) -> None:
        """``peer``'s output of the stage: ids cut after EOS, log-probs, usable text or None."""
        self.posts[peer] = (list(ids), list(logprobs), text)


@functools.lru_cache(maxsize=16)
def turn_markup(tokenizer: Any, ended_by_eos: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ids that close the assistant turn and open a user message, and that open the next answer.

    The same for every message of a tokenizer, so rendered once (not per injection).
    Without a chat template both are a blank line.
    """
    if not getattr(tokenizer, "chat_template", None):
        gap = tuple(encode_injected(tokenizer, "\n\n"))
        return gap, gap
    pieces = chat_feedback_pieces(tokenizer, "\x00")
    before = pieces.before
    eos_text = tokenizer.eos_token or ""
    if ended_by_eos and eos_text and before.startswith(eos_text):
        before = before[len(eos_text) :]  # the peer's own EOS already closed its turn
    return tuple(template_ids(tokenizer, before)), tuple(template_ids(tokenizer, pieces.after))


class Idea3Protocol(InteractionProtocol):
    """One peer's side of an Idea3 episode (module docstring); built per episode and peer.

    ``peer``: this peer's name; ``mode``: its interaction mode on this question;
    ``board``: the episode's board (None: no other peer, no message).
    """

    name = "idea3"
    unavailable_text = "there are no requests in Idea3"

    def __init__(self, peer: str, mode: Mode, board: Board | None = None) -> None:
        self.peer = peer
        self.mode = mode
        self.board = board

    @classmethod
    def from_config(cls, config: ProtocolSettings) -> InteractionProtocol:
        raise ValueError(
            "protocol 'idea3' is played between peers: configure a peers: section "
            "(trainers/peer_trainer.py) instead of env.protocol=idea3"
        )

    def stop_strings(self) -> list[str]:
        return []

    def instructions(self, targets: Sequence[str], budget: int) -> str:
        """Stage 1's instruction for this peer's mode (the prompt's last paragraph)."""
        return _SHARE[self.mode]

    def answer_text(self, policy_text: str) -> str:
        return policy_text

    def scored_text(self, segments: Sequence[str]) -> str:
        """The fusion stage's text: the last segment."""
        return segments[-1] if segments else ""

    def parse_request(self, text: str, targets: Sequence[str]) -> Request:
        return Request(None, "", error=self.unavailable_text)

    def reply_markup(self, target: str | None) -> tuple[str, str]:
        return "", ""

    def error_text(self, target: str | None, message: str) -> str:
        return message

    def count_requests(self, text: str) -> int:
        return 0

    def next_message(self, turn: int, tokenizer: Any, ended_by_eos: bool) -> list[Piece] | None:
        """The user message that opens stage ``turn + 1``, from the others' posts; None after the last."""
        if self.board is None or turn + 1 >= len(STAGES):
            return None
        board = self.board
        others = {name: board.posts[name][2] for name in board.tokenizers if name != self.peer}
        before, after = (list(ids) for ids in turn_markup(tokenizer, ended_by_eos))
        pieces: list[Piece] = [(before, sources.ENV, [None] * len(before))]
        for text, name in stage_message(STAGES[turn + 1], self.mode, others):
            if name is None:
                ids = encode_injected(tokenizer, text)
                pieces.append((ids, sources.ENV, [None] * len(ids)))
                continue
            other = board.tokenizers[name]
            posted_ids, posted_lps, _ = board.posts[name]
            if same_tokenizer(other, tokenizer):
                # The peer's own sampled ids and log-probs, its EOS left out.
                stop = eos_ids(other)
                keep = [k for k, i in enumerate(posted_ids) if i not in stop]
                ids = [posted_ids[k] for k in keep]
                lps: list[float | None] = [posted_lps[k] for k in keep]
            else:
                ids = encode_injected(tokenizer, text)
                lps = [None] * len(ids)
            pieces.append((ids, sources.peer(name), lps))
        pieces.append((after, sources.ENV, [None] * len(after)))
        return [p for p in pieces if p[0]]
