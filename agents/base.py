"""The agent protocol: a consult request in, an :class:`AgentReply` out, never an exception.

An agent answers one consult from the policy. Replies carry text for people and,
when the agent's model shares the policy's tokenizer, the reply's token ids and
their log-probs under the agent model: the behaviour probability of AIPO's
importance-sampling coefficient for agent tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from tasks.base import Problem

#: The three collaborative agents of AIPO, in the order prompts list them.
DEFAULT_AGENT_NAMES: tuple[str, ...] = ("verify", "knowledge", "reasoning")

#: What each agent is for: the one description, shown to the policy in the consult
#: instructions. Each agent's own prompt (``configs/agents/NAME.yaml``) tells its model
#: how to play that role.
AGENT_ROLES: dict[str, str] = {
    "verify": "checks a claim, a step or a candidate answer you show it and says whether and where it is wrong",
    "knowledge": "supplies domain knowledge: definitions, theorems, formulas and facts",
    "reasoning": "gives strategic guidance: a plan, the next step, or a way out of a dead end",
}


class ConsultRequest(BaseModel):
    """What the policy asked, and the context an agent may use to answer."""

    model_config = ConfigDict(extra="forbid")

    agent: str = Field(description="Name of the agent consulted, as written in the consult tag.")
    question: str = Field(
        description="The policy's question: a claim to verify, knowledge to supply, or where it is stuck."
    )
    problem: Problem | None = Field(
        default=None, description="The problem being solved (oracle agents use its reference)."
    )
    transcript: str = Field(
        default="",
        description="The policy's reasoning so far, decoded, for agents that look at it.",
    )
    episode_id: str = Field(
        default="",
        description="The trajectory's id: routes an agent's requests to one server and keys caches.",
    )


class AgentReply(BaseModel):
    """An agent's answer to one consult. ``error`` is set instead of raising."""

    model_config = ConfigDict(extra="forbid")

    agent: str = Field(description="Name of the agent that answered.")
    text: str = Field(
        default="", description="The reply text injected into the trajectory (empty on error)."
    )
    token_ids: list[int] | None = Field(
        default=None,
        description="The reply's ids in the policy's vocabulary, only when the agent's model shares the policy's tokenizer.",
    )
    logprobs: list[float] | None = Field(
        default=None,
        description="Log-prob of each of token_ids under the agent model (the IS behaviour probability), aligned with token_ids.",
    )
    latency_s: float = Field(default=0.0, description="Wall time the consult took, in seconds.")
    cached_tokens: int = Field(
        default=0, description="Prompt tokens the agent's backend served from its prefix cache."
    )
    cache_hit: bool = Field(
        default=False,
        description="Whether the reply came from the pool's cache of identical requests.",
    )
    truncated: bool = Field(
        default=False, description="Whether the reply was cut to the reply-length cap."
    )
    error: str | None = Field(
        default=None,
        description="What went wrong ('timeout after 30.0 s', 'unknown agent ...'); None on success.",
    )
    leak: Literal["blocked", "rewritten"] | None = Field(
        default=None,
        description="What the pool's leak guard did to a reply that stated the reference answer (agents/leak_guard.py); None when it did nothing.",
    )

    @property
    def ok(self) -> bool:
        """Whether the agent answered without error."""
        return self.error is None


class Agent(ABC):
    """A collaborative agent. :meth:`consult` must return within its timeout and never raise."""

    name: str = ""

    @abstractmethod
    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Answer one consult."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release backends (idempotent)."""


@runtime_checkable
class ConsultService(Protocol):
    """What the environment consults: a set of named agents behind one call.

    ``agents.pool.AgentPool`` is the real one; tests use scripted ones. ``consult``
    should not raise, but the environment guards against one that does.
    """

    @property
    def names(self) -> Sequence[str]:
        """The agent names the policy may consult."""
        ...

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Route ``request`` to the agent it names and return its reply."""
        ...
