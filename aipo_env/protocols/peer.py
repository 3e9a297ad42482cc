"""The peer protocol: ILR's Idea3, the texts two or more policies exchange on one question.

ILR (Lin et al., arXiv 2509.26306) has peers work on a question in three stages:

1. **Idea sharing**: each peer says how it would solve the problem;
2. **Idea analysis**: each reads the others' ideas and analyses them;
3. **Idea fusion**: each writes its final solution, drawing on the exchange.

What a peer is asked depends on its interaction mode
(:mod:`aipo_env.interaction_mode`): a peer that *cooperates* is told the others are
partners and asked to build on their ideas; one that *competes* is told they are
rivals and asked to find their mistakes. Only the final stage's text is scored.

This module holds the texts only; :mod:`aipo_env.peer_episode` runs the stages and
builds each peer's token-exact trajectory. Every other peer's words enter a peer's
trajectory as ``peer:<name>`` tokens between ``env`` text from here.
"""

from __future__ import annotations

from collections.abc import Mapping

from aipo_env.interaction_mode import Mode

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


def opening(question: str, answer_format: str, mode: Mode) -> str:
    """The first user message: the problem, then stage 1's instruction for ``mode``."""
    return f"{question}\n\n{answer_format}".strip() + "\n\n" + _SHARE[mode]


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
