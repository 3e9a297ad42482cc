"""The AIPO policy loss: PPO on the policy's own tokens, off-policy IS on agent-injected tokens.

The AIPO paper (arXiv 2605.08401) trains agent-injected tokens "through a tailored importance
sampling coefficient together with a clipping strategy"; its exact formula is not public. This
module implements a documented, configurable family (the formulas below), not the paper's
unknown formula. All per-token tensors are ``[B, T]`` and already aligned: position ``t`` is one
response token. ``A`` is the sequence advantage (broadcast over tokens) or a per-token one.

Policy tokens (``loss_mask & ~agent_mask``), with ``r = exp(clamp(logp - old_logp, -20, 20))``::

    l = -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A)                   (PPO, DAPO clip-higher)
    l = -max(min(r A, clamp(r, ...) A), dual_clip A)   where A < 0          (dual clip, optional)
    l = l * rho                                                         (rollout correction)

exactly as OpenRLHF's ``PolicyLoss``; ``rho`` is detached: with ``u = exp(old_logp -
rollout_logp)``, ``tis`` uses ``rho = clamp(u, lo, hi)``, ``icepop`` uses ``rho = u`` inside
``[lo, hi]`` and ``0`` outside; ``rho = 1`` where ``rollout_logp`` is not finite.

Agent tokens (``loss_mask & agent_mask``), with ``w = exp(clamp(logp - behavior_logp, -20, 20))``
(``behavior_logp = 0``, i.e. ``mu = 1``, where it is unknown/NaN, as LUFFY), by ``agent_mode``:

- ``mask``: not trained, and not counted by the normaliser either, so the loss equals plain PPO on
  the policy tokens (OpenRLHF's ``PolicyLoss`` with ``action_mask`` = policy tokens).
- ``shaped`` (default): ``f = w / (w + gamma)`` (LUFFY policy shaping; ``df/dp = gamma /
  (p + gamma)^2 / mu`` boosts rare tokens), clipped with a gradient-preserving clip::

      c = clamp(f, w_min, w_max);   f_clip = f * sg(c / f);   l = -f_clip A

  The value is ``c``, the gradient ``(c / f) grad f``: a clipped token keeps a gradient (for a
  token under the floor it tends to ``-w_min A grad logp``) instead of the zero a plain clamp gives.
  The weight on ``grad logp`` is ``c (1 - f)``: at most 0.25, and ``w_min`` for rare tokens.
- ``ratio``: truncated IS with the same gradient-preserving clip::

      c = min(w, C);   l = -w * sg(c / w) * A

  The value is ``min(w, C) A``; the gradient is ``-min(w, C) A grad logp`` (the truncated IS
  weight times the score function), so tokens above ``C`` keep a gradient; with ``mu = 1`` the
  weight is ``pi`` itself, almost nothing for the informative low-probability tokens.
- ``supervised``: ``l = -A logp``, weight 1 on ``grad logp`` whatever the token's probability
  (SFT on the agent's text, scaled by the advantage); ``w`` is not used.

Every trained agent mode is multiplied by ``agent_loss_weight``. With ``agent_positive_only``
(default) the agent tokens of trajectories with ``A <= 0`` are left out (no loss, not counted):
guidance is learned from episodes that beat their group and never trained down. Without it, a
group whose samples all got the same reply at the same place gets advantages that sum to zero
on those tokens, so their gradient cancels exactly, and a failed episode trains the oracle's
correct text down.

Aggregation (``aggregation``): ``token_mean`` (DAPO: sum / number of tokens), ``seq_mean_token_mean``
(GRPO: mean over sequences with a token of each sequence's token mean), ``seq_sum_norm``
(Dr. GRPO: sum / (B * constant), the constant being ``seq_sum_norm_constant`` or ``T``), over:

- ``agent_normalization: shared``: policy tokens and trained agent tokens together, one
  normaliser; consulting then shrinks the policy tokens' gradient (agent tokens enter the
  denominator) in the trained modes, and not in ``mask`` mode.
- ``agent_normalization: separate`` (default): the policy part over the policy tokens only, so it
  equals ``mask`` mode's loss exactly, plus the agent part over the trained agent tokens only
  (their own token mean, or the mean over sequences with a trained agent token of each one's
  agent-token mean); ``seq_sum_norm`` has no token count and is the same under both.

A trainer that splits a minibatch into micro-batches passes the minibatch's counts
(:func:`loss_normalizers`) to each call, so the micro losses add up to the minibatch loss
exactly under either normalisation (OpenRLHF's ``batch_num_tokens`` idea).

The defaults (``shaped``, ``agent_w_min`` 0.1, ``agent_positive_only``, ``separate``) are the
same for the embedded trainer and the OpenRLHF recipe: a floor that keeps a gradient on rare
agent tokens, guidance learned only from episodes that beat their group (no cancellation, no
inversion), and a policy-token gradient that consulting does not dilute.

Optional terms, aggregated over all trained tokens with one (shared) normaliser: ``kl_coef *
KL`` to the reference with ``log r = logp - ref_logp``: ``k1 = log r``, ``k2 = (log r)^2 / 2``,
``k3 = exp(-log r) - 1 + log r`` (OpenRLHF's clamps: ``log r >= -10`` in k3, value in
``[-10, 10]``); and ``-entropy_coef * entropy``.

Masked positions may hold NaN or infinities (padding, unknown behaviour log-probs): every input is
passed through ``torch.where`` before any arithmetic so neither the loss nor its gradient sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from torch import nn

from aipo_env import masks
from aipo_env.masks import MaskRule
from configs.registry import check_registered

#: Bound on log-ratios before ``exp`` (as OpenRLHF), so ratios stay finite.
LOG_RATIO_BOUND = 20.0


class LossConfig(BaseModel):
    """Hyper-parameters of the AIPO loss family (formulas in the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    eps_clip_low: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="PPO lower clip: policy-token ratios below 1 - eps_clip_low are clipped. Default 0.2.",
    )
    eps_clip_high: float = Field(
        default=0.2,
        ge=0.0,
        description="PPO upper clip: ratios above 1 + eps_clip_high are clipped. Default 0.2; DAPO's clip-higher uses 0.28.",
    )
    dual_clip: float | None = Field(
        default=None,
        gt=1.0,
        description="Dual-clip PPO constant c > 1: for A < 0 the policy-token loss is at most -c*A (OpenRLHF's definition). Default None (off).",
    )
    rollout_correction: Literal["none", "tis", "icepop"] = Field(
        default="none",
        description="Correction for the trainer/rollout-engine mismatch on policy tokens, weight u = exp(old_logp - rollout_logp), detached: 'tis' multiplies by clamp(u, lo, hi), 'icepop' by u inside [lo, hi] and 0 outside. Default 'none'.",
    )
    rollout_correction_bounds: tuple[float, float] = Field(
        default=(0.5, 5.0),
        description="(lo, hi) for rollout_correction, 0 <= lo < hi. Default (0.5, 5.0), OpenRLHF's is_correction_threshold.",
    )
    agent_mode: str = Field(
        default="shaped",
        description="How agent-injected tokens are trained: 'mask' not at all, 'shaped' with the clipped f(w) = w/(w+gamma) (weight c(1-f) <= 0.25 on grad log pi), 'ratio' with truncated IS min(w, C) (weight pi itself when the agent's log-probs are unknown), 'supervised' with -A log pi (weight 1, as SFT: rare, informative tokens are not starved). Default 'shaped'; 'mask' in an ILR run (peers:) or under a tool protocol unless set. One of trainers.losses.LOSS_MODES.",
    )

    @field_validator("agent_mode")
    @classmethod
    def _mode_is_registered(cls, value: str) -> str:
        return check_registered(value, LOSS_MODES, "agent_mode")

    shaped_gamma: float = Field(
        default=0.1,
        gt=0.0,
        description="gamma of the shaping f(w) = w/(w+gamma); smaller boosts rare tokens more. Default 0.1 (LUFFY).",
    )
    agent_w_min: float = Field(
        default=0.1,
        ge=0.0,
        description="Floor of the shaped coefficient (gradient-preserving clip): tokens with f below it count as w_min and keep a gradient of about w_min on grad log pi. Default 0.1, in the embedded trainer and the OpenRLHF recipe alike: without a floor a token the policy finds unlikely (the informative part of a reply) gets almost no gradient. 0 disables the floor.",
    )
    agent_w_max: float = Field(
        default=1.0,
        gt=0.0,
        description="Ceiling of the shaped coefficient. f < 1 always, so the default 1.0 never clips.",
    )
    agent_positive_only: bool = Field(
        default=True,
        description="Train agent tokens only in trajectories with A > 0. Default True: guidance is learned from episodes that beat their group, never trained down. Off, a failed consult episode trains the oracle's correct text down, and a group whose samples all got the same reply at the same place has advantages summing to zero on it, so its gradient cancels exactly.",
    )
    ratio_cap: float = Field(
        default=1.0,
        gt=0.0,
        description="C of agent_mode 'ratio': the IS weight is min(w, C). Default 1.0.",
    )
    agent_loss_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Multiplier on the agent-token loss terms. Default 1.0.",
    )
    agent_normalization: Literal["shared", "separate"] = Field(
        default="separate",
        description="How the agent-token part is normalised. 'separate' (default): policy tokens over policy tokens only (the policy part equals mask mode's exactly, so consulting does not dilute it), agent tokens over the trained agent tokens only (their own token mean or sequence mean, by aggregation). 'shared': one normaliser over policy and agent tokens together (the behaviour before this option).",
    )
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"] = Field(
        default="token_mean",
        description="Reduction over trained tokens: 'token_mean' (DAPO), 'seq_mean_token_mean' (GRPO), 'seq_sum_norm' (Dr. GRPO, sum / (B * constant)). Default 'token_mean'.",
    )
    seq_sum_norm_constant: float | None = Field(
        default=None,
        gt=0.0,
        description="Constant of 'seq_sum_norm', e.g. the maximum response length; None uses the tensor width T. Default None.",
    )
    kl_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the KL penalty to the reference policy (needs ref_logprobs). Default 0 (off).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        default="k3",
        description="KL estimator (Schulman): k1 = log r, k2 = (log r)^2/2, k3 = exp(-log r) - 1 + log r. Default 'k3'.",
    )
    entropy_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the entropy bonus, loss -= entropy_coef * mean entropy (needs entropy). Default 0 (off).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> LossConfig:
        lo, hi = self.rollout_correction_bounds
        if not 0.0 <= lo < hi:
            raise ValueError(
                f"rollout_correction_bounds must satisfy 0 <= lo < hi, got ({lo}, {hi})"
            )
        if self.agent_w_min > self.agent_w_max:
            raise ValueError(
                f"agent_w_min ({self.agent_w_min}) must not exceed agent_w_max ({self.agent_w_max})"
            )
        # Both settings only act on trained agent tokens. Refused only when set explicitly:
        # they are defaults, and mask mode is what an ILR run or a tool protocol falls back to.
        if self.agent_mode == "mask":
            explicit = self.model_fields_set
            if "agent_positive_only" in explicit and self.agent_positive_only:
                raise ValueError(
                    "agent_positive_only=true with agent_mode='mask': mask trains no agent "
                    "token, so positive-only advantages select nothing; set agent_mode to "
                    "shaped, ratio or supervised, or leave agent_positive_only unset"
                )
            if "agent_normalization" in explicit and self.agent_normalization == "separate":
                raise ValueError(
                    "agent_normalization='separate' with agent_mode='mask': mask trains no "
                    "agent token, so there is no agent part to normalise on its own; set "
                    "agent_mode to shaped, ratio or supervised, or leave agent_normalization unset"
                )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data = handler(self)
        if self.agent_mode == "mask":
            # Their defaults act on no token in mask mode; dumped, they would read back as set
            # explicitly and be refused (a run's config.yaml, the OpenRLHF workers' JSON).
            if self.agent_positive_only:
                data.pop("agent_positive_only", None)
            if self.agent_normalization == "separate":
                data.pop("agent_normalization", None)
        return data

    def trains_agent_tokens(self) -> bool:
        """Whether agent tokens enter the loss at all (every mode but 'mask')."""
        return self.agent_mode != "mask"

    def mask_rule(self, mask_on_drift: bool = False) -> MaskRule:
        """The :class:`~aipo_env.masks.MaskRule` this loss trains under."""
        return MaskRule(
            train_injected=self.trains_agent_tokens(),
            injected_positive_only=self.agent_positive_only,
            mask_on_drift=mask_on_drift,
        )


