"""RolloutDriver: concurrency, durable output, resume, schedules and failure isolation."""

from __future__ import annotations

import json

import pytest
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator

from aipo_env.config import EnvConfig
from aipo_env.rollout import ConsultSchedule, RolloutConfig, RolloutDriver
from aipo_env.trajectory import read_jsonl

EOS = "<|im_end|>"


def script_for(task: AdditionTask):
    """Consult once, then answer the session's problem correctly (problem index in the id)."""

    def step(session: str, turn: int, ids: list[int]) -> str:
        problem = task.problems[int(session.split("-g")[1].split("-")[0]) % len(task)]
        if turn == 0:
            return f'Hmm. <consult agent="verify">Is it {problem.reference}?</consult>'
        return f"\\boxed{{{problem.reference}}}{EOS}"

    return step


async def test_200_concurrent_episodes_complete_and_are_written_once(tokenizer, tmp_path) -> None:
    task = AdditionTask(50)
    agents = ScriptedAgents(delay=(0.0, 0.003), seed=1)
    gen = ScriptedGenerator(tokenizer, script_for(task), delay=(0.0, 0.002), seed=2)
    seen: list[int] = []
    driver = RolloutDriver(
        gen,
        task,
        agents,
        EnvConfig(max_new_tokens_per_turn=64),
        RolloutConfig(n_samples=4, concurrency=64),
    )
    out = tmp_path / "roll.jsonl"
    trajectories = await driver.run(output=out, progress=lambda done, total, t: seen.append(done))
    assert len(trajectories) == 200 and sorted(seen) == list(range(1, 201))
    assert [(t.group_id, t.sample_index) for t in trajectories] == [
        (f"s0-g{p}-{p}", s) for p in range(50) for s in range(4)
    ]
    lines = out.read_text().splitlines()
    assert len(lines) == 200
    ids = [json.loads(line)["trajectory_id"] for line in lines]
    assert sorted(ids) == sorted(t.trajectory_id for t in trajectories) and len(set(ids)) == 200
    by_id = {t.trajectory_id: t for t in read_jsonl(out)}
    assert all(by_id[t.trajectory_id] == t for t in trajectories)
    assert all(
        t.finish_reason == "eos" and t.reward == 1.0 and t.consults == 1 for t in trajectories
    )
    assert len(agents.requests) == 200
    assert {r.episode_id for r in agents.requests} == set(ids)


async def test_a_failing_generation_ends_only_its_trajectory(tokenizer, tmp_path) -> None:
    task = AdditionTask(3)
    bad = "s0-g1-1-n2"
    gen = ScriptedGenerator(
        tokenizer, script_for(task), fail=lambda session, turn: session == bad and turn == 1
    )
    driver = RolloutDriver(gen, task, ScriptedAgents(), EnvConfig(), RolloutConfig(n_samples=3))
    out = tmp_path / "r.jsonl"
    trajectories = await driver.run(output=out)
    reasons = {t.trajectory_id: t.finish_reason for t in trajectories}
    assert reasons.pop(bad) == "error:GenerationError"
    assert set(reasons.values()) == {"eos"}
    failed = next(t for t in trajectories if t.trajectory_id == bad)
    assert failed.consults == 1 and "scripted failure" in failed.error
    assert len(read_jsonl(out)) == 9


async def test_resume_skips_written_ids(tokenizer, tmp_path) -> None:
    task = AdditionTask(2)
    out = tmp_path / "r.jsonl"
    first = RolloutDriver(
        ScriptedGenerator(tokenizer, script_for(task)),
        task,
        ScriptedAgents(),
        config=RolloutConfig(n_samples=2),
    )
    done = await first.run([0], output=out)
    gen = ScriptedGenerator(tokenizer, script_for(task))
    second = RolloutDriver(gen, task, ScriptedAgents(), config=RolloutConfig(n_samples=2))
    both = await second.run([0, 1], output=out, resume=True)
    assert both[:2] == done
    assert {c[0] for c in gen.calls} == {"s0-g1-1-n0", "s0-g1-1-n1"}
    assert len(read_jsonl(out)) == 4


async def test_sampling_params_come_from_config_and_env(tokenizer) -> None:
    task = AdditionTask(1)
    gen = ScriptedGenerator(tokenizer, script_for(task))
    cfg = RolloutConfig(n_samples=1, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=33)
    await RolloutDriver(gen, task, ScriptedAgents(), EnvConfig(), cfg).run()
    params = gen.calls[0][2]
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (
        0.7,
        0.9,
        20,
        33,
    )
    assert params.stop == ["</consult>"]


@pytest.mark.parametrize(
    ("decay", "mid"),
    [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5), ("exponential", 0.1)],
)
def test_consult_schedule_decays(decay: str, mid: float) -> None:
    start = 1.0
    end = 0.0 if decay != "exponential" else 0.01
    schedule = ConsultSchedule(start_fraction=start, end_fraction=end, decay=decay, decay_steps=10)
    assert schedule.fraction(0) == pytest.approx(1.0)
    assert schedule.fraction(5) == pytest.approx(mid)
    assert schedule.fraction(20) == pytest.approx(1.0 if decay == "constant" else end)


async def test_schedule_limits_who_consults_in_a_group(tokenizer) -> None:
    task = AdditionTask(1)
    agents = ScriptedAgents()
    sched = ConsultSchedule(start_fraction=1.0, end_fraction=0.0, decay="linear", decay_steps=4)
    driver = RolloutDriver(
        ScriptedGenerator(tokenizer, script_for(task)),
        task,
        agents,
        EnvConfig(max_consults=1),
        config=RolloutConfig(n_samples=4, schedule=sched),
    )
    trajectories = await driver.run(step=1)
    assert [t.allow_consult for t in trajectories] == [True, True, True, False]
    assert [t.consults for t in trajectories] == [1, 1, 1, 0]
    assert len(agents.requests) == 3
