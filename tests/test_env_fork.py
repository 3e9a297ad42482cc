"""ConsultEnv.fork: a rollout tree's branch continues a deep copy of its parent's episode."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator

from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import turn_params
from aipo_env.trajectory import Trajectory
from policies.base import SamplingParams

EOS = "<|im_end|>"
TASK = AdditionTask(4)
RIGHT = f"So \\boxed{{{TASK.problems[0].reference}}}.{EOS}"
WRONG = f"So \\boxed{{0}}.{EOS}"


def consult(agent: str, question: str) -> str:
    return f'Let me check. <consult agent="{agent}">{question}</consult>'


#: Per session (trajectory id), the segments the policy writes, turn by turn.
SCRIPTS = {
    "root": [consult("knowledge", "How to add?"), WRONG],
    "root-again": [consult("knowledge", "How to add?"), consult("verify", "Sure?"), WRONG],
    "root/1": [consult("reasoning", "Carry?"), consult("verify", "Right?"), RIGHT],
    "root/1/1": [RIGHT],
}


def generator(tokenizer: Any) -> ScriptedGenerator:
    return ScriptedGenerator(tokenizer, lambda session, turn, ids: SCRIPTS[session][turn])


def make_env(tokenizer: Any, agents: ScriptedAgents | None = None, **config: Any) -> ConsultEnv:
    return ConsultEnv(TASK, agents or ScriptedAgents(), tokenizer, EnvConfig(**config))


async def start(env: ConsultEnv, trajectory_id: str = "root") -> None:
    await env.areset(options={"problem_index": 0, "trajectory_id": trajectory_id})


async def step(env: ConsultEnv, gen: ScriptedGenerator) -> tuple:
    """Generate the env's next segment for its session and step it."""
    params = turn_params(env, SamplingParams(), None, None)
    generation = await gen.generate(env.token_ids, params, session_id=env.trajectory_id)
    return await env.astep(generation)


async def finish(env: ConsultEnv, gen: ScriptedGenerator) -> Trajectory:
    """Step until the episode ends; returns its trajectory."""
    while True:
        _, _, terminated, truncated, info = await step(env, gen)
        if terminated or truncated:
            return info["trajectory"]


async def test_fork_shares_the_prefix_verbatim_and_records_its_parent(tokenizer) -> None:
    gen, env = generator(tokenizer), make_env(tokenizer)
    await start(env)
    await step(env, gen)
    branch_point = len(env.token_ids)
    child = env.fork("root/1")
    assert child is not env and child.trajectory_id == "root/1"
    assert child.token_ids == env.token_ids
    parent, fork = await finish(env, gen), await finish(child, gen)
    assert (parent.parent_id, parent.branch_point) == (None, None)
    assert (fork.parent_id, fork.branch_point) == ("root", branch_point)
    assert fork.group_id == parent.group_id == "root"
    for name in ("token_ids", "source", "loss_mask", "behavior_logprobs"):
        assert getattr(fork, name)[:branch_point] == getattr(parent, name)[:branch_point]
    assert fork.token_ids[branch_point:] != parent.token_ids[branch_point:]
    assert fork.turns[0] == parent.turns[0]
    assert (parent.reward, fork.reward) == (0.0, 1.0)
    assert Trajectory.model_validate_json(fork.model_dump_json()) == fork


async def test_fork_continues_its_parents_consult_budget(tokenizer) -> None:
    gen, env = generator(tokenizer), make_env(tokenizer, max_consults=2)
    await start(env, "root-again")
    await step(env, gen)
    child = env.fork("root/1")
    fork = await finish(child, gen)
    assert fork.turns[1].consult.error is None
    assert "budget of 2 exhausted" in fork.turns[2].consult.error
    assert (fork.consults, fork.consult_errors) == (2, 1)
    # The fork's consult did not spend the parent's budget: the parent still has one left.
    parent = await finish(env, gen)
    assert parent.turns[1].consult.error is None
    assert (parent.consults, parent.consult_errors) == (2, 0)


async def _tree(tokenizer: Any, fork_first: bool) -> tuple[Trajectory, Trajectory]:
    gen, env = generator(tokenizer), make_env(tokenizer, format="chat")
    await start(env)
    await step(env, gen)
    child = env.fork("root/1")
    if fork_first:
        fork = await finish(child, gen)
        return await finish(env, gen), fork
    parent = await finish(env, gen)
    return parent, await finish(child, gen)


@pytest.mark.parametrize("fork_first", [True, False])
async def test_stepping_a_fork_or_its_parent_never_changes_the_other(
    tokenizer, fork_first: bool
) -> None:
    gen, alone = generator(tokenizer), make_env(tokenizer, format="chat")
    await start(alone)
    unforked = await finish(alone, gen)
    parent, fork = await _tree(tokenizer, fork_first)
    assert parent == unforked
    other_parent, other_fork = await _tree(tokenizer, not fork_first)
    assert (other_parent, other_fork) == (parent, fork)
    assert fork.turns[0].consult.agent == "knowledge" and fork.turns[1].consult.agent == "reasoning"


async def test_a_fork_of_a_fork_names_its_immediate_parent(tokenizer) -> None:
    gen, env = generator(tokenizer), make_env(tokenizer)
    await start(env)
    await step(env, gen)
    child = env.fork("root/1")
    await step(child, gen)
    grandchild = child.fork("root/1/1")
    point = len(child.token_ids)
    leaf = await finish(grandchild, gen)
    assert (leaf.parent_id, leaf.branch_point) == ("root/1", point)
    assert leaf.consults == 2 and leaf.reward == 1.0


async def test_fork_refuses_an_unstarted_or_ended_episode(tokenizer) -> None:
    gen, env = generator(tokenizer), make_env(tokenizer)
    with pytest.raises(ValueError, match="no episode has started"):
        env.fork("root/1")
    await start(env)
    with pytest.raises(ValueError, match="new trajectory id"):
        env.fork("root")
    await finish(env, gen)
    with pytest.raises(ValueError, match=r"episode root: it has ended \(eos\)"):
        env.fork("root/1")


async def test_fork_refuses_while_a_step_awaits_its_reply(tokenizer) -> None:
    gen = generator(tokenizer)
    env = make_env(tokenizer, ScriptedAgents(delay=(0.3, 0.3)))
    await start(env)
    stepping = asyncio.create_task(step(env, gen))
    await asyncio.sleep(0.1)
    assert not stepping.done()
    with pytest.raises(ValueError, match="mid-step"):
        env.fork("root/1")
    await stepping
    assert env.fork("root/1").token_ids == env.token_ids
