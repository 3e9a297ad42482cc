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
:mod:`trainers.losses` aggregated with OpenRLHF's own ``aggregate_loss`` over the same mask. The
agent-token term is :func:`trainers.losses.agent_token_terms`, the embedded trainer's
own, configured by the same :class:`~trainers.losses.LossConfig` fields
(:data:`AGENT_TOKEN_FIELDS`). In mode ``mask`` it is the stock ``PolicyLoss`` call,
unchanged.

Every call adds its statistics to ``loss.stats`` (:class:`~trainers.openrlhf.metrics.LossStats`):
the agent-token coefficient, its clip fraction, and the PPO clip fraction and approximate KL of
the policy tokens alone; :func:`trainers.openrlhf.metrics.install_metrics` puts them in
OpenRLHF's logged status. A micro-batch without a trained token (every sample in it a failed
episode) returns a clip ratio and KL of 0 instead of the stock 0/0 = NaN, which would turn the
whole step's all-reduced ``ppo_clip_ratio`` and ``ppo_kl`` into NaN on every rank.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from aipo_env.masks import trained_token_masks
from trainers.losses import LOG_RATIO_BOUND, LossConfig, agent_token_terms
from trainers.openrlhf.dump import dump_micro_batch
from trainers.openrlhf.metrics import LossStats, install_metrics

logger = logging.getLogger(__name__)

#: Agent tokens carry ``AGENT_FLAG_OFFSET - mu_logprob`` in ``rollout_log_probs``.
AGENT_FLAG_OFFSET = 1.0
#: The OpenRLHF module whose ``ActorPPOTrainer`` builds and calls the policy loss.
PPO_ACTOR_MODULE = "openrlhf.trainer.ray.ppo_actor"
#: Environment variable holding the JSON of the agent-token fields of
#: :class:`trainers.losses.LossConfig` on every Ray worker.
LOSS_CONFIG_ENV = "AIPO_OPENRLHF_AGENT_LOSS"

#: The :class:`~trainers.losses.LossConfig` fields that reach OpenRLHF's loss. The policy-token
#: fields (clip, rollout correction, aggregation, KL, entropy) are OpenRLHF's own flags there.
AGENT_TOKEN_FIELDS = (
    "agent_mode",
    "shaped_gamma",
    "agent_w_min",
    "agent_w_max",
    "agent_positive_only",
    "ratio_cap",
    "agent_loss_weight",
)


def check_agent_token_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Refuse loss fields OpenRLHF's loss would silently ignore; returns ``data`` unchanged."""
    ignored = sorted(set(data) - set(AGENT_TOKEN_FIELDS))
    if ignored:
        raise ValueError(
            f"agent_loss field(s) {', '.join(ignored)} do not apply under OpenRLHF (set the "
            f"matching OpenRLHF flags instead); expected only {', '.join(AGENT_TOKEN_FIELDS)}"
        )
    return data


def loss_config_to_env(config: LossConfig) -> str:
    """The JSON written to :data:`LOSS_CONFIG_ENV`: the agent-token fields of ``config``."""
    return json.dumps(config.model_dump(include=set(AGENT_TOKEN_FIELDS)), sort_keys=True)


