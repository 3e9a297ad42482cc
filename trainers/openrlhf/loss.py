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
numerator), and adds the agent-token term of :mod:`trainers.losses` aggregated with
OpenRLHF's own ``aggregate_loss``. The agent-token term is
:func:`trainers.losses.agent_token_terms`, the embedded trainer's own, configured by the
same :class:`~trainers.losses.LossConfig` fields (:data:`AGENT_TOKEN_FIELDS`). In mode
``mask`` it is the stock ``PolicyLoss`` call, unchanged.

Normalisation (``agent_normalization``). ``shared``: both terms over the trained tokens with
OpenRLHF's normalisers (``batch_num_tokens``, ``global_batch_size``), which OpenRLHF counts
over every action token of the optimizer step. ``separate``: the stock term over the policy
tokens only and the agent term over the trained agent tokens only, each with the step's own
global counts. OpenRLHF counts only ``action_mask``, so :func:`install_separate_normalizers`
wraps ``ppo_actor.iter_grad_accum_global_norm`` (the per-step counting of the non-dynamic
path) to count the two sets too, with OpenRLHF's ``_optimizer_step_loss_norm`` (all-reduced
over data-parallel ranks, divided by the accumulation steps), and hands them to the loss of
the micro-batch it yields next. Dynamic batching counts elsewhere and is refused with
``separate`` (:class:`~trainers.openrlhf.config.OpenRLHFRecipe`). Called without OpenRLHF's
global counts (tests), ``separate`` counts the micro-batch's own tokens.

Every call adds its statistics to ``loss.stats`` (:class:`~trainers.openrlhf.metrics.LossStats`):
the agent-token coefficient, its clip fraction, and the PPO clip fraction and approximate KL of
the policy tokens alone; :func:`trainers.openrlhf.metrics.install_metrics` puts them in
OpenRLHF's logged status. A micro-batch without a trained token (every sample in it a failed
episode) returns a clip ratio and KL of 0 instead of the stock 0/0 = NaN, which would turn the
whole step's all-reduced ``ppo_clip_ratio`` and ``ppo_kl`` into NaN on every rank.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
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
    "agent_normalization",
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


#: The separate normalisers of the micro-batch whose training step runs next, set by the
#: wrapped ``iter_grad_accum_global_norm`` just before it yields that micro-batch:
#: ``(action_mask shape, policy normalisers, agent normalisers)``.
_next_separate: list[tuple[torch.Size, dict[str, Any], dict[str, Any]]] = []


