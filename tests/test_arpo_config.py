"""ARPO's settings: the rollout strategy, the tools behind a tool protocol, configs/arpo.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripted import AdditionTask

from aipo.config import ConfigError, load_config
from aipo_env.trajectory import Trajectory
from trainers.config import TrainConfig
from trainers.embedded import shaped_advantages
from trainers.tool_config import ToolsConfig, make_tool_service

REPO = Path(__file__).resolve().parent.parent
ARPO = REPO / "configs" / "arpo.yaml"


def refused(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, path, list(overrides))
    return str(caught.value)


def test_the_arpo_config_is_a_tool_tree_with_arpos_defaults() -> None:
    cfg = load_config(TrainConfig, ARPO, [])
    rollout = cfg.rollout
    assert (cfg.env.protocol, rollout.strategy) == ("tools", "arpo")
    assert rollout.tree_initial_samples * 2 == rollout.n_samples  # M = N / 2
    assert (rollout.beam_size, rollout.branch_probability, rollout.entropy_weight) == (2, 0.5, 0.2)
    assert (rollout.entropy_top_k, rollout.entropy_tokens, rollout.attribution) == (10, 20, "soft")
    assert cfg.env.max_consults == 3 and cfg.env.agent_names == ["python", "search"]
    assert cfg.agents.agents == {} and cfg.loss.agent_mode == "mask"


def test_initial_samples_above_the_leaves_are_refused() -> None:
    message = refused("rollout.strategy=arpo", "rollout.n_samples=4", "rollout.initial_samples=5")
    assert "initial_samples=5 exceeds n_samples=4" in message


def test_an_unknown_strategy_or_attribution_names_the_choices() -> None:
    message = refused("rollout.strategy=beam", "rollout.attribution=medium")
    assert "rollout.strategy" in message and "expected one of grpo, arpo" in message
    assert "rollout.attribution" in message and "'soft' or 'hard'" in message


def test_half_of_n_rounded_up_is_the_default_initial_samples() -> None:
    cfg = load_config(TrainConfig, None, ["rollout.n_samples=5"])
    assert cfg.rollout.tree_initial_samples == 3


def test_a_search_without_an_index_is_refused_naming_the_setting() -> None:
    message = refused("env.protocol=tools")
    assert "tools.search_index is not set" in message and "tools.search=false" in message
    cfg = load_config(TrainConfig, None, ["env.protocol=tools", "tools.search=false"])
    assert cfg.tools.search_index is None


def test_a_missing_corpus_is_named() -> None:
    message = refused("env.protocol=tools", "tools.search_index=/no/such/corpus.jsonl")
    assert "tools.search_index" in message and "/no/such/corpus.jsonl" in message


def test_tool_results_are_never_trained() -> None:
    message = refused("env.protocol=tools", "tools.search=false", "loss.agent_mode=shaped")
    assert "loss.agent_mode 'shaped'" in message and "loss.agent_mode=mask" in message


def test_tool_names_must_be_agent_names_when_set() -> None:
    message = refused("env.protocol=tools", "tools.search=false", "env.agent_names=[python]")
    assert "lacks ['search']" in message


async def test_the_tool_service_has_the_configured_index() -> None:
    tools = ToolsConfig(search_index="tiny", search_k=1)
    service = make_tool_service(tools, "tools")
    assert service is not None and service.names == ("python", "search")
    search = service.tools["search"]  # type: ignore[attr-defined]
    assert search.index is not None and search.index.k == 1
    assert make_tool_service(tools, "consult") is None
    assert make_tool_service(ToolsConfig(), "python_tool").names == ("python",)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="tools.search_index is not set"):
        make_tool_service(ToolsConfig(), "tools")


def test_arpo_trains_per_token_tree_advantages() -> None:
    def leaf(tid: str, ids: list[int], reward: float, **fork) -> Trajectory:
        src = ["prompt"] * 2 + ["policy"] * (len(ids) - 2)
        return Trajectory(
            trajectory_id=tid,
            problem_id="p",
            task="t",
            group_id="g",
            token_ids=ids,
            prompt_len=2,
            source=src,
            loss_mask=[int(s == "policy") for s in src],
            behavior_logprobs=[None, None] + [-1.0] * (len(ids) - 2),
            reward=reward,
            finish_reason="eos",
            **fork,
        )

    rows = [
        leaf("a", [1, 2, 3, 4, 5], 1.0),
        leaf("b", [1, 2, 3, 4, 6], 0.0, parent_id="a", branch_point=4),
        leaf("c", [1, 2, 7, 8, 9], 0.0),
    ]
    overrides = ["rollout.strategy=arpo", "rollout.n_samples=3", "train.advantage=dr_grpo"]
    hard = load_config(TrainConfig, None, [*overrides, "rollout.attribution=hard"])
    advantages, _, _ = shaped_advantages(rows, hard)
    # dr_grpo: reward minus the group mean (1/3): a 2/3, b and c -1/3.
    assert advantages.shape == (3, 5)
    shared = (2 / 3 - 1 / 3) / 2  # tokens 2..3, held by a and b
    assert torch.allclose(advantages[0, 2:], torch.tensor([shared, shared, 2 / 3]))
    assert torch.allclose(advantages[1, 2:], torch.tensor([shared, shared, -1 / 3]))
    soft = load_config(TrainConfig, None, overrides)
    advantages, _, _ = shaped_advantages(rows, soft)
    assert torch.allclose(advantages[0], torch.full((5,), 2 / 3))
    grpo = load_config(TrainConfig, None, [*overrides[1:]])
    assert shaped_advantages(rows, grpo)[0].shape == (3,)


def test_the_openrlhf_arpo_recipe_runs_the_tool_protocol_in_the_executor(tokenizer) -> None:
    pytest.importorskip("openrlhf.utils.agent", reason="openrlhf not installed")
    from agents.tools import ToolSet
    from trainers.openrlhf.config import OpenRLHFRecipe
    from trainers.openrlhf.executor import AgentExecutor

    recipe = load_config(OpenRLHFRecipe, REPO / "configs" / "openrlhf" / "arpo_1node.yaml", [])
    assert recipe.executor.env.protocol == "tools" and recipe.agent_loss.agent_mode == "mask"
    executor = AgentExecutor(recipe.executor, task=AdditionTask(1))
    _, service = executor._build_services(tokenizer)
    assert isinstance(service, ToolSet) and service.names == ("python", "search")
    assert service.tools["search"].index is None  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="agent_loss.agent_mode 'shaped'"):
        load_config(
            OpenRLHFRecipe,
            REPO / "configs" / "openrlhf" / "arpo_1node.yaml",
            ["agent_loss.agent_mode=shaped"],
        )
