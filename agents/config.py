"""Agent pool settings, and how to tell whether an agent shares the policy's tokenizer.

:class:`AgentPoolConfig` is what ``agents:`` in an experiment YAML validates into;
:func:`tokenizers_match` decides whether an agent's token ids and log-probs are
recorded (only when its vocabulary is the policy's).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.base import DEFAULT_AGENT_NAMES
from agents.kinds import AGENT_KINDS
from agents.oracle import ORACLE_SOURCES as ORACLE_SOURCES
from agents.tokenizers import tokenizer_fingerprint as tokenizer_fingerprint
from agents.tokenizers import tokenizers_match as tokenizers_match
from configs.registry import check_registered
from policies.base import SamplingParams

#: Reply cap of an agent that sets none, in a pool built without the env's
#: ``max_reply_tokens`` (the env's own default is the same).
DEFAULT_MAX_REPLY_TOKENS = 256
#: Per-attempt timeout of an agent that sets none, in a pool built without the env's
#: ``agent_timeout_s`` (the env's own default is the same).
DEFAULT_TIMEOUT_S = 60.0


class AgentConfig(BaseModel):
    """How one agent is built and served."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(
        default="policy",
        description=(
            "Where the agent's model runs: 'policy' shares the policy's generator; 'default' the "
            "embedded SmolLM2-135M-Instruct; a Hugging Face path or id loads it in-process; "
            "'sglang://host:port[,host:port]' talks to SGLang servers. Agents naming the same "
            "backend share one generator."
        ),
    )
    kind: str = Field(
        default="llm",
        description=(
            "'llm' samples replies from the backend; 'openai' asks an OpenAI-compatible server "
            "(vllm serve, SGLang's OpenAI API, a hosted API) at base_url for model, text replies "
            "only (agents/openai_agent.py); 'oracle' answers from the task's privileged "
            "information, no model, by the agent's name: verify checks the candidate with the "
            "task's verifier (and says too large/too small for numbers), knowledge states the "
            "task's facts, reasoning gives the next step of its reference solution. The task must "
            "provide them (docs/agents.md lists which do); checked before anything loads. "
            "One of agents.kinds.AGENT_KINDS."
        ),
    )
    leak_guard: Literal["block", "rewrite", "off"] = Field(
        default="block",
        description=(
            "What the pool does with a reply that states the reference answer (more often than "
            "the problem or the policy's question does; the task's states_answer): 'block' "
            "(default) replaces it with an error feedback, never trained; 'rewrite' replaces the "
            "extra mentions with [withheld] (the reply loses its log-probs); 'off' lets it "
            "through. Counted in the step metrics as agents/leak_rate."
        ),
    )
    template: str | None = Field(
        default=None,
        description="Prompt template: a packaged name (verify, knowledge, reasoning) or a YAML path; None uses the agent's own.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer path or id for an sglang:// backend (the model the servers run); ignored otherwise.",
    )
    base_url: str | None = Field(
        default=None,
        description="kind 'openai': the API root of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.",
    )
    model: str | None = Field(
        default=None,
        description="kind 'openai': the served model's name, as the server's /v1/models lists it.",
    )
    api_key_env: str | None = Field(
        default=None,
        description="kind 'openai': the environment variable holding the API key (never the key itself); None for a server without one.",
    )
    connect_retries: int = Field(
        default=2,
        ge=0,
        description="kind 'openai': retries of a failed connection inside one attempt (httpx's transport), before it counts as a failed attempt.",
    )
    backend_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword options for the backend's generator when the pool creates it (device, max_retries, ...); agents naming the same backend must agree on them.",
    )
    temperature: float = Field(
        default=0.7, ge=0.0, description="Sampling temperature of replies; 0 is greedy."
    )
    top_p: float = Field(default=0.8, gt=0.0, le=1.0, description="Nucleus mass of replies.")
    max_reply_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most tokens a reply of this agent may have: sampling stops there and longer replies "
            "are cut (truncated=True). None (default) follows env.max_reply_tokens; a value may "
            "only be lower than the env's."
        ),
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "Most seconds one attempt may take, waiting for a concurrency slot included. None "
            "(default) follows env.agent_timeout_s, the whole consult's deadline; a value may only "
            "be lower than the env's."
        ),
    )
    retries: int = Field(
        default=1, ge=0, description="Extra attempts after an error reply (a timeout included)."
    )
    max_concurrency: int = Field(
        default=8, ge=1, description="Most consults of this agent in flight at once."
    )
    include_solution: bool = Field(
        default=False,
        description="Show the agent the problem's reference solution when the dataset has one (the reasoning template tells it to hint, not reveal).",
    )
    max_transcript_chars: int = Field(
        default=4000,
        ge=0,
        description="Most characters of the policy's reasoning shown to agents whose template uses it (the tail is kept).",
    )

    @field_validator("kind")
    @classmethod
    def _kind_is_registered(cls, value: str) -> str:
        return check_registered(value, AGENT_KINDS, "agent kind")

    @model_validator(mode="after")
    def _openai_has_a_server(self) -> AgentConfig:
        if self.kind == "openai":
            missing = [f for f in ("base_url", "model") if not getattr(self, f)]
            if missing:
                raise ValueError(
                    f"an agent of kind 'openai' needs {' and '.join(missing)} "
                    "(base_url: the server's API root such as http://127.0.0.1:8000/v1; "
                    "model: the served model's name)"
                )
            if not self.base_url.startswith(("http://", "https://")):  # type: ignore[union-attr]
                raise ValueError(
                    f"base_url must start with http:// or https://; got {self.base_url!r}"
                )
        return self

    def with_defaults(
        self,
        *,
        max_reply_tokens: int = DEFAULT_MAX_REPLY_TOKENS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> AgentConfig:
        """These settings with the pool's values (the env's) where this agent sets none."""
        return self.model_copy(
            update={
                "max_reply_tokens": (
                    max_reply_tokens if self.max_reply_tokens is None else self.max_reply_tokens
                ),
                "timeout_s": timeout_s if self.timeout_s is None else self.timeout_s,
            }
        )

    def sampling(self) -> SamplingParams:
        """The sampling parameters of this agent's replies (unset cap: the package default)."""
        cap = DEFAULT_MAX_REPLY_TOKENS if self.max_reply_tokens is None else self.max_reply_tokens
        return SamplingParams(max_new_tokens=cap, temperature=self.temperature, top_p=self.top_p)


def _default_agents() -> dict[str, AgentConfig]:
    return {name: AgentConfig() for name in DEFAULT_AGENT_NAMES}


class AgentPoolConfig(BaseModel):
    """The agents the policy may consult and the pool's shared settings."""

    model_config = ConfigDict(extra="forbid")

    agents: dict[str, AgentConfig] = Field(
        default_factory=_default_agents,
        description="Agent name (as written in the consult tag) -> its settings. Defaults: verify, knowledge, reasoning on the policy's backend.",
    )
    cache_size: int = Field(
        default=1024,
        ge=0,
        description="Most replies kept in the cache of identical requests (agent, question, problem); 0 disables it.",
    )
    seed: int | None = Field(
        default=None,
        description=(
            "Base seed of the agents' reply sampling: each reply samples with a seed derived from "
            "it and the request (episode, agent, question, transcript so far, attempt), so a run "
            "and its resumed copy get the same replies. None (default) follows the run's seed "
            "(train: seed; eval: --seed); a pool built without either samples unseeded."
        ),
    )

    @model_validator(mode="after")
    def _oracles_have_a_role(self) -> AgentPoolConfig:
        for name, settings in self.agents.items():
            if settings.kind == "oracle" and name not in ORACLE_SOURCES:
                raise ValueError(
                    f"agent {name!r} has kind 'oracle', whose name says what it draws on; "
                    f"expected one of {', '.join(ORACLE_SOURCES)}"
                )
        return self