def _zeros_where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` on ``mask``, 0 elsewhere; NaN/inf off the mask neither propagates nor gets gradient."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _kl(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate from ``log r = logp - ref_logp`` (OpenRLHF's clamps)."""
    if estimator == "k1":
        value = log_ratio
    elif estimator == "k2":
        value = log_ratio**2 / 2.0
    elif estimator == "k3":
        bounded = log_ratio.clamp(min=-10.0)
        value = (-bounded).exp() - 1.0 + bounded
    else:
        raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of k1, k2, k3")
    return value.clamp(min=-10.0, max=10.0)


@dataclass(frozen=True)
class LossNormalizers:
    """The loss's denominators, counted over a whole minibatch (:func:`loss_normalizers`).

    Passed to every micro-batch's call of :func:`aipo_policy_loss`, they make the micro
    losses add up to the minibatch's loss exactly, whichever ``aggregation`` and
    ``agent_normalization``: each micro-batch divides by the minibatch's counts, not its own.
    """

    rows: int  #: rows of the minibatch (``seq_sum_norm``)
    policy_tokens: float  #: trained policy tokens
    agent_tokens: float  #: trained agent tokens
    policy_rows: float  #: rows with a trained policy token
    agent_rows: float  #: rows with a trained agent token
    trained_rows: float  #: rows with any trained token


def loss_normalizers(
    config: LossConfig,
    loss_mask: torch.Tensor,
    agent_mask: torch.Tensor,
    advantages: torch.Tensor,
) -> LossNormalizers:
    """Count the trained tokens and rows of a minibatch, as the loss trains them.

    The tensors are the minibatch's (``[B, T]``; ``advantages`` ``[B]`` or ``[B, T]``): the
    trained tokens follow :func:`~aipo_env.masks.trained_token_masks` under ``config``'s rule,
    so ``agent_positive_only`` is counted as the loss applies it.
    """
    policy, agent = masks.trained_token_masks(config.mask_rule(), loss_mask, agent_mask, advantages)
    return LossNormalizers(
        rows=int(policy.shape[0]),
        policy_tokens=float(policy.sum()),
        agent_tokens=float(agent.sum()),
        policy_rows=float(policy.any(dim=-1).sum()),
        agent_rows=float(agent.any(dim=-1).sum()),
        trained_rows=float((policy | agent).any(dim=-1).sum()),
    )


def loss_token_counts(
    config: LossConfig,
    loss_mask: torch.Tensor,
    agent_mask: torch.Tensor,
    advantages: torch.Tensor,
) -> dict[str, float]:
    """The loss's ``tokens/policy``, ``tokens/agent`` and ``tokens/agent_trained`` metrics.

    They depend on the masks and advantages only (the rule of :func:`loss_normalizers`).
    """
    policy, agent = masks.trained_token_masks(config.mask_rule(), loss_mask, agent_mask, advantages)
    return {
        "tokens/policy": float(policy.sum()),
        "tokens/agent": float((loss_mask.bool() & agent_mask.bool()).sum()),
        "tokens/agent_trained": float(agent.sum()),
    }


class _Aggregator:
    """Reduces per-token values on ``mask`` to a scalar (the ``aggregation`` formulas).

    ``tokens``, ``rows`` and ``batch_rows`` are the denominators counted over a whole
    minibatch (:class:`LossNormalizers`); None counts them on ``mask`` itself.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        mode: str,
        constant: float | None,
        dtype: torch.dtype,
        *,
        tokens: float | None = None,
        rows: float | None = None,
        batch_rows: int | None = None,
    ) -> None:
        self.mode = mode
        # Count in at least float32: a bfloat16 token count is inexact above 256.
        mask = mask.to(torch.promote_types(dtype, torch.float32))
        if mode == "token_mean":
            total = mask.sum() if tokens is None else mask.new_tensor(tokens)
            self.scale = 1.0 / total.clamp(min=1.0)
        elif mode == "seq_mean_token_mean":
            per_seq = mask.sum(dim=-1)
            n_seq = (per_seq > 0).to(mask.dtype).sum() if rows is None else mask.new_tensor(rows)
            # Row weight 1 / (count_i * n_seq); rows with no token on the mask get weight 0.
            self.row_scale = torch.where(
                per_seq > 0, 1.0 / per_seq.clamp(min=1.0), 0.0
            ) / n_seq.clamp(min=1.0)
        elif mode == "seq_sum_norm":
            norm = constant if constant is not None else float(mask.shape[-1])
            n_rows = mask.shape[0] if batch_rows is None else batch_rows
            self.scale = 1.0 / (n_rows * norm)
        else:
            raise ValueError(
                f"unknown aggregation {mode!r}; expected token_mean, seq_mean_token_mean or seq_sum_norm"
            )

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """Reduce ``values`` [B, T], already zero off the mask."""
        if self.mode == "seq_mean_token_mean":
            return (values.sum(dim=-1) * self.row_scale).sum()
        return values.sum() * self.scale


def _masked_stats(values: torch.Tensor, mask: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean, std (biased), min and max of ``values`` on ``mask``; zeros if the mask is empty."""
    selected = values[mask]
    if selected.numel() == 0:
        return {f"{prefix}_{k}": 0.0 for k in ("mean", "std", "min", "max")}
    return {
        f"{prefix}_mean": selected.mean().item(),
        f"{prefix}_std": selected.std(unbiased=False).item(),
        f"{prefix}_min": selected.min().item(),
        f"{prefix}_max": selected.max().item(),
    }


def _fraction(flags: torch.Tensor, mask: torch.Tensor) -> float:
    count = int(mask.sum())
    return float((flags & mask).sum()) / count if count else 0.0


def _aggregator(
    config: LossConfig,
    mask: torch.Tensor,
    part: Literal["policy", "agent", "trained"],
    dtype: torch.dtype,
    normalizers: LossNormalizers | None,
) -> _Aggregator:
    """The reduction over ``mask``, the tokens of ``part``, with the minibatch's counts if given."""
    counts: dict[str, float | None] = {"tokens": None, "rows": None}
    batch_rows = None
    if normalizers is not None:
        n = normalizers
        counts = {
            "policy": {"tokens": n.policy_tokens, "rows": n.policy_rows},
            "agent": {"tokens": n.agent_tokens, "rows": n.agent_rows},
            "trained": {"tokens": n.policy_tokens + n.agent_tokens, "rows": n.trained_rows},
        }[part]
        batch_rows = n.rows
    return _Aggregator(
        mask,
        config.aggregation,
        config.seq_sum_norm_constant,
        dtype,
        batch_rows=batch_rows,
        **counts,
    )


def agent_token_terms(
    config: LossConfig,
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    agent_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The agent-token part of the AIPO loss, per token: ``(loss, coefficient, clipped)``.

    The one definition of the agent-token formula (module docstring, ``agent_mode``
    ``shaped``, ``ratio`` or ``supervised``), shared by the embedded trainer and the OpenRLHF
    loss.

    Args:
        config: the loss config; only the agent-token fields are read.
        logprobs: ``[B, T]`` current-policy log-probs (with grad).
        behavior_logprobs: ``[B, T]`` the agent model's log-probs, NaN/inf where unknown
            (then ``mu = 1``); None means unknown everywhere.
        advantages: ``[B]`` or ``[B, T]`` advantages.
        agent_mask: ``[B, T]`` the agent tokens to train (as :func:`trained_token_masks`
            returns them: ``agent_positive_only`` is not applied again here).

    Returns:
        ``loss``: ``[B, T]`` ``-c A * agent_loss_weight`` with the gradient-preserving clip
        (``-A logp * agent_loss_weight`` in ``supervised``), 0 (and no gradient) off
        ``agent_mask``; ``coefficient``: ``[B, T]`` the detached value ``c``
        (``clamp(f, w_min, w_max)``, ``min(w, C)``, or 1 in ``supervised``, its weight on
        ``grad logp``); ``clipped``: ``[B, T]`` bool, True where the clip changed the value.
        Mode ``mask`` gives zeros and no clipped token.
    """
    agent = agent_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand(logprobs.shape)
    tokens = AgentTokens(
        logp=_zeros_where(agent, logprobs),
        behavior_logprobs=behavior_logprobs,
        advantages=advantages,
        agent=agent,
    )
    if config.agent_mode not in LOSS_MODES:
        raise ValueError(
            f"unknown agent_mode {config.agent_mode!r}; expected one of {', '.join(LOSS_MODES)}"
        )
    return LOSS_MODES[config.agent_mode](config, tokens)


@dataclass(frozen=True)
class AgentTokens:
    """What a loss mode reads: ``logp`` (``[B, T]``, 0 off ``agent``), the agent model's
    ``behavior_logprobs`` (NaN/inf or None where unknown), ``[B, T]`` ``advantages`` and
    the ``agent`` mask of tokens to train."""

    logp: torch.Tensor
    behavior_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    agent: torch.Tensor

    def adv(self) -> torch.Tensor:
        """The advantages on agent tokens, 0 elsewhere, in ``logp``'s dtype."""
        return _zeros_where(self.agent, self.advantages.to(self.logp.dtype))

    def is_weight(self) -> torch.Tensor:
        """``w = pi / mu`` per agent token (``mu = 1`` where unknown), log bounded."""
        if self.behavior_logprobs is None:
            beh = torch.zeros_like(self.logp)
        else:
            beh = torch.where(
                self.agent & torch.isfinite(self.behavior_logprobs), self.behavior_logprobs, 0.0
            )
        w = _zeros_where(self.agent, self.logp - beh.to(self.logp.dtype))
        return w.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()

    def preserved_clip(
        self, config: LossConfig, raw: torch.Tensor, coef: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``-c A`` with the gradient-preserving clip of ``raw`` to ``coef``."""
        # raw > 0 everywhere (w >= exp(-20)), so the rescale is finite.
        preserved = raw * (coef / raw).detach()
        loss = _zeros_where(self.agent, -preserved * self.adv() * config.agent_loss_weight)
        return loss, coef.detach(), (coef != raw).detach() & self.agent


#: A loss mode: ``(config, tokens) -> (loss, coefficient, clipped)`` per token, as
#: :func:`agent_token_terms` returns them.
Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LossMode = Callable[[LossConfig, AgentTokens], Terms]


def _mask_mode(config: LossConfig, tokens: AgentTokens) -> Terms:
    zeros = torch.zeros_like(tokens.logp)
    return zeros, zeros.detach(), torch.zeros_like(tokens.agent)


def _supervised_mode(config: LossConfig, tokens: AgentTokens) -> Terms:
    # Coefficient 1 on grad logp: the reply's text is imitated like SFT, scaled by A.
    loss = _zeros_where(tokens.agent, -tokens.logp * tokens.adv() * config.agent_loss_weight)
    return loss, tokens.agent.to(tokens.logp.dtype), torch.zeros_like(tokens.agent)


def _shaped_mode(config: LossConfig, tokens: AgentTokens) -> Terms:
    w = tokens.is_weight()
    raw = w / (w + config.shaped_gamma)
    return tokens.preserved_clip(config, raw, raw.clamp(config.agent_w_min, config.agent_w_max))


def _ratio_mode(config: LossConfig, tokens: AgentTokens) -> Terms:
    w = tokens.is_weight()
    return tokens.preserved_clip(config, w, w.clamp(max=config.ratio_cap))


#: ``loss.agent_mode`` -> how agent tokens are weighted (module docstring). A new mode is
#: one function and one entry here; :class:`LossConfig` accepts exactly these names.
LOSS_MODES: dict[str, LossMode] = {
    "mask": _mask_mode,
    "shaped": _shaped_mode,
    "ratio": _ratio_mode,
    "supervised": _supervised_mode,
}


def _check_shapes(
    logprobs: torch.Tensor, advantages: torch.Tensor, **tensors: torch.Tensor | None
) -> torch.Tensor:
    """``advantages`` as ``[B, T]``; raises ValueError naming a tensor whose shape is not ``logprobs``'."""
    shape = logprobs.shape
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {tuple(shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages.unsqueeze(-1).expand(shape)
    if advantages.shape != shape:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [{shape[0]}] or {tuple(shape)}"
        )
    return advantages


def _check_needs(
    config: LossConfig,
    rollout_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> None:
    """Raise ValueError when a configured term lacks its input."""
    if config.rollout_correction != "none" and rollout_logprobs is None:
        raise ValueError(f"rollout_correction={config.rollout_correction!r} needs rollout_logprobs")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} needs ref_logprobs")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={config.entropy_coef} needs entropy")


@dataclass(frozen=True)
class _Surrogate:
    """The PPO surrogate's per-token pieces, kept for the metrics."""

    log_ratio: torch.Tensor  #: ``logp - old_logp`` (0 off the policy tokens)
    ratio: torch.Tensor  #: ``r``
    surr1: torch.Tensor  #: ``r A``
    surr2: torch.Tensor  #: ``clamp(r, 1 - eps_low, 1 + eps_high) A``
    clipped: torch.Tensor  #: ``min(surr1, surr2)``
    loss: (
        torch.Tensor
    )  #: ``-clipped``, or the dual clip's ``-max(clipped, dual_clip A)`` where ``A < 0``


def _ppo_surrogate(
    config: LossConfig,
    logp: torch.Tensor,
    old_logprobs: torch.Tensor,
    adv: torch.Tensor,
    policy: torch.Tensor,
) -> _Surrogate:
    """``l = -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A)`` per token, with the dual clip."""
    log_ratio = logp - _zeros_where(policy, old_logprobs.to(logp.dtype))
    r = _zeros_where(policy, log_ratio).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
    surr1 = r * adv
    surr2 = r.clamp(1.0 - config.eps_clip_low, 1.0 + config.eps_clip_high) * adv
    clipped = torch.min(surr1, surr2)
    if config.dual_clip is None:
        loss = -clipped
    else:
        loss = -torch.where(adv < 0, torch.max(clipped, config.dual_clip * adv), clipped)
    return _Surrogate(log_ratio, r, surr1, surr2, clipped, loss)


def _rollout_correction(
    config: LossConfig,
    policy: torch.Tensor,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The detached weight ``rho`` per token (1 where ``rollout_logp`` is unknown) and its metrics.

    ``u = exp(old_logp - rollout_logp)``; ``tis``: ``rho = clamp(u, lo, hi)``; ``icepop``:
    ``rho = u`` inside ``[lo, hi]``, 0 outside.
    """
    known = policy & torch.isfinite(rollout_logprobs)
    is_log = _zeros_where(known, old_logprobs.detach() - rollout_logprobs).to(dtype)
    u = is_log.exp()
    lo, hi = config.rollout_correction_bounds
    if config.rollout_correction == "tis":
        rho = u.clamp(lo, hi)
        filtered = (u < lo) | (u > hi)
    else:  # icepop
        inside = (u >= lo) & (u <= hi)
        rho = torch.where(inside, u, 0.0)
        filtered = ~inside
    metrics = {
        "rollout/filter_frac": _fraction(filtered, known),
        "rollout/kl": (-is_log).sum().item() / max(int(known.sum()), 1),
    }
    return torch.where(known, rho, 1.0).detach(), metrics


@torch.no_grad()
def _policy_metrics(
    config: LossConfig, s: _Surrogate, adv: torch.Tensor, policy: torch.Tensor
) -> dict[str, float]:
    """``policy/clip_frac`` (OpenRLHF's clip_ratio), its low and high sides, the dual clip's
    share and ``policy/approx_kl``, over the policy tokens."""
    ratio = s.ratio
    dual = (
        (adv < 0) & (config.dual_clip * adv > s.clipped)
        if config.dual_clip is not None
        else torch.zeros_like(policy)
    )
    n_policy = int(policy.sum())
    return {
        "policy/clip_frac": _fraction(s.surr2 < s.surr1, policy),
        "policy/clip_frac_low": _fraction((ratio < 1.0 - config.eps_clip_low) & (adv < 0), policy),
        "policy/clip_frac_high": _fraction(
            (ratio > 1.0 + config.eps_clip_high) & (adv > 0), policy
        ),
        "policy/dual_clip_frac": _fraction(dual, policy),
        "policy/approx_kl": (-s.log_ratio * policy).sum().item() / n_policy if n_policy else 0.0,
    }


@torch.no_grad()
def _agent_metrics(
    config: LossConfig, coef: torch.Tensor, clipped: torch.Tensor, agent: torch.Tensor
) -> dict[str, float]:
    """``agent/coef_{mean,std,min,max}`` (the coefficient's value) and ``agent/clip_frac``."""
    if config.agent_mode == "mask":
        return {
            **{f"agent/coef_{k}": 0.0 for k in ("mean", "std", "min", "max")},
            "agent/clip_frac": 0.0,
        }
    return {
        **_masked_stats(coef, agent, "agent/coef"),
        "agent/clip_frac": _fraction(clipped, agent),
    }


def aipo_policy_loss(
    config: LossConfig,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    agent_mask: torch.Tensor,
    behavior_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizers: LossNormalizers | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The AIPO loss (module docstring) and its metrics.

    Args:
        logprobs: ``[B, T]`` log-probs of the taken tokens under the current policy (with grad).
        old_logprobs: ``[B, T]`` log-probs under the policy that sampled the batch (trainer side).
        advantages: ``[B]`` sequence advantages (broadcast over tokens) or ``[B, T]``.
        loss_mask: ``[B, T]`` float or bool, nonzero where the loss applies.
        agent_mask: ``[B, T]`` bool, True on agent-injected tokens.
        behavior_logprobs: ``[B, T]`` log-probs of agent tokens under the agent's model, NaN where
            unknown (then ``mu = 1``); None means unknown everywhere.
        rollout_logprobs: ``[B, T]`` the rollout engine's log-probs (needed for rollout_correction).
        ref_logprobs: ``[B, T]`` reference-policy log-probs (needed when kl_coef > 0).
        entropy: ``[B, T]`` per-token entropy of the current policy (needed when entropy_coef > 0).
        normalizers: the denominators counted over the whole minibatch this micro-batch is
            part of (:func:`loss_normalizers`); None counts them on this call's tensors.

    Returns:
        ``(loss, metrics)``: a scalar to minimise and a dict of floats, among them
        ``loss/total``, ``loss/policy``, ``loss/agent``, ``loss/kl``, ``loss/entropy``,
        ``policy/clip_frac`` (OpenRLHF's clip_ratio), ``policy/clip_frac_low``,
        ``policy/clip_frac_high``, ``policy/dual_clip_frac``, ``policy/approx_kl``,
        ``agent/coef_{mean,std,min,max}`` (the coefficient value, c or min(w, C)),
        ``agent/clip_frac``, ``tokens/policy``, ``tokens/agent``, ``tokens/agent_trained``,
        ``entropy/mean``, and for rollout correction ``rollout/filter_frac`` and ``rollout/kl``.
    """
    advantages = _check_shapes(
        logprobs,
        advantages,
        old_logprobs=old_logprobs,
        loss_mask=loss_mask,
        agent_mask=agent_mask,
        behavior_logprobs=behavior_logprobs,
        rollout_logprobs=rollout_logprobs,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    _check_needs(config, rollout_logprobs, ref_logprobs, entropy)
    policy, agent = masks.trained_token_masks(config.mask_rule(), loss_mask, agent_mask, advantages)
    trained = policy | agent
    logp = _zeros_where(trained, logprobs)
    adv = _zeros_where(loss_mask.bool(), advantages.to(logp.dtype))
    metrics: dict[str, float] = {}

    # Policy tokens: l = -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A) [* rho], as OpenRLHF.
    ppo = _ppo_surrogate(config, logp, old_logprobs, adv, policy)
    policy_loss = ppo.loss
    if config.rollout_correction != "none":
        assert rollout_logprobs is not None
        rho, rollout_metrics = _rollout_correction(
            config, policy, old_logprobs, rollout_logprobs, logp.dtype
        )
        policy_loss = policy_loss * rho
        metrics.update(rollout_metrics)
    policy_loss = _zeros_where(policy, policy_loss)

    # Agent tokens: l = -c A with the gradient-preserving clip (agent_mode).
    agent_loss, coef, agent_clipped = agent_token_terms(
        config, logprobs, behavior_logprobs, advantages, agent
    )
    agent_loss = agent_loss.to(policy_loss.dtype)

    # total = policy part + agent part + kl_coef KL - entropy_coef H (aggregation).
    aggregate = _aggregator(config, trained, "trained", logp.dtype, normalizers)
    if config.agent_normalization == "separate":
        policy_part = _aggregator(config, policy, "policy", logp.dtype, normalizers)(policy_loss)
        agent_part = _aggregator(config, agent, "agent", logp.dtype, normalizers)(agent_loss)
    else:
        policy_part, agent_part = aggregate(policy_loss), aggregate(agent_loss)
    total = policy_part + agent_part
    kl_part = torch.zeros((), dtype=total.dtype, device=total.device)
    if ref_logprobs is not None:
        ref = _zeros_where(trained, ref_logprobs.to(logp.dtype))
        kl_part = aggregate(_zeros_where(trained, _kl(logp - ref, config.kl_estimator)))
        if config.kl_coef > 0:
            total = total + config.kl_coef * kl_part
    entropy_part = torch.zeros_like(kl_part)
    if entropy is not None:
        entropy_part = aggregate(_zeros_where(trained, entropy.to(logp.dtype)))
        if config.entropy_coef > 0:
            total = total - config.entropy_coef * entropy_part

    metrics.update(_policy_metrics(config, ppo, adv, policy))
    metrics.update(_agent_metrics(config, coef, agent_clipped, agent))
    metrics.update(loss_token_counts(config, loss_mask, agent_mask, advantages))
    if entropy is not None:
        n_trained = int(trained.sum())
        ent = _zeros_where(trained, entropy.detach()).sum().item()
        metrics["entropy/mean"] = ent / n_trained if n_trained else 0.0
    metrics.update(
        {
            "loss/policy": policy_part.item(),
            "loss/agent": agent_part.item(),
            "loss/kl": kl_part.item(),
            "loss/entropy": entropy_part.item(),
            "loss/total": total.item(),
        }
    )
    return total, metrics


class AIPOLoss(nn.Module):
    """The AIPO loss as a module: ``forward`` returns ``(loss, metrics)``; see :func:`aipo_policy_loss`."""

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else LossConfig()

    @property
    def width_dependent(self) -> bool:
        """Whether the loss reads the padded width (``seq_sum_norm`` without a constant).

        :func:`trainers.update.ppo_update` then keeps every micro-batch at the batch's width.
        """
        c = self.config
        return c.aggregation == "seq_sum_norm" and c.seq_sum_norm_constant is None

    def normalizers(
        self, loss_mask: torch.Tensor, agent_mask: torch.Tensor, advantages: torch.Tensor
    ) -> LossNormalizers:
        """The minibatch's denominators (:func:`loss_normalizers`) under this loss's config.

        :func:`trainers.update.ppo_update` passes them to every micro-batch's call.
        """
        return loss_normalizers(self.config, loss_mask, agent_mask, advantages)

    def token_counts(
        self, loss_mask: torch.Tensor, agent_mask: torch.Tensor, advantages: torch.Tensor
    ) -> dict[str, float]:
        """The ``tokens/`` metrics of rows (:func:`loss_token_counts`), without a forward."""
        return loss_token_counts(self.config, loss_mask, agent_mask, advantages)

    def zero_gradient_rows(self, loss_mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: rows whose loss terms all have zero gradient, whatever their log-probs.

        A row qualifies when the advantage is exactly 0 on every token of ``loss_mask``
        and the loss has no term without the advantage (``kl_coef`` and ``entropy_coef``
        0). Then every policy token's surrogate is ``r * 0`` in each clip branch (dual clip
        and rollout correction multiply it), every agent token's term is ``c * 0`` or
        ``logp * 0`` (and with ``agent_positive_only`` the token is not trained at all),
        so the row adds 0 to the loss and to its gradient. It still counts in the
        normalisers (:meth:`normalizers`), which the trainer takes over the whole minibatch.
        """
        rows = loss_mask.shape[0]
        c = self.config
        if c.kl_coef > 0 or c.entropy_coef > 0:
            return torch.zeros(rows, dtype=torch.bool, device=loss_mask.device)
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(loss_mask.shape)
        return ((adv == 0) | (loss_mask == 0)).all(dim=1)

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        agent_mask: torch.Tensor,
        behavior_logprobs: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        normalizers: LossNormalizers | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss and float metrics for one micro-batch (tensor contract in the module docstring)."""
        return aipo_policy_loss(
            self.config,
            logprobs,
            old_logprobs,
            advantages,
            loss_mask,
            agent_mask,
            behavior_logprobs=behavior_logprobs,
            rollout_logprobs=rollout_logprobs,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            normalizers=normalizers,
        )
