"""The consult warm-up: demonstrations relabelled from the policy's own rollouts, fitted, checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator
from tiny_run import load_weights, make_config, max_weight_diff, parity_task_registered

from aipo.config import ConfigError, load_config
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from aipo_env.trajectory import Trajectory, read_jsonl
from tasks.registry import make_task
from trainers.config import TrainConfig
from trainers.demonstrations import (
    Demonstration,
    consult_usage,
    demonstration,
    fit_demonstrations,
    select_demonstrations,
    spliced,
    without_consult,
)
from trainers.embedded import EmbeddedTrainer
from trainers.warmup import WarmupError, WarmupSection

EOS = "<|im_end|>"


@pytest.fixture(autouse=True)
def _parity_task():
    with parity_task_registered():
        yield


async def episode(tokenizer, script, *, auto: bool, index: int = 0, reply="Add the ones first."):
    task = AdditionTask(4)
    config = EnvConfig(auto_consult="reasoning", max_consults=1)
    env = ConsultEnv(task, ScriptedAgents({"reasoning": reply}), tokenizer, config)
    gen = ScriptedGenerator(tokenizer, script)
    return await run_episode(
        env,
        gen,
        {"problem_index": index, "trajectory_id": f"t{index}-{auto}", "auto_consult": auto},
    ), task.problems[index]


def answer(problem, right: bool = True) -> str:
    value = int(problem.reference) + (0 if right else 1)
    return f"So \\boxed{{{value}}}.{EOS}"


async def test_opening_consult_is_relabelled_as_the_policys_and_the_reply_stays_context(
    tokenizer,
) -> None:
    problem = AdditionTask(4).problems[0]
    t, _ = await episode(tokenizer, [answer(problem)], auto=True)
    demo = demonstration(t)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    tag = enc(f'<consult agent="reasoning">{problem.question}</consult>')
    start = t.prompt_len
    assert t.token_ids[start : start + len(tag)] == tag
    trained = [i for i, m in enumerate(demo.train_mask) if m]
    policy = [i for i, s in enumerate(t.source) if s == "policy"]
    assert trained == list(range(start, start + len(tag))) + policy
    assert demo.consulted and demo.token_ids == t.token_ids
    agent = [i for i, s in enumerate(t.source) if s == "agent:reasoning"]
    assert agent and not any(demo.train_mask[i] for i in agent)
    with_agent = demonstration(t, train_agent_tokens=True)
    assert all(with_agent.train_mask[i] for i in agent)
    # The per-episode switch: no opening request, the policy's own tokens only.
    alone, _ = await episode(tokenizer, [answer(problem)], auto=False)
    assert not alone.turns[0].generation_finish == "auto_consult"
    assert demonstration(alone).train_mask == [int(s == "policy") for s in alone.source]


async def test_without_consult_keeps_the_policys_solution_on_the_independent_prompt(
    tokenizer,
) -> None:
    problem = AdditionTask(4).problems[0]
    opened, _ = await episode(tokenizer, [answer(problem)], auto=True)
    alone_env = ConsultEnv(AdditionTask(4), None, tokenizer, EnvConfig(mode="independent"))
    prompt = alone_env.prompt_ids(problem)
    assert "consult" not in tokenizer.decode(prompt)
    demo = without_consult(demonstration(opened), prompt)
    solution = opened.token_ids[opened.turns[0].feedback_end :]
    assert demo.token_ids == prompt + solution and not demo.consulted
    assert "consult" not in tokenizer.decode(demo.token_ids)
    assert "feedback" not in tokenizer.decode(demo.token_ids)
    assert demo.train_mask == [0] * len(prompt) + [1] * len(solution)
    assert demo.problem_id == problem.id and demo.response_start == len(prompt)
    # A demonstration solved alone keeps its whole response; a spliced one the solution.
    right, _ = await episode(tokenizer, [answer(problem)], auto=False)
    wrong, _ = await episode(tokenizer, [answer(problem, False)], auto=True)
    expected = prompt + right.token_ids[right.prompt_len :]
    assert without_consult(demonstration(right), prompt).token_ids == expected
    assert without_consult(spliced(wrong, right), prompt).token_ids == expected


async def test_the_no_consult_warmup_renders_each_demonstration_on_its_own_problem(
    tokenizer,
) -> None:
    from types import SimpleNamespace

    from trainers.warmup import _without_consults

    task = AdditionTask(4)
    demos = []
    for index in (0, 1):
        t, _ = await episode(tokenizer, [answer(task.problems[index])], auto=True, index=index)
        demos.append(demonstration(t))
    run = SimpleNamespace(
        env_config=EnvConfig(auto_consult="reasoning", max_consults=1),
        task=task,
        tokenizer=tokenizer,
    )
    stripped = _without_consults(run, demos)  # type: ignore[arg-type]
    alone_env = ConsultEnv(task, None, tokenizer, EnvConfig(mode="independent"))
    for demo, problem in zip(stripped, task.problems[:2], strict=True):
        prompt = alone_env.prompt_ids(problem)
        assert demo.token_ids[: len(prompt)] == prompt and not demo.consulted


async def test_selection_keeps_correct_episodes_at_the_mix_and_drops_consult_attempts(
    tokenizer,
) -> None:
    problems = AdditionTask(4).problems
    trajectories: list[Trajectory] = []
    for i in range(4):  # 3 right, 1 wrong, all with the opening consult
        t, _ = await episode(tokenizer, [answer(problems[i], i != 3)], auto=True, index=i)
        trajectories.append(t)
    for i in range(4):  # 2 right alone, 1 wrong, 1 right but with a malformed consult attempt
        script = [answer(problems[i], i != 2)]
        if i == 3:
            script = [f'<consult agent="reasoning">help {answer(problems[i])}']
        t, _ = await episode(tokenizer, script, auto=False, index=i)
        trajectories.append(t)
    section = WarmupSection(consult_share=0.5)
    demos, counts = select_demonstrations(trajectories, tokenizer, section, seed=0)
    assert counts == {
        "episodes": 8,
        "consult_episodes": 4,
        "correct_consult": 3,
        "correct_alone": 2,
        "spliced": 0,
        "referenced": 0,
    }
    # The scarcer kind sets the total: 2 alone -> 2 with a consult.
    assert len(demos) == 4 and sum(d.consulted for d in demos) == 2
    chosen = {d.trajectory_id for d in demos}
    assert "t3-True" not in chosen and "t2-False" not in chosen and "t3-False" not in chosen
    only, _ = select_demonstrations(trajectories, tokenizer, WarmupSection(consult_share=1.0), 0)
    assert len(only) == 3 and all(d.consulted for d in only)


async def test_a_wrong_consult_episode_is_spliced_with_the_policys_own_correct_solution(
    tokenizer,
) -> None:
    problem = AdditionTask(4).problems[0]
    wrong, _ = await episode(tokenizer, [answer(problem, False)], auto=True)
    right, _ = await episode(tokenizer, [answer(problem)], auto=False)
    demo = spliced(wrong, right)
    cut = wrong.turns[0].feedback_end
    assert demo.token_ids == wrong.token_ids[:cut] + right.token_ids[right.prompt_len :]
    tag = range(wrong.prompt_len, wrong.turns[0].feedback_start)
    trained = [i for i, m in enumerate(demo.train_mask) if m]
    assert trained == list(tag) + list(range(cut, len(demo.token_ids)))
    # Only when real consult demonstrations are short: here none is correct, so 1 spliced.
    demos, counts = select_demonstrations([wrong, right], tokenizer, WarmupSection(), seed=0)
    assert counts["spliced"] == 1 and counts["correct_consult"] == 0
    assert len(demos) == 2 and {d.consulted for d in demos} == {True, False}
    off = WarmupSection(splice=False)
    assert select_demonstrations([wrong, right], tokenizer, off, seed=0)[0] == []
    other, _ = await episode(tokenizer, [answer(AdditionTask(4).problems[1])], auto=False, index=1)
    with pytest.raises(ValueError, match="prompts differ"):
        spliced(wrong, other)


async def test_consult_usage_separates_well_formed_malformed_and_none(tokenizer) -> None:
    problem = AdditionTask(4).problems[0]
    good, _ = await episode(
        tokenizer,
        ['<consult agent="reasoning">how?</consult>', answer(problem)],
        auto=False,
    )
    unknown, _ = await episode(
        tokenizer,
        ['<consult agent="oracle">how?</consult>', answer(problem)],
        auto=False,
    )
    unclosed, _ = await episode(tokenizer, [f'<consult agent="reasoning">{EOS}'], auto=False)
    plain, _ = await episode(tokenizer, [answer(problem)], auto=False)
    opened, _ = await episode(tokenizer, [answer(problem)], auto=True)
    usage = consult_usage([good, unknown, unclosed, plain, opened], tokenizer)
    assert usage["episodes"] == 5
    assert usage["consult_written_rate"] == pytest.approx(1 / 5)
    assert usage["malformed_rate"] == pytest.approx(2 / 5)
    assert usage["accuracy"] == pytest.approx(4 / 5)


def test_fitting_raises_the_trained_tokens_likelihood_and_ignores_untrained_ones(
    tiny_model_dir: str,
) -> None:
    from transformers import AutoModelForCausalLM

    from trainers.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = list(range(100, 120))
    demo = Demonstration("d", ids, [0] * 10 + [1] * 10, consulted=True)

    def likelihood() -> float:
        with torch.no_grad():
            lp, _ = token_logprobs(model, torch.tensor([ids]), torch.ones(1, 20, dtype=torch.long))
        return float(lp[0, 10:].sum())

    before = likelihood()
    losses = fit_demonstrations(model, [demo], pad_id=0, epochs=5, batch_size=1, lr=1e-2, seed=0)
    assert losses[-1] < losses[0] and likelihood() > before
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    nothing = Demonstration("z", ids, [0] * 20, consulted=False)
    fit_demonstrations(model, [nothing], pad_id=0, epochs=2, batch_size=1, lr=1e-2, seed=0)
    assert all(torch.equal(untouched[k], v) for k, v in model.state_dict().items())


def test_warmup_config_errors_name_the_setting(tmp_path: Path, tiny_model_dir: str) -> None:
    with pytest.raises(ValidationError, match="warmup.agent 'teacher'"):
        make_config(tmp_path, tiny_model_dir, warmup={"enabled": True, "agent": "teacher"})
    with pytest.raises(ValidationError, match="env.max_consults=0"):
        make_config(tmp_path, tiny_model_dir, warmup={"enabled": True}, env={"max_consults": 0})


@pytest.mark.slow
def test_warmup_runs_before_the_first_step_and_moves_the_weights(
    tmp_path: Path, tiny_model_dir: str
) -> None:
    cfg = make_config(
        tmp_path / "run",
        tiny_model_dir,
        train={"steps": 1, "save_every": 1},
        optim={"lr": 1e-12, "warmup_steps": 0},
        warmup={
            "enabled": True,
            "problems": 6,
            "samples": 4,
            "min_demonstrations": 2,
            "epochs": 1,
            "lr": 1e-2,
            "check_problems": 3,
        },
    )
    EmbeddedTrainer(cfg, progress=False).run()
    run = tmp_path / "run"
    collected = read_jsonl(run / "warmup" / "rollouts.jsonl")
    assert len(collected) == 24
    opened = [t for t in collected if t.turns and t.turns[0].generation_finish == "auto_consult"]
    assert len(opened) == 12 and all(t.sample_index < 2 for t in opened)
    result = json.loads((run / "warmup" / "result.json").read_text())
    assert result["episodes"] == 24 and result["consult_episodes"] == 12
    assert result["demonstrations"] >= 2 and result["check_episodes"] == 3
    checked = read_jsonl(run / "warmup" / "check.jsonl")
    assert len(checked) == 3 and all(t.policy_version == "warmup" for t in checked)
    assert not any(t.turns and t.turns[0].generation_finish == "auto_consult" for t in checked)
    # The RL step's lr is 1e-12 (AdamW moves each weight by about lr), so what moved
    # the weights by more than 1e-4 is the warm-up's.
    assert max_weight_diff(load_weights(tiny_model_dir), load_weights(_checkpoint(run))) > 1e-4


def _checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").iterdir())[-1]


@pytest.mark.slow
def test_too_few_demonstrations_stop_the_run_with_the_counts(
    tmp_path: Path, tiny_model_dir: str
) -> None:
    cfg = make_config(
        tmp_path / "run",
        tiny_model_dir,
        warmup={"enabled": True, "problems": 2, "samples": 2, "min_demonstrations": 50},
    )
    with pytest.raises(WarmupError, match=r"kept \d+ demonstrations, fewer than .*=50: of 4"):
        EmbeddedTrainer(cfg, progress=False).run()
    # Nothing that would block a rerun without --resume: no logged step, no checkpoint.
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.stat().st_size == 0
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


async def test_a_wrong_consult_episode_is_continued_with_the_reference_when_asked(
    tokenizer,
) -> None:
    problems = AdditionTask(4).problems
    wrong, _ = await episode(tokenizer, [answer(problems[0], False)], auto=True)
    wrong2, _ = await episode(tokenizer, [answer(problems[1], False)], auto=True, index=1)
    right, _ = await episode(tokenizer, [answer(problems[0])], auto=False)
    solution = {p.id: [7, 8, tokenizer.eos_token_id] for p in problems}
    share = WarmupSection(consult_share=1.0)
    demos, counts = select_demonstrations(
        [wrong, wrong2, right], tokenizer, share, seed=0, reference=solution.__getitem__
    )
    # Problem 0 has the policy's own solution: spliced; problem 1 has none: the reference.
    assert counts["spliced"] == 1 and counts["referenced"] == 1 and len(demos) == 2
    demo = next(d for d in demos if d.trajectory_id == f"{wrong2.trajectory_id}+reference")
    cut = wrong2.turns[0].feedback_end
    assert demo.token_ids == wrong2.token_ids[:cut] + [7, 8, tokenizer.eos_token_id]
    tag = range(wrong2.prompt_len, wrong2.turns[0].feedback_start)
    trained = [i for i, m in enumerate(demo.train_mask) if m]
    assert trained == list(tag) + [cut, cut + 1, cut + 2] and demo.response_start == cut
    # Without the option nothing changes.
    _, plain = select_demonstrations([wrong, wrong2, right], tokenizer, share, seed=0)
    assert plain["referenced"] == 0 and plain["spliced"] == 1


def test_the_reference_solution_reads_step_by_step_and_boxes_the_answer() -> None:
    from tasks.base import SolutionStep
    from trainers.demonstrations import reference_solution

    steps = [
        SolutionStep(action="compute 3 + 4", result="7"),
        SolutionStep(action="7 - 2", result="5"),
    ]
    assert reference_solution(steps) == "compute 3 + 4 = 7\n7 - 2 = 5\nThe answer is \\boxed{5}."
    task = make_task("rg:leg_counting", size=5, seed=0)
    problem = task.problems[0]
    text = reference_solution(task.solution_steps(problem))
    assert task.score(problem, text).correct
    with pytest.raises(ValueError, match="at least one step"):
        reference_solution([])


def test_warmup_reference_on_a_task_without_steps_is_refused_before_anything_loads() -> None:
    overrides = [
        "task.name=rg:basic_arithmetic",
        'agents.agents={"verify": {"kind": "oracle"}}',
        "warmup.enabled=true",
        "warmup.agent=verify",
        "warmup.reference=true",
    ]
    with pytest.raises(ConfigError, match="reference steps; 'rg:basic_arithmetic' has no priv"):
        load_config(TrainConfig, None, overrides)
    # The same without the option is a valid config.
    assert not load_config(TrainConfig, None, overrides[:-1]).warmup.reference
