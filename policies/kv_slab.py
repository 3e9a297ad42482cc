"""The decode batch's keys/values, kept in preallocated per-layer buffers and updated in place.

Rows are right-aligned: row ``r`` holds its ``lengths[r]`` computed tokens in columns
``[width - lengths[r], width)`` and zeros (masked out) to their left, so one decode
step writes every row's new key/value in the same column ``width``. A buffer has
room for ``capacity`` columns; a step only writes one column and hands the model a
view of the first ``width + 1``, instead of concatenating (copying) the whole cache
every step. The buffers are rebuilt only when rows join or leave or room runs out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from policies.prefix_cache import KV

#: Columns of room a rebuilt slab keeps past its widest row, at most; more is grown on demand.
HEADROOM = 128


@dataclass
class RowSource:
    """Where one row's keys/values lie: row ``index`` of ``kv``, the ``spans`` of its sequence axis.

    The spans, concatenated in order, are the row's keys/values for its tokens;
    a prefill over a cached prefix gives two (the cached prefix and the new suffix).
    """

    kv: KV
    index: int
    spans: list[tuple[int, int]]

    @property
    def length(self) -> int:
        """Tokens whose keys/values this source holds."""
        return sum(end - start for start, end in self.spans)


def _slab_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A cache layer whose keys/values are views of a preallocated buffer, written in place."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
            super().__init__()
            self._key_buffer, self._value_buffer = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys[:, :, :width], values[:, :, :width]
            self.is_initialized = True

        def update(
            self,
            key_states: torch.Tensor,
            value_states: torch.Tensor,
            *args: object,
            **kwargs: object,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            self._key_buffer[:, :, start:end].copy_(key_states)
            self._value_buffer[:, :, start:end].copy_(value_states)
            self.keys = self._key_buffer[:, :, :end]
            self.values = self._value_buffer[:, :, :end]
            return self.keys, self.values

    return SlabLayer


class KVSlab:
    """Keys/values of every row in the decode batch, with the attention mask they imply."""

    def __init__(self, layers: KV, lengths: list[int], width: int) -> None:
        self.layers = layers
        self.lengths = lengths
        self.width = width

    @classmethod
    def empty(cls) -> KVSlab:
        """A slab with no rows."""
        return cls([], [], 0)

    @property
    def rows(self) -> int:
        """Rows held."""
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        """Columns the buffers have room for."""
        return self.layers[0][0].shape[2] if self.layers else 0

    @classmethod
    def build(
        cls, old: KVSlab | None, sources: Sequence[RowSource], headroom: int | None = None
    ) -> KVSlab:
        """A new slab holding ``old``'s rows (if any) followed by one row per source."""
        headroom = HEADROOM if headroom is None else headroom
        lengths = (list(old.lengths) if old is not None else []) + [s.length for s in sources]
        width = max(lengths)
        template = old.layers if old is not None and old.layers else sources[0].kv
        out = cls(_allocate(template, len(lengths), width, width + headroom), lengths, width)
        n_old = old.rows if old is not None else 0
        for layer, (k, v) in enumerate(out.layers):
            if n_old:
                ok, ov = old.layers[layer]  # type: ignore[union-attr]
                shift = width - old.width  # type: ignore[union-attr]
                k[:n_old, :, shift:width].copy_(ok[:, :, : old.width])  # type: ignore[union-attr]
                v[:n_old, :, shift:width].copy_(ov[:, :, : old.width])  # type: ignore[union-attr]
            for first, count, step in _runs(sources):
                src = sources[first]
                sk, sv = src.kv[layer]
                rows = slice(n_old + first, n_old + first + count)
                col = width - src.length
                for start, end in src.spans:
                    if step:
                        picked = slice(src.index, src.index + count)
                        k[rows, :, col : col + end - start].copy_(sk[picked, :, start:end])
                        v[rows, :, col : col + end - start].copy_(sv[picked, :, start:end])
                    else:  # one prefill shared by identical prompts
                        k[rows, :, col : col + end - start].copy_(sk[src.index, :, start:end])
                        v[rows, :, col : col + end - start].copy_(sv[src.index, :, start:end])
                    col += end - start
        return out

    def keep(self, rows: Sequence[int], headroom: int | None = None) -> KVSlab:
        """A new slab of only ``rows`` (in that order), trimmed of all-padding columns."""
        if not rows:
            return KVSlab.empty()
        headroom = HEADROOM if headroom is None else headroom
        lengths = [self.lengths[r] for r in rows]
        width = max(lengths)
        start = self.width - width
        index = torch.tensor(list(rows), device=self.layers[0][0].device)
        out = KVSlab(_allocate(self.layers, len(rows), 0, width + headroom), lengths, width)
        for (k, v), (ok, ov) in zip(out.layers, self.layers, strict=True):
            k[:, :, :width].copy_(ok[:, :, start : self.width].index_select(0, index))
            v[:, :, :width].copy_(ov[:, :, start : self.width].index_select(0, index))
        return out

    def row_kv(self, row: int, length: int) -> KV:
        """A copy of the last ``length`` computed keys/values of ``row`` (batch dimension 1)."""
        lo = self.width - self.lengths[row]
        return [
            (
                k[row : row + 1, :, lo : lo + length].clone(),
                v[row : row + 1, :, lo : lo + length].clone(),
            )
            for k, v in self.layers
        ]

    def attention_mask(self, extra: int) -> torch.Tensor | None:
        """The ``[rows, width + extra]`` padding mask of a step appending ``extra`` tokens per row.

        None when no row is padded, so attention needs no mask at all.
        """
        if all(n == self.width for n in self.lengths):
            return None
        device = self.layers[0][0].device
        starts = self.width - torch.tensor(self.lengths, device=device)
        columns = torch.arange(self.width + extra, device=device)
        return (columns[None] >= starts[:, None]).long()

    def cache(self, extra: int) -> object:
        """A transformers cache over this slab for a step appending ``extra`` tokens per row.

        Grows the buffers first when they lack room. After the forward call
        :meth:`advance` to account for the written columns.
        """
        from transformers import DynamicCache

        self.reserve(extra)
        layer_class = _slab_layer_class()
        cache = DynamicCache()
        cache.layers = [layer_class(k, v, self.width) for k, v in self.layers]
        return cache

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more columns, growing (copying) the buffers when they lack it."""
        if self.width + extra > self.capacity:
            grown = _allocate(self.layers, self.rows, 0, self.width + extra + HEADROOM)
            for (k, v), (ok, ov) in zip(grown, self.layers, strict=True):
                k[:, :, : self.width].copy_(ok[:, :, : self.width])
                v[:, :, : self.width].copy_(ov[:, :, : self.width])
            self.layers = grown

    def advance(self, extra: int) -> None:
        """Record that every row gained ``extra`` computed tokens."""
        self.width += extra
        self.lengths = [n + extra for n in self.lengths]


def _runs(sources: Sequence[RowSource]) -> list[tuple[int, int, int]]:
    """Consecutive sources copyable as one block: (first, count, index step 0 or 1).

    Sources from the same prefill forward with the same spans form a run when their
    batch indices go up by one (distinct prompts) or stay put (one shared prompt),
    so a whole group lands in the slab with one copy per layer instead of one per row.
    """
    runs: list[tuple[int, int, int]] = []
    for i, src in enumerate(sources):
        if runs:
            first, count, step = runs[-1]
            head = sources[first]
            last = sources[i - 1]
            delta = src.index - last.index
            if (
                src.kv is head.kv
                and src.spans == head.spans
                and delta in (0, 1)
                and (count == 1 or delta == step)
            ):
                runs[-1] = (first, count + 1, delta)
                continue
        runs.append((i, 1, 1))
    return runs


def _allocate(template: KV, rows: int, zeroed: int, capacity: int) -> KV:
    """Per-layer buffers shaped like ``template``'s, the first ``zeroed`` columns zero.

    Only the columns left of every row's start are ever read unwritten, and they lie
    in the first ``width`` columns; zeroing just those keeps padding finite (masked
    scores must not turn into NaN) without clearing the whole buffer.
    """
    out: KV = []
    for k, v in template:
        shape_k = (rows, k.shape[1], capacity, k.shape[3])
        shape_v = (rows, v.shape[1], capacity, v.shape[3])
        nk = torch.empty(shape_k, dtype=k.dtype, device=k.device)
        nv = torch.empty(shape_v, dtype=v.dtype, device=v.device)
        if zeroed:
            nk[:, :, :zeroed].zero_()
            nv[:, :, :zeroed].zero_()
        out.append((nk, nv))
    return out
