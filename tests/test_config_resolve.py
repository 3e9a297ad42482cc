"""Config resolution: every value derived from another setting is reported, none rewritten silently."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from agents.config import AgentPoolConfig
from aipo.config import ConfigError, load_config
from aipo_env.config import EnvConfig
from trainers.config import TrainConfig
from trainers.losses import LossConfig
from trainers.openrlhf.config import OpenRLHFRecipe
from trainers.resolve import describe


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a config's field values (not its serialised form), by dotted path."""
    if isinstance(value, BaseModel):
        value = dict(value)
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(leaves(item, f"{path}.{key}" if path else str(key)))
        return out
    return {path: value}


def declared(overrides: dict[str, Any]) -> dict[str, Any]:
    """The sections resolution may touch, as the user declared them (defaults filled in)."""
    return {
        "env": EnvConfig(**overrides.get("env", {})),
        "loss": LossConfig(**overrides.get("loss", {})),
        "agents": AgentPoolConfig(**overrides.get("agents", {})),
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"env": {"protocol": "python_tool"}},
        {"env": {"protocol": "tools"}, "tools": {"search": False}},
        {"env": {"protocol": "tools", "max_total_tokens": 512}, "tools": {"search": False}},
        {"peers": {}, "agents": {"agents": {"verify": {"kind": "oracle"}}}},
        {
            "env": {"protocol": "python_tool", "agent_names": ["python"]},
            "loss": {"agent_mode": "mask"},
        },
    ],
)
def test_every_value_that_differs_from_the_declared_one_is_reported(overrides) -> None:
    config = TrainConfig(**overrides)
    before = leaves(declared(overrides))
    after = leaves({k: getattr(config, k) for k in ("env", "loss", "agents")})
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    reported = [c.path for c in config.resolved]
    silent = [p for p in changed if not any(p == r or p.startswith(r + ".") for r in reported)]
    assert not silent, f"rewritten without a report: {silent}"
    for change in config.resolved:  # and each report says what it was and what it became
        section, _, rest = change.path.partition(".")
        now = leaves(getattr(config, section)).get(rest, change.new)
        assert (sorted(now) if isinstance(now, dict) else now) == change.new
        assert change.old != change.new and change.why


def test_a_tool_protocol_reports_what_it_derived() -> None:
    config = TrainConfig(env={"protocol": "python_tool"})
    got = {c.path: (c.old, c.new) for c in config.resolved}
    assert got["env.agent_names"] == (["verify", "knowledge", "reasoning"], ["python"])
    assert got["agents.agents"] == (["knowledge", "reasoning", "verify"], [])
    assert got["loss.agent_mode"] == ("shaped", "mask")
    assert got["env.max_total_tokens"] == (4096, 1024)
    assert "python_tool" in describe(config.resolved)


def test_values_the_user_set_are_never_replaced() -> None:
    config = TrainConfig(
        env={"protocol": "python_tool", "agent_names": ["python"], "max_total_tokens": 512},
        loss={"agent_mode": "mask"},
        agents={"agents": {}},
    )
    assert config.resolved == []
    with pytest.raises(ValueError, match=r"lacks \['search'\]"):
        TrainConfig(env={"protocol": "tools", "agent_names": ["python"]}, tools={"search": False})
    with pytest.raises(ValueError, match="loss.agent_mode 'ratio' would train the tools' output"):
        TrainConfig(env={"protocol": "python_tool"}, loss={"agent_mode": "ratio"})


def test_resolving_a_resolved_config_changes_nothing() -> None:
    config = TrainConfig(env={"protocol": "tools"}, tools={"search": False})
    assert config.resolved and config.resolve() == []
    again = TrainConfig.model_validate(config.model_dump())
    assert again.resolved == [] and again.model_dump() == config.model_dump()


def test_the_openrlhf_recipe_resolves_the_same_protocol_rules() -> None:
    recipe = OpenRLHFRecipe(
        executor={"env": {"protocol": "python_tool"}},
        openrlhf={"rollout.max_new_tokens": 256},
    )
    got = {c.path: (c.old, c.new) for c in recipe.resolved}
    assert got["executor.env.agent_names"][1] == ["python"]
    assert got["agent_loss.agent_mode"] == ("shaped", "mask")
    assert got["executor.env.max_new_tokens_per_turn"][1] == 256
    assert recipe.executor_for_workers().env.max_new_tokens_per_turn == 256
    with pytest.raises(ValueError, match="agent_loss.agent_mode 'shaped' would train"):
        OpenRLHFRecipe(
            executor={"env": {"protocol": "python_tool"}}, agent_loss={"agent_mode": "shaped"}
        )


def test_dry_run_prints_every_resolved_value(capsys) -> None:
    from aipo.cli import main

    assert (
        main(
            [
                "train",
                "--dry-run",
                "env.protocol=tools",
                "tools.search=false",
                "warmup.enabled=false",
                "loss.agent_mode=mask",
                "agents.agents={}",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays the config alone
    out = captured.err
    assert "resolved (set from other settings):" in out
    assert "env.agent_names: ['verify', 'knowledge', 'reasoning'] -> ['python', 'search']" in out
    with pytest.raises(ConfigError):
        load_config(TrainConfig, None, ["env.protocol=tools", "loss.agent_mode=ratio"])
