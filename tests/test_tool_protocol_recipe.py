"""A one-tag tool protocol is one module plus one registry entry, and fails loudly without its tool.

The ``<calc>`` protocol of ``tests/support/calc_tool.py`` is registered as a contributor
would (one ``PROTOCOLS`` entry, one ``TOOL_SERVICES`` entry) and trained the way the
embedded trainer builds a run: the config resolves from the protocol's declarations, the
tool set comes from the registry, and an episode calls the tool.
"""

from __future__ import annotations

import json

import pytest
from calc_tool import CalcProtocol, Calculator
from scripted import AdditionTask, ScriptedGenerator

from agents.tool_services import TOOL_SERVICES, ToolService
from agents.tools import PythonRunner
from aipo.config import ConfigError, load_config
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from aipo_env.evaluation.runner import EvalConfig, evaluate
from aipo_env.protocols import PROTOCOLS
from aipo_env.trajectory import read_jsonl
from trainers.config import TrainConfig
from trainers.openrlhf.config import ExecutorConfig
from trainers.tool_config import make_tool_service

EOS = "<|im_end|>"


@pytest.fixture
def calc_protocol(monkeypatch) -> None:
    """The protocol's one registry entry (aipo_env/protocols/__init__.py)."""
    monkeypatch.setitem(PROTOCOLS, CalcProtocol.name, CalcProtocol)


@pytest.fixture
def calc_service(monkeypatch) -> None:
    """The tool's one registry entry (agents/tool_services.py)."""
    monkeypatch.setitem(TOOL_SERVICES, "calc", ToolService(lambda config: Calculator()))


@pytest.mark.usefixtures("calc_protocol", "calc_service")
async def test_a_calc_protocol_trains_from_its_module_and_two_entries(tokenizer) -> None:
    config = load_config(TrainConfig, None, ["env.protocol=calc", "warmup.enabled=false"])
    # What the protocol declares, resolved and reported: its tool, no pool, no training on it.
    assert config.env.agent_names == ["calc"] and config.agents.agents == {}
    assert config.loss.agent_mode == "mask"
    assert {c.path for c in config.resolved} >= {
        "env.agent_names",
        "agents.agents",
        "loss.agent_mode",
    }
    service = make_tool_service(config.tools, config.env.protocol)
    assert service is not None and service.names == ("calc",)
    env = ConsultEnv(
        AdditionTask(1), service, tokenizer, config.env, mask_rule=config.loss.mask_rule()
    )
    assert "<calc>expression</calc>" in env.instructions()
    script = ["<calc>2 + 3 * 4</calc>", f"\\boxed{{{env.task.problems[0].reference}}}{EOS}"]
    gen = ScriptedGenerator(tokenizer, script)
    t = await run_episode(env, gen, {"problem_index": 0, "trajectory_id": "t"})
    span = slice(t.turns[0].feedback_start, t.turns[0].feedback_end)
    assert tokenizer.decode(t.token_ids[span]) == "\n<result>\n14\n</result>\n"
    assert "agent:calc" in t.source[span] and not any(t.loss_mask[span])
    assert (t.consults, t.finish_reason, t.reward) == (1, "eos", 1.0)


@pytest.mark.usefixtures("calc_protocol", "calc_service")
async def test_the_calc_protocol_speaks_of_tools_past_its_budget(tokenizer) -> None:
    env = ConsultEnv(
        AdditionTask(1), Calculator(), tokenizer, EnvConfig(protocol="calc", max_consults=1)
    )
    gen = ScriptedGenerator(tokenizer, ["<calc>1+1</calc>", "<calc>2+2</calc>", f"done{EOS}"])
    t = await run_episode(env, gen, {"problem_index": 0, "trajectory_id": "t"})
    assert t.turns[1].consult.error == "tool budget of 1 calls exhausted; continue on your own"


@pytest.mark.usefixtures("calc_protocol")
def test_a_tool_without_a_service_is_refused_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match="tool 'calc', which has no service.*TOOL_SERVICES"):
        load_config(TrainConfig, None, ["env.protocol=calc"])
    with pytest.raises(ValueError, match="tool 'calc', which has no service"):
        ExecutorConfig.model_validate({"env": {"protocol": "calc"}})


@pytest.mark.usefixtures("calc_protocol")
def test_an_env_whose_service_lacks_the_tool_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"answers only \['python'\]: no service for \['calc'\]"):
        ConsultEnv(AdditionTask(1), PythonRunner(), tokenizer, EnvConfig(protocol="calc"))


@pytest.mark.usefixtures("calc_protocol", "calc_service")
async def test_aipo_eval_evaluates_the_calc_protocol_with_its_tool(tokenizer, tmp_path) -> None:
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"unique_id": "a", "problem": "What is 2+3?", "answer": "5"}) + "\n")
    config = EvalConfig(
        tasks=["math500"], task_args={"math500": {"path": str(path)}}, consult=True, protocol="calc"
    )
    generator = ScriptedGenerator(tokenizer, ["<calc>2+3</calc>", f"\\boxed{{5}}{EOS}"])
    results = await evaluate(config, tmp_path / "out", generator=generator, progress=False)
    (t,) = read_jsonl(tmp_path / "out" / "trajectories.jsonl")
    span = slice(t.turns[0].feedback_start, t.turns[0].feedback_end)
    assert tokenizer.decode(t.token_ids[span]) == "\n<result>\n5\n</result>\n"
    assert t.consults == 1 and t.reward == 1.0 and results["tasks"]["math500"]
    with pytest.raises(ValueError, match="unknown protocol 'calk'"):
        EvalConfig(tasks=["math500"], protocol="calk")
