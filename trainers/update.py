"""One policy update: PPO epochs over shuffled minibatches with gradient accumulation.

The algorithm box (:func:`ppo_update`)::

    if every row's gradient is zero: return (skipped)
    for epoch in 1..ppo_epochs:
        shuffle the B rows (seeded)
        for each minibatch of `minibatch_size` rows:
            counts = loss_fn.normalizers(minibatch)        # if the loss has them
            leave out the rows whose gradient is zero      # still in counts and shares
            for each micro-batch of `micro_batch_size` rows (a prompt's samples together):
                logp, H = token_logprobs(model, micro, where=loss_mask)  # aligned with input_ids
                loss_micro = loss_fn(logp, old_logp, A, masks, ..., counts)
                backward(loss_micro * weight(micro))   # accumulate; weight 1 with counts
            if loss or grad-norm is not finite: drop the gradient, dump the minibatch
            else: clip grad-norm, optimizer.step(), scheduler.step()

Gradient accumulation is exact. A loss that counts its denominators over the whole
minibatch (one with a ``normalizers`` method, as ``trainers.losses.AIPOLoss``) gets
those counts once per minibatch and passes them to every micro-batch's call
(``normalizers=``): each micro loss is then already its part of the minibatch loss, and
the parts add up with weight 1, under every ``aggregation`` and ``agent_normalization``
(the policy and agent tokens normalised apart need two counts, which no single weight
per micro-batch could apply). Any other loss's micro-batch is scaled by its share of
the minibatch, so the accumulated gradient equals the gradient of the loss computed on
the whole minibatch at once:

- ``accumulation="tokens"`` (for token-mean aggregation, DAPO): the share is
  ``micro trained tokens / minibatch trained tokens`` (trained = ``loss_mask`` sum).
  Since ``mean over minibatch tokens = sum_micro (n_micro / n_mini) * mean over micro tokens``,
  the sum of the scaled micro losses is the minibatch token-mean loss.
- ``accumulation="rows"`` (for sequence-mean-token-mean, GRPO, or a per-row normalised
  sum, Dr.GRPO): the share is ``micro rows / minibatch rows``.

All tensors stay aligned with ``input_ids`` (``[B, T]``, position ``t`` describes token
``t``); the one-token shift is done once, inside :func:`trainers.logprobs.token_logprobs`.

The samples of one prompt share a micro-batch, and the prompt goes through the decoder
once for all of them (:func:`micro_batches`, ``token_logprobs(prefix_groups=)``): with
a GRPO group of n samples the prompt costs one forward and backward instead of n.

Memory: each micro-batch's rows can run as one packed sequence without padding
(``pack``, :mod:`trainers.packing`), with each decoder layer recomputed in backward
instead of keeping its activations (``checkpoint_layers``), and the output head runs in
chunks of ``chunk_size`` positions whose logits are never kept
(:func:`trainers.logprobs.selected_logprobs`). Each is the same gradient up to rounding.

Zero gradients: a row whose every trained token has advantage exactly 0 (a group whose
rewards are all equal, under GRPO, Dr. GRPO or RLOO) adds nothing to the loss or its
gradient when the loss has no term without the advantage (no KL, no entropy bonus; the
loss says so: :func:`zero_gradient_rows`). Such rows never reach the model, but they
stay in the minibatch's counts (the normalisers and the micro-batch shares), which is
what keeps the other rows' gradient exactly as before.

Log-probs (old, reference and current) and entropy are computed only where ``loss_mask``
is nonzero and hold 0 elsewhere: the loss, each of its metrics and the KL term read them
only on trained tokens (policy tokens and the agent tokens the mode trains, both inside
``loss_mask``), so prompt positions never reach the model's output head.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from trainers.logprobs import HEAD_CHUNK, token_logprobs

logger = logging.getLogger(__name__)

#: ``loss_fn(**tensors) -> (scalar loss, metrics)``; the signature of ``trainers.losses.AIPOLoss``.
LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass
class UpdateBatch:
    """The aligned ``[B, T]`` tensors one policy update trains on.

    Every per-token tensor is aligned with ``input_ids`` (not shifted), as in
    :class:`aipo_env.batch.TrajectoryBatch`.
    """

    input_ids: torch.Tensor  #: [B, T] long
    attention_mask: torch.Tensor  #: [B, T]; 1 on real tokens
    loss_mask: torch.Tensor  #: [B, T] float; 1 where the loss applies
    agent_mask: torch.Tensor  #: [B, T] bool; True on agent-produced tokens
    behavior_logprobs: torch.Tensor  #: [B, T] float; NaN where unknown
    advantages: torch.Tensor  #: [B] or [B, T] float
    #: [B, T] float; the policy before this update (no grad). None: on-policy, the
    #: update's own first forward gives them (:func:`on_policy_update`).
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None = None  #: [B, T] float; reference model, for a KL term
    rewards: torch.Tensor | None = None  #: [B] float; only used in non-finite dumps

    @classmethod
    def from_trajectory_batch(
        cls,
        batch,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> UpdateBatch:
        """Take the aligned tensors of a :class:`aipo_env.batch.TrajectoryBatch`."""
        return cls(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            loss_mask=batch.loss_mask,
            agent_mask=batch.agent_mask,
            behavior_logprobs=batch.behavior_logprobs,
            advantages=advantages,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            rewards=batch.rewards,
        )

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("advantages", "rewards"):
                continue
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"UpdateBatch.{f.name} has shape {tuple(value.shape)}; expected {shape} "
                    "(aligned with input_ids)"
                )
        if self.advantages.shape[0] != shape[0]:
            raise ValueError(
                f"advantages has {self.advantages.shape[0]} rows; expected {shape[0]} ([B] or [B, T])"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor) -> UpdateBatch:
        """The rows ``rows`` (an index tensor) of every tensor."""
        picked = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows])
            for f in fields(self)
        }
        return replace(self, **picked)

    def trained_tokens(self) -> float:
        """Number of tokens the loss applies to (the ``loss_mask`` sum)."""
        return float(self.loss_mask.sum())

    def trimmed(self) -> UpdateBatch:
        """Without the trailing columns that are padding in every row (a narrower forward).

        Exact for a causal model: a position never attends to a later one, so columns
        after every row's last real token change nothing before them.
        """
        width = _real_width(self.attention_mask)
        if width == self.input_ids.shape[1]:
            return self
        cut = {
            f.name: getattr(self, f.name)[:, :width]
            for f in fields(self)
            if getattr(self, f.name) is not None and getattr(self, f.name).dim() == 2
        }
        return replace(self, **cut)


def _real_width(attention_mask: torch.Tensor) -> int:
    """One past the last column with a real token in any row."""
    real = attention_mask.bool().any(dim=0).nonzero()
    return int(real[-1]) + 1 if real.numel() else 1


def _by_length(attention_mask: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Row indices in chunks of ``size``, rows of similar length together (less padding)."""
    order = torch.argsort(attention_mask.sum(dim=1), stable=True)
    yield from _chunks(order, size)


