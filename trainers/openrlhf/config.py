"""The OpenRLHF recipe: one YAML file, validated by pydantic, turned into a launch command.

The application loads a recipe with its one config loader (``aipo.config.load_config``;
``openrlhf.actor.adam.lr=1e-6`` addresses the flag ``actor.adam.lr``) and hands the
typed :class:`OpenRLHFRecipe` to :func:`trainers.openrlhf.launcher.run_openrlhf`.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from agents.config import AgentConfig, AgentPoolConfig
from agents.oracle import check_oracle_task
from agents.serve import EndpointsFile
from aipo_env.config import EnvConfig
from trainers.config import check_agent_limits
from trainers.losses import LossConfig
from trainers.openrlhf.flags import (
    DATA_MAX_LEN_DEFAULT,
    OPENRLHF_RAY_ENV_DEFAULTS,
    OPENRLHF_VERSION,
)
from trainers.openrlhf.loss import AGENT_TOKEN_FIELDS, LOSS_CONFIG_ENV, check_agent_token_fields
from trainers.openrlhf.recipe_secrets import check_secret_flags
from trainers.resolve import Change, resolve_protocol
from trainers.tool_config import ToolsConfig, check_tools

logger = logging.getLogger(__name__)

FlagValue = str | int | float | bool | list[str | int | float] | None

#: Environment variable holding the executor's JSON config on every worker.
EXECUTOR_CONFIG_ENV = "AIPO_OPENRLHF_EXECUTOR"
#: Set in a submitted job's runtime env, so the driver knows the setup hook is in place.
HOOK_MARKER_ENV = "AIPO_OPENRLHF_HOOK"
#: The job's Ray runtime env as JSON, handed to a driver the launcher starts itself
#: (``ray.submit: false``), which starts Ray with it.
RUNTIME_ENV_ENV = "AIPO_OPENRLHF_RUNTIME_ENV"
#: Variables the launcher writes into the job's runtime env; a recipe may not set them.
LAUNCHER_ENV_VARS = (LOSS_CONFIG_ENV, EXECUTOR_CONFIG_ENV, HOOK_MARKER_ENV, RUNTIME_ENV_ENV)


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
        default=None,
        description=(
            "Directory uploaded as the job's working_dir (e.g. a checkout that is not installed "
            "on the nodes), relative to the launch directory or absolute. None (default): "
            "nothing is uploaded; AIPO is installed on every node (pip install, the same path "
            "everywhere), and the launch works from any directory."
        ),
    )
    excludes: list[str] = Field(
        default_factory=lambda: [".venv", ".git", "ckpt", "runs", "**/__pycache__"],
        description="Paths left out of the uploaded working_dir.",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra environment variables for every Ray worker. Not the ones OpenRLHF's own "
            "ray.init sets (" + ", ".join(OPENRLHF_RAY_ENV_DEFAULTS) + ": export them where the "
            "driver starts) nor the launcher's (" + ", ".join(LAUNCHER_ENV_VARS) + ")."
        ),
    )

    @field_validator("env_vars")
    @classmethod
    def _not_owned_elsewhere(cls, env_vars: dict[str, str]) -> dict[str, str]:
        openrlhf = sorted(set(env_vars) & set(OPENRLHF_RAY_ENV_DEFAULTS))
        if openrlhf:
            raise ValueError(
                f"may not set {', '.join(openrlhf)}: OpenRLHF's ray.init puts "
                f"{', '.join(OPENRLHF_RAY_ENV_DEFAULTS)} in its own runtime env and Ray refuses "
                "a job whose runtime env sets them too. OpenRLHF reads them from the driver's "
                "environment: export them where the driver starts (the environment of "
                "'ray start' on the head node for a submitted job; your shell with "
                "ray.submit: false)"
            )
        launcher = sorted(set(env_vars) & set(LAUNCHER_ENV_VARS))
        if launcher:
            raise ValueError(
                f"may not set {', '.join(launcher)}: the launcher writes it from "
                "the recipe (agent_loss, executor)"
            )
        return env_vars


class ExecutorConfig(BaseModel):
    """What the agent executor inside OpenRLHF's vLLM actors runs (handed over as JSON).

    The launcher puts :func:`trainers.openrlhf.launcher.executor_payload` into the
    workers' environment; ``ExecutorConfig.model_validate(json.loads(...))`` reads it
    back, with the ``aipo serve`` endpoints in ``endpoints``.
    """

    model_config = ConfigDict(extra="forbid")

    task: str = Field(
        default="deepmath",
        description="Registered task whose answer extraction and verifier score the episodes; prompts come from OpenRLHF's dataset (input_key = question, label_key = reference).",
    )
    env: EnvConfig = Field(
        default_factory=EnvConfig,
        description=(
            "The episodes' EnvConfig; env.max_total_tokens, when unset, is OpenRLHF's data.max_len, "
            "and env.max_new_tokens_per_turn its rollout.max_new_tokens (see "
            "OpenRLHFRecipe.executor_for_workers); neither may exceed that flag."
        ),
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
    tools: ToolsConfig = Field(
        default_factory=ToolsConfig,
        description=(
            "The tool set answering env.protocol tools or python_tool (ARPO's <python> and "
            "<search>) in every rollout worker; a search_index must be readable on every node."
        ),
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
        # A tool without a service, or without its setting, fails here, not in every worker.
        check_tools(self.tools, self.env.protocol)
        check_agent_limits(self.env, self.agents)
        from tasks.registry import UnknownTaskError, check_task_name

        try:
            check_task_name(self.task)  # a typo fails here, not in every Ray worker
        except UnknownTaskError as exc:
            raise ValueError(f"executor.task: {exc}") from None
        check_oracle_task(self.agents, self.task, {})  # before any worker starts
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
        """The episodes' EnvConfig under OpenRLHF's ``max_length`` (prompt plus response).

        A recipe resolves ``max_total_tokens`` to ``data.max_len`` when it leaves it
        unset, and reports it (:meth:`OpenRLHFRecipe.resolve`); an executor config read
        without a recipe takes ``max_length`` here. A value above ``max_length`` is
        lowered to it: OpenRLHF cuts every sample there, so the env must not write past it.
        """
        if "max_total_tokens" in self.env.model_fields_set:
            if self.env.max_total_tokens <= max_length:
                return self.env
            logger.warning(
                "executor.env.max_total_tokens=%d exceeds OpenRLHF's max_length=%d; the "
                "episodes stop at %d, where OpenRLHF cuts every sample",
                self.env.max_total_tokens,
                max_length,
                max_length,
            )
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
    allow_overlap: bool = Field(
        default=False,
        description="Launch even when the evaluation data (eval.dataset) shares questions with the training data (data.prompt_dataset), compared by normalised question text (tasks/splits.py). Default False: such a launch is refused.",
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

    @model_validator(mode="after")
    def _resolved_first(self) -> OpenRLHFRecipe:
        self.resolve()  # the checks below see the derived values
        return self

    @model_validator(mode="after")
    def _separate_needs_step_counts(self) -> OpenRLHFRecipe:
        # Dynamic batching counts each step's tokens in the replay buffer, where the
        # separate policy and agent counts (trainers.openrlhf.loss) are not made.
        loss = self.agent_loss
        if (
            loss.trains_agent_tokens()
            and loss.agent_normalization == "separate"
            and self.openrlhf.get("train.dynamic_batch_enable")
        ):
            raise ValueError(
                "agent_loss.agent_normalization 'separate' with openrlhf "
                "train.dynamic_batch_enable: the separate policy and agent token counts are "
                "made on OpenRLHF's non-dynamic path only; set agent_loss.agent_normalization: "
                "shared or turn dynamic batching off"
            )
        return self

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
        check_secret_flags(flags)  # logger.wandb.key: env:WANDB_API_KEY, never the key
        return flags

    _changes: list[Change] = PrivateAttr(default_factory=list)

    @property
    def resolved(self) -> list[Change]:
        """Every value :meth:`resolve` set when the recipe was read (``--dry-run`` prints them)."""
        return list(self._changes)

    def resolve(self) -> list[Change]:
        """Derive what the recipe leaves unset from what it declares; return each :class:`Change`.

        The embedded trainer's resolution of the protocol
        (:func:`trainers.resolve.resolve_protocol`: a tool protocol's agent names and
        ``agent_loss.agent_mode`` mask where replies may not be trained), and
        ``executor.env.max_new_tokens_per_turn`` from OpenRLHF's flags
        (:meth:`executor_for_workers`), and ``executor.env.max_total_tokens`` from
        ``data.max_len`` (OpenRLHF passes it to the executor as ``max_length``). Run once when the recipe is read; again, it
        changes nothing.
        """
        executor = self.executor
        sections = resolve_protocol(
            executor.env,
            self.agent_loss,
            executor.agents,
            agents_declared=True,  # the recipe's pool is the served agents: empty unless set
            env_path="executor.env",
            loss_path="agent_loss",
            agents_path="executor.agents",
        )
        changes = sections.changes
        self.agent_loss = sections.loss
        self.executor = executor.model_copy(update={"env": sections.env})
        workers = self.executor_for_workers()
        if workers is not self.executor:
            old = self.executor.env.max_new_tokens_per_turn
            new = workers.env.max_new_tokens_per_turn
            changes.append(
                Change(
                    "executor.env.max_new_tokens_per_turn",
                    old,
                    new,
                    "OpenRLHF's most tokens of one generation (openrlhf rollout.max_new_tokens, "
                    "else data.max_len)",
                )
            )
            self.executor = workers
        env = self.executor.env
        if "max_total_tokens" not in env.model_fields_set:
            changes.append(
                Change(
                    "executor.env.max_total_tokens",
                    env.max_total_tokens,
                    self.max_len(),
                    "OpenRLHF cuts every sample to data.max_len tokens, prompt plus response",
                )
            )
            env = env.model_copy(update={"max_total_tokens": self.max_len()})
            self.executor = self.executor.model_copy(update={"env": env})
        self._changes = [*self._changes, *changes]
        return changes

    @model_validator(mode="after")
    def _token_limits_fit_openrlhf(self) -> OpenRLHFRecipe:
        env = self.executor.env
        per_sample = int_flag(self.openrlhf, "rollout.max_new_tokens")
        if (
            "max_new_tokens_per_turn" in env.model_fields_set
            and per_sample is not None
            and env.max_new_tokens_per_turn > per_sample
        ):
            raise ValueError(
                f"executor.env.max_new_tokens_per_turn={env.max_new_tokens_per_turn} exceeds "
                f"openrlhf rollout.max_new_tokens={per_sample} (OpenRLHF's most tokens of one "
                "generation); lower the one or raise the other"
            )
        max_len = self.max_len()
        if "max_total_tokens" in env.model_fields_set and env.max_total_tokens > max_len:
            raise ValueError(
                f"executor.env.max_total_tokens={env.max_total_tokens} exceeds openrlhf "
                f"data.max_len={max_len} (OpenRLHF cuts every sample to data.max_len tokens, "
                "prompt plus response); lower the one or raise the other"
            )
        return self

    def max_len(self) -> int:
        """OpenRLHF's ``data.max_len``: the recipe's flag, or OpenRLHF's default."""
        value = int_flag(self.openrlhf, "data.max_len")
        return DATA_MAX_LEN_DEFAULT if value is None else value

    def executor_for_workers(self) -> ExecutorConfig:
        """The executor config the workers get: the per-turn limit follows OpenRLHF's flags unless set.

        ``env.max_new_tokens_per_turn``, when the recipe leaves it unset, is
        ``rollout.max_new_tokens`` (OpenRLHF's most tokens of one generation), or, when
        that flag is unset too, ``data.max_len``: OpenRLHF then limits a generation by
        the context alone, and so does the env (it never generates past
        ``max_total_tokens``).
        """
        env = self.executor.env
        if "max_new_tokens_per_turn" in env.model_fields_set:
            return self.executor
        per_sample = int_flag(self.openrlhf, "rollout.max_new_tokens")
        limit = self.max_len() if per_sample is None else per_sample
        env = env.model_copy(update={"max_new_tokens_per_turn": limit})
        return self.executor.model_copy(update={"env": env})


def int_flag(flags: dict[str, FlagValue], name: str) -> int | None:
    """The integer value of the OpenRLHF flag ``name`` in ``flags``; None when it is absent or null.

    Raises:
        ValueError: the value is not an integer (named with the flag).
    """
    value = flags.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"openrlhf flag {name} must be an integer; got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"openrlhf flag {name} must be an integer; got {value!r}") from None
