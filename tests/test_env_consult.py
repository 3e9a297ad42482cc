"""ConsultEnv: token-exact episodes, masks and sources, budgets, malformed input, modes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator, scripted_logprob

from agents.base import AgentReply
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from aipo_env.masks import MaskRule
from aipo_env.trajectory import Trajectory
from policies.base import SamplingParams

EOS = "<|im_end|>"


def consult(agent: str, question: str) -> str:
    return f'Let me check. <consult agent="{agent}">{question}</consult>'


async def play(env: ConsultEnv, gen: ScriptedGenerator, **options) -> Trajectory:
    """Drive one episode with the scripted generator; returns the trajectory."""
    return await run_episode(env, gen, {"problem_index": 0, **options})


@pytest.fixture
def task() -> AdditionTask:
    return AdditionTask(4)


def answer(task: AdditionTask) -> str:
    return f"The answer is \\boxed{{{task.problems[0].reference}}}.{EOS}"


async def test_masks_sources_and_logprobs_token_by_token(tokenizer, task) -> None:
    agents = ScriptedAgents({"knowledge": "Add ones then tens."})
    gen = ScriptedGenerator(tokenizer, [consult("knowledge", "How to add?"), answer(task)])
    env = ConsultEnv(task, agents, tokenizer, EnvConfig())
    t = await play(env, gen)
    assert t.finish_reason == "eos" and t.reward == 1.0 and t.consults == 1
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    first, second = enc(consult("knowledge", "How to add?")), enc(answer(task))
    open_ids, body, close = (
        enc('\n<feedback agent="knowledge">\n'),
        enc("Add ones then tens."),
        enc("\n</feedback>\n"),
    )
    prompt = env.prompt_ids(task.problems[0])
    assert t.token_ids == prompt + first + open_ids + body + close + second
    expected_sources = (
        ["prompt"] * len(prompt)
        + ["policy"] * len(first)
        + ["env"] * len(open_ids)
        + ["agent:knowledge"] * len(body)
        + ["env"] * len(close)
        + ["policy"] * len(second)
    )
    assert t.source == expected_sources
    assert t.loss_mask == [int(s == "policy") for s in expected_sources]
    for i, (s, lp) in enumerate(zip(t.source, t.behavior_logprobs, strict=True)):
        if s == "policy":
            assert lp == pytest.approx(scripted_logprob(t.token_ids[i], _pos(t, i)))
        else:
            assert lp is None
    turn = t.turns[0]
    assert (turn.consult.agent, turn.consult.question) == ("knowledge", "How to add?")
    assert t.source[turn.feedback_start : turn.feedback_end].count("agent:knowledge") == len(body)
    assert agents.requests[0].problem == task.problems[0]


def _pos(t: Trajectory, i: int) -> int:
    """The scripted generator's position argument: the prompt length of the call plus offset."""
    turn = next(u for u in t.turns if u.policy_start <= i < u.policy_end)
    return turn.policy_start + (i - turn.policy_start)


async def test_sampled_ids_are_kept_verbatim(tokenizer, task) -> None:
    # "hello" spelt one character per token: decode + re-encode would merge them.
    odd = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "hello"]
    assert tokenizer.encode(tokenizer.decode(odd), add_special_tokens=False) != odd
    eos = tokenizer.eos_token_id
    gen = ScriptedGenerator(
        tokenizer,
        [odd + tokenizer.encode(consult("verify", "ok?"), add_special_tokens=False), odd + [eos]],
    )
    env = ConsultEnv(task, ScriptedAgents(), tokenizer, EnvConfig())
    t = await play(env, gen)
    first = t.turns[0]
    assert t.token_ids[first.policy_start : first.policy_start + 5] == odd
    assert t.token_ids[t.turns[1].policy_start :] == odd + [eos]
    assert t.finish_reason == "eos"


async def test_answer_inside_feedback_never_counts(tokenizer, task) -> None:
    leak = f"\\boxed{{{task.problems[0].reference}}}"
    agents = ScriptedAgents({"verify": f"The answer is {leak}"})
    gen = ScriptedGenerator(tokenizer, [consult("verify", "?"), f"I give up.{EOS}"])
    t = await play(ConsultEnv(task, agents, tokenizer, EnvConfig()), gen)
    assert leak in tokenizer.decode(t.token_ids)
    assert t.reward == 0.0 and t.verifier.reason == "no boxed answer"


async def test_agent_token_ids_logprobs_cap_and_training(tokenizer, task) -> None:
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    reply = AgentReply(
        agent="reasoning",
        text="ignored",
        token_ids=ids,
        logprobs=[-0.1 * (i + 1) for i in range(len(ids))],
    )
    agents = ScriptedAgents({"reasoning": reply})
    gen = ScriptedGenerator(tokenizer, [consult("reasoning", "plan?"), answer(task)])
    env = ConsultEnv(
        task,
        agents,
        tokenizer,
        EnvConfig(max_reply_tokens=3),
        mask_rule=MaskRule(train_injected=True),
    )
    t = await play(env, gen)
    agent_at = [i for i, s in enumerate(t.source) if s == "agent:reasoning"]
    assert [t.token_ids[i] for i in agent_at] == ids[:3]
    assert [t.behavior_logprobs[i] for i in agent_at] == pytest.approx([-0.1, -0.2, -0.3])
    assert all(t.loss_mask[i] == 1 for i in agent_at)
    assert t.turns[0].consult.reply_truncated


