"""Agents backed by a language model: any :class:`~policies.base.Generator` answers.

The prompt is the agent's template rendered through the agent tokenizer's chat
template with the static system part first, so every request to an agent shares
that prefix in the backend's cache. Replies keep the sampled ids verbatim (minus a
trailing EOS or stop token, which must never enter the policy's sequence) and,
when the agent's model shares the policy's tokenizer, their log-probs: the
behaviour probability of AIPO's importance-sampling coefficient.

With a base seed every reply samples with :func:`reply_seed`, a pure function of that
seed and the request, like the policy's per-turn seed: a run resumed from a checkpoint
gets the replies an uninterrupted one got, whatever ran concurrently.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from agents.base import Agent, AgentReply, ConsultRequest
from agents.templates import PromptTemplate, load_template
from policies.base import Generation, Generator, SamplingParams

logger = logging.getLogger(__name__)

#: What fills a template variable the request does not provide.
_MISSING = {"problem": "(not given)", "transcript": "(nothing yet)", "solution": "(none)"}


#: Stands for the user message while the chat template renders, so the markup around the
#: message can be told from the message itself (private-use characters no template alters).
_USER_SLOT = "\ue000aipo-user-message\ue000"


def render_prompt(
    tokenizer: Any,
    system: str,
    user: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Render ``system`` then ``user`` as a chat prompt; return ``(static_ids, prompt_ids)``.

    ``chat_template_kwargs`` are extra variables of the chat template (a template's
    :attr:`~agents.templates.PromptTemplate.chat_template_kwargs`: ``enable_thinking:
    false`` turns Qwen3's thinking off); templates ignore the ones they do not use.

    ``prompt_ids`` always starts with ``static_ids`` (the rendered system part alone):
    the per-request rest is tokenized separately and appended, so the shared prefix
    is identical token for token across requests, whatever the tokenizer merges.
    The user message holds the policy's text (its question, its transcript), so it is
    tokenized with special-token parsing off, like injected text in the env: typed chat
    markup (``<|im_start|>system``) stays text and never becomes the agent's control
    tokens. Only the template's own markup around it is parsed. Without a chat template
    (or one that rejects a system message) the parts are joined as plain text.
    """
    static_text, before, after = _render_parts(tokenizer, system, user, chat_template_kwargs or {})
    static_ids = _encode(tokenizer, static_text)
    rest_ids = (
        _encode(tokenizer, before) + _encode_text(tokenizer, user) + _encode(tokenizer, after)
    )
    return static_ids, static_ids + rest_ids


def _render_parts(
    tokenizer: Any, system: str, user: str, kwargs: Mapping[str, Any]
) -> tuple[str, str, str]:
    """``(static, before, after)``: the prompt is ``static + before + user + after``."""
    if getattr(tokenizer, "chat_template", None):
        try:
            static = tokenizer.apply_chat_template(
                [{"role": "system", "content": system}], tokenize=False, **kwargs
            )
            full = tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": _USER_SLOT}],
                tokenize=False,
                add_generation_prompt=True,
                **kwargs,
            )
            if (
                isinstance(static, str)
                and isinstance(full, str)
                and full.startswith(static)
                and full.count(_USER_SLOT) == 1
            ):
                before, after = full[len(static) :].split(_USER_SLOT)
                return static, before, after
        except Exception:  # templates that refuse a system turn fall through
            logger.debug("chat template rejects a leading system message; using plain text")
    static = system.rstrip() + "\n\n"
    return static, "", "\n\n"


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of trusted template text, whose markup must become the template's control ids."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of text that is only text (the policy's): special-token parsing off."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def reply_seed(base_seed: int | None, request: ConsultRequest, attempt: int = 0) -> int | None:
    """The sampling seed of one reply: a pure function of the base seed, the request and the attempt.

    The request is its episode, agent, problem, question and the transcript so far; the
    transcript grows between two consults of an episode, so it tells which consult this
    is. A retry (``attempt`` >= 1) samples afresh. None without a base seed.
    """
    if base_seed is None:
        return None
    problem = request.problem
    key = [
        base_seed,
        request.episode_id,
        request.agent,
        [problem.task, problem.id] if problem is not None else None,
        request.question,
        request.transcript,
        attempt,
    ]
    return zlib.crc32(json.dumps(key).encode()) & 0x7FFFFFFF


def end_token_ids(tokenizer: Any, params: SamplingParams | None = None) -> set[int]:
    """Ids that may end a reply and must not be injected: EOS, the special tokens, stop ids."""
    ids: set[int] = set(getattr(tokenizer, "all_special_ids", None) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, Sequence):
        ids.update(int(i) for i in eos)
    if params is not None:
        ids.update(params.stop_token_ids)
    return ids


