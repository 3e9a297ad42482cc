"""Key/value caches of already-computed token prefixes, for the embedded generator.

A cached prefix is the per-layer attention keys and values of one token sequence
(batch dimension 1). A request whose ids start with a cached sequence needs only
its new suffix computed. Two kinds are kept: the last sequence of each session
(bounded LRU, evicted by entries and by tokens) and static prefixes registered by
callers (an agent's fixed prompt), which stay until the weights change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Per-layer ``(keys, values)``, each ``[1, kv_heads, seq, head_dim]``.
KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CachedPrefix:
    """Token ids and the keys/values computed for exactly those ids."""

    ids: tuple[int, ...]
    kv: KV | None

    def sliced(self, length: int) -> KV:
        """The keys/values of the first ``length`` tokens (views, never copied in place)."""
        assert self.kv is not None
        return [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Session and static prefix caches, safe to use from several threads.

    ``max_sessions`` and ``max_tokens`` bound the session entries (least recently
    used first out); registered static prefixes are not counted against them.
    """

    def __init__(self, *, max_sessions: int = 64, max_tokens: int = 65536) -> None:
        if max_sessions < 0 or max_tokens < 0:
            raise ValueError(
                f"max_sessions and max_tokens must be >= 0; got {max_sessions}, {max_tokens}"
            )
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self._sessions: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._static: dict[tuple[int, ...], CachedPrefix] = {}
        #: Forked session -> the session it was forked from (:meth:`link_session`).
        self._links: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        #: Bumped on every invalidation; a row admitted under an older epoch
        #: must not store its keys/values (they may mix two weight versions).
        self.epoch = 0

    def register_static(self, ids: Sequence[int]) -> None:
        """Remember a static prefix; its keys/values are computed on first use."""
        key = tuple(int(t) for t in ids)
        if not key:
            raise ValueError("a registered prefix must hold at least one token; got none")
        with self._lock:
            self._static.setdefault(key, CachedPrefix(key, None))

    def static_missing_kv(self) -> list[tuple[int, ...]]:
        """Registered prefixes whose keys/values are not computed yet."""
        with self._lock:
            return [k for k, v in self._static.items() if v.kv is None]

    def set_static_kv(self, ids: tuple[int, ...], kv: KV, epoch: int) -> None:
        """Store the keys/values computed for a registered prefix."""
        with self._lock:
            if epoch == self.epoch and ids in self._static:
                self._static[ids] = CachedPrefix(ids, kv)

    def store_session(self, session_id: str, ids: Sequence[int], kv: KV, epoch: int) -> None:
        """Keep ``session_id``'s latest sequence, evicting old sessions past the bounds."""
        if self.max_sessions == 0 or len(ids) > self.max_tokens:
            return
        with self._lock:
            if epoch != self.epoch:
                return
            self._sessions.pop(session_id, None)
            self._links.pop(session_id, None)  # its own entry now; the parent's no longer needed
            self._sessions[session_id] = CachedPrefix(tuple(ids), kv)
            total = sum(len(p.ids) for p in self._sessions.values())
            while self._sessions and (
                len(self._sessions) > self.max_sessions or total > self.max_tokens
            ):
                _, old = self._sessions.popitem(last=False)
                total -= len(old.ids)

    def lookup(self, ids: Sequence[int], session_id: str | None) -> tuple[int, CachedPrefix | None]:
        """The best cached prefix for ``ids``: (usable length, entry), at least one id left to compute."""
        limit = len(ids) - 1  # the last prompt token must run to give the next-token logits
        best_len, best = 0, None
        with self._lock:
            candidates = [p for p in self._static.values() if p.kv is not None]
            owner = session_id
            for _ in range(8):  # a fork without an entry of its own reads its ancestors'
                if owner is None or owner in self._sessions:
                    break
                owner = self._links.get(owner)
            if owner is not None and owner in self._sessions:
                self._sessions.move_to_end(owner)
                candidates.append(self._sessions[owner])
            for entry in candidates:
                n = min(common_prefix_len(entry.ids, ids), limit)
                if n > best_len:
                    best_len, best = n, entry
        return best_len, best

    def link_session(self, child: str, parent: str) -> None:
        """Let ``child``'s lookups use ``parent``'s cached sequence until ``child`` stores one (a fork)."""
        with self._lock:
            self._links[child] = parent
            while len(self._links) > 4 * max(1, self.max_sessions):
                self._links.popitem(last=False)

    def invalidate(self) -> None:
        """Drop every computed key/value (the weights changed); keep static prefix ids."""
        with self._lock:
            self.epoch += 1
            self._sessions.clear()
            self._links.clear()
            self._static = {k: CachedPrefix(k, None) for k in self._static}
