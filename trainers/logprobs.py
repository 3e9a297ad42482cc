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

Memory: no ``[*, V]`` log-softmax tensor is built; each log-prob is
``logit[target] - logsumexp(logits)`` in float32. The largest tensor is the ``[N, V]``
float32 logits of the N selected positions, which autograd keeps for the backward (the
fastest choice). ``chunk_size`` bounds it to ``[chunk_size, V]``: under autograd each
chunk's head and log-sum-exp are then recomputed in backward (activation
checkpointing), so only the ``[N, hidden]`` states are kept, at the cost of a second
head matmul per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

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
    cache = body(
        input_ids=input_ids[firsts, :longest],
        attention_mask=prefix_mask,
        position_ids=columns[None].expand(len(groups), longest),
        use_cache=True,
    ).cache
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
        cache=cache,
        use_cache=True,
    )
    hidden = getattr(out, "logits", None)
    hidden = out.last_hidden_state if hidden is None else hidden
    # Suffix position j of row r is column starts[r] + j; it predicts that column + 1.
    suffix_predictors = predictors.gather(1, cols.clamp(max=width - 2)) & (cols <= width - 2)
    return hidden, suffix_predictors


def _rows_logprobs(
    rows: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor] | None,
    targets: torch.Tensor,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (and entropy) of ``targets [n]`` under the logits ``project(rows)`` ``[n, V]``."""
    logits = (rows if project is None else project(rows)).float()
    log_normalizer = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return picked - log_normalizer, log_normalizer.new_zeros(())
    # H = logsumexp(z) - sum softmax(z) * z
    probs = torch.softmax(logits, dim=-1)
    return picked - log_normalizer, log_normalizer - (probs * logits).sum(dim=-1)


def selected_logprobs(
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets [N]`` under the logits of ``rows`` (``project(rows)``, or ``rows`` itself).

    Args:
        rows: ``[N, V]`` logits, or ``[N, H]`` hidden states when ``project`` is the head.
        targets: ``[N]`` token ids; ``rows[i]`` predicts ``targets[i]``.
        project: maps ``[n, *]`` rows to ``[n, V]`` logits (``None``: rows are logits).
        with_entropy: also return the entropy of each predictive distribution.
        chunk_size: rows processed at a time (``None``: all ``N`` at once). Under autograd
            each chunk is recomputed in backward, so only ``rows`` is kept, never a chunk's
            ``[chunk_size, V]`` float32 logits.

    Returns:
        ``(logprobs [N] float32, entropy [N] float32 or None)``.
    """
    if rows.shape[0] != targets.shape[0]:
        raise ValueError(
            f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} disagree; "
            "expected rows [N, *] and targets [N]"
        )
    count = rows.shape[0]
    step = count if chunk_size is None else int(chunk_size)
    if chunk_size is not None and step <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    recompute = chunk_size is not None and torch.is_grad_enabled() and rows.requires_grad
    logprob_chunks: list[torch.Tensor] = []
    entropy_chunks: list[torch.Tensor] = []
    # One pass even when N == 0, so the result stays connected to the graph.
    for start in range(0, max(count, 1), max(step, 1)):
        args = (rows[start : start + step], project, targets[start : start + step], with_entropy)
        if recompute:
            lp, h = torch.utils.checkpoint.checkpoint(_rows_logprobs, *args, use_reentrant=False)
        else:
            lp, h = _rows_logprobs(*args)
        logprob_chunks.append(lp)
        entropy_chunks.append(h)
    logprobs = torch.cat(logprob_chunks)
    entropy = torch.cat(entropy_chunks) if with_entropy else None
    return logprobs, entropy


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` under ``logits`` (already shifted: ``logits[:, i]`` predicts ``targets[:, i]``).

    ``logits`` ``[B, L, V]`` in any float dtype, ``targets`` ``[B, L]``; returns
    ``(logprobs [B, L] float32, entropy [B, L] float32 or None)``. ``chunk_size``: see
    :func:`selected_logprobs` (rows of the flattened ``[B * L, V]``).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree; "
            "expected logits [B, L, V] and targets [B, L]"
        )
    flat_lp, flat_h = selected_logprobs(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        with_entropy=with_entropy,
        chunk_size=chunk_size,
    )
    entropy = None if flat_h is None else flat_h.view(targets.shape)
    return flat_lp.view(targets.shape), entropy


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    prefix_groups: Sequence[tuple[int, int]] | None = None,
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
        chunk_size: selected positions per float32 chunk (see :func:`selected_logprobs`).
        prefix_groups: ``[(K, n), ...]``: the rows come in consecutive groups of ``n``
            rows that start with the same ``K >= 1`` real tokens, and no position before
            ``K + 1`` is asked for (the samples of a prompt): each group's prefix goes
            through the decoder once instead of once per row (module docstring). The
            result is the same function of the weights; the floats differ by the
            rounding of a different batching.

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
    # The one shift: the state (or logits) at t-1 scores token t.
    predictors = wanted[:, 1:]
    targets = input_ids[:, 1:][predictors]
    parts = decoder_and_head(model)
    if prefix_groups:
        _check_prefix_groups(input_ids, attention_mask, wanted, prefix_groups)
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
    project = None if parts is None else parts[1]
    picked, picked_entropy = selected_logprobs(
        rows, targets, project=project, with_entropy=with_entropy, chunk_size=chunk_size
    )
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    logprobs = zeros.masked_scatter(wanted, picked)
    entropy = None if picked_entropy is None else zeros.masked_scatter(wanted, picked_entropy)
    return logprobs, entropy
