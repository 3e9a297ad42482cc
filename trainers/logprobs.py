"""Per-token log-probabilities of a causal LM, aligned with ``input_ids``.

The shift convention lives here and nowhere else. A causal LM's logits at position
``t - 1`` predict token ``t``; :func:`token_logprobs` returns

    out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])    for t >= 1
    out[:, 0] = 0                                            (nothing predicts the first token)

so its result is aligned with ``input_ids`` exactly like every per-token tensor of
:class:`aipo_env.batch.TrajectoryBatch` (``loss_mask``, ``behavior_logprobs``, ...).
Callers never shift anything themselves; position 0 is always a prompt token and is
never trained.

Memory: the full ``[B, T, V]`` float32 ``log_softmax`` is never built. For each chunk
of positions the log-prob is ``logit[target] - logsumexp(logits)``, computed in float32
from the model's logits chunk by chunk (``chunk_size`` positions at a time).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (correct for left or right padding)."""
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)


def _chunk_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = logits.float()
    log_normalizer = torch.logsumexp(chunk, dim=-1)
    picked = chunk.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return picked - log_normalizer, log_normalizer.new_zeros(())
    # H = logsumexp(z) - sum softmax(z) * z
    probs = torch.softmax(chunk, dim=-1)
    return picked - log_normalizer, log_normalizer - (probs * chunk).sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` under ``logits`` (already shifted: ``logits[:, i]`` predicts ``targets[:, i]``).

    Args:
        logits: ``[B, L, V]`` logits in any float dtype.
        targets: ``[B, L]`` token ids.
        with_entropy: also return the entropy of each predictive distribution.
        chunk_size: positions processed at a time (``None``: all ``L`` at once). Only a
            ``[B, chunk_size, V]`` float32 copy of the logits exists at any moment; under
            autograd each chunk is recomputed in backward instead of kept.

    Returns:
        ``(logprobs [B, L] float32, entropy [B, L] float32 or None)``.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree; "
            "expected logits [B, L, V] and targets [B, L]"
        )
    length = logits.shape[1]
    step = length if chunk_size is None else int(chunk_size)
    if step <= 0 and length > 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    logprob_chunks: list[torch.Tensor] = []
    entropy_chunks: list[torch.Tensor] = []
    # With gradients and chunking, each chunk is recomputed in backward (activation
    # checkpointing), so autograd keeps only the model-dtype logits, never the float32 copies.
    recompute = chunk_size is not None and torch.is_grad_enabled() and logits.requires_grad
    for start in range(0, length, max(step, 1)):
        args = (logits[:, start : start + step], targets[:, start : start + step], with_entropy)
        if recompute:
            lp, h = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, h = _chunk_logprobs(*args)
        logprob_chunks.append(lp)
        if with_entropy:
            entropy_chunks.append(h)
    batch = targets.shape[0]
    empty = logits.new_zeros((batch, 0), dtype=torch.float32)
    logprobs = torch.cat(logprob_chunks, dim=1) if logprob_chunks else empty
    entropy = (
        (torch.cat(entropy_chunks, dim=1) if entropy_chunks else empty) if with_entropy else None
    )
    return logprobs, entropy


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every token given its prefix, aligned with ``input_ids``.

    ``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` for ``t >= 1`` and
    ``out[:, 0] = 0``; ``entropy[:, t]`` is the entropy of the distribution that
    ``input_ids[:, t]`` was drawn from (0 at ``t = 0``). Padding positions
    (``attention_mask == 0``) hold 0 in both, so they never carry NaN or inf into a loss.

    Args:
        model: a causal LM whose forward accepts ``input_ids``, ``attention_mask``,
            ``position_ids`` and returns an object with ``.logits`` ``[B, T, V]``.
        input_ids: ``[B, T]`` long.
        attention_mask: ``[B, T]``; 1 on real tokens.
        with_entropy: also return per-token entropy (for an entropy bonus or metrics).
        chunk_size: positions per float32 chunk (see :func:`logprobs_from_logits`).

    Returns:
        ``(logprobs [B, T] float32, entropy [B, T] float32 or None)``, differentiable
        with respect to the model's parameters unless called under ``torch.no_grad``.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must have the same shape [B, T]"
        )
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits
    # The one shift: logits at t-1 score token t.
    shifted, entropy_shifted = logprobs_from_logits(
        logits[:, :-1], input_ids[:, 1:], with_entropy=with_entropy, chunk_size=chunk_size
    )
    real = attention_mask[:, 1:].bool()
    first = shifted.new_zeros((input_ids.shape[0], 1))
    logprobs = torch.cat([first, shifted.masked_fill(~real, 0.0)], dim=1)
    entropy = None
    if entropy_shifted is not None:
        entropy = torch.cat([first, entropy_shifted.masked_fill(~real, 0.0)], dim=1)
    return logprobs, entropy
