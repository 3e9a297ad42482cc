"""The Python-tool example environment and the gymnasium registration."""

from __future__ import annotations

import argparse

import gymnasium
from scripted import AdditionTask, ScriptedGenerator

import aipo_env
from agents.tools import PythonRunner
from aipo.commands.envs import run as envs_run
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.rollout import RolloutConfig, RolloutDriver


async def test_python_tool_env_runs_code_and_injects_results(tokenizer) -> None:
    task = AdditionTask(1)
    p = task.problems[0]
    a, b = p.question.removeprefix("What is ").removesuffix("?").split(" + ")
    script = [
        f"<python>print({a} + {b})</python>",
        "<python>while True: pass</python>",
        f"So \\boxed{{{p.reference}}}<|im_end|>",
    ]
    runner = PythonRunner(timeout_s=1.0)
    cfg = EnvConfig(max_consults=2, protocol="python_tool")
    driver = RolloutDriver(
        ScriptedGenerator(tokenizer, script),
        env_factory=lambda: ConsultEnv(task, runner, tokenizer, cfg),
        config=RolloutConfig(n_samples=1),
    )
    [t] = await driver.run([0])
    text = tokenizer.decode(t.token_ids[t.turns[0].feedback_start : t.turns[0].feedback_end])
    assert text == f"\n<result>\n{p.reference}\n</result>\n"
    assert t.source[t.turns[0].feedback_start : t.turns[0].feedback_end].count("agent:python") > 0
    assert "timed out after 1.0 s" in t.turns[1].consult.error
    assert (t.finish_reason, t.reward, t.consults, t.consult_errors) == ("eos", 1.0, 1, 1)
    prompt = tokenizer.decode(t.token_ids[: t.prompt_len])
    assert "<python>code</python>" in prompt and "at most 2 times" in prompt


def test_ids_are_registered_on_import_and_made_on_demand(tokenizer) -> None:
    for env_id in ("aipo/Math500-v0", "aipo/GPQADiamond-v0", "aipo/RG-chain_sum-v0"):
        assert gymnasium.registry[env_id].entry_point == "aipo_env.env:make_consult_env"
    assert gymnasium.registry["aipo/GSM8K-v0"].kwargs == {"task": "gsm8k"}
    env = aipo_env.make(
        "aipo/RG-leg_counting-v0", tokenizer=tokenizer, max_consults=1, task_kwargs={"size": 3}
    )
    assert isinstance(env, ConsultEnv) and env.config.max_consults == 1
    assert gymnasium.registry["aipo/RG-leg_counting-v0"].kwargs == {"task": "rg:leg_counting"}
    obs, info = env.reset(seed=0)
    assert info["problem"].task.endswith("leg_counting") and len(obs) > 0


def test_envs_cli_lists_ids(capsys) -> None:
    assert envs_run(argparse.Namespace(ids_only=False)) == 0
    out = capsys.readouterr().out
    assert "aipo/Math500-v0" in out and "math500" in out and "aipo/RG-<name>-v0" in out


async def test_python_tool_code_runs_in_the_code_sandbox(tmp_path) -> None:
    import pytest

    from agents.base import ConsultRequest
    from tasks.sandbox import bwrap_problem

    if bwrap_problem() is not None:
        pytest.skip(f"bubblewrap cannot run here: {bwrap_problem()}")
    target = tmp_path / "escaped.txt"
    runner = PythonRunner(timeout_s=5.0, sandbox="bwrap")
    code = f"open({str(target)!r}, 'w').write('x'); print('wrote')"
    reply = await runner.consult(
        ConsultRequest(agent="python", question=code, problem=AdditionTask(1).problems[0])
    )
    assert not target.exists() and "wrote" not in reply.text
