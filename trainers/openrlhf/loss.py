"""AIPO's agent-token term inside OpenRLHF's PPO step: a drop-in ``PolicyLoss`` subclass.

OpenRLHF's actor calls its policy loss as::

    loss_fn(action_log_probs, old_action_log_probs, advantages,
            action_mask=..., rollout_log_probs=..., dp_size=..., batch_num_tokens=..., ...)

and nothing else per token reaches it. ``rollout_log_probs`` is a per-token tensor
that OpenRLHF carries untouched from the agent executor to the loss (it is only read
by the loss), so it is the side channel that tells agent tokens apart:

* policy tokens (and non-trained positions) hold the vLLM log-prob, which is ``<= 0``;
* agent tokens hold ``AGENT_FLAG_OFFSET - mu_logprob`` (``>= 1``), where ``mu_logprob``
  is the log-prob of the token under the agent's model, or ``0`` (behaviour prob 1)
  when the agent does not share the policy's tokenizer.

:func:`encode_agent_logprob` / :func:`decode_rollout_log_probs` are the two ends of
that channel. :class:`AIPOPolicyLoss` decodes it, lets the stock ``PolicyLoss`` handle
the policy tokens (agent tokens get a zero advantage there, so they add nothing to its
numerator but keep OpenRLHF's normalisation), and adds the agent-token term of
DESIGN §5 aggregated with OpenRLHF's own ``aggregate_loss`` over the same mask. In
mode ``mask`` it is the stock ``PolicyLoss`` call, unchanged.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Agent tokens carry ``AGENT_FLAG_OFFSET - mu_logprob`` in ``rollout_log_probs``.
AGENT_FLAG_OFFSET = 1.0
#: Environment variable holding the JSON of :class:`AgentTokenLossConfig` on every Ray worker.
LOSS_CONFIG_ENV = "AIPO_OPENRLHF_AGENT_LOSS"


class AgentTokenLossConfig(BaseModel):
    """How agent-injected tokens are trained inside OpenRLHF (DESIGN §5)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["mask", "shaped", "ratio"] = Field(
        default="shaped",
        description="'mask': agent tokens are not trained (stock OpenRLHF); 'shaped': f(w) = w/(w+gamma) with a gradient-preserving clip to [w_min, w_max]; 'ratio': truncated IS min(w, ratio_cap).",
    )
    gamma: float = Field(
        default=0.1, gt=0.0, description="Shaping constant of f(w) = w / (w + gamma) (LUFFY: 0.1)."
    )
    w_min: float = Field(
        default=0.0,
        ge=0.0,
        description="Lower clip of the shaped coefficient (value only; gradient kept).",
    )
    w_max: float = Field(
        default=1.0,
        gt=0.0,
        description="Upper clip of the shaped coefficient (value only; gradient kept).",
    )
    ratio_cap: float = Field(
        default=1.0, gt=0.0, description="Truncation C of the IS weight in mode 'ratio'."
    )
    positive_advantage_only: bool = Field(
        default=False, description="Train agent tokens only where the advantage is positive."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AgentTokenLossConfig:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        return self

    @property
    def trains_agent_tokens(self) -> bool:
        """Whether agent tokens enter the loss at all."""
        return self.mode != "mask"

    def to_env(self) -> str:
        """The JSON written to :data:`LOSS_CONFIG_ENV`."""
        return self.model_dump_json()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AgentTokenLossConfig:
        """Read the config from :data:`LOSS_CONFIG_ENV`; mode 'mask' when it is unset."""
        raw = (os.environ if environ is None else environ).get(LOSS_CONFIG_ENV)
        if not raw:
            return cls(mode="mask")
        try:
            return cls.model_validate(json.loads(raw))
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(
                f"{LOSS_CONFIG_ENV} must hold an AgentTokenLossConfig JSON object; got {raw!r}: {exc}"
            ) from exc


def encode_agent_logprob(mu_logprob: float | None) -> float:
    """The ``rollout_log_probs`` entry of one agent token (``mu_logprob`` None: behaviour prob 1)."""
    lp = 0.0 if mu_logprob is None else float(mu_logprob)
    if lp > 0.0 or lp != lp:
        raise ValueError(f"agent log-prob must be a finite number <= 0; got {mu_logprob!r}")
    return AGENT_FLAG_OFFSET - lp


def decode_rollout_log_probs(
    rollout_log_probs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the side channel into ``(agent_mask, behavior_logprobs, policy_rollout_log_probs)``.

    ``agent_mask`` is True on agent tokens; ``behavior_logprobs`` holds ``mu_logprob``
    there and 0 elsewhere; ``policy_rollout_log_probs`` holds the vLLM log-probs of
    policy tokens and 0 on agent tokens.
    """
    agent_mask = rollout_log_probs >= AGENT_FLAG_OFFSET * 0.5
    zeros = torch.zeros_like(rollout_log_probs)
    behavior = torch.where(agent_mask, AGENT_FLAG_OFFSET - rollout_log_probs, zeros)
    policy = torch.where(agent_mask, zeros, rollout_log_probs)
    return agent_mask, behavior, policy


def agent_token_loss(
    log_probs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    config: AgentTokenLossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss of agent tokens and their (detached) coefficient, before masking.

    ``w = exp(log pi_theta - log mu)``. Mode 'shaped': ``c = f(w) = w / (w + gamma)``,
    clipped to ``[w_min, w_max]`` as ``c * clamp(c) / stopgrad(c)`` so a clipped token
    keeps a gradient; mode 'ratio': ``c = min(w, ratio_cap)``. Loss ``-c * A``.
    """
    log_w = (log_probs - behavior_logprobs).clamp(min=-20.0, max=20.0)
    w = log_w.exp()
    if config.mode == "shaped":
        coef = w / (w + config.gamma)
        clipped = coef.detach().clamp(min=config.w_min, max=config.w_max)
        coef = coef * (clipped / coef.detach().clamp(min=1e-12))
    elif config.mode == "ratio":
        coef = w.clamp(max=config.ratio_cap)
    else:
        raise ValueError(f"agent_token_loss needs mode 'shaped' or 'ratio'; got {config.mode!r}")
    adv = advantages
    if config.positive_advantage_only:
        adv = torch.where(advantages > 0, advantages, torch.zeros_like(advantages))
    return -coef * adv, coef.detach()


def _policy_loss_base() -> type:
    from openrlhf.models.loss import PolicyLoss

    return PolicyLoss


@functools.cache
def make_aipo_policy_loss_class() -> type:
    """Build :class:`AIPOPolicyLoss` as a subclass of OpenRLHF's ``PolicyLoss`` (imported lazily)."""
    base = _policy_loss_base()
    from openrlhf.models.loss import aggregate_loss
    from openrlhf.models.utils import masked_mean

    class AIPOPolicyLoss(base):  # type: ignore[misc, valid-type]
        """OpenRLHF's ``PolicyLoss`` plus AIPO's term for agent tokens.

        Same constructor as ``PolicyLoss`` plus ``agent_loss`` (default: read from
        :data:`LOSS_CONFIG_ENV`); same ``forward`` signature and return tuple, so
        OpenRLHF's actor uses it unchanged. Per-batch agent metrics are kept in
        ``self.last_metrics``.
        """

        def __init__(
            self, *args: Any, agent_loss: AgentTokenLossConfig | None = None, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self.agent_loss = agent_loss or AgentTokenLossConfig.from_env()
            if self.agent_loss.trains_agent_tokens and self.policy_loss_type != "ppo":
                raise ValueError(
                    f"agent-token mode {self.agent_loss.mode!r} needs policy_loss_type 'ppo'; got "
                    f"{self.policy_loss_type!r} (GSPO's sequence ratio would mix agent tokens in)"
                )
            self.last_metrics: dict[str, float] = {}

        def forward(
            self,
            log_probs: torch.Tensor,
            old_log_probs: torch.Tensor,
            advantages: torch.Tensor,
            action_mask: torch.Tensor | None = None,
            rollout_log_probs: torch.Tensor | None = None,
            dp_size: int = 1,
            batch_num_tokens: float | None = None,
            global_batch_size: float | None = None,
        ):
            stock = dict(
                dp_size=dp_size,
                batch_num_tokens=batch_num_tokens,
                global_batch_size=global_batch_size,
            )
            if not self.agent_loss.trains_agent_tokens or rollout_log_probs is None:
                return super().forward(
                    log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, **stock
                )
            agent_mask, behavior, policy_rollout = decode_rollout_log_probs(rollout_log_probs)
            if action_mask is None:
                action_mask = torch.ones_like(log_probs)
            # Agent tokens: zero advantage and a neutral rollout log-prob in the stock
            # term, so they add nothing there but still count in its normalisation.
            policy_adv = torch.where(agent_mask, torch.zeros_like(advantages), advantages)
            policy_rollout = torch.where(agent_mask, old_log_probs.detach(), policy_rollout)
            loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = super().forward(
                log_probs, old_log_probs, policy_adv, action_mask, policy_rollout, **stock
            )
            per_token, coef = agent_token_loss(log_probs, behavior, advantages, self.agent_loss)
            trained = agent_mask & action_mask.bool()
            per_token = torch.where(trained, per_token, torch.zeros_like(per_token))
            loss = loss + aggregate_loss(
                per_token, action_mask, token_level_loss=self.token_level_loss, **stock
            )
            n_agent = float(trained.sum().item())
            self.last_metrics = {
                "agent_token_frac": float(
                    (n_agent / action_mask.sum().clamp(min=1)).item()
                    if isinstance(action_mask, torch.Tensor)
                    else 0.0
                ),
                "agent_is_coef": float(masked_mean(coef, trained.float(), dim=None).item())
                if n_agent
                else 0.0,
            }
            return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio

    AIPOPolicyLoss.__module__ = __name__
    AIPOPolicyLoss.__qualname__ = "AIPOPolicyLoss"
    return AIPOPolicyLoss
