"""The ``peers:`` section: ILR's trainable peers (:mod:`trainers.peer_trainer`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The shared state of a peer run, in its run_dir: the last step every peer committed.
STATE = "peer_state.json"


class PeerSection(BaseModel):
    """Two or more policies trained together through Idea3 episodes (ILR)."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(
        default_factory=lambda: ["A", "B"],
        description="The peers' names (two or more, distinct); tokens of peer X are peer:X.",
    )
    models: list[str] = Field(
        default_factory=list,
        description="One model per peer (HF id, local dir or 'default'); empty: policy.model for all.",
    )
    seeds: list[int] = Field(
        default_factory=list,
        description="One seed per peer (sampling, update shuffle); empty: seed + the peer's index.",
    )
    interaction: Literal["dynamic", "cooperate", "compete"] = Field(
        default="dynamic",
        description=(
            "dynamic: each peer cooperates on questions it probably fails (P(q, i) < 0.5) and "
            "competes on the others (aipo_env/interaction_mode.py); or always one mode."
        ),
    )
    ability_every: int = Field(
        default=2, ge=1, description="Re-estimate each peer's ability every this many steps."
    )
    validation_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"seed": 20000},
        description="Task factory arguments of the validation split abilities are measured on.",
    )
    validation_size: int = Field(
        default=32, ge=1, description="Validation problems per ability estimate (greedy, alone)."
    )
    difficulty_prior: float = Field(
        default=2.0,
        ge=0.0,
        description="Pseudo-episodes at the task-wide solve rate added to each question's own.",
    )
    calibration: bool = Field(
        default=True,
        description="Perception calibration of the rewards (trainers/peer_rewards.py); false: plain GRPO.",
    )
    max_new_tokens_per_stage: int = Field(
        default=64, ge=1, description="Most tokens a peer writes at one Idea3 stage."
    )

    @model_validator(mode="after")
    def _consistent(self) -> PeerSection:
        if len(self.names) < 2 or len(set(self.names)) != len(self.names):
            raise ValueError(
                f"peers.names {self.names}: ILR needs two or more peers with distinct names"
            )
        bad = [n for n in self.names if not n or not n.replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"peers.names {bad}: use letters, digits and underscores")
        for key in ("models", "seeds"):
            values = getattr(self, key)
            if values and len(values) != len(self.names):
                raise ValueError(
                    f"peers.{key} has {len(values)} entries for {len(self.names)} peers "
                    f"{self.names}; give one per peer or none"
                )
        return self
