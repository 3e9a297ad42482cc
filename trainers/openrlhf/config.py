"""The OpenRLHF recipe: one YAML file, validated by pydantic, turned into a launch command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainers.losses import LossConfig
from trainers.openrlhf.flags import OPENRLHF_VERSION
from trainers.openrlhf.loss import AGENT_TOKEN_FIELDS, check_agent_token_fields

FlagValue = str | int | float | bool | list[str | int | float] | None


class RayJobConfig(BaseModel):
    """How the training driver reaches the Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    submit: bool = Field(
        default=True,
        description="True: 'ray job submit' to the dashboard at address; False: run the driver here (on the head node).",
    )
    address: str = Field(
        default="http://127.0.0.1:8265", description="Ray dashboard address for 'ray job submit'."
    )
    working_dir: str | None = Field(
        default=".",
        description="Directory uploaded as the job's working_dir (the project root); None when the project is installed on every node.",
    )
    excludes: list[str] = Field(
        default_factory=lambda: [".venv", ".git", "ckpt", "runs", "**/__pycache__"],
        description="Paths left out of the uploaded working_dir.",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for every Ray worker."
    )


class ExecutorConfig(BaseModel):
    """What the agent executor inside OpenRLHF's vLLM actors runs (handed over as JSON)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(
        default="math",
        description="Registered task whose answer extraction and verifier score the episodes; prompts come from OpenRLHF's dataset (input_key = question, label_key = reference).",
    )
    env: dict[str, Any] = Field(
        default_factory=dict, description="EnvConfig fields (aipo_env.env.EnvConfig)."
    )
    agents: dict[str, Any] = Field(
        default_factory=dict, description="AgentPoolConfig fields (agents.pool.AgentPoolConfig)."
    )
    endpoints_file: str | None = Field(
        default=None,
        description="Endpoints file written by 'aipo serve'; read at launch and inlined, so workers on any node see it.",
    )


class OpenRLHFRecipe(BaseModel):
    """A complete OpenRLHF run: cluster, executor, AIPO agent-token loss and OpenRLHF flags."""

    model_config = ConfigDict(extra="forbid")

    openrlhf_version: str = Field(
        default=OPENRLHF_VERSION, description="The OpenRLHF release the flags are written for."
    )
    ray: RayJobConfig = Field(default_factory=RayJobConfig, description="Cluster access.")
    executor: ExecutorConfig = Field(
        default_factory=ExecutorConfig, description="The agent executor's task, env and agents."
    )
    agent_loss: LossConfig = Field(
        default_factory=LossConfig,
        description=(
            "How agent tokens are trained: the agent-token fields of trainers.losses.LossConfig ("
            + ", ".join(AGENT_TOKEN_FIELDS)
            + "), the embedded trainer's own; policy-token settings are OpenRLHF flags."
        ),
    )
    openrlhf: dict[str, FlagValue] = Field(
        default_factory=dict,
        description="OpenRLHF 0.11.2 flags without the leading '--' ('actor.model_name_or_path': ...); True = bare switch, False/None = omitted, lists = several values.",
    )

    @field_validator("openrlhf_version")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if value != OPENRLHF_VERSION:
            raise ValueError(
                f"recipe targets OpenRLHF {value}; this launcher writes flags for {OPENRLHF_VERSION}"
            )
        return value

    @field_validator("agent_loss", mode="before")
    @classmethod
    def _agent_fields_only(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return check_agent_token_fields(value)
        return value

    @field_validator("openrlhf")
    @classmethod
    def _no_dashes(cls, flags: dict[str, FlagValue]) -> dict[str, FlagValue]:
        for name in flags:
            if name.startswith("-"):
                raise ValueError(f"flag {name!r} must be written without leading dashes")
            if name == "train.agent_func_path":
                raise ValueError(
                    "train.agent_func_path is set by the launcher; remove it from the recipe"
                )
        return flags


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    # 'openrlhf.actor.adam.lr' addresses the flag 'actor.adam.lr' inside the 'openrlhf' map.
    head, _, rest = dotted.partition(".")
    if head == "openrlhf" and rest:
        data.setdefault("openrlhf", {})[rest] = value
        return
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> OpenRLHFRecipe:
    """Read a recipe YAML, apply ``overrides`` (dotted keys) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe {path} not found; expected a YAML file in configs/openrlhf/"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must hold a mapping; got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return OpenRLHFRecipe.model_validate(data)
