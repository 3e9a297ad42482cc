"""The agent pool: the named agents the policy may consult, behind one call that never raises.

:class:`AgentPool` implements :class:`~agents.base.ConsultService`. Around each
agent it bounds concurrency with a semaphore, enforces a timeout per attempt,
retries error replies, caps the reply length in tokens and caches identical
requests. :meth:`AgentPool.from_config` builds the agents and their generation
backends from an :class:`AgentPoolConfig`. The reply cap and the timeout of an agent
that sets neither come from the pool's builder, who passes the env's
(``env.max_reply_tokens``, ``env.agent_timeout_s``): the env owns those limits.

Replies are seeded per request (:func:`agents.llm_agent.reply_seed`), so the cache
keys a sampling agent's reply on its seed too: a reply sampled for one episode is never
handed to another, whichever of them asked first. :meth:`AgentPool.probe` checks every
backend before a run relies on it (:func:`agents.llm_agent.probe_backend`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from agents.base import Agent, AgentReply, ConsultRequest
from agents.config import (
    DEFAULT_MAX_REPLY_TOKENS,
    DEFAULT_TIMEOUT_S,
    AgentConfig,
    AgentPoolConfig,
)
from agents.kinds import AGENT_KINDS, BuildContext
from agents.leak_guard import guard_reply
from agents.llm_agent import (
    LLMAgent,
    probe_backend,
)
from agents.openai_agent import OpenAIAgent
from agents.oracle import check_oracle_agents
from policies.base import Generator
from tasks.base import Task

logger = logging.getLogger(__name__)


def make_backend(
    spec: str, *, tokenizer: str | None = None, options: Mapping[str, Any] | None = None
) -> Generator:
    """Build the generator a backend spec names ('default', an HF path/id, 'sglang://...').

    ``options`` go to the generator's constructor (``device``, ``max_retries``, ...).
    """
    from policies import make_generator, sglang_hosts

    if sglang_hosts(spec) is not None:
        if tokenizer is None:
            # Guessing would silently pair ids with the wrong vocabulary.
            raise ValueError(
                f"backend {spec!r} needs the tokenizer of the served model; set the agent's tokenizer"
            )
        return make_generator(spec, tokenizer=tokenizer, **dict(options or {}))
    return make_generator(spec, **dict(options or {}))


def _error(agent: str, message: str, start: float) -> AgentReply:
    return AgentReply(agent=agent, error=message, latency_s=time.perf_counter() - start)


class AgentPool:
    """Named agents behind one :meth:`consult` that never raises (a ``ConsultService``).

    ``config.agents`` gives each agent's timeout, retries, concurrency and reply cap;
    an agent it does not list gets :class:`AgentConfig`'s defaults. An agent that sets
    no ``max_reply_tokens`` or ``timeout_s`` gets ``max_reply_tokens`` and
    ``timeout_s`` here: pass the env's ``max_reply_tokens`` and ``agent_timeout_s``
    (the defaults are the env's defaults). ``tokenizer`` is the policy's: it decodes
    capped token ids and counts tokens of text-only replies. Every answered reply passes
    the agent's leak guard (:mod:`agents.leak_guard`), which asks ``task`` whether it
    states the answer (without a task: the reference as a token).
    """

    def __init__(
        self,
        agents: Mapping[str, Agent],
        config: AgentPoolConfig | None = None,
        *,
        tokenizer: Any = None,
        owned: Sequence[Generator] = (),
        max_reply_tokens: int = DEFAULT_MAX_REPLY_TOKENS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        task: Task | None = None,
    ) -> None:
        if not agents:
            raise ValueError("an agent pool needs at least one agent; got none")
        self.config = config or AgentPoolConfig(agents={name: AgentConfig() for name in agents})
        self._agents = dict(agents)
        self._settings = {
            name: self.config.agents.get(name, AgentConfig()).with_defaults(
                max_reply_tokens=max_reply_tokens, timeout_s=timeout_s
            )
            for name in agents
        }
        self._semaphores = {
            name: asyncio.Semaphore(s.max_concurrency) for name, s in self._settings.items()
        }
        self._tokenizer = tokenizer
        self._task = task
        self._owned = list(owned)
        self._cache: OrderedDict[tuple[Any, ...], AgentReply] = OrderedDict()
        self._closed = False

    @property
    def names(self) -> Sequence[str]:
        """The agent names the policy may consult."""
        return tuple(self._agents)

    @property
    def agents(self) -> Mapping[str, Agent]:
        """The agents by name."""
        return dict(self._agents)

    async def probe(self, skip: Sequence[Generator] = ()) -> dict[str, str]:
        """Check every agent's backend once; ``{agent: what is wrong}`` for those down.

        Agents sharing a generator share its probe. Generators in ``skip`` (the policy's,
        checked by the caller) and agents without one (oracle, tools) are not probed.
        An empty result means every backend answered.
        """
        backends: dict[int, tuple[Generator, list[str]]] = {}
        for name, agent in self._agents.items():
            generator = getattr(agent, "generator", None)
            if generator is None or any(generator is other for other in skip):
                continue
            backends.setdefault(id(generator), (generator, []))[1].append(name)
        down: dict[str, str] = {}
        for name, agent in self._agents.items():
            if isinstance(agent, OpenAIAgent):
                error = await agent.probe()
                if error is not None:
                    down[name] = error
        for generator, names in backends.values():
            timeout = min(
                float(self._settings[name].timeout_s or DEFAULT_TIMEOUT_S) for name in names
            )
            error = await probe_backend(generator, timeout)
            if error is not None:
                down.update(dict.fromkeys(names, error))
        return down

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Route ``request`` to its agent; every failure comes back as an error reply."""
        start = time.perf_counter()
        try:
            reply = await self._consult(request, start)
        except Exception as exc:  # the pool's own bug must not crash a rollout
            logger.exception("agent pool failed on a consult of %r", request.agent)
            reply = _error(request.agent, f"agent pool error: {type(exc).__name__}: {exc}", start)
        return reply.model_copy(update={"latency_s": time.perf_counter() - start})

    async def _consult(self, request: ConsultRequest, start: float) -> AgentReply:
        agent = self._agents.get(request.agent)
        if agent is None:
            return _error(
                request.agent,
                f"unknown agent {request.agent!r}; expected one of {', '.join(self._agents)}",
                start,
            )
        if not request.question.strip():
            return _error(
                request.agent,
                f"empty question for agent {request.agent!r}; write the question inside the consult tag",
                start,
            )
        key = self._cache_key(agent, request)
        cached = self._cache.get(key) if key is not None else None
        if cached is not None:
            self._cache.move_to_end(key)
            return cached.model_copy(deep=True, update={"cache_hit": True})

        settings = self._settings[request.agent]
        attempts = settings.retries + 1
        for attempt in range(1, attempts + 1):
            reply = await self._attempt(agent, request, settings, attempt - 1)
            if reply.ok:
                break
            logger.info(
                "agent %r attempt %d/%d failed: %s", request.agent, attempt, attempts, reply.error
            )
        if not reply.ok:
            if attempts > 1:
                reply = reply.model_copy(
                    update={"error": f"{reply.error} (gave up after {attempts} attempts)"}
                )
            return reply
        reply = self._cap(reply, agent, settings.max_reply_tokens)
        # After the cap: the guard judges what would be injected.
        reply = guard_reply(reply, request, settings.leak_guard, self._task)
        if not reply.ok:
            return reply
        if key is not None:
            self._cache[key] = reply
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return reply

    async def _attempt(
        self, agent: Agent, request: ConsultRequest, settings: AgentConfig, attempt: int
    ) -> AgentReply:
        start = time.perf_counter()
        semaphore = self._semaphores[request.agent]

        async def bounded() -> AgentReply:
            async with semaphore:
                if isinstance(agent, LLMAgent | OpenAIAgent):  # a retry samples afresh
                    return await agent.consult(request, attempt=attempt)
                return await agent.consult(request)

        try:
            reply = await asyncio.wait_for(bounded(), timeout=settings.timeout_s)
        except asyncio.TimeoutError:
            return _error(
                request.agent,
                f"agent {request.agent!r}: timeout after {float(settings.timeout_s)} s",
                start,
            )
        except Exception as exc:  # an agent that breaks the never-raise contract
            return _error(
                request.agent, f"agent {request.agent!r} raised {type(exc).__name__}: {exc}", start
            )
        if not isinstance(reply, AgentReply):
            return _error(
                request.agent,
                f"agent {request.agent!r} returned {type(reply).__name__}; expected an AgentReply",
                start,
            )
        if (
            reply.ok
            and reply.token_ids is not None
            and (reply.logprobs is not None and len(reply.logprobs) != len(reply.token_ids))
        ):
            return _error(
                request.agent,
                f"agent {request.agent!r} returned {len(reply.token_ids)} token ids but "
                f"{len(reply.logprobs)} log-probs; they must align",
                start,
            )
        return reply

    def _cache_key(self, agent: Agent, request: ConsultRequest) -> tuple[Any, ...] | None:
        if self.config.cache_size == 0:
            return None
        problem = request.problem
        # An agent whose prompt shows the transcript answers differently for each one.
        transcript = request.transcript if getattr(agent, "uses_transcript", False) else None
        # A seeded sampling agent's reply belongs to its request's seed: sharing it with
        # another request would make that request's reply depend on which asked first.
        seed = (
            agent.request_seed(request)
            if isinstance(agent, LLMAgent | OpenAIAgent) and agent.samples
            else None
        )
        return (
            request.agent,
            request.question.strip(),
            (problem.task, problem.id) if problem is not None else None,
            transcript,
            seed,
        )

    def _reply_tokenizer(self, agent: Agent) -> Any:
        if self._tokenizer is not None:
            return self._tokenizer
        generator = getattr(agent, "generator", None)
        return getattr(generator, "tokenizer", None)

    def _cap(self, reply: AgentReply, agent: Agent, cap: int) -> AgentReply:
        """Cut ``reply`` to ``cap`` tokens: ids, log-probs and text together."""
        tokenizer = self._reply_tokenizer(agent)
        if reply.token_ids is not None:
            if len(reply.token_ids) <= cap:
                return reply
            ids = reply.token_ids[:cap]
            logprobs = reply.logprobs[:cap] if reply.logprobs is not None else None
            text = (
                tokenizer.decode(ids, skip_special_tokens=True)
                if tokenizer is not None
                else _cut_words(reply.text, cap)
            )
            return reply.model_copy(
                update={"token_ids": ids, "logprobs": logprobs, "text": text, "truncated": True}
            )
        if tokenizer is None:
            # Without a tokenizer a whitespace word stands in for a token: an
            # approximation, used only when the pool was built without one.
            text = _cut_words(reply.text, cap)
        else:
            ids = tokenizer(reply.text, add_special_tokens=False)["input_ids"]
            if len(ids) <= cap:
                return reply
            text = tokenizer.decode(ids[:cap], skip_special_tokens=True)
        if text == reply.text:
            return reply
        return reply.model_copy(update={"text": text, "truncated": True})

    @classmethod
    def from_config(
        cls,
        config: AgentPoolConfig,
        *,
        policy_generator: Generator | None = None,
        policy_tokenizer: Any = None,
        task: Task | None = None,
        max_reply_tokens: int = DEFAULT_MAX_REPLY_TOKENS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int | None = None,
    ) -> AgentPool:
        """Build the agents and their backends.

        Agents naming the same backend share one generator; the pool closes the
        generators it created (not the policy's). An agent's ids and log-probs are
        recorded only when its tokenizer has the policy's vocabulary.
        ``max_reply_tokens`` and ``timeout_s`` are the env's ``max_reply_tokens`` and
        ``agent_timeout_s``, followed by every agent that sets neither of its own.
        ``seed`` is the run's seed, the base of every reply's sampling seed unless
        ``config.seed`` sets one (None for both: unseeded replies).
        """
        if policy_tokenizer is None and policy_generator is not None:
            policy_tokenizer = policy_generator.tokenizer
        base_seed = config.seed if config.seed is not None else seed
        context = BuildContext(
            policy_generator=policy_generator,
            policy_tokenizer=policy_tokenizer,
            task=task,
            max_reply_tokens=max_reply_tokens,
            timeout_s=timeout_s,
            seed=base_seed,
            make_backend=make_backend,
        )
        # Check everything before loading any model, so a bad config wastes no work.
        for name, settings in config.agents.items():
            AGENT_KINDS[settings.kind].check(name, settings, context)
        if task is not None:
            check_oracle_agents(config, task)
        agents: dict[str, Agent] = {
            name: AGENT_KINDS[settings.kind].build(name, settings, context)
            for name, settings in config.agents.items()
        }
        return cls(
            agents,
            config,
            tokenizer=policy_tokenizer,
            owned=context.owned,
            max_reply_tokens=max_reply_tokens,
            timeout_s=timeout_s,
            task=task,
        )

    async def aclose(self) -> None:
        """Close the agents and the generators this pool created (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for agent in self._agents.values():
            try:
                await agent.aclose()
            except Exception as exc:
                logger.warning("closing agent %r failed: %s", agent.name, exc)
        for generator in self._owned:
            try:
                await generator.aclose()
            except Exception as exc:
                logger.warning("closing an agent backend failed: %s", exc)

    async def __aenter__(self) -> AgentPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _cut_words(text: str, cap: int) -> str:
    words = text.split()
    return text if len(words) <= cap else " ".join(words[:cap])