def micro_batches(
    batch: UpdateBatch, size: int, share_prefix: bool = True
) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]] | None]]:
    """Each micro-batch's row indices, with the prefix groups of its rows (None: no sharing).

    With ``share_prefix``, rows that hold the same real tokens before their first
    trained one (the samples of one prompt) stay together, consecutive, and each such
    block is a prefix group ``(K, n)`` of :func:`~trainers.logprobs.token_logprobs`:
    ``n`` rows whose first ``K`` tokens the decoder runs once. Blocks of similar length
    are packed into micro-batches of at most ``size`` rows. The other rows, and all rows
    without ``share_prefix``, go by length (:func:`_by_length`).
    """
    alone: list[int] = []
    blocks: list[tuple[int, torch.Tensor]] = []  # (K, rows), at most `size` rows each
    if share_prefix:
        trained = batch.loss_mask != 0
        width = trained.shape[1]
        first = torch.where(trained.any(dim=1), trained.int().argmax(dim=1), width).tolist()
        real = batch.attention_mask.bool()
        prompts: dict[tuple[int, ...], list[int]] = {}
        for row, start in enumerate(first):
            if 1 < start < width and bool(real[row, :start].all()):
                prompts.setdefault(tuple(batch.input_ids[row, :start].tolist()), []).append(row)
            else:
                alone.append(row)
        for prompt, rows in prompts.items():
            index = torch.tensor(rows, device=batch.input_ids.device)
            for chunk in _by_length(batch.attention_mask[index], size):
                if chunk.numel() == 1:
                    alone.append(int(index[chunk]))
                else:  # the state at the prompt's last token predicts the first trained one
                    blocks.append((len(prompt) - 1, index[chunk]))
    else:
        alone = list(range(len(batch)))
    lengths = batch.attention_mask.sum(dim=1)
    blocks.sort(key=lambda block: int(lengths[block[1]].max()))
    packs: list[list[tuple[int, torch.Tensor]]] = []
    for block in blocks:
        if packs and sum(len(rows) for _, rows in packs[-1]) + len(block[1]) <= size:
            packs[-1].append(block)
        else:
            packs.append([block])
    for pack in packs:
        yield torch.cat([rows for _, rows in pack]), [(k, len(rows)) for k, rows in pack]
    if alone:
        index = torch.tensor(sorted(alone), device=batch.input_ids.device)
        for chunk in _by_length(batch.attention_mask[index], size):
            yield index[chunk], None


