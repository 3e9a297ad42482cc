"""The interaction protocol: what the policy writes to ask for something, and what comes back.

A protocol is the language of one kind of multi-turn episode. :class:`ConsultEnv`
holds one and asks it every question about text; the env itself only keeps token
ids, sources and budgets. Methods differ in their protocol: AIPO's consult tags
(:mod:`aipo_env.protocols.consult`), ARPO-style tool calls
(:mod:`aipo_env.protocols.python_tool`), and whatever comes next, as one new module
and one line in :data:`aipo_env.protocols.PROTOCOLS`.

Contract (every method works on text the env decoded from the policy's own ids; the
ids themselves are never re-tokenized):

- :meth:`~InteractionProtocol.stop_strings`: what the policy is sampled with in train
  mode; generation stops after a request, keeping the stop text.
- :meth:`~InteractionProtocol.parse_request`: the :class:`Request` that ends a segment:
  ``target`` (agent or tool name), ``content`` (question or code) and ``error`` (why it
  cannot be honoured, in words the policy can read). It never raises.
- :meth:`~InteractionProtocol.reply_markup` / :meth:`~InteractionProtocol.error_text`:
  the ``env`` text around an answer, and a whole error reply.
- :meth:`~InteractionProtocol.instructions`: the prompt section that teaches the
  policy the protocol and its budget (train mode only).
- :meth:`~InteractionProtocol.opening_request`: the request the env may write on the
  policy's behalf at the start of an episode (``EnvConfig.auto_consult``); protocols
  without one raise ``ValueError``.
- :meth:`~InteractionProtocol.count_requests`: complete requests in a text (reported
  in independent mode, where requests are not honoured).
- :meth:`~InteractionProtocol.find_request`: where a request ends in a segment's text,
  wherever the last token's boundary falls.
- :meth:`~InteractionProtocol.answer_text`: the only text the task scores: the policy's
  text with requests and reply-shaped blocks removed; :meth:`~InteractionProtocol.scored_text`
  picks it from the policy's segments (all of them, by default).
- :meth:`~InteractionProtocol.next_message`: for a protocol whose *env* opens the next
  turn (ILR's Idea3 stages), the message injected after a segment whatever the segment
  says; None (the default) leaves it to the requests the policy writes.
- :meth:`~InteractionProtocol.targets`: the names a request may address (the
  configured agents, or the protocol's own tools); :attr:`~InteractionProtocol.roles`:
  what each does, for the instructions.

What a protocol declares about itself, as class attributes read without building it
(the training config, the OpenRLHF recipe and executor ask these, never a table of
names):

- :attr:`~InteractionProtocol.tools`: empty when the agent pool answers its requests;
  else the tools that do, one per target, each built from the tool-service registry
  (``agents.tool_services.TOOL_SERVICES``), and the targets are these tools.
- :attr:`~InteractionProtocol.trainable_replies`: whether a reply may be trained
  (``loss.agent_mode`` other than ``mask``); a tool's output is no model's sample.
- :attr:`~InteractionProtocol.unavailable_text`, :attr:`~InteractionProtocol.budget_text`,
  :attr:`~InteractionProtocol.no_responder_text`: what the policy reads when requests are
  off in an episode, when its budget is spent, and when nothing answers.

Injected text is tokenized by :func:`encode_injected`: ids only, with special-token
parsing off, so an agent's or a tool's text can never forge the chat template's
turn markers or EOS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

#: One injected run of tokens: ids, their source label, their behaviour log-probs.
Piece = tuple[list[int], str, list[float | None]]


class ProtocolSettings(Protocol):
    """What a protocol is built from (:class:`~aipo_env.config.EnvConfig` has it).

    A structural type: the protocols never import the env config, which checks
    ``protocol`` against :data:`~aipo_env.protocols.PROTOCOLS`.
    """

    @property
    def protocol(self) -> str:
        """The protocol's registered name."""

    @property
    def instructions(self) -> str | None:
        """Instructions that replace the protocol's own (train mode)."""

    @property
    def agent_roles(self) -> Mapping[str, str]:
        """Role descriptions of agents beyond or instead of the defaults."""


