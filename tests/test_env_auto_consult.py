"""The opt-in auto consult: the env opens an episode with a consult on the policy's behalf."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator

from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from aipo_env.masks import MaskRule
from aipo_env.trajectory import Trajectory

EOS = "<|im_end|>"


async def play(env: ConsultEnv, gen: ScriptedGenerator, **options) -> Trajectory:
    return await run_episode(env, gen, {"problem_index": 0, **options})


@pytest.fixture
def task() -> AdditionTask:
    return AdditionTask(2)


async def test_auto_consult_opens_the_episode_with_env_written_tag_and_agent_reply(
    tokenizer, task
) -> None:
    agents = ScriptedAgents({"reasoning": "Add the ones first."})
    answer = f"So \\boxed{{{task.problems[0].reference}}}.{EOS}"
    gen = ScriptedGenerator(tokenizer, [answer])
    config = EnvConfig(
        auto_consult="reasoning",
        auto_consult_question="Plan for: {question}",
    )
    env = ConsultEnv(task, agents, tokenizer, config, mask_rule=MaskRule(train_injected=True))
    t = await play(env, gen)

    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    question = f"Plan for: {task.problems[0].question}"
    tag = enc(f'<consult agent="reasoning">{question}</consult>')
    open_ids, body, close = (
        enc('\n<feedback agent="reasoning">\n'),
        enc("Add the ones first."),
        enc("\n</feedback>\n"),
    )
    prompt = env.prompt_ids(task.problems[0])
    assert t.token_ids == prompt + tag + open_ids + body + close + enc(answer)
    assert t.source == (
        ["prompt"] * len(prompt)
        + ["env"] * (len(tag) + len(open_ids))
        + ["agent:reasoning"] * len(body)
        + ["env"] * len(close)
        + ["policy"] * len(enc(answer))
    )
    # The env's tag is never trained; the agent's tokens are (train_injected).
    assert [m for m, s in zip(t.loss_mask, t.source, strict=True) if s == "env"] == [0] * (
        len(tag) + len(open_ids) + len(close)
    )
    assert sum(t.loss_mask) == len(body) + len(enc(answer))
    assert (
        agents.requests[0].question == question and agents.requests[0].problem == task.problems[0]
    )
    assert (
        t.turns[0].generation_finish == "auto_consult"
        and t.turns[0].policy_start == t.turns[0].policy_end
    )
    assert t.consults == 1 and t.reward == 1.0 and t.finish_reason == "eos"


async def test_auto_consult_uses_the_budget_and_skips_episodes_that_may_not_consult(
    tokenizer, task
) -> None:
    agents = ScriptedAgents({"reasoning": "Hint."})
    again = '<consult agent="reasoning">And now?</consult>'
    config = EnvConfig(auto_consult="reasoning", max_consults=1)
    env = ConsultEnv(task, agents, tokenizer, config)
    t = await play(env, ScriptedGenerator(tokenizer, [again, f"done{EOS}"]))
    assert t.consults == 1 and t.consult_errors == 1
    assert "budget of 1 exhausted" in t.turns[1].consult.error
    assert len(agents.requests) == 1

    alone = await play(env, ScriptedGenerator(tokenizer, [f"done{EOS}"]), allow_consult=False)
    assert alone.consults == 0 and "env" not in alone.source and len(agents.requests) == 1


def test_auto_consult_must_name_a_known_agent_and_the_inline_format() -> None:
    with pytest.raises(ValidationError, match="auto_consult agent 'verfy' is not in agent_names"):
        EnvConfig(auto_consult="verfy")
    with pytest.raises(ValidationError, match="needs format 'inline'"):
        EnvConfig(auto_consult="verify", format="chat")


async def test_the_reset_observation_holds_the_prompt_and_the_auto_consult(tokenizer, task) -> None:
    agents = ScriptedAgents({"reasoning": "Add the ones first."})
    env = ConsultEnv(task, agents, tokenizer, EnvConfig(auto_consult="reasoning"))
    obs, info = await env.areset(options={"problem_index": 0})
    assert list(obs) == env.token_ids and len(info["sources"]) == len(obs)
    assert len(obs) > len(env.prompt_ids(task.problems[0])) and "agent:reasoning" in info["sources"]