@dataclass
class UpdateStats:
    """What one :func:`ppo_update` did, averaged over its optimizer steps."""

    loss: float = float("nan")  #: mean minibatch loss over applied optimizer steps
    grad_norm: float = float("nan")  #: mean pre-clip gradient norm over applied steps
    lr: float = float("nan")  #: learning rate of the last applied step
    optimizer_steps: int = 0  #: optimizer steps applied
    skipped_steps: int = 0  #: steps dropped because the loss or gradient norm was not finite
    #: minibatches with nothing to train: no trained token, or a zero gradient on every
    #: row (:func:`zero_gradient_rows`); no forward, no optimizer step
    empty_minibatches: int = 0
    #: rows of the batch left out of every forward and backward: their gradient is zero
    skipped_rows: int = 0
    #: 1 when every row's gradient is zero: no forward, backward or optimizer step at all
    skipped: int = 0
    dumps: list[str] = field(default_factory=list)  #: files written for non-finite steps
    loss_metrics: dict[str, float] = field(default_factory=dict)  #: loss_fn metrics, averaged

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalar metrics for a logger (``prefix`` prepended to every name)."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("dumps", "loss_metrics")}
        flat.update(self.loss_metrics)
        return {f"{prefix}{k}": float(v) for k, v in flat.items()}


def on_policy_update(model: nn.Module, rows: int, ppo_epochs: int, minibatch_size: int) -> bool:
    """Whether the update's own first forward can stand in for the old log-probs.

    True when the batch makes exactly one optimizer step (one epoch, one minibatch), so
    every micro-batch's forward runs on the weights the rollout used, and the model has
    no active dropout (the old log-probs are an eval-mode forward). Then a separate
    no-grad forward over the batch (:func:`compute_old_logprobs`) computes the same
    numbers a second time.
    """
    if ppo_epochs != 1 or rows > minibatch_size:
        return False
    config = getattr(model, "config", None)
    dropouts = [getattr(config, k, 0.0) or 0.0 for k in ("attention_dropout", "hidden_dropout")]
    modules = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    return not any(p > 0 for p in dropouts + modules)


@torch.no_grad()
def compute_old_logprobs(
    model: nn.Module,
    batch,
    micro_batch_size: int,
    *,
    chunk_size: int | None = HEAD_CHUNK,
    pack: bool = False,
) -> torch.Tensor:
    """Log-probs of ``batch.input_ids`` under ``model`` without gradient, ``[B, T]`` float32.

    Works for the policy (old log-probs) and for a frozen reference model (KL term).
    ``batch`` needs ``input_ids`` and ``attention_mask`` (a ``TrajectoryBatch`` or an
    :class:`UpdateBatch`). Only the tokens ``batch.loss_mask`` marks get a log-prob (0
    elsewhere), since the loss reads old and reference log-probs nowhere else; a batch
    without ``loss_mask`` gets every real token. ``pack``: each micro-batch's rows as one
    sequence without padding (:mod:`trainers.packing`). The model's train/eval mode is
    restored afterwards.
    """
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    was_training = model.training
    model.eval()
    try:
        loss_mask = getattr(batch, "loss_mask", None)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
        # Rows of similar length share a micro-batch, cut to its own longest row.
        for rows in _by_length(batch.attention_mask, micro_batch_size):
            attention = batch.attention_mask[rows]
            width = _real_width(attention)
            logprobs, _ = token_logprobs(
                model,
                batch.input_ids[rows, :width],
                attention[:, :width],
                positions=None if loss_mask is None else loss_mask[rows, :width] != 0,
                chunk_size=chunk_size,
                pack=pack,
            )
            out[rows, :width] = logprobs.float()
        return out
    finally:
        model.train(was_training)


