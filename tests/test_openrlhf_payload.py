"""The executor config crosses to OpenRLHF's workers as JSON and comes back typed, endpoints inlined."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from agents.config import AgentConfig
from aipo.config import ConfigError, load_config
from trainers.openrlhf.config import ExecutorConfig, OpenRLHFRecipe
from trainers.openrlhf.launcher import EXECUTOR_CONFIG_ENV, executor_payload, runtime_env

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "openrlhf" / "grpo_1node.yaml"
SERVED = {
    "verify": {"backend": "sglang://10.0.0.3:30000", "tokenizer": "Qwen/Qwen3-32B"},
    "knowledge": {"backend": "sglang://10.0.0.3:30001", "tokenizer": "Qwen/Qwen3-32B"},
}


def _recipe(tmp_path: Path, *overrides: str, served: dict | None = None) -> OpenRLHFRecipe:
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"agents": SERVED if served is None else served}))
    return load_config(OpenRLHFRecipe, RECIPE, [f"executor.endpoints_file={endpoints}", *overrides])


def _worker_side(recipe: OpenRLHFRecipe) -> ExecutorConfig:
    """What a Ray worker reads from its environment."""
    raw = runtime_env(recipe)["env_vars"][EXECUTOR_CONFIG_ENV]
    return ExecutorConfig.model_validate(json.loads(raw))


def test_payload_round_trips_into_the_executor_config(tmp_path) -> None:
    recipe = _recipe(tmp_path)
    worker = _worker_side(recipe)
    assert worker.task == recipe.executor.task == "deepmath"
    assert worker.env == recipe.executor_for_workers().env
    assert (worker.env.max_consults, worker.env.max_turns) == (3, 4)
    assert worker.endpoints_file is None  # read at launch, inlined below
    assert worker.endpoints is not None
    assert worker.endpoints.agents["knowledge"] == AgentConfig(**SERVED["knowledge"])
    assert worker.agent_pool().agents == {name: AgentConfig(**e) for name, e in SERVED.items()}
    # The payload is the launcher's own validation, re-read: reading it again changes nothing.
    assert executor_payload(worker) == json.loads(
        runtime_env(recipe)["env_vars"][EXECUTOR_CONFIG_ENV]
    )


def test_recipe_agent_settings_are_kept_beside_the_served_backends(tmp_path) -> None:
    recipe = _recipe(
        tmp_path,
        "executor.agents.agents.knowledge.temperature=0.3",
        "executor.agents.agents.reasoning.backend=sglang://10.0.0.4:30000",
        "executor.agents.agents.reasoning.tokenizer=Qwen/Qwen3-8B",
    )
    pool = _worker_side(recipe).agent_pool()
    assert pool.agents["knowledge"].temperature == 0.3
    assert pool.agents["knowledge"].backend == SERVED["knowledge"]["backend"]
    assert pool.agents["reasoning"].backend == "sglang://10.0.0.4:30000"  # not served: its own
    assert list(pool.agents) == ["knowledge", "reasoning", "verify"]


def test_env_context_follows_openrlhf_unless_the_recipe_sets_it(tmp_path) -> None:
    worker = _worker_side(_recipe(tmp_path))
    assert worker.episode_env(max_length=12288).max_total_tokens == 8192  # the recipe's
    bare = ExecutorConfig.model_validate(
        json.loads(json.dumps(executor_payload(ExecutorConfig(env={"max_turns": 2}))))
    )
    env = bare.episode_env(max_length=12288)
    assert (env.max_total_tokens, env.max_turns) == (12288, 2)


def test_no_agent_is_configured_beyond_the_served_ones_by_default() -> None:
    assert ExecutorConfig().agent_pool().agents == {}
    assert ExecutorConfig.model_validate({"agents": {}}).agent_pool().agents == {}


def test_a_served_entry_that_is_no_agent_config_fails_the_launch(tmp_path) -> None:
    recipe = _recipe(tmp_path, served={"verify": {"backend": "sglang://h:1", "port": 1}})
    with pytest.raises(ValidationError, match="port"):
        runtime_env(recipe)


def test_an_agent_limit_above_the_env_is_refused_in_a_recipe(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        _recipe(tmp_path, "executor.agents.agents.knowledge.max_reply_tokens=300")
    assert "agents.agents.knowledge.max_reply_tokens=300 exceeds env.max_reply_tokens=256" in str(
        err.value
    )


def test_per_turn_limit_follows_rollout_max_new_tokens_unless_the_recipe_sets_it(tmp_path) -> None:
    # The recipe sets rollout.max_new_tokens=4096 and data.max_len=8192, not the env's limit.
    def per_turn(*overrides: str) -> int:
        worker = _worker_side(_recipe(tmp_path, *overrides))
        return worker.episode_env(max_length=8192).max_new_tokens_per_turn

    assert per_turn() == 4096  # not EnvConfig's default of 1024
    assert per_turn("openrlhf.rollout.max_new_tokens=2048") == 2048
    assert per_turn("executor.env.max_new_tokens_per_turn=512") == 512
    # Flag unset: OpenRLHF limits a generation by the context alone, and so does the env.
    assert per_turn("openrlhf.rollout.max_new_tokens=null") == 8192


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "executor.env.max_new_tokens_per_turn=8192",
            "executor.env.max_new_tokens_per_turn=8192 exceeds openrlhf rollout.max_new_tokens=4096",
        ),
        (
            "executor.env.max_total_tokens=16384",
            "executor.env.max_total_tokens=16384 exceeds openrlhf data.max_len=8192",
        ),
    ],
)
def test_env_limits_above_openrlhf_flags_are_refused(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError) as err:
        _recipe(tmp_path, override)
    assert message in str(err.value)


def test_env_context_above_openrlhf_default_max_len_is_refused(tmp_path) -> None:
    # data.max_len unset: OpenRLHF's default (2048) is the limit.
    with pytest.raises(
        ConfigError, match="max_total_tokens=8192 exceeds openrlhf data.max_len=2048"
    ):
        _recipe(tmp_path, "openrlhf.data.max_len=null")


def test_the_context_left_unset_resolves_to_data_max_len_and_is_reported(tmp_path) -> None:
    recipe = OpenRLHFRecipe.model_validate({"openrlhf": {"data.max_len": 6144}})
    changes = {c.path: c for c in recipe.resolved}
    assert (changes["executor.env.max_total_tokens"].old, recipe.executor.env.max_total_tokens) == (
        4096,
        6144,
    )
    assert "data.max_len" in changes["executor.env.max_total_tokens"].why
    worker = _worker_side(recipe)
    assert worker.env.max_total_tokens == 6144
    assert worker.episode_env(max_length=6144).max_total_tokens == 6144
    # Declared (the packaged recipe sets it), it is the recipe's and no change is reported.
    declared = _recipe(tmp_path)
    assert "max_total_tokens" in declared.executor.env.model_fields_set
    assert "executor.env.max_total_tokens" not in {c.path for c in declared.resolved}


def test_a_context_above_openrlhfs_max_length_at_run_time_is_lowered_to_it(caplog) -> None:
    config = ExecutorConfig(env={"max_total_tokens": 8192})
    with caplog.at_level("WARNING"):
        env = config.episode_env(max_length=4096)
    assert env.max_total_tokens == 4096
    assert "max_total_tokens=8192 exceeds OpenRLHF's max_length=4096" in caplog.text
