"""``EnvConfig``: how a :class:`~aipo_env.env.ConsultEnv` episode runs (budgets, format, mode)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.base import DEFAULT_AGENT_NAMES
from aipo_env.protocols import PROTOCOLS
from configs.registry import check_registered


class EnvConfig(BaseModel):
    """How a :class:`ConsultEnv` episode runs. Every budget ends the episode with its own finish reason."""

    model_config = ConfigDict(extra="forbid")

    protocol: str = Field(
        default="consult",
        description=(
            f"The interaction protocol (aipo_env/protocols): one of {', '.join(PROTOCOLS)}. "
            "A protocol that declares tools is answered by them, not the agent pool; "
            "agent_names then defaults to its tools (trainers/resolve.py)."
        ),
    )
    agent_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_AGENT_NAMES),
        description="Agents the policy may name in a consult tag (default verify, knowledge, reasoning).",
    )
    format: Literal["inline", "chat"] = Field(
        default="inline",
        description="inline: feedback injected inside the assistant turn; chat: feedback as its own message through the chat template (delta tokenization).",
    )
    chat_feedback_role: Literal["user", "tool"] = Field(
        default="user", description="Role of the feedback message in chat format."
    )
    mode: Literal["train", "independent"] = Field(
        default="train",
        description="train: consult instructions in the prompt, stop on </consult>; independent (evaluation): no instructions, tags not honoured, attempts counted.",
    )
    max_consults: int = Field(
        default=3,
        ge=0,
        description="Agent calls allowed per episode; beyond it consults get an error feedback.",
    )
    max_turns: int = Field(
        default=8,
        ge=1,
        description="Policy segments per episode; a consult that would start one more ends the episode with max_turns.",
    )
    max_new_tokens_per_turn: int = Field(
        default=1024,
        ge=1,
        description="Most tokens the policy generates in one segment (finish 'length').",
    )
    max_total_tokens: int = Field(
        default=4096,
        ge=2,
        description="The context: prompt plus response. A feedback that would overflow it ends the episode with context_overflow.",
    )
    max_reply_tokens: int = Field(
        default=256, ge=1, description="An agent reply is cut to this many tokens."
    )
    agent_timeout_s: float = Field(
        default=60.0, gt=0, description="A consult that takes longer gets a timeout error feedback."
    )
    check_drift: bool = Field(
        default=True,
        description="Compare incremental ids with a full render in chat format; a mismatch sets tokenization_drift.",
    )
    mask_on_drift: bool = Field(
        default=False,
        description="Train nothing of a trajectory with tokenization drift (aipo_env/masks.py applies it).",
    )
    system_prompt: str | None = Field(
        default=None, description="System message; None keeps the chat template's default."
    )
    instructions: str | None = Field(
        default=None,
        description="Replaces the protocol's generated instructions (train mode); may use {max_consults}.",
    )
    agent_roles: dict[str, str] = Field(
        default_factory=dict,
        description="Role descriptions for agents beyond or instead of the defaults.",
    )
    policy_version: int | str | None = Field(
        default=None, description="Weights version recorded on each trajectory."
    )
    auto_consult: str | None = Field(
        default=None,
        description=(
            "Open every episode that may consult with a consult to this agent, written by the "
            "env (source env, never trained) and answered like the policy's own: small models "
            "that never write a consult tag still receive agent guidance to learn from. "
            "None (default): only the policy decides when to consult. Inline format, train mode."
        ),
    )
    auto_consult_question: str = Field(
        default="{question}",
        description="The auto consult's question; {question} is the problem statement.",
    )
    consult_cost: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "Reward subtracted per consult tag the policy wrote (Trajectory.consult_attempts, "
            "answered or not; the env's auto consult is free), in train mode, from every episode "
            "that did not end in error:*: reward = score - consult_cost * consult_attempts. "
            "Teaches the policy to consult where it pays. Default 0 (free); the verifier's score "
            "stays in Trajectory.verifier."
        ),
    )

    @model_validator(mode="after")
    def _auto_consult_fits(self) -> EnvConfig:
        check_registered(self.protocol, PROTOCOLS, "protocol")
        if self.auto_consult is not None:
            if self.auto_consult not in self.agent_names:
                raise ValueError(
                    f"auto_consult agent {self.auto_consult!r} is not in agent_names {self.agent_names}"
                )
            if self.format != "inline":
                raise ValueError(
                    "auto_consult needs format 'inline' (a chat render has no place for it)"
                )
        return self