@pytest.mark.parametrize(
    ("policy_text", "replies", "config", "fragment"),
    [
        ('<consult agent="verfy">x?</consult>', {}, {}, "unknown agent 'verfy'"),
        ('<consult agent="verify"> </consult>', {}, {}, "empty question"),
        ("stray close</consult>", {}, {}, "without an opening"),
        (consult("verify", "x?"), {"verify": RuntimeError("boom")}, {}, "failed (RuntimeError)"),
        (
            consult("verify", "x?"),
            {"verify": "hang"},
            {"agent_timeout_s": 0.05},
            "timed out after 0.05 s",
        ),
        (
            consult("verify", "x?"),
            {"verify": AgentReply(agent="verify", error="server down")},
            {},
            "server down",
        ),
        (consult("verify", "x?"), {}, {"max_consults": 0}, "budget of 0 exhausted"),
    ],
)
async def test_bad_consults_get_masked_env_error_feedback(
    tokenizer, task, policy_text, replies, config, fragment
) -> None:
    agents = ScriptedAgents(replies)
    gen = ScriptedGenerator(tokenizer, [policy_text, answer(task)])
    t = await play(ConsultEnv(task, agents, tokenizer, EnvConfig(**config)), gen)
    turn = t.turns[0]
    injected = t.token_ids[turn.feedback_start : turn.feedback_end]
    assert fragment in tokenizer.decode(injected) and fragment in turn.consult.error
    assert set(t.source[turn.feedback_start : turn.feedback_end]) == {"env"}
    assert set(t.loss_mask[turn.feedback_start : turn.feedback_end]) == {0}
    assert (t.consults, t.consult_errors, t.finish_reason, t.reward) == (0, 1, "eos", 1.0)


async def test_no_agents_and_disallowed_episodes_get_errors(tokenizer, task) -> None:
    gen = ScriptedGenerator(tokenizer, [consult("verify", "x?"), answer(task)])
    t = await play(ConsultEnv(task, None, tokenizer, EnvConfig()), gen)
    assert "no agents are available" in t.turns[0].consult.error
    agents = ScriptedAgents()
    gen = ScriptedGenerator(tokenizer, [consult("verify", "x?"), answer(task)])
    t = await play(ConsultEnv(task, agents, tokenizer, EnvConfig()), gen, allow_consult=False)
    assert "not available in this episode" in t.turns[0].consult.error
    assert agents.requests == [] and t.allow_consult is False


async def test_budget_counts_agent_calls(tokenizer, task) -> None:
    agents = ScriptedAgents()
    script = [
        consult("verify", "a?"),
        consult("knowledge", "b?"),
        consult("reasoning", "c?"),
        answer(task),
    ]
    gen = ScriptedGenerator(tokenizer, script)
    t = await play(ConsultEnv(task, agents, tokenizer, EnvConfig(max_consults=2)), gen)
    assert [r.agent for r in agents.requests] == ["verify", "knowledge"]
    assert (t.consults, t.consult_errors, t.consult_attempts) == (2, 1, 3)
    assert "budget of 2 exhausted" in t.turns[2].consult.error


async def test_length_max_turns_and_context_overflow(tokenizer, task) -> None:
    long_text = "word " * 50
    gen = ScriptedGenerator(tokenizer, [long_text])
    t = await play(ConsultEnv(task, None, tokenizer, EnvConfig(max_new_tokens_per_turn=7)), gen)
    assert t.finish_reason == "length" and t.policy_token_count() == 7

    gen = ScriptedGenerator(tokenizer, [consult("verify", "a?")] * 3)
    t = await play(ConsultEnv(task, ScriptedAgents(), tokenizer, EnvConfig(max_turns=2)), gen)
    assert t.finish_reason == "max_turns" and len(t.turns) == 2 and t.consults == 1

    env = ConsultEnv(task, ScriptedAgents({"verify": "x " * 200}), tokenizer, EnvConfig())
    prompt_len = len(env.prompt_ids(task.problems[0]))
    env.config.max_total_tokens = prompt_len + 60
    gen = ScriptedGenerator(tokenizer, [consult("verify", "a?"), answer(task)])
    t = await play(env, gen)
    assert t.finish_reason == "context_overflow" and len(t.token_ids) < prompt_len + 60
    assert t.turns[0].feedback_start is None and t.turns[0].consult.agent == "verify"

    env = ConsultEnv(task, None, tokenizer, EnvConfig(max_total_tokens=10))
    _, info = await env.areset(options={"problem_index": 0})
    assert info["trajectory"].finish_reason == "context_overflow"


