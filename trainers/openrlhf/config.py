"""The OpenRLHF recipe: one YAML file, validated by pydantic, turned into a launch command.

The application loads a recipe with its one config loader (``aipo.config.load_config``;
``openrlhf.actor.adam.lr=1e-6`` addresses the flag ``actor.adam.lr``) and hands the
typed :class:`OpenRLHFRecipe` to :func:`trainers.openrlhf.launcher.run_openrlhf`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.config import AgentConfig, AgentPoolConfig
from agents.serve import EndpointsFile
from aipo_env.config import EnvConfig
from trainers.config import check_agent_limits
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
    """What the agent executor inside OpenRLHF's vLLM actors runs (handed over as JSON).

    The launcher puts :func:`trainers.openrlhf.launcher.executor_payload` into the
    workers' environment; ``ExecutorConfig.model_validate(json.loads(...))`` reads it
    back, with the ``aipo serve`` endpoints in ``endpoints``.
    """

    model_config = ConfigDict(extra="forbid")

    task: str = Field(
        default="math",
        description="Registered task whose answer extraction and verifier score the episodes; prompts come from OpenRLHF's dataset (input_key = question, label_key = reference).",
    )
    env: EnvConfig = Field(
        default_factory=EnvConfig,
        description="The episodes' EnvConfig; env.max_total_tokens, when unset, is OpenRLHF's max_length.",
    )
    agents: AgentPoolConfig = Field(
        default_factory=lambda: AgentPoolConfig(agents={}),
        description=(
            "The agent pool: the agents of the endpoints file, each updated with the settings "
            "listed here under agents.agents (an agent listed here but not served keeps its own "
            "backend). Unlike the embedded trainer, no agent is configured by default."
        ),
    )
    endpoints_file: str | None = Field(
        default=None,
        description="Endpoints file written by 'aipo serve'; read at launch and inlined into endpoints, so workers on any node see it.",
    )
    endpoints: EndpointsFile | None = Field(
        default=None,
        description="The endpoints file's content; the launcher fills it from endpoints_file (which then wins).",
    )

    @field_validator("agents", mode="before")
    @classmethod
    def _no_default_agents(cls, value: Any) -> Any:
        # AgentPoolConfig's default agents run on the policy's generator, which the
        # executor does not have: here the served agents are the default.
        if isinstance(value, dict) and "agents" not in value:
            return {**value, "agents": {}}
        return value

    @model_validator(mode="after")
    def _limits(self) -> ExecutorConfig:
        check_agent_limits(self.env, self.agents)
        return self

    def agent_pool(self) -> AgentPoolConfig:
        """The pool the executor builds: served agents pointed at their servers, with the recipe's settings."""
        agents = dict(self.agents.agents)
        served = self.endpoints.agents if self.endpoints is not None else {}
        for name, endpoint in served.items():
            mine = agents.get(name)
            fields = mine.model_dump(exclude_unset=True) if mine is not None else {}
            agents[name] = AgentConfig.model_validate(
                {**fields, **endpoint.model_dump(exclude_unset=True)}
            )
        return self.agents.model_copy(update={"agents": agents})

    def episode_env(self, max_length: int) -> EnvConfig:
        """The episodes' EnvConfig; ``max_total_tokens``, unless the recipe sets it, is OpenRLHF's ``max_length``."""
        if "max_total_tokens" in self.env.model_fields_set:
            return self.env
        return self.env.model_copy(update={"max_total_tokens": int(max_length)})


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
