"""The env owns the agents' reply cap and deadline; an agent may only lower them."""

from __future__ import annotations

import asyncio

import pytest
from scripted import ScriptedGenerator

from agents import Agent, AgentConfig, AgentPool, AgentPoolConfig, AgentReply, ConsultRequest
from aipo.config import ConfigError, load_config
from trainers.config import TrainConfig, default_config_path

LEARNING = default_config_path().with_name("learning.yaml")


class WordyAgent(Agent):
    """Replies with ``words`` words, after ``delay`` seconds."""

    def __init__(self, name: str, words: int, delay: float = 0.0) -> None:
        self.name = name
        self.words = words
        self.delay = delay

    async def consult(self, request: ConsultRequest) -> AgentReply:
        await asyncio.sleep(self.delay)
        return AgentReply(agent=self.name, text=" ".join(["w"] * self.words))


def ask(agent: str) -> ConsultRequest:
    return ConsultRequest(agent=agent, question="Is it 4?")


async def test_an_agent_without_its_own_cap_follows_the_pools_from_the_env() -> None:
    agents = {"knowledge": WordyAgent("knowledge", 40), "reasoning": WordyAgent("reasoning", 40)}
    config = AgentPoolConfig(
        agents={"knowledge": AgentConfig(), "reasoning": AgentConfig(max_reply_tokens=5)}
    )
    pool = AgentPool(agents, config, max_reply_tokens=12, timeout_s=5.0)
    followed = await pool.consult(ask("knowledge"))
    lowered = await pool.consult(ask("reasoning"))
    assert len(followed.text.split()) == 12 and followed.truncated
    assert len(lowered.text.split()) == 5 and lowered.truncated


async def test_an_agent_without_its_own_timeout_follows_the_consult_deadline() -> None:
    agents = {"knowledge": WordyAgent("knowledge", 1, delay=5.0)}
    config = AgentPoolConfig(agents={"knowledge": AgentConfig(retries=0)})
    reply = await AgentPool(agents, config, timeout_s=0.05).consult(ask("knowledge"))
    assert reply.error == "agent 'knowledge': timeout after 0.05 s"


async def test_a_pool_built_without_env_values_keeps_the_former_defaults() -> None:
    pool = AgentPool({"knowledge": WordyAgent("knowledge", 300)})
    reply = await pool.consult(ask("knowledge"))
    assert len(reply.text.split()) == 256 and reply.truncated
    assert AgentConfig().with_defaults() == AgentConfig(max_reply_tokens=256, timeout_s=60.0)


def test_from_config_samples_replies_within_the_envs_cap(tokenizer) -> None:
    generator = ScriptedGenerator(tokenizer, ["unused"])
    config = AgentPoolConfig(
        agents={"knowledge": AgentConfig(), "reasoning": AgentConfig(max_reply_tokens=7)}
    )
    pool = AgentPool.from_config(
        config, policy_generator=generator, max_reply_tokens=24, timeout_s=300.0
    )
    assert pool.agents["knowledge"].sampling.max_new_tokens == 24
    assert pool.agents["reasoning"].sampling.max_new_tokens == 7


@pytest.mark.parametrize(
    ("path", "cap", "timeout"), [(default_config_path(), 32, 120.0), (LEARNING, 24, 300.0)]
)
def test_packaged_configs_keep_their_agent_limits_through_the_env(path, cap, timeout) -> None:
    cfg = load_config(TrainConfig, path)
    for name in ("knowledge", "reasoning"):
        agent = cfg.agents.agents[name]
        assert (agent.max_reply_tokens, agent.timeout_s) == (None, None)  # set once, by the env
        resolved = agent.with_defaults(
            max_reply_tokens=cfg.env.max_reply_tokens, timeout_s=cfg.env.agent_timeout_s
        )
        assert (resolved.max_reply_tokens, resolved.timeout_s) == (cap, timeout)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "agents.agents.knowledge.max_reply_tokens=33",
            "agents.agents.knowledge.max_reply_tokens=33 exceeds env.max_reply_tokens=32",
        ),
        (
            "agents.agents.reasoning.timeout_s=121",
            "agents.agents.reasoning.timeout_s=121 exceeds env.agent_timeout_s=120",
        ),
    ],
)
def test_an_agent_may_not_raise_the_envs_limits(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, default_config_path(), [override])


def test_an_agent_may_lower_the_envs_limits() -> None:
    cfg = load_config(
        TrainConfig,
        default_config_path(),
        ["agents.agents.knowledge.max_reply_tokens=16", "agents.agents.knowledge.timeout_s=30"],
    )
    assert (
        cfg.agents.agents["knowledge"].max_reply_tokens,
        cfg.agents.agents["knowledge"].timeout_s,
    ) == (16, 30.0)
