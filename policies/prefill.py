"""Batched prefill for the embedded generator: many prompts, cached prefixes or not, per forward.

Each admitted prompt is a cached prefix (possibly empty) plus a suffix to compute.
Prompts are grouped so that padding stays a bounded share of the computed tokens,
and each group runs as one forward: the cached prefixes left-padded to a common
length as past keys/values, the suffixes left-padded after them, padding masked out.
Identical prompts (same cached prefix, same ids) are computed once and shared, so
``n`` samples of one prompt cost one prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from policies.kv_slab import RowSource
from policies.prefix_cache import KV, CachedPrefix

#: A forward pass: (ids, positions, past keys/values, padding mask) -> (last logits, keys/values).
Forward = Callable[[torch.Tensor, torch.Tensor, KV, "torch.Tensor | None"], tuple[torch.Tensor, KV]]

#: Most (padded) suffix tokens one prefill forward computes, to bound its activations.
MAX_GROUP_TOKENS = 16384


@dataclass(frozen=True)
class PrefillItem:
    """One prompt to prefill: its ids and the cached prefix (``cached`` tokens of ``entry``)."""

    ids: tuple[int, ...]
    cached: int
    entry: CachedPrefix | None

    @property
    def suffix(self) -> int:
        """Tokens this prompt needs computed."""
        return len(self.ids) - self.cached


def plan_groups(
    suffix_lengths: Sequence[int], max_tokens: int = MAX_GROUP_TOKENS
) -> list[list[int]]:
    """Split prompts (by index) into forward groups of similar suffix length.

    Longest first; a prompt joins the current group while its padding (the group's
    longest suffix minus its own) is at most a quarter of that longest suffix or at
    most 32 tokens, and the group's padded size stays within ``max_tokens``.
    """
    order = sorted(range(len(suffix_lengths)), key=lambda i: -suffix_lengths[i])
    groups: list[list[int]] = []
    for i in order:
        s = suffix_lengths[i]
        if groups:
            group = groups[-1]
            longest = suffix_lengths[group[0]]
            similar = longest - s <= max(longest // 4, 32)
            if similar and (len(group) + 1) * longest <= max_tokens:
                group.append(i)
                continue
        groups.append([i])
    return groups


def prefill(
    forward: Forward, items: Sequence[PrefillItem], device: torch.device
) -> tuple[list[torch.Tensor], list[RowSource], int]:
    """Prefill every item; per item its next-token logits and keys/values, and the forwards run."""
    unique: dict[tuple[int, int, tuple[int, ...]], int] = {}
    firsts: list[PrefillItem] = []
    slot = []
    for item in items:
        key = (id(item.entry) if item.entry is not None else 0, item.cached, item.ids)
        if key not in unique:
            unique[key] = len(firsts)
            firsts.append(item)
        slot.append(unique[key])
    logits: list[torch.Tensor | None] = [None] * len(firsts)
    sources: list[RowSource | None] = [None] * len(firsts)
    groups = plan_groups([item.suffix for item in firsts])
    for group in groups:
        group_logits, group_sources = _prefill_group(forward, [firsts[i] for i in group], device)
        for i, lg, src in zip(group, group_logits, group_sources, strict=True):
            logits[i], sources[i] = lg, src
    return (
        [logits[s] for s in slot],  # type: ignore[misc]
        [sources[s] for s in slot],  # type: ignore[misc]
        len(groups),
    )


def _prefill_group(
    forward: Forward, items: Sequence[PrefillItem], device: torch.device
) -> tuple[list[torch.Tensor], list[RowSource]]:
    """One forward over ``items``: past = cached prefixes left-padded, then suffixes left-padded."""
    past_width = max(item.cached for item in items)
    width = max(item.suffix for item in items)
    past: KV = []
    if past_width:
        template = next(item.entry for item in items if item.entry is not None).kv
        assert template is not None
        for layer, (tk, tv) in enumerate(template):
            k = tk.new_zeros((len(items), tk.shape[1], past_width, tk.shape[3]))
            v = tv.new_zeros((len(items), tv.shape[1], past_width, tv.shape[3]))
            for row, item in enumerate(items):
                if item.cached:
                    ek, ev = item.entry.sliced(item.cached)[layer]  # type: ignore[union-attr]
                    k[row, :, past_width - item.cached :] = ek[0]
                    v[row, :, past_width - item.cached :] = ev[0]
            past.append((k, v))
    ids = [[0] * (width - item.suffix) + list(item.ids[item.cached :]) for item in items]
    mask_rows = [
        [0] * (past_width - item.cached)
        + [1] * item.cached
        + [0] * (width - item.suffix)
        + [1] * item.suffix
        for item in items
    ]
    positions = [
        [max(item.cached + j - (width - item.suffix), 0) for j in range(width)] for item in items
    ]
    uniform = all(item.cached == past_width and item.suffix == width for item in items)
    # With no padding anywhere the mask is dropped, so attention can take its causal fast path.
    mask = None if uniform else torch.tensor(mask_rows, device=device)
    logits, kv = forward(
        torch.tensor(ids, device=device), torch.tensor(positions, device=device), past, mask
    )
    sources = []
    for row, item in enumerate(items):
        spans = [(past_width + width - item.suffix, past_width + width)]
        if item.cached:
            spans.insert(0, (past_width - item.cached, past_width))
        sources.append(RowSource(kv, row, spans))
    return [logits[row] for row in range(len(items))], sources