def strip_trailing(
    token_ids: list[int], logprobs: list[float], drop: set[int]
) -> tuple[list[int], list[float]]:
    """Drop trailing ids in ``drop`` (EOS, stop tokens) with their log-probs."""
    end = len(token_ids)
    while end and token_ids[end - 1] in drop:
        end -= 1
    return token_ids[:end], logprobs[:end]


#: The probe's sampling: one greedy token with a fixed seed, so it draws nothing from a
#: backend's own random stream and leaves the run's sampling as it would have been.
PROBE_SAMPLING = SamplingParams(max_new_tokens=1, temperature=0.0, seed=0)


async def probe_backend(generator: Generator, timeout_s: float) -> str | None:
    """Ask ``generator`` for one greedy token; None when it answers, else what is wrong.

    The probe has no session id, so the backend keeps nothing of it for later requests.
    """
    tokenizer = generator.tokenizer
    ids = list(tokenizer("Hello", add_special_tokens=False)["input_ids"])
    if not ids:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = [eos if isinstance(eos, int) else 0]
    try:
        generation = await asyncio.wait_for(
            generator.generate(ids, PROBE_SAMPLING), timeout=timeout_s
        )
    except asyncio.TimeoutError:
        return f"no reply to a one-token probe within {timeout_s:g} s"
    except Exception as exc:
        return f"a one-token probe failed: {type(exc).__name__}: {exc}"
    if not isinstance(generation, Generation):
        return f"a one-token probe returned {type(generation).__name__}; expected a Generation"
    if generation.finish_reason == "abort":
        return "the backend aborted a one-token probe"
    if not generation.token_ids or len(generation.token_ids) != len(generation.logprobs):
        return (
            f"a one-token probe came back malformed ({len(generation.token_ids)} token ids, "
            f"{len(generation.logprobs)} log-probs)"
        )
    return None