async def test_abort_and_error_kinds(tokenizer, task) -> None:
    env = ConsultEnv(task, None, tokenizer, EnvConfig())
    await env.areset(options={"problem_index": 0})
    t = env.abort("GenerationError", "server down")
    assert (t.finish_reason, t.error, t.reward, t.verifier) == (
        "error:GenerationError",
        "server down",
        0.0,
        None,
    )
    with pytest.raises(RuntimeError, match="already ended"):
        await env.astep([1, 2])
    await env.areset(options={"problem_index": 0})
    _, _, terminated, truncated, info = await env.astep(
        {"token_ids": [5], "logprobs": [-1.0], "finish_reason": "abort"}
    )
    assert info["trajectory"].finish_reason == "error:abort" and truncated and not terminated


async def test_independent_mode_counts_attempts_without_honouring(tokenizer, task) -> None:
    text = consult("verify", "a?") + " and " + consult("knowledge", "b?") + " " + answer(task)
    agents = ScriptedAgents()
    gen = ScriptedGenerator(tokenizer, [text])
    env = ConsultEnv(task, agents, tokenizer, EnvConfig(mode="independent"))
    assert env.sampling_stop == []
    t = await play(env, gen)
    prompt = tokenizer.decode(t.token_ids[: t.prompt_len])
    assert "consult" not in prompt and task.problems[0].question in prompt
    assert (t.consult_attempts, t.consults, len(t.turns), t.finish_reason, t.reward) == (
        2,
        0,
        1,
        "eos",
        1.0,
    )
    assert agents.requests == [] and set(t.source[t.prompt_len :]) == {"policy"}
    train = ConsultEnv(task, agents, tokenizer, EnvConfig())
    assert train.sampling_stop == ["</consult>"]
    assert "<consult agent=" in tokenizer.decode(train.prompt_ids(task.problems[0]))


async def test_chat_format_matches_a_full_render(tokenizer, task) -> None:
    agents = ScriptedAgents({"verify": "Yes, that step is right."})
    gen = ScriptedGenerator(tokenizer, [consult("verify", "Is 2+2=4?"), answer(task)])
    env = ConsultEnv(task, agents, tokenizer, EnvConfig(format="chat"))
    t = await play(env, gen)
    assert not t.tokenization_drift
    messages = env.prompt_messages(task.problems[0]) + [
        {"role": "assistant", "content": consult("verify", "Is 2+2=4?")},
        {
            "role": "user",
            "content": '<feedback agent="verify">\nYes, that step is right.\n</feedback>',
        },
        {"role": "assistant", "content": answer(task)[: -len(EOS)]},
    ]
    full = tokenizer.encode(
        tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False
    )
    assert t.token_ids == full[: len(t.token_ids)]
    assert len(full) - len(t.token_ids) == 1  # only the template's trailing newline
    turn = t.turns[0]
    fb = t.source[turn.feedback_start : turn.feedback_end]
    assert fb.count("agent:verify") == len(
        tokenizer.encode("Yes, that step is right.", add_special_tokens=False)
    )


async def test_chat_format_flags_drift_from_non_canonical_ids(tokenizer, task) -> None:
    odd = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "hello"]
    gen = ScriptedGenerator(tokenizer, [odd + [tokenizer.eos_token_id]])
    env = ConsultEnv(task, None, tokenizer, EnvConfig(format="chat", mask_on_drift=True))
    t = await play(env, gen)
    assert t.tokenization_drift and set(t.loss_mask) == {0}
    assert t.token_ids[t.prompt_len :] == odd + [tokenizer.eos_token_id]


def test_sync_api_and_check_env(tokenizer, task) -> None:
    env = ConsultEnv(
        task, ScriptedAgents(), tokenizer, EnvConfig(max_new_tokens_per_turn=16), render_mode="ansi"
    )
    check_env(env, skip_close_check=True)
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.int64 and info["sources"] == ["prompt"] * len(obs)
    ids = tokenizer.encode(consult("verify", "x?"), add_special_tokens=False)
    obs, reward, terminated, truncated, info = env.step(ids)
    assert info["sources"].count("agent:verify") > 0 and not (terminated or truncated)
    assert "[agent:verify" in env.render()
    env.close()


async def test_sync_api_refuses_a_running_loop(tokenizer, task) -> None:
    env = ConsultEnv(task, None, tokenizer, EnvConfig())
    with pytest.raises(RuntimeError, match="use 'await env.areset"):
        env.reset()
    assert asyncio.get_running_loop() is not None


async def test_each_step_labels_its_observation_and_the_last_carries_the_reward(
    task, tokenizer
) -> None:
    gen = ScriptedGenerator(tokenizer, [consult("verify", "Is it 4?"), f"So \\boxed{{4}}{EOS}"])
    env = ConsultEnv(task, ScriptedAgents(), tokenizer, EnvConfig(max_new_tokens_per_turn=16))
    _, info = await env.areset(options={"problem_index": 0})
    while True:
        params = SamplingParams(max_new_tokens=max(1, env.max_new_tokens()), stop=env.sampling_stop)
        g = await gen.generate(env.token_ids, params, session_id=env.trajectory_id)
        obs, reward, terminated, truncated, info = await env.astep(g)
        assert len(obs) == len(info["sources"])
        if terminated or truncated:
            assert reward == info["trajectory"].reward
            break