def zero_gradient_rows(loss_fn: LossFn, batch: UpdateBatch) -> torch.Tensor | None:
    """``[B]`` bool, True on rows whose every term of ``loss_fn`` has zero gradient; None: unknown.

    Asked of the loss (``loss_fn.zero_gradient_rows(loss_mask, advantages)``, as
    :meth:`trainers.losses.AIPOLoss.zero_gradient_rows`); a loss without that method
    never has rows skipped.
    """
    rule = getattr(loss_fn, "zero_gradient_rows", None)
    if rule is None:
        return None
    return rule(batch.loss_mask, batch.advantages).to(torch.bool)


def _chunks(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, rows.numel(), size):
        yield rows[start : start + size]


def _dump_nonfinite(
    dump_dir: Path, name: str, batch: UpdateBatch, reason: str, loss: float, grad_norm: float
) -> Path:
    """Write the offending minibatch (ids, masks, rewards, ...) for later inspection."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    path = dump_dir / f"{name}.pt"
    tensors = {
        f.name: getattr(batch, f.name).detach().cpu()
        for f in fields(batch)
        if getattr(batch, f.name) is not None
    }
    torch.save({"reason": reason, "loss": loss, "grad_norm": grad_norm, **tensors}, path)
    (dump_dir / f"{name}.json").write_text(
        json.dumps(
            {
                "reason": reason,
                "loss": None if not math.isfinite(loss) else loss,
                "grad_norm": None if not math.isfinite(grad_norm) else grad_norm,
                "tensors": str(path.name),
            }
        )
    )
    return path


def _token_counts(loss_fn: LossFn, rows: UpdateBatch) -> dict[str, float]:
    """The loss's token counts (its ``tokens/`` metrics) of rows that skip the forward.

    Asked of the loss (``loss_fn.token_counts(loss_mask, agent_mask, advantages)``, as
    :meth:`trainers.losses.AIPOLoss.token_counts`), so the update's ``tokens/`` metrics
    count every row of the minibatch, as they do without skipping; none for another loss.
    """
    count = getattr(loss_fn, "token_counts", None)
    if count is None:
        return {}
    return dict(count(rows.loss_mask, rows.agent_mask, rows.advantages))


@dataclass(frozen=True)
class ForwardOptions:
    """How the micro-batches of a minibatch are formed and run (:func:`ppo_update`'s arguments).

    None of them changes the gradient beyond float rounding; ``accumulation`` decides how
    micro losses are weighted (module docstring).
    """

    micro_batch_size: int
    accumulation: Literal["tokens", "rows"] = "tokens"
    with_entropy: bool = False
    chunk_size: int | None = HEAD_CHUNK
    share_prefix: bool = True
    pack: bool = False
    checkpoint_layers: bool = False


def _micro_loss(
    model: nn.Module,
    micro: UpdateBatch,
    loss_fn: LossFn,
    forward: ForwardOptions,
    prefix_groups: Any,
    extra: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's forward and loss: ``loss_fn`` on its log-probs (and entropy)."""
    logprobs, entropy = token_logprobs(
        model,
        micro.input_ids,
        micro.attention_mask,
        positions=micro.loss_mask != 0,
        with_entropy=forward.with_entropy,
        chunk_size=forward.chunk_size,
        prefix_groups=prefix_groups,
        pack=forward.pack,
        checkpoint_layers=forward.checkpoint_layers,
    )
    # On-policy (no old log-probs): the weights have not moved since the rollout's
    # last publish, so this forward's log-probs, detached, are the old ones.
    old = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs
    return loss_fn(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=micro.advantages,
        loss_mask=micro.loss_mask,
        agent_mask=micro.agent_mask,
        behavior_logprobs=micro.behavior_logprobs,
        # The rollout engine's log-prob of each policy token is its behaviour
        # log-prob; the loss's rollout correction (TIS/ICEPOP) reads it.
        rollout_logprobs=micro.behavior_logprobs,
        ref_logprobs=micro.ref_logprobs,
        entropy=entropy,
        **extra,
    )


def _accumulate_gradients(
    model: nn.Module, minibatch: UpdateBatch, loss_fn: LossFn, forward: ForwardOptions
) -> tuple[float, dict[str, float], bool] | None:
    """Backward every micro-batch's share of the minibatch loss (module docstring).

    Returns the minibatch loss, its loss metrics (token counts and, with normalizers, the
    loss parts summed; the other metrics weighted by the micro-batch's share) and whether
    every micro loss was finite; stops at the first non-finite one. None when no row of
    the minibatch has a gradient (:func:`zero_gradient_rows`): nothing ran.

    Rows with a zero gradient stay out of the forward and backward, but not out of the
    counts: the loss's normalizers and the micro-batches' shares are taken over the whole
    minibatch, so the other rows' gradient is exactly what it is with them. The token
    counts among the metrics include them (:func:`_token_counts`); the averaged metrics
    (clip fractions, ratios) cover the rows that ran.
    """
    count = getattr(loss_fn, "normalizers", None)
    normalizers = (
        count(minibatch.loss_mask, minibatch.agent_mask, minibatch.advantages)
        if count is not None
        else None
    )
    extra = {} if normalizers is None else {"normalizers": normalizers}
    additive = ("tokens/",) if normalizers is None else ("tokens/", "loss/")
    mb_tokens = minibatch.trained_tokens()
    mb_rows = len(minibatch)
    zero = zero_gradient_rows(loss_fn, minibatch)
    live = minibatch
    mb_metrics: dict[str, float] = defaultdict(float)
    if zero is not None and bool(zero.any()):
        if bool(zero.all()):
            return None
        live = minibatch.select((~zero).nonzero(as_tuple=True)[0])
        skipped = minibatch.select(zero.nonzero(as_tuple=True)[0])
        mb_metrics.update(_token_counts(loss_fn, skipped))
    mb_loss, shares = 0.0, 0.0
    # Rows of similar length share a micro-batch, cut to its own longest row: the sum of
    # the micro-batches' gradients does not depend on how the rows are grouped. A loss
    # normalised by the padded width keeps it.
    trim = not getattr(loss_fn, "width_dependent", False)
    for rows, prefix_groups in micro_batches(live, forward.micro_batch_size, forward.share_prefix):
        micro = live.select(rows).trimmed() if trim else live.select(rows)
        if forward.accumulation == "tokens":
            micro_tokens = micro.trained_tokens()
            if micro_tokens == 0:  # weight 0: contributes nothing to the gradient
                continue
            share = micro_tokens / mb_tokens
        else:
            share = len(micro) / mb_rows
        # With the minibatch's counts, the micro loss already is its part of the minibatch's.
        weight = share if normalizers is None else 1.0
        loss, metrics = _micro_loss(model, micro, loss_fn, forward, prefix_groups, extra)
        if not torch.isfinite(loss.detach()).all():
            return float(loss.detach()), dict(mb_metrics), False
        (loss * weight).backward()
        mb_loss += float(loss.detach()) * weight
        shares += share
        for key, value in metrics.items():
            # Token counts add up over the micro-batches, and so do the loss parts when the
            # minibatch's counts normalised them; every other metric is a mean, weighted by
            # the micro-batch's share.
            mb_metrics[key] += float(value) * (1.0 if key.startswith(additive) else share)
    if live is not minibatch and shares > 0:  # means over the rows that ran
        for key in mb_metrics:
            if not key.startswith(additive):
                mb_metrics[key] /= shares
    return mb_loss, dict(mb_metrics), True


def _check_update_arguments(
    ppo_epochs: int, minibatch_size: int, micro_batch_size: int, accumulation: str
) -> None:
    if ppo_epochs < 1 or minibatch_size < 1 or micro_batch_size < 1:
        raise ValueError(
            f"ppo_epochs={ppo_epochs}, minibatch_size={minibatch_size}, "
            f"micro_batch_size={micro_batch_size}; expected all >= 1"
        )
    if accumulation not in ("tokens", "rows"):
        raise ValueError(f"unknown accumulation {accumulation!r}; expected 'tokens' or 'rows'")


def _nothing_to_train(loss_fn: LossFn, batch: UpdateBatch, minibatch_size: int) -> UpdateStats:
    """The batch's zero-gradient rows counted; ``skipped`` set (with the token counts an
    update would report) when no row has a gradient, so the update need not run."""
    stats = UpdateStats()
    zero = zero_gradient_rows(loss_fn, batch)
    if zero is None:
        return stats
    stats.skipped_rows = int(zero.sum())
    if len(batch) and bool(zero.all()):
        stats.skipped = 1
        # The token counts of a minibatch, on average, as an update that ran reports them.
        minibatches = math.ceil(len(batch) / minibatch_size) if minibatch_size > 0 else 1
        counts = _token_counts(loss_fn, batch)
        stats.loss_metrics = {k: v / minibatches for k, v in counts.items()}
    return stats


def _clipped_grad_norm(
    params: list[nn.Parameter],
    clip_to: float,
    optimizer: torch.optim.Optimizer,
    stats: UpdateStats,
    finite_loss: bool,
    mb_loss: float,
    dump: tuple[Path | None, str, UpdateBatch],
) -> float | None:
    """The minibatch's gradient norm, clipped to ``clip_to``; None when the step is dropped.

    A non-finite loss or norm drops the gradient (the optimizer and its moment estimates
    never see it), counts the step in ``stats.skipped_steps`` and saves the minibatch
    where ``dump`` names a folder.
    """
    reason = None if finite_loss else "loss"
    grad_norm = float("nan")
    if reason is None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_to))
        reason = None if math.isfinite(grad_norm) else "grad_norm"
    if reason is None:
        return grad_norm
    optimizer.zero_grad(set_to_none=True)
    stats.skipped_steps += 1
    dump_dir, name, minibatch = dump
    logger.warning(
        "skipped optimizer step %s: non-finite %s (loss=%s, grad_norm=%s)",
        name,
        reason,
        mb_loss,
        grad_norm,
    )
    if dump_dir is not None:
        path = _dump_nonfinite(dump_dir, name, minibatch, reason, mb_loss, grad_norm)
        stats.dumps.append(str(path))
    return None


