"""Agent kinds: how the pool checks and builds an agent of each ``kind`` (one registry).

:data:`AGENT_KINDS` maps a kind's name (``agents.agents.NAME.kind``) to an
:class:`AgentKind`: ``check`` refuses what cannot work before any model loads,
``build`` makes the agent. :class:`~agents.config.AgentConfig` accepts exactly these
names, and :meth:`agents.pool.AgentPool.from_config` builds every agent through them. A
new kind is one module with its agent and an ``AgentKind``, plus one entry here.

A kind sees the agent's name, its :class:`~agents.config.AgentConfig` (``settings``;
not imported: the config imports this module) and the pool's :class:`BuildContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.base import Agent
from agents.llm_agent import KnowledgeAgent, LLMAgent, ReasoningAgent, VerifyAgent
from agents.openai_agent import api_key_from_env, make_openai_agent
from agents.oracle import make_oracle
from agents.tokenizers import tokenizers_match
from policies.base import Generator
from tasks.base import Task


@dataclass
class BuildContext:
    """What the pool's builder knows, shared by the agents it builds.

    ``max_reply_tokens`` and ``timeout_s`` are the env's, for agents that set neither;
    ``seed`` is the base of reply sampling seeds. ``backends`` holds the generators
    built so far by backend spec (shared by agents naming the same one), ``owned`` those
    the pool must close, ``make_backend`` builds one from a spec.
    """

    policy_generator: Generator | None
    policy_tokenizer: Any
    task: Task | None
    max_reply_tokens: int
    timeout_s: float
    seed: int | None
    make_backend: Callable[..., Generator]
    backends: dict[str, Generator] = field(default_factory=dict)
    owned: list[Generator] = field(default_factory=list)
    #: The first agent seen on each non-policy backend, to check that sharers agree.
    first_on_backend: dict[str, tuple[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentKind:
    """One kind of agent: ``build(name, settings, context) -> Agent`` and an up-front check."""

    build: Callable[[str, Any, BuildContext], Agent]
    check: Callable[[str, Any, BuildContext], None] = lambda name, settings, context: None


# -- llm: replies sampled from a generator (the policy's or a backend's) ------------------

_LLM_AGENT_CLASSES: dict[str, type[LLMAgent]] = {
    "verify": VerifyAgent,
    "knowledge": KnowledgeAgent,
    "reasoning": ReasoningAgent,
}


def _check_llm(name: str, settings: Any, context: BuildContext) -> None:
    if settings.backend != "policy":
        other = context.first_on_backend.setdefault(settings.backend, (name, settings))
        if (other[1].tokenizer, other[1].backend_options) != (
            settings.tokenizer,
            settings.backend_options,
        ):
            raise ValueError(
                f"agents {other[0]!r} and {name!r} share backend {settings.backend!r} "
                "but set different tokenizer or backend_options; make them agree"
            )
    if settings.backend == "policy" and context.policy_generator is None:
        raise ValueError(f"agent {name!r} uses backend 'policy' but no policy_generator was given")


def _build_llm(name: str, settings: Any, context: BuildContext) -> Agent:
    generator = context.backends.get(settings.backend)
    if generator is None:
        if settings.backend == "policy":
            assert context.policy_generator is not None
            generator = context.policy_generator
        else:
            generator = context.make_backend(
                settings.backend, tokenizer=settings.tokenizer, options=settings.backend_options
            )
            context.owned.append(generator)
        context.backends[settings.backend] = generator
    shares = tokenizers_match(generator.tokenizer, context.policy_tokenizer)
    resolved = settings.with_defaults(
        max_reply_tokens=context.max_reply_tokens, timeout_s=context.timeout_s
    )
    options: dict[str, Any] = {
        "template": settings.template,
        "sampling": resolved.sampling(),
        "shares_policy_tokenizer": shares,
        "include_solution": settings.include_solution,
        "max_transcript_chars": settings.max_transcript_chars,
        "seed": context.seed,
    }
    agent_class = _LLM_AGENT_CLASSES.get(name)
    if agent_class is not None:
        return agent_class(generator, name=name, **options)
    return LLMAgent(name, generator, options.pop("template") or name, **options)


# -- oracle: answers from the task's privileged information, no model ---------------------


def _check_oracle(name: str, settings: Any, context: BuildContext) -> None:
    if context.task is None:
        raise ValueError(f"agent {name!r} is an oracle and needs the task; pass task=")


def _build_oracle(name: str, settings: Any, context: BuildContext) -> Agent:
    assert context.task is not None
    return make_oracle(name, context.task)


# -- openai: an OpenAI-compatible server, text replies only -------------------------------


def _check_openai(name: str, settings: Any, context: BuildContext) -> None:
    api_key_from_env(settings.api_key_env)  # a named key variable that is unset stops here


def _build_openai(name: str, settings: Any, context: BuildContext) -> Agent:
    return make_openai_agent(
        name,
        settings.with_defaults(
            max_reply_tokens=context.max_reply_tokens, timeout_s=context.timeout_s
        ),
        seed=context.seed,
    )


#: Kind name -> how the pool checks and builds an agent of that kind.
AGENT_KINDS: dict[str, AgentKind] = {
    "llm": AgentKind(build=_build_llm, check=_check_llm),
    "oracle": AgentKind(build=_build_oracle, check=_check_oracle),
    "openai": AgentKind(build=_build_openai, check=_check_openai),
}

__all__ = ["AGENT_KINDS", "AgentKind", "BuildContext"]
