"""Padding-free forwards: a micro-batch's rows as one sequence, attention kept within each row.

A padded micro-batch of ``B`` rows costs ``B x T`` token positions, ``T`` its longest row.
Packed, only its real tokens go through the decoder, one after the other in one sequence
of ``L`` positions, each with its own position id (counting from 0 at its row's start),
under an attention mask that lets a token see the earlier tokens of its own row only
(block-diagonal, causal inside each block). The samples of one prompt
(``prefix_groups``, as in :func:`trainers.logprobs.token_logprobs`) share the prompt:
it appears once, and each sample's tokens after it see it, as a tree::

    [prompt g | sample g.1 | sample g.2 | ... | prompt h | sample h.1 | ... | row alone]

    token i may see token j  iff  j <= i  and  (same piece, or j is the prompt of i's group)

Every token then computes exactly what it computes in its padded row, so the result is
the same function of the weights (the floats differ by the rounding of other shapes).
Nothing is cached, so layer checkpointing (:func:`trainers.logprobs.checkpointed_layers`)
works on a packed forward, where the cached prefix of the padded path cannot be recomputed.

What it costs: the mask is dense, so attention runs over ``L x L`` pairs instead of each
row's own ``T x T`` (masked pairs are computed and dropped). For the update's
micro-batches (two prompts of ~100 tokens, four samples of at most 64 tokens each:
``L`` about 700) that is as fast as the cached prompt of the padded path, and it is what
lets the layers be checkpointed. For eight unshared rows of ~220 tokens (a warm-up
batch) one sequence of 1,764 tokens took 40 s a step against 28 s padded, on the
default model on two shared cores: the warm-up's fit keeps its rows padded.

The mask is passed to the model as a ready 4D mask ``[1, 1, L, L]``, which transformers
uses as it is: boolean for ``sdpa`` attention, additive (0 or the dtype's minimum) for
``eager``. Other attention implementations and models whose head is not plain
(:func:`packing_unsupported`) keep the padded path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Attention implementations that read a ready 4D mask as it is.
PACKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class PackedRows:
    """One packed sequence and where each real token of the padded rows went."""

    input_ids: torch.Tensor  #: [1, L] long
    position_ids: torch.Tensor  #: [1, L] long; each row's own positions
    allowed: torch.Tensor  #: [L, L] bool; True where token i may attend to token j
    index: torch.Tensor  #: [B, T] long; the packed position of (row, column), -1 on padding


def packing_unsupported(model: nn.Module) -> str | None:
    """Why ``model``'s decoder cannot take a packed sequence, or None when it can."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKABLE_ATTENTION:
        return f"attention implementation {attention!r} (packing needs one of {PACKABLE_ATTENTION})"
    return None


def pack_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_groups: Sequence[tuple[int, int]] | None = None,
) -> PackedRows:
    """The packed layout of ``[B, T]`` rows (module docstring).

    Real tokens are where ``attention_mask`` is 1, in order, wherever the padding is.
    ``prefix_groups`` ``[(K, n), ...]``: consecutive groups of ``n`` rows whose first
    ``K`` columns are the same real tokens (checked by the caller); rows after the groups
    share nothing.
    """
    device = input_ids.device
    rows = input_ids.shape[0]
    real = attention_mask.bool()
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    index = torch.full(input_ids.shape, -1, dtype=torch.long, device=device)
    # Pieces in packed order: (row, columns, piece id, group id, is a shared prompt).
    pieces: list[tuple[int, torch.Tensor, int, int, bool]] = []
    row = 0
    for group, (k, n) in enumerate(prefix_groups or ()):
        pieces.append((row, torch.arange(k, device=device), rows + group, group, True))
        for r in range(row, row + n):
            later = real[r].clone()
            later[:k] = False
            pieces.append((r, later.nonzero(as_tuple=True)[0], r, group, False))
        row += n
    groups = len(prefix_groups or ())
    for r in range(row, rows):
        pieces.append((r, real[r].nonzero(as_tuple=True)[0], r, groups + r, False))
    ids, pos, piece_of, group_of, shared = [], [], [], [], []
    start = 0
    for r, cols, piece, group, is_prompt in pieces:
        count = cols.numel()
        span = torch.arange(start, start + count, device=device)
        if is_prompt:  # the prompt's tokens stand in every row of its group
            n = int(prefix_groups[group][1])  # type: ignore[index]
            index[r : r + n, cols] = span
        else:
            index[r, cols] = span
        ids.append(input_ids[r, cols])
        pos.append(positions[r, cols])
        piece_of.append(torch.full((count,), piece, device=device))
        group_of.append(torch.full((count,), group, device=device))
        shared.append(torch.full((count,), is_prompt, device=device))
        start += count
    piece_ids, group_ids, prompt = torch.cat(piece_of), torch.cat(group_of), torch.cat(shared)
    length = piece_ids.numel()
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril_()
    same_piece = piece_ids[:, None] == piece_ids[None, :]
    own_prompt = prompt[None, :] & (group_ids[:, None] == group_ids[None, :])
    return PackedRows(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(pos)[None],
        allowed=causal & (same_piece | own_prompt),
        index=index,
    )


def attention_mask_4d(allowed: torch.Tensor, model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` ``[L, L]`` as the ready ``[1, 1, L, L]`` mask ``model``'s attention reads."""
    mask = allowed[None, None]
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return mask
    additive = torch.zeros(mask.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


def packed_hidden(
    decoder: nn.Module,
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_groups: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states of the packed rows, and where each (row, column) went.

    Returns ``(hidden [L, H], index [B, T])``: the state of the real token at ``(r, t)``
    is ``hidden[index[r, t]]``; ``index`` is -1 on padding.
    """
    packed = pack_rows(input_ids, attention_mask, prefix_groups)
    dtype = next(decoder.parameters()).dtype
    out = decoder(
        input_ids=packed.input_ids,
        attention_mask=attention_mask_4d(packed.allowed, model, dtype),
        position_ids=packed.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state[0], packed.index
