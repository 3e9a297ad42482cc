"""Agent kinds and loss modes are registries: an entry added from outside works, an unknown name is refused."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from agents.base import Agent, AgentReply, ConsultRequest
from agents.config import AgentConfig, AgentPoolConfig
from agents.kinds import AGENT_KINDS, AgentKind
from agents.pool import AgentPool
from tasks.base import Problem
from trainers.losses import LOSS_MODES, AgentTokens, LossConfig, agent_token_terms

PROBLEM = Problem(id="p1", task="toy", question="What is 1/2 + 1/4?", reference="3/4")


class EchoAgent(Agent):
    """Repeats the question: the smallest agent a new kind could build."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def consult(self, request: ConsultRequest) -> AgentReply:
        return AgentReply(agent=self.name, text=f"you asked: {request.question}")


def test_a_registered_agent_kind_is_accepted_and_built_by_the_pool(monkeypatch) -> None:
    checked: list[str] = []
    kind = AgentKind(
        build=lambda name, settings, context: EchoAgent(name),
        check=lambda name, settings, context: checked.append(name),
    )
    monkeypatch.setitem(AGENT_KINDS, "echo", kind)
    config = AgentPoolConfig(agents={"helper": AgentConfig(kind="echo")})
    pool = AgentPool.from_config(config)
    assert checked == ["helper"]

    async def go() -> AgentReply:
        async with pool:
            return await pool.consult(
                ConsultRequest(agent="helper", question="Is 3/4 right?", problem=PROBLEM)
            )

    reply = asyncio.run(go())
    assert reply.error is None
    assert reply.text == "you asked: Is 3/4 right?"


def test_an_unknown_agent_kind_is_refused_naming_it_and_the_registered_ones() -> None:
    with pytest.raises(ValidationError) as err:
        AgentConfig(kind="echo")
    message = str(err.value)
    assert "unknown agent kind 'echo'" in message
    assert all(name in message for name in AGENT_KINDS)


def _tokens() -> dict[str, torch.Tensor]:
    return {
        "logprobs": torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True),
        "behavior_logprobs": torch.tensor([[float("nan"), -1.0, -0.5]]),
        "advantages": torch.tensor([2.0]),
        "agent_mask": torch.tensor([[0, 1, 1]]),
    }


def test_a_registered_loss_mode_weights_the_agent_tokens(monkeypatch) -> None:
    def half(config: LossConfig, tokens: AgentTokens):
        coef = torch.where(tokens.agent, 0.5, 0.0).to(tokens.logp.dtype)
        loss = -coef * tokens.logp * tokens.adv() * config.agent_loss_weight
        return loss, coef, torch.zeros_like(tokens.agent)

    monkeypatch.setitem(LOSS_MODES, "half", half)
    config = LossConfig(agent_mode="half", agent_loss_weight=3.0)
    inputs = _tokens()
    loss, coef, clipped = agent_token_terms(config, **inputs)
    torch.testing.assert_close(coef, torch.tensor([[0.0, 0.5, 0.5]]))
    # -0.5 * logp * A * weight on agent tokens, 0 on the policy's token
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.0, 6.0, 1.5]]))
    loss.sum().backward()
    torch.testing.assert_close(inputs["logprobs"].grad, torch.tensor([[0.0, -3.0, -3.0]]))
    assert not clipped.any()


def test_an_unknown_loss_mode_is_refused_naming_it_and_the_registered_ones() -> None:
    with pytest.raises(ValidationError) as err:
        LossConfig(agent_mode="half")
    message = str(err.value)
    assert "unknown agent_mode 'half'" in message
    assert all(name in message for name in LOSS_MODES)


def _registry_fields():
    from aipo_env.config import EnvConfig
    from aipo_env.protocols import PROTOCOLS
    from aipo_env.rollout import RolloutConfig
    from aipo_env.strategies import STRATEGIES

    return [
        (lambda v: AgentConfig(kind=v), AGENT_KINDS, "agent kind"),
        (lambda v: LossConfig(agent_mode=v), LOSS_MODES, "agent_mode"),
        (lambda v: RolloutConfig(strategy=v), STRATEGIES, "rollout strategy"),
        (lambda v: EnvConfig(protocol=v), PROTOCOLS, "protocol"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_every_registry_named_field_refuses_an_unknown_name_the_same_way(index: int) -> None:
    build, registry, what = _registry_fields()[index]
    with pytest.raises(ValidationError) as err:
        build("no_such_entry")
    assert f"unknown {what} 'no_such_entry'; expected one of {', '.join(registry)}" in str(
        err.value
    )
    name = next(iter(registry))
    build(name)  # a registered name passes the same check


def test_a_name_added_to_a_registry_is_accepted_without_other_changes(monkeypatch) -> None:
    from aipo_env.rollout import RolloutConfig
    from aipo_env.strategies import STRATEGIES

    with pytest.raises(ValidationError):
        RolloutConfig(strategy="mine")
    monkeypatch.setitem(STRATEGIES, "mine", next(iter(STRATEGIES.values())))
    assert RolloutConfig(strategy="mine").strategy == "mine"