class LLMAgent(Agent):
    """An agent whose replies a :class:`Generator` samples from its prompt template.

    ``shares_policy_tokenizer`` says whether the generator's tokenizer is the
    policy's: only then are the reply's ids and log-probs returned (ids from
    another vocabulary mean nothing to the policy). ``consult`` never raises: any
    failure becomes ``AgentReply(error=...)``. ``seed`` is the base of every reply's
    sampling seed (:func:`reply_seed`); None draws from the backend's own stream.
    """

    #: The packaged template a subclass uses by default.
    default_template: str = ""

    def __init__(
        self,
        name: str,
        generator: Generator,
        template: PromptTemplate | str | None = None,
        *,
        sampling: SamplingParams | None = None,
        shares_policy_tokenizer: bool = False,
        include_solution: bool = False,
        max_transcript_chars: int = 4000,
        seed: int | None = None,
    ) -> None:
        template = template or self.default_template or name
        self.name = name
        self.generator = generator
        self.template = (
            template if isinstance(template, PromptTemplate) else load_template(template)
        )
        self.sampling = sampling or SamplingParams(max_new_tokens=256, temperature=0.7, top_p=0.8)
        self.shares_policy_tokenizer = shares_policy_tokenizer
        self.include_solution = include_solution
        self.max_transcript_chars = max_transcript_chars
        self.seed = seed
        self._prefix_registered = False

    @property
    def samples(self) -> bool:
        """Whether replies are sampled (temperature above 0) rather than greedy."""
        return self.sampling.temperature > 0

    def request_seed(self, request: ConsultRequest, attempt: int = 0) -> int | None:
        """The sampling seed of this agent's reply to ``request`` (:func:`reply_seed`)."""
        return reply_seed(self.seed, request, attempt)

    @property
    def uses_transcript(self) -> bool:
        """Whether replies depend on the policy's transcript (the pool keys its cache on it)."""
        return self.template.uses("transcript")

    def variables(self, request: ConsultRequest) -> dict[str, str]:
        """The template variables for ``request``; missing ones get a short placeholder."""
        problem = request.problem
        transcript = request.transcript.strip()
        if len(transcript) > self.max_transcript_chars:
            # The latest reasoning matters most to the agent: keep the tail.
            transcript = "..." + transcript[-self.max_transcript_chars :]
        values = {
            "question": request.question.strip(),
            "problem": problem.question.strip() if problem else "",
            "transcript": transcript,
            "solution": (problem.solution or "").strip() if problem else "",
        }
        return {k: v or _MISSING.get(k, "") for k, v in values.items()}

    def with_solution(self, request: ConsultRequest) -> bool:
        """Whether this request's prompt includes the reference solution."""
        return bool(
            self.include_solution
            and request.problem is not None
            and request.problem.solution
            and self.template.user_with_solution
        )

    def render(self, request: ConsultRequest) -> tuple[list[int], list[int]]:
        """``(static_ids, prompt_ids)`` of this agent's prompt for ``request``."""
        user = self.template.render_user(
            self.variables(request), with_solution=self.with_solution(request)
        )
        return render_prompt(
            self.generator.tokenizer,
            self.template.system,
            user,
            self.template.chat_template_kwargs,
        )

    async def _register_prefix(self, static_ids: list[int]) -> None:
        # Pinning the static prefix is an optimisation: a backend that cannot must
        # not cost the consult.
        self._prefix_registered = True
        register = getattr(self.generator, "register_prefix", None)
        if register is None or not static_ids:
            return
        try:
            result = register(static_ids)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            logger.warning("agent %r: could not register its prompt prefix: %s", self.name, exc)

    async def consult(self, request: ConsultRequest, attempt: int = 0) -> AgentReply:
        """Sample a reply to ``request``; any failure becomes an error reply.

        ``attempt`` counts the pool's retries of the same request: each samples afresh.
        """
        start = time.perf_counter()
        try:
            return await self._consult(request, start, attempt)
        except Exception as exc:  # the protocol says never raise
            return AgentReply(
                agent=self.name,
                error=f"agent {self.name!r} failed: {type(exc).__name__}: {exc}",
                latency_s=time.perf_counter() - start,
            )

    async def _consult(self, request: ConsultRequest, start: float, attempt: int) -> AgentReply:
        static_ids, prompt_ids = self.render(request)
        if not self._prefix_registered:
            await self._register_prefix(static_ids)
        # Returned log-probs are the behaviour probabilities of a trained reply: they must
        # not depend on which requests shared the backend's decode step (exact resume).
        sampling = self.sampling.model_copy(
            update={"exact_logprobs": self.shares_policy_tokenizer or self.sampling.exact_logprobs}
        )
        seed = self.request_seed(request, attempt)
        if seed is not None:
            sampling = sampling.model_copy(update={"seed": seed})
        generation = await self.generator.generate(
            prompt_ids, sampling, session_id=f"{self.name}:{request.episode_id}"
        )
        if generation.finish_reason == "abort":
            raise RuntimeError("the backend aborted the generation")
        tokenizer = self.generator.tokenizer
        drop = end_token_ids(tokenizer, self.sampling)
        # The backend may know end ids the tokenizer does not (generation_config's EOS).
        drop.update(getattr(self.generator, "eos_token_ids", None) or ())
        ids, logprobs = strip_trailing(list(generation.token_ids), list(generation.logprobs), drop)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.strip():
            raise ValueError(f"empty reply ({len(generation.token_ids)} tokens, all special)")
        shared = self.shares_policy_tokenizer
        return AgentReply(
            agent=self.name,
            text=text if shared else text.strip(),
            token_ids=ids if shared else None,
            logprobs=logprobs if shared else None,
            latency_s=time.perf_counter() - start,
            cached_tokens=generation.cached_tokens,
            truncated=generation.finish_reason == "length",
        )

    async def aclose(self) -> None:
        """The generator belongs to whoever built it (the pool closes what it created)."""


class VerifyAgent(LLMAgent):
    """The Verify agent (its role: ``AGENT_ROLES["verify"]``; its prompt: ``configs/agents/verify.yaml``)."""

    default_template = "verify"

    def __init__(self, generator: Generator, name: str = "verify", **kwargs: Any) -> None:
        super().__init__(name, generator, kwargs.pop("template", None), **kwargs)


class KnowledgeAgent(LLMAgent):
    """The Knowledge agent (its role: ``AGENT_ROLES["knowledge"]``; its prompt: ``configs/agents/knowledge.yaml``)."""

    default_template = "knowledge"

    def __init__(self, generator: Generator, name: str = "knowledge", **kwargs: Any) -> None:
        super().__init__(name, generator, kwargs.pop("template", None), **kwargs)


class ReasoningAgent(LLMAgent):
    """The Reasoning agent (its role: ``AGENT_ROLES["reasoning"]``; its prompt: ``configs/agents/reasoning.yaml``).

    With ``include_solution=True`` the prompt carries the problem's reference
    solution when the dataset has one, and the template tells the agent to hint
    from it rather than reveal it.
    """

    default_template = "reasoning"

    def __init__(self, generator: Generator, name: str = "reasoning", **kwargs: Any) -> None:
        super().__init__(name, generator, kwargs.pop("template", None), **kwargs)
