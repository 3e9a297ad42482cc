"""Per-token log-probabilities of a causal LM, aligned with ``input_ids``, where they are needed.

The shift convention lives here and nowhere else. A causal LM's logits at position
``t - 1`` predict token ``t``; :func:`token_logprobs` returns

    out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])    for t >= 1 where asked for
    out[:, t] = 0                                            everywhere else, and at t = 0

so its result is aligned with ``input_ids`` exactly like every per-token tensor of
:class:`aipo_env.batch.TrajectoryBatch` (``loss_mask``, ``behavior_logprobs``, ...).
Callers never shift anything themselves; position 0 is always a prompt token and is
never trained.

With ``prefix_groups`` (the trainer passes them for the samples of each prompt, which
share it), the decoder runs on each prefix once, and its keys and values, graph
included, are repeated for every row's suffix: backward sums each row's gradient into
the one prefix computation. The prompt is then computed once per group instead of once
per sample, in two decoder calls per micro-batch whatever its number of groups.

Only the positions asked for cost anything beyond the decoder. The trainer asks for the
tokens its loss reads (the loss mask: response tokens), so the prompt's positions never
reach the output head. The decoder runs on every token (attention needs the prefix);
then the hidden states that predict an asked-for token are gathered, and the output
head and the log-softmax run on those rows only. On SmolLM2-135M (vocabulary 49152,
hidden 576, 30 layers) the head is about a fifth of the forward's FLOPs per token and
the ``[*, V]`` logits are the largest activation, so a response of 64 tokens after a
prompt of 100 skips most of both.

The head is applied directly (``model.get_decoder()``, then ``model.get_output_embeddings()``)
only for architectures whose forward is exactly ``lm_head(decoder(...))``
(:data:`PLAIN_HEAD_MODELS`); any other model takes its full logits from ``model(...)``
and the same positions are gathered from them, which is correct for every causal LM.

Memory: each log-prob is ``logit[target] - logsumexp(logits)`` in float32, computed
``chunk_size`` positions at a time (:data:`HEAD_CHUNK` by default) by one autograd
function (:class:`_ChunkedLogprobs`) that keeps only the ``[N, hidden]`` states and each
position's log-normaliser, and recomputes a chunk's logits in backward: no ``[N, V]``
tensor exists in either pass, only ``[chunk_size, V]`` ones, for one more head matmul per
chunk. (A model outside :data:`PLAIN_HEAD_MODELS` still computes its own full logits.)
Two more savings are the caller's choice: ``pack`` (rows as one sequence without padding,
:mod:`trainers.packing`) and ``checkpoint_layers`` (each decoder layer recomputed in
backward, :func:`checkpointed_layers`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from policies.cache_api import cache_keyword, returned_cache
from trainers.packing import packed_hidden, packing_unsupported

logger = logging.getLogger(__name__)

#: ``config.model_type`` of architectures whose ``ForCausalLM.forward`` is exactly
#: ``lm_head(model(...).last_hidden_state)``: no logit scaling, soft-capping or bias.
#: Others fall back to the full logits (correct, slower).
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (correct for left or right padding)."""
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, head)`` with ``model(x).logits == head(decoder(x).last_hidden_state)``, or None.

    None when the architecture is not in :data:`PLAIN_HEAD_MODELS` or does not expose
    both parts; the caller then uses the model's own logits.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    return decoder, head


def _check_prefix_groups(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    wanted: torch.Tensor,
    groups: Sequence[tuple[int, int]],
) -> None:
    """Raise unless ``groups`` describes the rows (``token_logprobs``'s ``prefix_groups``)."""
    rows, width = input_ids.shape
    if sum(n for _, n in groups) != rows or any(n < 1 for _, n in groups):
        raise ValueError(f"prefix_groups {list(groups)} do not cover the {rows} rows")
    start = 0
    for k, n in groups:
        if not 0 < k < width:
            raise ValueError(f"prefix_groups: prefix {k}; expected 0 < K < {width} (the width)")
        block = slice(start, start + n)
        head = input_ids[block, :k]
        if not bool((head == head[:1]).all()) or not bool(attention_mask[block, :k].bool().all()):
            raise ValueError(
                f"prefix_groups: rows {start}..{start + n - 1} do not share {k} real first tokens"
            )
        if bool(wanted[block, : k + 1].any()):
            raise ValueError(
                f"prefix_groups: rows {start}..{start + n - 1} ask for a log-prob at a position "
                f"<= {k}, whose prediction their shared prefix does not return"
            )
        start += n


