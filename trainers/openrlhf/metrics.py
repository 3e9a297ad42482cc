"""AIPO's loss metrics in OpenRLHF's logged training status.

OpenRLHF 0.11.2 logs what ``ActorPPOTrainer.ppo_train`` (``openrlhf/trainer/ray/ppo_actor.py``)
returns: ``PolicyModelActor.fit`` hands that dict to the driver, which prints it every global
step and logs each key under ``train/`` (wandb, TensorBoard). Inside, ``training_step`` keeps
only the five values ``PolicyLoss.forward`` returns (loss, clip ratio, PPO KL, vLLM KL, IS
filter ratio), so anything else the loss computes never reaches the log. Two pieces close that
gap without editing OpenRLHF:

* :class:`LossStats`: running sums that :class:`~trainers.openrlhf.loss.AIPOPolicyLoss` adds to
  on every call, as tensors on the loss's device (no host sync per micro-batch);
* :func:`install_metrics`: wraps ``ActorPPOTrainer.ppo_train``. The wrapper clears the loss's
  stats, runs the stock method, reduces the stats over all ranks with the trainer's own
  ``strategy.all_reduce`` (two small collectives per training step) and adds
  :data:`METRIC_KEYS` to the status the stock method returned. ``AIPOPolicyLoss`` installs
  it when OpenRLHF builds the loss (in ``ActorPPOTrainer.__init__``, once ``ppo_actor`` is
  imported and before any ``ppo_train``), so it is present exactly where the loss is.

Why ``ppo_train`` and not ``training_step``: ``ppo_train`` is the one function whose return value
is the logged status, so wrapping it leaves the loss call, the backward pass and OpenRLHF's own
metrics untouched. ``training_step``'s status goes through ``ppo_train``'s reduction, a mean per
micro-batch weighted by its token (or sample) count, which cannot express a minimum, a maximum
or a mean over agent tokens; reducing sums once per step gives them exactly. Every rank runs
``ppo_train`` in lockstep (OpenRLHF already all-reduces inside it), so the wrapper's collectives
are matched on every rank.

The keys, named as the embedded trainer's loss names them (``trainers.losses.aipo_policy_loss``):

``agent/coef_mean``, ``agent/coef_min``, ``agent/coef_max``
    the agent-token coefficient (``clamp(f, w_min, w_max)`` or ``min(w, C)``) over the agent
    tokens the loss trained in this step; 0 when there were none.
``agent/clip_frac``
    the fraction of those tokens whose coefficient was clipped.
``agent/token_frac``
    trained agent tokens over all tokens the loss trained.
``tokens/agent_trained``, ``tokens/policy``
    trained agent and policy tokens per epoch, over all data-parallel ranks.
``policy/clip_frac``, ``policy/approx_kl``
    PPO clip fraction and ``mean(old_logp - logp)`` over policy tokens only. OpenRLHF's own
    ``ppo_clip_ratio`` and ``ppo_kl`` count every token the loss trains, agent tokens included
    (they have advantage 0 in the stock term, so they are never clipped there).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: The keys :func:`install_metrics` adds to OpenRLHF's training status.
METRIC_KEYS = (
    "agent/coef_mean",
    "agent/coef_min",
    "agent/coef_max",
    "agent/clip_frac",
    "agent/token_frac",
    "tokens/agent_trained",
    "tokens/policy",
    "policy/clip_frac",
    "policy/approx_kl",
)

#: Order of the summed statistics in :attr:`LossStats.sums`.
_SUMS = (
    "policy_tokens",
    "policy_clipped",
    "policy_neg_log_ratio",
    "agent_tokens",
    "agent_coef",
    "agent_clipped",
)

#: ``reduce(tensor, op)`` with op ``"sum"`` or ``"max"``, as OpenRLHF's ``strategy.all_reduce``.
AllReduce = Callable[[torch.Tensor, str], torch.Tensor]


class LossStats:
    """Sums of the AIPO loss's per-token statistics over the calls of one training step.

    Kept as float64 tensors on the device of the first call: :meth:`add_policy` and
    :meth:`add_agent` never synchronise with the host; :meth:`reduce` does, once.
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        #: ``[max coefficient, -min coefficient]`` (so one max-reduction gives both).
        self.extrema: torch.Tensor | None = None

    def clear(self) -> None:
        """Forget everything added (start of a training step)."""
        self.sums = None
        self.extrema = None

    def _add(self, index: int, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        if self.sums is None:
            self.sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=value.device)
        self.sums[index] += value

    def add_policy(
        self, tokens: torch.Tensor, clipped: torch.Tensor, neg_log_ratio: torch.Tensor
    ) -> None:
        """Add one call's policy tokens: their count, clipped count and sum of ``old_logp - logp``."""
        self._add(_SUMS.index("policy_tokens"), tokens)
        self._add(_SUMS.index("policy_clipped"), clipped)
        self._add(_SUMS.index("policy_neg_log_ratio"), neg_log_ratio)

    def add_agent(self, coef: torch.Tensor, clipped: torch.Tensor, trained: torch.Tensor) -> None:
        """Add one call's trained agent tokens (``trained``) with their coefficient and clip flags."""
        trained = trained.bool()
        coef = coef.detach().to(torch.float64)
        self._add(_SUMS.index("agent_tokens"), trained.sum())
        self._add(_SUMS.index("agent_coef"), torch.where(trained, coef, 0.0).sum())
        self._add(_SUMS.index("agent_clipped"), (clipped.bool() & trained).sum())
        if coef.numel() == 0:
            return
        extrema = torch.stack(
            [
                torch.where(trained, coef, -math.inf).amax(),
                torch.where(trained, -coef, -math.inf).amax(),
            ]
        )
        self.extrema = extrema if self.extrema is None else torch.maximum(self.extrema, extrema)

    def reduce(self, all_reduce: AllReduce | None = None) -> dict[str, float]:
        """The summed statistics over all ranks (``all_reduce`` None: this process only).

        Every rank must call it, also one that added nothing, so the collectives match.
        Returns the sums by name plus ``agent_coef_max`` and ``agent_coef_min`` (inf when
        no agent token was trained anywhere).
        """
        sums = self.sums if self.sums is not None else torch.zeros(len(_SUMS), dtype=torch.float64)
        extrema = self.extrema if self.extrema is not None else torch.full((2,), -math.inf)
        extrema = extrema.to(torch.float64)
        if all_reduce is not None:
            sums = all_reduce(sums.clone(), "sum")
            extrema = all_reduce(extrema.clone(), "max")
        reduced = dict(zip(_SUMS, sums.tolist(), strict=True))
        coef_max, neg_coef_min = extrema.tolist()
        reduced["agent_coef_max"] = coef_max
        reduced["agent_coef_min"] = -neg_coef_min
        return reduced