def _split_masks(config: LossConfig, experience: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained policy and agent tokens of one OpenRLHF ``Experience``, as the loss sees them."""
    action_mask = experience.action_mask
    rollout = getattr(experience, "rollout_log_probs", None)
    if rollout is None:
        agent_flag = torch.zeros_like(action_mask, dtype=torch.bool)
    else:
        agent_flag = decode_rollout_log_probs(rollout)[0]
    return trained_token_masks(config.mask_rule(), action_mask, agent_flag, experience.advantages)


def separate_step_normalizers(
    config: LossConfig, experiences: list[Any], strategy: Any, gas: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenRLHF's normalisers of one optimizer step, over its policy tokens and its agent tokens.

    ``experiences`` are the step's micro-batches on this rank; the counts are summed over
    them and all data-parallel ranks and divided by ``gas``, exactly as OpenRLHF counts
    ``action_mask`` (``_optimizer_step_loss_norm``), and kept at least one token (sequence)
    so a step without agent tokens gives a zero term, not 0/0.
    """
    import torch.distributed as dist
    from openrlhf.utils import loss_utils

    dp_group = loss_utils._get_dp_group(strategy)
    dp_size = (
        dist.get_world_size(group=dp_group) if dist.is_available() and dist.is_initialized() else 1
    )
    split = [_split_masks(config, e) for e in experiences]
    infos = []
    for masks in ([p for p, _ in split], [a for _, a in split]):
        info = loss_utils._optimizer_step_loss_norm(masks, dp_group, dp_size, gas)
        info["batch_num_tokens"] = info["batch_num_tokens"].clamp(min=1.0 / gas)
        info["global_batch_size"] = info["global_batch_size"].clamp(min=1.0 / gas)
        infos.append(info)
    return infos[0], infos[1]


def install_separate_normalizers(ppo_actor: ModuleType | None, config: LossConfig) -> bool:
    """Make ``ppo_actor``'s per-step counting also count policy and agent tokens apart.

    Replaces ``iter_grad_accum_global_norm`` where ``ActorPPOTrainer.ppo_train`` looks it
    up (its globals: the module's namespace; idempotent, ``config`` is the latest loss's)
    by a wrapper that takes each optimizer step's micro-batches from the stock iterator,
    counts them with :func:`separate_step_normalizers`, and puts the counts in
    :data:`_next_separate` before yielding each micro-batch to the training step that
    calls the loss. Returns False (changing nothing) when the module is None or the name
    is not there.
    """
    if ppo_actor is None:
        return False
    ppo_train = getattr(getattr(ppo_actor, "ActorPPOTrainer", None), "ppo_train", None)
    # The stock ppo_train, under install_metrics's wrapper: the namespace it reads names from.
    namespace = (
        getattr(ppo_train, "__aipo_wrapped__", ppo_train).__globals__
        if ppo_train is not None
        else vars(ppo_actor)
    )
    original = namespace.get("iter_grad_accum_global_norm")
    if original is None:
        return False
    original = getattr(original, "__aipo_wrapped__", original)

    def iterate(
        data_iter: Any, strategy: Any, accumulated_gradient: int, mask_fn: Callable[[Any], Any]
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        gas = max(int(accumulated_gradient), 1)
        stock = original(data_iter, strategy, accumulated_gradient, mask_fn)
        # The stock iterator yields one step's gas micro-batches after reading all of them,
        # so taking gas at a time reads no further than it does.
        while window := list(itertools.islice(stock, gas)):
            policy, agent = separate_step_normalizers(
                config, [item for item, _ in window], strategy, gas
            )
            for item, info in window:
                _next_separate[:] = [(item.action_mask.shape, policy, agent)]
                yield item, info

    iterate.__aipo_wrapped__ = original  # type: ignore[attr-defined]
    namespace["iter_grad_accum_global_norm"] = iterate
    return True


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
            ppo_actor = sys.modules.get(PPO_ACTOR_MODULE)
            install_metrics(ppo_actor)
            if self._separate():
                install_separate_normalizers(ppo_actor, self.agent_loss)
            # WARNING, not INFO: Ray workers have no handler, and this line is the evidence
            # in a worker's log that the AIPO term is the one being trained.
            logger.warning(
                "AIPO policy loss built in this worker: agent_mode=%s (%s)",
                self.agent_loss.agent_mode,
                "agent tokens trained through the AIPO coefficient"
                if self.agent_loss.trains_agent_tokens()
                else "agent tokens not trained; stock PPO on policy tokens",
            )

        def _separate(self) -> bool:
            return (
                self.agent_loss.trains_agent_tokens()
                and self.agent_loss.agent_normalization == "separate"
            )

        def _separate_normalizers(
            self,
            action_mask: torch.Tensor,
            policy: torch.Tensor,
            agent: torch.Tensor,
            stock: dict[str, Any],
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            """The policy term's and the agent term's normalisers (module docstring)."""
            if stock["batch_num_tokens"] is None and stock["global_batch_size"] is None:
                # No global counts (a direct call): this micro-batch's own, as masked means.
                return tuple(  # type: ignore[return-value]
                    dict(
                        dp_size=stock["dp_size"],
                        batch_num_tokens=mask.sum().clamp(min=1).float(),
                        global_batch_size=mask.any(dim=-1).sum().clamp(min=1).float(),
                    )
                    for mask in (policy, agent)
                )
            pending = _next_separate[:]
            _next_separate.clear()
            if not pending or pending[0][0] != action_mask.shape:
                raise RuntimeError(
                    "agent_normalization 'separate' needs the optimizer step's policy and agent "
                    "token counts, which the wrapped ppo_actor.iter_grad_accum_global_norm "
                    "provides; none came for this micro-batch (dynamic batching counts "
                    "elsewhere): set agent_loss.agent_normalization: shared"
                )
            _, policy_info, agent_info = pending[0]
            return policy_info, agent_info

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
            if self._separate():
                # Each term over its own tokens, with the step's own counts of them.
                policy_norm, agent_norm = self._separate_normalizers(
                    action_mask, policy, agent, stock
                )
                policy_over, agent_over = policy.to(action_mask.dtype), agent.to(action_mask.dtype)
            else:
                # The loss's own mask: agent tokens that agent_positive_only leaves out are not
                # counted either, as in the embedded trainer (a global batch_num_tokens, counted
                # by OpenRLHF before the loss, still includes them).
                policy_norm = agent_norm = stock
                policy_over = agent_over = (policy | agent).to(action_mask.dtype)
            # Agent tokens: zero advantage and a neutral rollout log-prob in the stock
            # term, so they add nothing there (and, shared, still count in its normalisation).
            policy_adv = torch.where(agent_mask, torch.zeros_like(advantages), advantages)
            policy_rollout = torch.where(agent_mask, old_log_probs.detach(), policy_rollout)
            loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = super().forward(
                log_probs, old_log_probs, policy_adv, policy_over, policy_rollout, **policy_norm
            )
            per_token, coef, clipped = agent_token_terms(
                self.agent_loss, log_probs, behavior, advantages, agent
            )
            loss = loss + aggregate_loss(
                per_token, agent_over, token_level_loss=self.token_level_loss, **agent_norm
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