def _grouped_prefix_forward(
    body: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    predictors: torch.Tensor,
    groups: Sequence[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's prefix once, then every row's suffix on its group's keys and values.

    Prefixes are right-padded to the longest, ``P``; row ``r`` of a group with prefix
    ``K`` continues at column ``K`` of its own tokens, with positions ``K, K+1, ...``, and
    attends to its prefix's ``K`` real columns of the cache and to its own suffix.

    Returns ``body``'s output on the suffixes ``[B, S, *]`` (hidden states, or logits for
    a full model) and the ``[B, S]`` mask of the suffix positions that predict an asked-for
    token, in the order of ``predictors`` (``[B, T - 1]``: position ``t`` predicts ``t + 1``).
    """
    device = input_ids.device
    width = input_ids.shape[1]
    lens = torch.tensor([k for k, _ in groups], device=device)
    counts = torch.tensor([n for _, n in groups], device=device)
    firsts = torch.cumsum(counts, 0) - counts
    longest = int(lens.max())
    columns = torch.arange(longest, device=device)
    prefix_mask = (columns[None] < lens[:, None]).long()  # [G, P]
    cache = returned_cache(
        body(
            input_ids=input_ids[firsts, :longest],
            attention_mask=prefix_mask,
            position_ids=columns[None].expand(len(groups), longest),
            use_cache=True,
        )
    )
    group_of_row = torch.repeat_interleave(torch.arange(len(groups), device=device), counts)
    cache.batch_select_indices(group_of_row)  # each row its group's keys and values
    starts = lens[group_of_row]  # [B]
    span = width - int(lens.min())
    cols = starts[:, None] + torch.arange(span, device=device)[None]  # [B, S] original columns
    inside = cols < width
    safe = cols.clamp(max=width - 1)
    suffix_mask = attention_mask.gather(1, safe) * inside
    out = body(
        input_ids=input_ids.gather(1, safe),
        attention_mask=torch.cat([prefix_mask[group_of_row], suffix_mask], dim=1),
        position_ids=safe,
        use_cache=True,
        # cache= since transformers 5.24, past_key_values= before (policies/cache_api.py)
        **{cache_keyword(body): cache},
    )
    hidden = getattr(out, "logits", None)
    hidden = out.last_hidden_state if hidden is None else hidden
    # Suffix position j of row r is column starts[r] + j; it predicts that column + 1.
    suffix_predictors = predictors.gather(1, cols.clamp(max=width - 2)) & (cols <= width - 2)
    return hidden, suffix_predictors


#: Selected positions per chunk of the output head (:func:`selected_logprobs`): the most
#: ``[chunk, V]`` float32 logits that exist at once, forward or backward (64 MiB at a
#: vocabulary of 64k). Large enough that the head's matmuls stay efficient.
HEAD_CHUNK = 256


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Float32 logits of ``rows`` (``rows @ weight.T``, or ``rows`` themselves without a head)."""
    return (rows if weight is None else rows @ weight.t()).float()


class _ChunkedLogprobs(torch.autograd.Function):
    """Log-prob (and entropy) of targets under the logits of rows, one chunk of rows at a time.

    Forward keeps only each row's log-normaliser ``lse`` (and entropy ``H``); backward
    recomputes each chunk's logits ``z`` and applies, with ``p = softmax(z)``,
    ``log p = z - lse``::

        d logp[target] / dz = onehot(target) - p
        d H / dz            = -p * (log p + H)

    so no ``[N, V]`` tensor exists in either pass, only ``[chunk, V]`` ones (two at a time).
    The head's weight gradient is accumulated over chunks (in float32 for a lower-precision
    head).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        weight: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = rows.shape[0]
        logprobs = torch.empty(count, dtype=torch.float32, device=rows.device)
        normalizer = torch.empty_like(logprobs)
        entropy = torch.empty(count if with_entropy else 0, dtype=torch.float32, device=rows.device)
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            z = _chunk_logits(rows[part], weight)
            lse = torch.logsumexp(z, dim=-1)
            normalizer[part] = lse
            logprobs[part] = z.gather(-1, targets[part, None]).squeeze(-1) - lse
            if with_entropy:
                # H = lse - sum_j p_j z_j
                entropy[part] = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
            del z
        ctx.save_for_backward(rows, weight, targets, normalizer, entropy)
        ctx.chunk, ctx.with_entropy = chunk, with_entropy
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        rows, weight, targets, normalizer, entropy = ctx.saved_tensors
        want_rows, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.empty_like(rows) if want_rows else None
        grad_weight = None
        if weight is not None and want_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, rows.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            g = grad_logprobs[part, None]
            logp = _chunk_logits(rows[part], weight).sub_(normalizer[part, None])
            p = logp.exp()
            if ctx.with_entropy:
                # -p * (g_lp + g_H (log p + H)), then + g_lp at the target
                coef = logp.add_(entropy[part, None]).mul_(grad_entropy[part, None]).add_(g)
            else:
                coef = g
            grad_z = p.mul_(coef).neg_()
            del logp, coef
            grad_z.scatter_add_(-1, targets[part, None], g)
            if grad_rows is not None:
                low = grad_z.to(rows.dtype)  # the head's matmul runs in its own dtype
                grad_rows[part] = low if weight is None else low @ weight
                del low
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.t(), rows[part].float())
            del grad_z
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_rows, grad_weight, None, None, None


def selected_logprobs(
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    head: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = HEAD_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets [N]`` under the logits of ``rows`` (``rows @ head.T``, or ``rows`` itself).

    Args:
        rows: ``[N, V]`` logits, or ``[N, H]`` hidden states when ``head`` is given.
        targets: ``[N]`` token ids; ``rows[i]`` predicts ``targets[i]``.
        head: the output layer's weight ``[V, H]`` (``None``: rows are logits).
        with_entropy: also return the entropy of each predictive distribution.
        chunk_size: rows processed at a time (``None``: all ``N`` at once). Whatever its
            value, neither pass keeps the logits: forward keeps each row's log-normaliser,
            backward recomputes the chunk's logits (:class:`_ChunkedLogprobs`), so the
            largest tensor is ``[chunk_size, V]`` float32.

    Returns:
        ``(logprobs [N] float32, entropy [N] float32 or None)``.
    """
    if rows.shape[0] != targets.shape[0]:
        raise ValueError(
            f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} disagree; "
            "expected rows [N, *] and targets [N]"
        )
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    step = max(1, rows.shape[0] if chunk_size is None else int(chunk_size))
    logprobs, entropy = _ChunkedLogprobs.apply(rows, head, targets, step, with_entropy)
    return logprobs, entropy if with_entropy else None


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, each decoder layer keeps only its input for backward and recomputes the rest.

    Activation checkpointing per layer (transformers' ``GradientCheckpointingLayer``,
    non-reentrant ``torch.utils.checkpoint``): the activations kept for backward shrink
    from every layer's intermediates to one ``[tokens, hidden]`` tensor per layer, for
    a second forward through each layer during backward. The gradient is the same.
    Yields whether any layer is checkpointed (False for a model without such layers or
    with ``enabled`` False); the model's own settings are restored on exit.
    """
    layers = []
    if enabled:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    saved = [
        (
            m,
            m.__dict__.get("gradient_checkpointing"),
            m.__dict__.get("_gradient_checkpointing_func"),
        )
        for m in layers
    ]
    recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for m in layers:
        m.gradient_checkpointing = True
        m._gradient_checkpointing_func = recompute
    try:
        yield bool(layers)
    finally:
        for m, flag, func in saved:
            for name, value in (
                ("gradient_checkpointing", flag),
                ("_gradient_checkpointing_func", func),
            ):
                if value is None:
                    m.__dict__.pop(name, None)
                else:
                    setattr(m, name, value)


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = HEAD_CHUNK,
    prefix_groups: Sequence[tuple[int, int]] | None = None,
    pack: bool = False,
    checkpoint_layers: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each asked-for token given its prefix, aligned with ``input_ids``.

    ``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` where ``positions[:, t]``
    is set, ``t >= 1`` and the token is real; ``entropy[:, t]`` is the entropy of the
    distribution ``input_ids[:, t]`` was drawn from, at the same positions. Every other
    position holds 0 in both (never NaN or inf), so a loss may multiply by its mask.

    Args:
        model: a causal LM whose forward accepts ``input_ids``, ``attention_mask``,
            ``position_ids`` and returns an object with ``.logits`` ``[B, T, V]``.
        input_ids: ``[B, T]`` long.
        attention_mask: ``[B, T]``; 1 on real tokens.
        positions: ``[B, T]`` bool (or 0/1), the tokens whose log-prob is needed, e.g.
            the loss mask; ``None``: every real token. Fewer positions, less work.
        with_entropy: also return per-token entropy (for an entropy bonus or metrics).
        chunk_size: selected positions per float32 chunk of the output head
            (:func:`selected_logprobs`; ``None``: all at once).
        prefix_groups: ``[(K, n), ...]``: the rows come in consecutive groups of ``n``
            rows that start with the same ``K >= 1`` real tokens, and no position before
            ``K + 1`` is asked for (the samples of a prompt): each group's prefix goes
            through the decoder once instead of once per row (module docstring). The
            result is the same function of the weights; the floats differ by the
            rounding of a different batching.
        pack: run the real tokens of all rows as one sequence (:mod:`trainers.packing`;
            the prefix of each group once), so padding costs nothing. Models outside
            :data:`PLAIN_HEAD_MODELS` or whose attention cannot take the packed mask
            keep the padded forward.
        checkpoint_layers: recompute each decoder layer in backward instead of keeping
            its activations (:func:`checkpointed_layers`). Needs a forward without the
            cached prefix: with ``prefix_groups``, ``pack`` must be True.

    Returns:
        ``(logprobs [B, T] float32, entropy [B, T] float32 or None)``, differentiable
        with respect to the model's parameters unless called under ``torch.no_grad``.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must have the same shape [B, T]"
        )
    if positions is not None and positions.shape != input_ids.shape:
        raise ValueError(
            f"positions has shape {tuple(positions.shape)}; expected {tuple(input_ids.shape)} "
            "(aligned with input_ids)"
        )
    wanted = (
        attention_mask.bool() if positions is None else positions.bool() & attention_mask.bool()
    )
    # Nothing predicts the first token (a new tensor: the caller's mask is left alone).
    wanted = torch.cat([torch.zeros_like(wanted[:, :1]), wanted[:, 1:]], dim=1)
    parts = decoder_and_head(model)
    packed = pack and parts is not None and packing_unsupported(model) is None
    if packed:
        # A token is scored from the state of the real token before it in its row.
        wanted[:, 1:] &= attention_mask[:, :-1].bool()
    # The one shift: the state (or logits) at t-1 scores token t.
    predictors = wanted[:, 1:]
    targets = input_ids[:, 1:][predictors]
    if prefix_groups:
        _check_prefix_groups(input_ids, attention_mask, wanted, prefix_groups)
    if checkpoint_layers and prefix_groups and not packed:
        if not pack:
            raise ValueError(
                "checkpoint_layers needs a forward without a cached prefix: with "
                "prefix_groups, pass pack=True"
            )
        # Memory, not correctness: the shared prompt stays a cached prefix, unrecomputed.
        reason = "no plain output head" if parts is None else packing_unsupported(model)
        logger.warning("packed forward unavailable (%s): layers are not checkpointed", reason)
        checkpoint_layers = False
    with checkpointed_layers(model, checkpoint_layers and torch.is_grad_enabled()):
        if packed:
            assert parts is not None
            hidden, index = packed_hidden(
                parts[0], model, input_ids, attention_mask, prefix_groups or None
            )
            rows = hidden[index[:, :-1][predictors]]
        elif prefix_groups:
            hidden, suffix_predictors = _grouped_prefix_forward(
                model if parts is None else parts[0],
                input_ids,
                attention_mask,
                predictors,
                prefix_groups,
            )
            rows = hidden[suffix_predictors]
        else:
            inputs = dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
            if parts is not None:
                rows = parts[0](**inputs).last_hidden_state[:, :-1][predictors]
            else:
                rows = model(**inputs).logits[:, :-1][predictors]
    head = None if parts is None else parts[1].weight
    picked, picked_entropy = selected_logprobs(
        rows, targets, head=head, with_entropy=with_entropy, chunk_size=chunk_size
    )
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    logprobs = zeros.masked_scatter(wanted, picked)
    entropy = None if picked_entropy is None else zeros.masked_scatter(wanted, picked_entropy)
    return logprobs, entropy
