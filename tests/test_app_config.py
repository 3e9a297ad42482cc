"""The one config loader: YAML + dotted overrides, with one clear message per bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from aipo.config import ConfigError, load_config, parse_value
from trainers.config import write_config


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="sampling temperature")
    stop: list[str] = Field(default_factory=list, description="stop strings")


class Train(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-6, gt=0.0, description="learning rate")
    steps: int = Field(10, ge=1, description="steps")
    group_size: int = Field(4, ge=2, le=64, description="rollouts per prompt")
    shuffle: bool = Field(True, description="shuffle prompts")
    sampling: Sampling = Field(default_factory=Sampling, description="sampling")
    mode: Literal["mask", "shaped"] = Field("shaped", description="agent mode")
    name: str | None = Field(None, description="run name")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 2.0e-6\nsteps: 5\nsampling:\n  temperature: 0.7\n")
    return path


def test_yaml_values_and_overrides_are_applied(config_file):
    cfg = load_config(Train, config_file, ["steps=50", "sampling.temperature=1.3"])
    assert cfg.lr == 2e-6 and cfg.steps == 50 and cfg.sampling.temperature == 1.3
    assert cfg.group_size == 4  # default kept


def test_override_values_parse_as_yaml_scalars_and_lists():
    cfg = load_config(
        Train,
        None,
        ["shuffle=false", "lr=3e-5", "sampling.stop=[</consult>, '###']", "name=null", "mode=mask"],
    )
    assert cfg.shuffle is False
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float)
    assert cfg.sampling.stop == ["</consult>", "###"]
    assert cfg.name is None and cfg.mode == "mask"
    assert parse_value("0.5") == 0.5 and parse_value("7") == 7 and parse_value("yes-no") == "yes-no"


def test_unknown_override_key_names_full_key_and_valid_keys(config_file):
    with pytest.raises(ConfigError) as err:
        load_config(Train, config_file, ["sampling.temprature=0.5"])
    message = str(err.value)
    assert "'sampling.temprature'" in message
    assert "under 'sampling': temperature, stop" in message


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lrr: 1\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'lrr'; valid keys at the top level: lr, steps"
    ):
        load_config(Train, path, [])


def test_out_of_range_names_field_and_allowed_range():
    with pytest.raises(ConfigError) as err:
        load_config(Train, None, ["group_size=1", "sampling.temperature=0"])
    lines = str(err.value).splitlines()[1:]
    assert "group_size: 1 is out of range; allowed: 2 <= value <= 64" in lines
    assert "sampling.temperature: 0 is out of range; allowed: 0.0 < value <= 2.0" in lines
    assert len(lines) == 2


def test_wrong_type_and_bad_literal_name_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(Train, None, ["steps=many", "mode=ratio"])
    message = str(err.value)
    assert "steps:" in message and "'many'" in message
    assert "mode:" in message and "'ratio'" in message


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Train, None, ["steps"])
    with pytest.raises(ConfigError, match="'steps' holds 5"):
        load_config(Train, None, ["steps=5", "steps.x=1"])


def test_write_config_round_trips(tmp_path):
    cfg = load_config(Train, None, ["sampling.stop=[a, b]", "lr=1e-4", "name=run-1"])
    path = write_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(Train, path, []) == cfg


# --- list items, mappings of sections, free-form flag maps, duplicate keys ---

REPO = Path(__file__).resolve().parent.parent
PER_AGENT = REPO / "configs" / "serve" / "per_agent.yaml"


def test_override_addresses_a_list_item_by_index():
    from agents.serve import ServeConfig

    cfg = load_config(ServeConfig, PER_AGENT, ["servers.1.port=31001", "servers.2.tp=4"])
    assert [s.port for s in cfg.servers] == [30000, 31001, 30002]
    assert [s.tp for s in cfg.servers] == [2, 2, 4]
    assert cfg.servers[1].model == "Qwen/Qwen3-32B"  # the rest of the item is kept


def test_override_of_a_list_the_file_leaves_out_starts_from_its_default():
    from agents.serve import DEFAULT_COMMAND, ServeConfig

    cfg = load_config(ServeConfig, PER_AGENT, ["command.0=/opt/py/bin/python"])
    assert cfg.command == ["/opt/py/bin/python", *DEFAULT_COMMAND[1:]]


def test_list_index_out_of_range_or_not_a_number_is_named():
    from agents.serve import ServeConfig

    with pytest.raises(
        ConfigError, match=r"'servers' has 3 item\(s\); index 3 is out of range \(valid: 0..2\)"
    ):
        load_config(ServeConfig, PER_AGENT, ["servers.3.port=1"])
    with pytest.raises(ConfigError, match="'servers' is a list; address its items by index"):
        load_config(ServeConfig, PER_AGENT, ["servers.knowledge.port=1"])


def test_errors_inside_list_items_name_the_item_and_keep_their_detail():
    from agents.serve import ServeConfig

    with pytest.raises(ConfigError) as err:
        load_config(ServeConfig, PER_AGENT, ["servers.0.prot=1"])
    assert (
        "unknown config key 'servers.0.prot'; valid keys under 'servers.0': name, model, port"
        in str(err.value)
    )
    with pytest.raises(ConfigError) as err:
        load_config(ServeConfig, PER_AGENT, ["servers.0.port=70000"])
    assert "servers.0.port: 70000 is out of range; allowed: 1 <= value <= 65535" in str(err.value)


def test_sections_inside_a_mapping_are_addressed_and_checked_by_name():
    from trainers.config import TrainConfig, default_config_path

    cfg = load_config(
        TrainConfig, default_config_path(), ["agents.agents.knowledge.temperature=0.2"]
    )
    assert cfg.agents.agents["knowledge"].temperature == 0.2
    assert cfg.agents.agents["knowledge"].backend == "policy"  # the file's setting stays
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, default_config_path(), ["agents.agents.knowledge.temprature=0.2"])
    assert (
        "unknown config key 'agents.agents.knowledge.temprature'; valid keys under "
        "'agents.agents.knowledge': backend, kind" in str(err.value)
    )
    with pytest.raises(
        ConfigError,
        match=r"agents.agents.knowledge.top_p: 2 is out of range; allowed: 0.0 < value <= 1.0",
    ):
        load_config(TrainConfig, default_config_path(), ["agents.agents.knowledge.top_p=2"])


def test_dotted_flag_names_of_the_openrlhf_recipe_are_one_key():
    from trainers.openrlhf.config import OpenRLHFRecipe

    recipe_path = REPO / "configs" / "openrlhf" / "grpo_1node.yaml"
    recipe = load_config(
        OpenRLHFRecipe,
        recipe_path,
        [
            "openrlhf.actor.adam.lr=1e-6",  # a new flag
            "openrlhf.actor.model_name_or_path=Qwen/Qwen3-4B",  # a flag the recipe sets
            "openrlhf.actor.eps_clip_low_high=[0.2, 0.28]",
            "executor.env.max_turns=2",
        ],
    )
    assert recipe.openrlhf["actor.adam.lr"] == 1e-6
    assert recipe.openrlhf["actor.model_name_or_path"] == "Qwen/Qwen3-4B"
    assert recipe.openrlhf["actor.eps_clip_low_high"] == [0.2, 0.28]
    assert "actor" not in recipe.openrlhf
    assert recipe.executor.env.max_turns == 2
    assert recipe.executor.env.max_consults == 3  # from the file


def test_unknown_recipe_key_lists_the_valid_ones():
    from trainers.openrlhf.config import OpenRLHFRecipe

    with pytest.raises(
        ConfigError,
        match="unknown config key 'executor.env.max_turn'; valid keys under 'executor.env'",
    ):
        load_config(OpenRLHFRecipe, None, ["executor.env.max_turn=2"])


def test_a_repeated_key_in_the_file_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("lr: 2.0e-6\nsampling:\n  temperature: 0.7\n  temperature: 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config(Train, path, [])
    assert str(err.value) == f"{path}: duplicate key 'temperature' on line 4 (first on line 3)"
    path.write_text("steps: 5\nlr: 1.0e-6\nsteps: 6\n")
    with pytest.raises(ConfigError, match="duplicate key 'steps' on line 3 \\(first on line 1\\)"):
        load_config(Train, path, [])


def test_merge_keys_may_be_overridden_beside_them(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("sampling:\n  <<: {temperature: 0.5, stop: [x]}\n  temperature: 0.9\n")
    cfg = load_config(Train, path, [])
    assert cfg.sampling.temperature == 0.9 and cfg.sampling.stop == ["x"]


def test_exponent_floats_read_the_same_in_files_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("lr: 3e-5\n")
    assert load_config(Train, path, []).lr == 3e-5
    assert parse_value("1e-6") == 1e-6 and parse_value("2E3") == 2000.0
    assert load_config(Train, None, ["name=1e-6x"]).name == "1e-6x"


def test_missing_file_and_non_mapping_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Train, tmp_path / "nope.yaml", [])
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping at the top level"):
        load_config(Train, path, [])