def loss_config_from_env(environ: Mapping[str, str] | None = None) -> LossConfig:
    """Read the loss config from :data:`LOSS_CONFIG_ENV`; mode 'mask' when it is unset."""
    raw = (os.environ if environ is None else environ).get(LOSS_CONFIG_ENV)
    if not raw:
        return LossConfig(agent_mode="mask")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return LossConfig.model_validate(check_agent_token_fields(data))
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError included
        raise ValueError(
            f"{LOSS_CONFIG_ENV} must hold a JSON object of the fields {', '.join(AGENT_TOKEN_FIELDS)}; "
            f"got {raw!r}: {exc}"
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


def _zero_nan(value: torch.Tensor | None) -> torch.Tensor | None:
    """``value`` with NaN replaced by 0 (a mean over no token); None stays None."""
    if value is None:
        return None
    return torch.where(torch.isnan(value), torch.zeros_like(value), value)


def _policy_loss_base() -> type:
    from openrlhf.models.loss import PolicyLoss

    return PolicyLoss


@functools.cache
def make_aipo_policy_loss_class() -> type:
    """Build :class:`AIPOPolicyLoss` as a subclass of OpenRLHF's ``PolicyLoss`` (imported lazily)."""
    base = _policy_loss_base()
    from openrlhf.models.loss import aggregate_loss

    class AIPOPolicyLoss(base):  # type: ignore[misc, valid-type]
        """OpenRLHF's ``PolicyLoss`` plus AIPO's term for agent tokens.

        Same constructor as ``PolicyLoss`` plus ``agent_loss`` (a
        :class:`~trainers.losses.LossConfig`; default: read from :data:`LOSS_CONFIG_ENV`);
        same ``forward`` signature and return tuple, so OpenRLHF's actor uses it
        unchanged. Each call adds its statistics to ``self.stats``.
        """

        def __init__(self, *args: Any, agent_loss: LossConfig | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.agent_loss = agent_loss if agent_loss is not None else loss_config_from_env()
            if self.agent_loss.trains_agent_tokens() and self.policy_loss_type != "ppo":
                raise ValueError(
                    f"agent-token mode {self.agent_loss.agent_mode!r} needs policy_loss_type 'ppo'; "
                    f"got {self.policy_loss_type!r} (GSPO's sequence ratio would mix agent tokens in)"
                )
            self.stats = LossStats()
            # OpenRLHF builds its loss in ActorPPOTrainer.__init__: ppo_actor is fully
            # imported now and no ppo_train has run yet, so this is where the metrics go in.
            install_metrics(sys.modules.get(PPO_ACTOR_MODULE))
            # WARNING, not INFO: Ray workers have no handler, and this line is the evidence
            # in a worker's log that the AIPO term is the one being trained.
            logger.warning(
                "AIPO policy loss built in this worker: agent_mode=%s (%s)",
                self.agent_loss.agent_mode,
                "agent tokens trained through the AIPO coefficient"
                if self.agent_loss.trains_agent_tokens()
                else "agent tokens not trained; stock PPO on policy tokens",
            )

        def _policy_token_stats(
            self,
            log_probs: torch.Tensor,
            old_log_probs: torch.Tensor,
            advantages: torch.Tensor,
            policy: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Count, clipped count and sum of ``old_logp - logp`` over ``policy`` (stock formulas)."""
            raw = (log_probs - old_log_probs).detach()
            ratio = raw.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
            adv = advantages.detach()
            surr1 = ratio * adv
            surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * adv
            clipped = (surr2 < surr1) & policy
            return policy.sum(), clipped.sum(), torch.where(policy, -raw, 0.0).sum()

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
            if not self.agent_loss.trains_agent_tokens() or rollout_log_probs is None:
                loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = super().forward(
                    log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, **stock
                )
                clip_ratio, ppo_kl = _zero_nan(clip_ratio), _zero_nan(ppo_kl)
                with torch.no_grad():
                    # Every trained token is a policy token here: the stock metrics are
                    # already policy-only (and exact for GSPO's sequence ratio too).
                    n = (
                        action_mask.sum()
                        if action_mask is not None
                        else log_probs.new_tensor(float(log_probs.numel()))
                    )
                    self.stats.add_policy(n, clip_ratio * n, ppo_kl * n)
                return loss, clip_ratio, ppo_kl, _zero_nan(vllm_kl), _zero_nan(is_filter_ratio)
            agent_mask, behavior, policy_rollout = decode_rollout_log_probs(rollout_log_probs)
            if action_mask is None:
                action_mask = torch.ones_like(log_probs)
            policy, agent = trained_token_masks(
                self.agent_loss.mask_rule(), action_mask, agent_mask, advantages
            )
            # The loss's own mask: agent tokens that agent_positive_only leaves out are not
            # counted either, as in the embedded trainer (a global batch_num_tokens, counted by
            # OpenRLHF before the loss, still includes them).
            trained = (policy | agent).to(action_mask.dtype)
            # Agent tokens: zero advantage and a neutral rollout log-prob in the stock
            # term, so they add nothing there but still count in its normalisation.
            policy_adv = torch.where(agent_mask, torch.zeros_like(advantages), advantages)
            policy_rollout = torch.where(agent_mask, old_log_probs.detach(), policy_rollout)
            loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = super().forward(
                log_probs, old_log_probs, policy_adv, trained, policy_rollout, **stock
            )
            per_token, coef, clipped = agent_token_terms(
                self.agent_loss, log_probs, behavior, advantages, agent
            )
            loss = loss + aggregate_loss(
                per_token, trained, token_level_loss=self.token_level_loss, **stock
            )
            with torch.no_grad():
                self.stats.add_policy(
                    *self._policy_token_stats(log_probs, old_log_probs, advantages, policy)
                )
                self.stats.add_agent(coef, clipped, agent)
                if agent.any():
                    dump_micro_batch(
                        action_mask=action_mask,
                        rollout_log_probs=rollout_log_probs,
                        agent=agent,
                        coef=coef,
                    )
            return (
                loss,
                _zero_nan(clip_ratio),
                _zero_nan(ppo_kl),
                _zero_nan(vllm_kl),
                _zero_nan(is_filter_ratio),
            )

    AIPOPolicyLoss.__module__ = __name__
    AIPOPolicyLoss.__qualname__ = "AIPOPolicyLoss"
    return AIPOPolicyLoss