@dataclass(frozen=True)
class Request:
    """What a policy segment asked for.

    Exactly one of ``content`` (with ``target``) or ``error`` is meaningful: ``error``
    says why the request cannot be honoured, in words the policy can read.
    """

    target: str | None
    content: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request is well-formed and names a known target."""
        return self.error is None


class InteractionProtocol(ABC):
    """The text side of one kind of interaction; see the module docstring for the contract."""

    #: Registered name (``EnvConfig.protocol``).
    name: str = ""
    #: Target -> what it does, as the instructions describe it.
    roles: Mapping[str, str] = {}
    #: The tools that answer the requests (the targets); empty: the agent pool answers.
    tools: tuple[str, ...] = ()
    #: Whether a reply may be trained (``loss.agent_mode`` shaped or ratio).
    trainable_replies: bool = True
    #: The error a request gets in an episode that may not make requests.
    unavailable_text: str = "consulting is not available in this episode; continue on your own"
    #: The error a request gets past the budget (``{budget}``: the episode's budget).
    budget_text: str = "consult budget of {budget} exhausted; continue on your own"
    #: The error a request gets when the env has no service to ask.
    no_responder_text: str = "no agents are available; continue on your own"

    @classmethod
    def from_config(cls, config: ProtocolSettings) -> InteractionProtocol:
        """The protocol with ``config.instructions`` (and, where it has roles, ``config.agent_roles``)."""
        return cls(instructions=config.instructions)  # type: ignore[call-arg]

    def targets(self, configured: Sequence[str]) -> list[str]:
        """The names a request may address: the protocol's tools, else the configured agents."""
        return list(self.tools) if self.tools else list(configured)

    @abstractmethod
    def stop_strings(self) -> list[str]:
        """Stop strings that end a segment on a request (the stop text is kept)."""

    def find_request(self, text: str, last_token_start: int | None = None) -> int | None:
        """Where the request that ends a segment ends in ``text``, or None when there is none.

        Generation stops on a stop string *in the decoded text*, keeping the token that
        completes it; that token may carry more text than the stop string (``</consult>.``
        can be one token). So a stop string counts when only whitespace follows it, or
        when it ends inside the segment's last token (which starts at ``last_token_start``
        in ``text``). Returns the index just past the stop string.
        """
        best: int | None = None
        for stop in self.stop_strings():
            at = text.rfind(stop)
            if at < 0:
                continue
            end = at + len(stop)
            if not text[end:].strip() or (last_token_start is not None and end > last_token_start):
                best = end if best is None else max(best, end)
        return best

    @abstractmethod
    def answer_text(self, policy_text: str) -> str:
        """The policy's own answer: its text with every request and any reply-shaped block removed.

        Only this is scored, so neither a reply the policy forged in the reply format nor
        an answer inside its own request can decide the reward.
        """

    def scored_text(self, segments: Sequence[str]) -> str:
        """The text the task scores, from the policy's segments (decoded, in order).

        By default :meth:`answer_text` of all of them joined; a protocol whose last
        segment alone is the answer (Idea3's fusion stage) says so here.
        """
        return self.answer_text("".join(segments))

    def next_message(self, turn: int, tokenizer: Any, ended_by_eos: bool) -> list[Piece] | None:
        """The env's own message after the policy's segment of turn ``turn``, as pieces; None: none.

        For a protocol whose env opens every turn (ILR's Idea3 stages): the segment ends
        the turn whatever it says (an EOS, a cut-off, nothing), and these ``(ids, source,
        log-probs)`` pieces are injected after it, with the room check of a reply.
        ``ended_by_eos``: whether the segment closed with EOS (the turn markup differs).
        None, the default: only a request the policy writes (:meth:`find_request`) ends a
        turn.
        """
        return None

    @abstractmethod
    def parse_request(self, text: str, targets: Sequence[str]) -> Request:
        """The request ending ``text``; problems come back as ``Request.error``."""

    @abstractmethod
    def reply_markup(self, target: str | None) -> tuple[str, str]:
        """The ``env`` text before and after an answer from ``target``."""

    @abstractmethod
    def error_text(self, target: str | None, message: str) -> str:
        """A whole error reply (``env`` text), short enough not to distract."""

    @abstractmethod
    def instructions(self, targets: Sequence[str], budget: int) -> str:
        """The prompt section that teaches the protocol, with the per-episode budget."""

    def opening_request(self, target: str, content: str) -> str:
        """A request the env writes for the policy; this protocol has none."""
        raise ValueError(f"protocol {self.name!r} has no opening request")

    @abstractmethod
    def count_requests(self, text: str) -> int:
        """Complete requests in ``text``."""


class ToolUseProtocol(InteractionProtocol):
    """A protocol whose requests tools answer: never trained, and its texts speak of tools.

    A subclass sets :attr:`tools` (its targets); each needs an entry in the tool-service
    registry (``agents.tool_services.TOOL_SERVICES``), or the config naming the protocol
    is refused.
    """

    trainable_replies = False
    unavailable_text = "calling tools is not available in this episode; continue on your own"
    budget_text = "tool budget of {budget} calls exhausted; continue on your own"
    no_responder_text = "no tools are available; continue on your own"


def encode_injected(tokenizer: Any, text: str) -> list[int]:
    """Ids of injected text (markup, agent and tool replies): no special tokens added or parsed.

    Special-token parsing is off (``split_special_tokens``), so a reply that contains the
    text of a turn marker or of EOS becomes ordinary tokens, never the control ids.
    """
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