def ppo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    batch: UpdateBatch,
    loss_fn: LossFn,
    *,
    ppo_epochs: int,
    minibatch_size: int,
    micro_batch_size: int,
    max_grad_norm: float | None,
    seed: int = 0,
    accumulation: Literal["tokens", "rows"] = "tokens",
    with_entropy: bool = False,
    chunk_size: int | None = HEAD_CHUNK,
    dump_dir: str | Path | None = None,
    update_index: int = 0,
    share_prefix: bool = True,
    pack: bool = False,
    checkpoint_layers: bool = False,
) -> UpdateStats:
    """Run ``ppo_epochs`` passes of minibatch SGD on ``batch``; return averaged stats.

    Args:
        model: the policy; put in train mode for the update.
        optimizer: steps once per minibatch.
        scheduler: steps after each applied optimizer step (``None``: no schedule).
        batch: aligned tensors (see :class:`UpdateBatch`).
        loss_fn: called as ``loss_fn(logprobs=, old_logprobs=, advantages=, loss_mask=,
            agent_mask=, behavior_logprobs=, rollout_logprobs=, ref_logprobs=, entropy=)`` on a micro-batch;
            returns ``(scalar loss, metrics dict)``. ``logprobs`` and ``entropy`` are 0
            where ``loss_mask`` is 0: the loss must read them only under its mask. A loss
            with a ``normalizers(loss_mask, agent_mask, advantages)`` method also gets
            ``normalizers=``, its result on the minibatch (module docstring).
        ppo_epochs: passes over the batch.
        minibatch_size: rows per optimizer step (the last minibatch may be smaller).
        micro_batch_size: rows per forward/backward; gradients accumulate over a minibatch.
        max_grad_norm: clip the gradient norm to this (``None``: measure, do not clip).
        seed: seeds the row shuffle; derive it from the run seed and the update index so
            a resumed run shuffles exactly as an uninterrupted one.
        accumulation: how micro losses are weighted (module docstring): ``"tokens"``
            for token-mean losses, ``"rows"`` for per-sequence-mean losses.
        with_entropy: compute per-token entropy and pass it to ``loss_fn``.
        chunk_size: positions per chunk of the output head
            (:func:`trainers.logprobs.selected_logprobs`).
        dump_dir: where a minibatch with a non-finite loss or gradient norm is saved
            (``None``: not saved, only logged and counted).
        update_index: names dump files (``nonfinite_u{update}_e{epoch}_m{minibatch}``).
        share_prefix: compute a prompt once for the rows that share it
            (:func:`micro_batches`); the same gradient up to float rounding.
        pack: each micro-batch's rows as one sequence without padding
            (:mod:`trainers.packing`); the same gradient up to float rounding.
        checkpoint_layers: recompute each decoder layer in backward instead of keeping
            its activations (:func:`trainers.logprobs.checkpointed_layers`); the same
            gradient, a second forward through the layers.

    Rows whose gradient is zero (:func:`zero_gradient_rows`: every trained token has
    advantage 0 and the loss has no term without it) never reach the model; the counts
    that normalise the loss still include them, so the gradient is unchanged
    (``UpdateStats.skipped_rows``). A minibatch with no other row takes no optimizer step
    (``empty_minibatches``), and a batch with no other row is not run at all
    (``UpdateStats.skipped``): a zero gradient would only have let AdamW's momentum
    move the weights.

    A non-finite loss or gradient norm never reaches the weights: the gradient is
    dropped, neither the optimizer nor the scheduler steps, and the event is counted in
    ``UpdateStats.skipped_steps``.
    """
    _check_update_arguments(ppo_epochs, minibatch_size, micro_batch_size, accumulation)
    stats = _nothing_to_train(loss_fn, batch, minibatch_size)
    if stats.skipped:
        return stats
    if batch.old_logprobs is None and not on_policy_update(
        model, len(batch), ppo_epochs, minibatch_size
    ):
        raise ValueError(
            "old_logprobs=None (on-policy) needs one optimizer step on the batch and no dropout: "
            f"ppo_epochs={ppo_epochs}, {len(batch)} rows, minibatch_size={minibatch_size}; "
            "compute them with compute_old_logprobs"
        )
    forward = ForwardOptions(
        micro_batch_size,
        accumulation,
        with_entropy,
        chunk_size,
        share_prefix,
        pack,
        checkpoint_layers,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(int(seed))
    clip_to = float("inf") if max_grad_norm is None else float(max_grad_norm)
    losses: list[float] = []
    grad_norms: list[float] = []
    metric_sums: dict[str, float] = defaultdict(float)
    metric_counts: dict[str, int] = defaultdict(int)

    model.train()
    optimizer.zero_grad(set_to_none=True)
    for epoch in range(ppo_epochs):
        order = torch.randperm(len(batch), generator=generator).to(batch.input_ids.device)
        for mb_index, mb_rows in enumerate(_chunks(order, minibatch_size)):
            minibatch = batch.select(mb_rows)
            accumulated = (
                _accumulate_gradients(model, minibatch, loss_fn, forward)
                if minibatch.trained_tokens() > 0
                else None
            )
            if accumulated is None:  # no trained token, or every row's gradient is zero
                stats.empty_minibatches += 1
                continue
            mb_loss, mb_metrics, finite = accumulated
            name = f"nonfinite_u{update_index:06d}_e{epoch}_m{mb_index}"
            where = None if dump_dir is None else Path(dump_dir)
            grad_norm = _clipped_grad_norm(
                params, clip_to, optimizer, stats, finite, mb_loss, (where, name, minibatch)
            )
            if grad_norm is None:
                continue
            stats.lr = float(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.optimizer_steps += 1
            losses.append(mb_loss)
            grad_norms.append(grad_norm)
            for key, value in mb_metrics.items():
                metric_sums[key] += value
                metric_counts[key] += 1

    if losses:
        stats.loss = sum(losses) / len(losses)
        stats.grad_norm = sum(grad_norms) / len(grad_norms)
    stats.loss_metrics = {k: metric_sums[k] / metric_counts[k] for k in metric_sums}
    return stats
