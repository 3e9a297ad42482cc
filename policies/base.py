"""The generator protocol: token ids in; token ids, log-probs and a finish reason out.

Every generation backend (embedded transformers, SGLang over HTTP, OpenRLHF's
engine adapter) implements :class:`Generator`. Text is only for people: callers
pass token ids and get the sampled ids back verbatim, so nothing is re-tokenized.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ContextOverflowError(ValueError):
    """A request whose prompt (plus at least one new token) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_context: int) -> None:
        super().__init__(
            f"prompt of {prompt_tokens} tokens leaves no room to generate within the model's "
            f"context of {max_context} tokens; shorten the prompt or raise max_context"
        )
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


class GenerationError(RuntimeError):
    """A backend failed to produce a generation (server down, malformed reply, ...)."""


class SamplingParams(BaseModel):
    """How to sample one continuation. Field names follow SGLang's ``sampling_params``."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        default=256,
        ge=1,
        description="Most tokens to generate; the continuation ends with finish_reason 'length' there.",
    )
    temperature: float = Field(
        default=1.0, ge=0.0, description="Softmax temperature; 0 means greedy."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables it."
    )
    top_k: int = Field(
        default=-1,
        ge=-1,
        description="Sample among the k most likely tokens; -1 (or 0) disables it.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings; generation ends when the decoded output contains one. The tokens that complete it are kept.",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list,
        description="Extra stop token ids besides the model's EOS; the stop token is kept in the output.",
    )
    ignore_eos: bool = Field(
        default=False, description="Keep generating past EOS (benchmarks only)."
    )
    seed: int | None = Field(
        default=None,
        description="Seed for this request's sampling; None draws from the backend's generator.",
    )
    top_logprobs: int = Field(
        default=0,
        ge=0,
        description=(
            "Also return, for every generated token, the log-probs of this many most likely "
            "tokens (Generation.top_logprobs; ARPO's entropy). 0 (default): none."
        ),
    )
    exact_logprobs: bool = Field(
        default=False,
        description=(
            "Return log-probs that do not depend on which other requests shared a decode "
            "step: the embedded generator scores the finished sequence again on its own "
            "(about one batch-of-one forward per generated token), so a run and its resumed "
            "copy record the same numbers for the same tokens. For log-probs a trainer reads "
            "(agent replies, rollout correction). Other backends ignore it. Default False."
        ),
    )

    @model_validator(mode="after")
    def _no_empty_stop(self) -> SamplingParams:
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty; got an empty string in stop")
        return self


FinishReason = Literal["stop", "length", "abort"]


class Generation(BaseModel):
    """One sampled continuation of a prompt."""

    model_config = ConfigDict(extra="forbid")

    token_ids: list[int] = Field(
        description="The sampled token ids, verbatim (a matched stop string's tokens and the EOS token included)."
    )
    logprobs: list[float] = Field(
        description="Log-prob of each sampled token under the sampling model (same length as token_ids), before temperature is applied where the backend can say so."
    )
    finish_reason: FinishReason = Field(
        description="'stop' (EOS, a stop token or a stop string), 'length' (max_new_tokens or the context reached) or 'abort'."
    )
    stop_match: str | int | None = Field(
        default=None,
        description="The stop string or stop token id that ended generation, when finish_reason is 'stop'.",
    )
    prompt_tokens: int = Field(default=0, description="Length of the prompt in tokens.")
    cached_tokens: int = Field(
        default=0,
        description="Prompt tokens served from a prefix cache instead of being recomputed.",
    )
    top_logprobs: list[list[float]] = Field(
        default_factory=list,
        description=(
            "Per generated token, the log-probs of the SamplingParams.top_logprobs most likely "
            "tokens at that position, highest first, under the same distribution as logprobs; "
            "empty when none were asked for."
        ),
    )

    @model_validator(mode="after")
    def _aligned(self) -> Generation:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries for {len(self.token_ids)} tokens; they must align"
            )
        if self.top_logprobs and len(self.top_logprobs) != len(self.token_ids):
            raise ValueError(
                f"top_logprobs has {len(self.top_logprobs)} entries for {len(self.token_ids)} "
                "tokens; expected one list per token (or none)"
            )
        return self


class Generator(ABC):
    """An asynchronous text-generation backend over token ids.

    ``session_id`` names the trajectory a request belongs to: backends route every
    turn of one session to the same server and reuse its cached prefix.
    """

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer whose ids this backend consumes and produces."""

    @property
    @abstractmethod
    def max_context(self) -> int:
        """The most tokens (prompt plus generated) one sequence may hold."""

    @abstractmethod
    async def generate(
        self,
        input_ids: Sequence[int],
        params: SamplingParams,
        *,
        session_id: str | None = None,
    ) -> Generation:
        """Sample one continuation of ``input_ids``.

        Raises :class:`ContextOverflowError` before any work when the prompt leaves
        no room in the context, and :class:`GenerationError` when the backend fails.
        """

    def fork_session(self, parent_session: str, child_session: str) -> None:
        """Declare that ``child_session`` starts from ``parent_session``'s ids (a rollout-tree branch).

        The child's first prompt is a prefix of what the parent's session already
        processed, so a backend can serve it from the parent's cache: a generator with a
        session-keyed ``prefix_cache`` (the embedded one) lets the child's lookups fall
        back to the parent's cached sequence until the child stores its own; SGLang's
        radix cache shares any prefix by itself and only needs the child routed to the
        parent's server (its override). Backends without a cache do nothing.
        """
        link = getattr(getattr(self, "prefix_cache", None), "link_session", None)
        if link is not None:
            link(child_session, parent_session)

    def check_context(self, input_ids: Sequence[int]) -> None:
        """Refuse a prompt that leaves no room to generate, before any server call."""
        if len(input_ids) >= self.max_context:
            raise ContextOverflowError(len(input_ids), self.max_context)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients, workers and memory (idempotent)."""
