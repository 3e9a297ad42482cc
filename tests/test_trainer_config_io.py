"""load_config: YAML + dotted overrides, with one clear message per bad field."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from trainers.config_io import ConfigError, dump_config, load_config, parse_value


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


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(Train, None, ["sampling.stop=[a, b]", "lr=1e-4", "name=run-1"])
    path = dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(Train, path, []) == cfg
