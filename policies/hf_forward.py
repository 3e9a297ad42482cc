"""The embedded generator's forward through transformers' own model code (any architecture).

Keys/values pass through a transformers ``Cache`` given as ``cache=`` (transformers
5.24 and later) or ``past_key_values=`` (before 5.24), whichever the model's forward
takes (:func:`policies.cache_api.cache_keyword`). The cache object is the one handed in,
so its layers are read back directly rather than through the output's field, which the
same release renamed.
"""

from __future__ import annotations

import copy

import torch

from policies.cache_api import cache_keyword
from policies.kv_slab import KVSlab
from policies.prefix_cache import KV


def forward_with_cache(
    model: torch.nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    past: KV | object,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, KV]:
    """One forward keeping only the last position's logits (float32) and all keys/values.

    ``past`` is per-layer keys/values (an empty list for none) or a ready
    transformers cache (the decode batch's in-place :class:`~policies.kv_slab.KVSlab`).
    """
    from transformers import DynamicCache

    if isinstance(past, list):
        cache = DynamicCache()
        for layer, (k, v) in enumerate(past):
            cache.update(k, v, layer)
    else:
        cache = past
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword(model): cache},
    )
    return out.logits[:, -1].float(), [(lay.keys, lay.values) for lay in cache.layers]


class HFForward:
    """Prefill and decode through the model's transformers forward, in ``dtype``.

    With ``dtype`` the model's own, the forward runs on the model itself (its weights
    are always current). Otherwise it runs on a copy cast to ``dtype``, refreshed by
    :meth:`sync_weights`.
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = model
        own = next(model.parameters()).dtype
        self.dtype = own if dtype is None else dtype
        self.module = model if self.dtype == own else copy.deepcopy(model).to(self.dtype).eval()

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the model's weights into the cast copy (nothing to do without one)."""
        if self.module is self.model:
            return
        for mine, theirs in zip(self.module.parameters(), self.model.parameters(), strict=True):
            mine.copy_(theirs)

    def release(self) -> None:
        """Nothing to drop: a cast copy is kept (remaking it would need a full copy at once)."""

    def prefill(
        self, ids: torch.Tensor, positions: torch.Tensor, past: KV, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        """Last-position logits (float32) and all keys/values, ``past`` included."""
        return forward_with_cache(self.module, ids, positions, past, mask)

    def decode(
        self, ids: torch.Tensor, positions: torch.Tensor, slab: KVSlab, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One token per row, its keys/values written into ``slab`` (the caller advances it)."""
        logits, _ = forward_with_cache(self.module, ids, positions, slab.cache(ids.shape[1]), mask)
        return logits