def status_metrics(
    reduced: Mapping[str, float], *, epochs: int = 1, copies: int = 1
) -> dict[str, float]:
    """The :data:`METRIC_KEYS` values from :meth:`LossStats.reduce`'s sums.

    ``epochs`` (passes over the rollout batch) and ``copies`` (ranks that see the same
    micro-batch: ring attention and tensor parallelism) turn summed counts into tokens
    per epoch over the data-parallel ranks; ratios need neither.
    """
    n_policy = reduced["policy_tokens"]
    n_agent = reduced["agent_tokens"]
    n_trained = n_policy + n_agent
    per_epoch = 1.0 / (max(epochs, 1) * max(copies, 1))

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else 0.0

    return {
        "agent/coef_mean": ratio(reduced["agent_coef"], n_agent),
        "agent/coef_min": reduced["agent_coef_min"] if n_agent > 0 else 0.0,
        "agent/coef_max": reduced["agent_coef_max"] if n_agent > 0 else 0.0,
        "agent/clip_frac": ratio(reduced["agent_clipped"], n_agent),
        "agent/token_frac": ratio(n_agent, n_trained),
        "tokens/agent_trained": n_agent * per_epoch,
        "tokens/policy": n_policy * per_epoch,
        "policy/clip_frac": ratio(reduced["policy_clipped"], n_policy),
        "policy/approx_kl": ratio(reduced["policy_neg_log_ratio"], n_policy),
    }


def _copies(args: Any) -> int:
    """Ranks that train on the same micro-batch (ring attention x DeepSpeed tensor parallel)."""
    ds = getattr(args, "ds", None)
    ring = int(getattr(ds, "ring_attn_size", 1) or 1)
    tp = int(getattr(ds, "tensor_parallel_size", 1) or 1)
    return ring * tp


def _with_aipo_metrics(ppo_train: Callable[..., dict]) -> Callable[..., dict]:
    """``ppo_train`` that adds :data:`METRIC_KEYS` to the status it returns."""

    warned = False

    @functools.wraps(ppo_train)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> dict:
        nonlocal warned
        stats = getattr(getattr(self, "actor_loss_fn", None), "stats", None)
        if not isinstance(stats, LossStats):
            if not warned:
                warned = True
                logger.warning(
                    "OpenRLHF's actor loss here is %s, not AIPO's: agent tokens are not trained "
                    "by the AIPO term (was the worker setup hook run?)",
                    type(getattr(self, "actor_loss_fn", None)).__name__,
                )
            return ppo_train(self, *args, **kwargs)
        stats.clear()
        status = ppo_train(self, *args, **kwargs)
        strategy = getattr(self, "strategy", None)
        reduced = stats.reduce(getattr(strategy, "all_reduce", None))
        stats.clear()
        metrics = status_metrics(
            reduced,
            epochs=int(getattr(self, "max_epochs", 1) or 1),
            copies=_copies(getattr(self, "args", None)),
        )
        return {**status, **metrics}

    wrapper.__aipo_wrapped__ = ppo_train  # type: ignore[attr-defined]
    return wrapper


def install_metrics(ppo_actor: ModuleType | None) -> bool:
    """Make ``ppo_actor.ActorPPOTrainer.ppo_train`` report :data:`METRIC_KEYS`; idempotent.

    ``ppo_actor`` is the imported ``openrlhf.trainer.ray.ppo_actor`` module.
    :class:`~trainers.openrlhf.loss.AIPOPolicyLoss` calls this when it is built, i.e. inside
    ``ActorPPOTrainer.__init__``, so no setup hook has to. The class attribute is replaced,
    so trainers built before the call are covered too; it must run before the first
    ``fit``. Returns False (changing nothing) when the module is None or has no
    ``ActorPPOTrainer.ppo_train``.
    """
    trainer_cls = getattr(ppo_actor, "ActorPPOTrainer", None)
    ppo_train = getattr(trainer_cls, "ppo_train", None)
    if trainer_cls is None or ppo_train is None:
        return False
    if hasattr(ppo_train, "__aipo_wrapped__"):
        return True
    trainer_cls.ppo_train = _with_aipo_metrics(ppo_train)
    logger.warning(
        "AIPO loss metrics (%s) added to OpenRLHF's training status (ActorPPOTrainer.ppo_train)",
        ", ".join(METRIC_KEYS),
    )
    return True
