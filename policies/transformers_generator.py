"""The embedded generator: a transformers causal LM in this process, CPU or one GPU.

Concurrent ``generate`` calls are gathered by one background thread that runs a
token-by-token decode loop over all admitted rows at once (continuous batching: new
requests join between decode steps, finished rows leave). Admitted prompts are
prefilled together (:mod:`policies.prefill`), each starting from the longest cached
prefix it extends (its session's last sequence or a registered static prefix). The
rows' keys/values then live right-aligned in preallocated buffers
(:mod:`policies.kv_slab`) that each decode step extends in place; sampling runs on
all rows at once (:func:`policies.sampling.sample_batch`).

The forwards run on :func:`policies.forward.make_forward`'s choice: the lean Llama
forward where the architecture allows, transformers' own otherwise, in
``generator_dtype`` (``"auto"``: bfloat16 matmuls for a float32 Llama on a CPU with
native bfloat16, the model's dtype otherwise).

Log-probs are those of the sampled tokens under the model's own distribution:
``log_softmax`` of the raw logits, at temperature 1 whatever temperature the row
samples at. That is the behaviour probability the trainer's importance ratio needs.
They depend slightly on which rows shared each decode step (about 1e-5 in float32, up
to about 0.1 in bfloat16); a request with ``exact_logprobs`` gets them from the finished
sequence scored again on its own (:func:`policies.exact_logprobs.score_alone`), a
function of the weights and the token ids only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from policies.base import Generation, GenerationError, Generator, SamplingParams
from policies.decode_rows import (
    GeneratorStats,
    Request,
    Row,
    append_tokens,
    deliver,
    eos_token_ids,
)
from policies.exact_logprobs import score_alone
from policies.forward import make_forward
from policies.kv_slab import KVSlab
from policies.prefill import PrefillItem, prefill
from policies.prefix_cache import KV, PrefixCache
from policies.sampling import StopChecker, row_generator, sample_batch

__all__ = ["GeneratorStats", "TransformersGenerator"]

logger = logging.getLogger(__name__)


class TransformersGenerator(Generator):
    """Batched generation with a transformers causal LM, sharing its module with a trainer.

    The trainer that updates ``model``'s weights in place should wrap the update in
    ``async with generator.paused():`` (or the blocking ``pause()``/``resume()``),
    which lets the rows in flight finish and holds new ones back, then call
    ``weights_updated(version)`` so the forward's bfloat16 copies (if any) take the new
    weights and cached prefixes computed with the old ones are dropped. ``weights_lock`` is held during every forward pass, for callers that only
    need a forward never to see half-updated weights.
    """

    def __init__(
        self,
        model: str = "default",
        *,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_size: int = 16,
        max_context: int | None = None,
        max_context_cap: int = 8192,
        seed: int = 0,
        max_cached_sessions: int = 64,
        max_cached_tokens: int = 65536,
        generator_dtype: str = "auto",
        forward_path: str = "auto",
    ) -> None:
        from policies.default_model import resolve_model_path
        from policies.loading import load_causal_lm, load_tokenizer

        path = resolve_model_path(model)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        tokenizer = load_tokenizer(path)
        lm = load_causal_lm(path, dtype=dtype).to(dev)
        lm.eval()
        self._setup(
            lm,
            tokenizer,
            max_batch_size=max_batch_size,
            max_context=max_context,
            max_context_cap=max_context_cap,
            seed=seed,
            max_cached_sessions=max_cached_sessions,
            max_cached_tokens=max_cached_tokens,
            generator_dtype=generator_dtype,
            forward_path=forward_path,
        )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_context: int | None = None,
        max_context_cap: int = 8192,
        seed: int = 0,
        max_cached_sessions: int = 64,
        max_cached_tokens: int = 65536,
        generator_dtype: str = "auto",
        forward_path: str = "auto",
    ) -> TransformersGenerator:
        """Serve an already-loaded ``model`` (the trainer's module, shared, not copied).

        In a ``generator_dtype`` other than the model's, the forward holds cast copies
        of the weights, refreshed by :meth:`weights_updated`.
        """
        self = cls.__new__(cls)
        self._setup(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            max_context=max_context,
            max_context_cap=max_context_cap,
            seed=seed,
            max_cached_sessions=max_cached_sessions,
            max_cached_tokens=max_cached_tokens,
            generator_dtype=generator_dtype,
            forward_path=forward_path,
        )
        return self

    def _setup(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int,
        max_context: int | None,
        max_context_cap: int,
        seed: int,
        max_cached_sessions: int,
        max_cached_tokens: int,
        generator_dtype: str,
        forward_path: str,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1; got {max_batch_size}")
        self.model = model
        self._tokenizer = tokenizer
        #: The forward every prefill and decode step runs (lean or transformers', its dtype).
        self.forward = make_forward(model, generator_dtype, forward_path)
        config = model.config
        model_max = int(getattr(config, "max_position_embeddings", 0) or max_context_cap)
        if max_context is None:
            max_context = min(model_max, max_context_cap)
        elif max_context > model_max or max_context < 2:
            raise ValueError(
                f"max_context={max_context} must lie in [2, {model_max}] "
                "(the model's max_position_embeddings)"
            )
        self._max_context = int(max_context)
        self.max_batch_size = max_batch_size
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.prefix_cache = PrefixCache(
            max_sessions=max_cached_sessions, max_tokens=max_cached_tokens
        )
        self.stats = GeneratorStats()
        self.weights_version: int | str = 0
        #: Held during every forward pass; take it to change weights between two steps.
        self.weights_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._active = 0
        self._pauses = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- Generator protocol -------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose ids the model consumes."""
        return self._tokenizer

    @property
    def max_context(self) -> int:
        """Most tokens one sequence may hold (prompt plus generated)."""
        return self._max_context

    @property
    def device(self) -> torch.device:
        """The device the model's parameters live on."""
        return next(self.model.parameters()).device

    async def generate(
        self,
        input_ids: Sequence[int],
        params: SamplingParams,
        *,
        session_id: str | None = None,
    ) -> Generation:
        """Queue one request for the batching worker and await its generation."""
        self.check_context(input_ids)
        ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("input_ids is empty; expected at least one prompt token")
        loop = asyncio.get_running_loop()
        req = Request(
            ids=ids,
            params=params,
            max_new=min(params.max_new_tokens, self._max_context - len(ids)),
            session_id=session_id,
            loop=loop,
            future=loop.create_future(),
        )
        with self._cond:
            if self._stopping:
                raise GenerationError("the generator is closed; create a new one")
            self._queue.append(req)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="transformers-generator", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True
            raise

    async def aclose(self) -> None:
        """Stop the worker; queued and running requests fail with GenerationError."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    # -- cache and weight management ------------------------------------------

    def register_prefix(self, ids: Sequence[int]) -> None:
        """Keep the keys/values of a static prefix (an agent's fixed prompt) for reuse."""
        self.prefix_cache.register_static(ids)

    def weights_updated(self, version: int | str | None = None) -> None:
        """Record new weights: refresh the forward's copies, drop every cached prefix."""
        with self.weights_lock:
            self.forward.sync_weights()
        self.prefix_cache.invalidate()
        if version is None:
            version = self.weights_version + 1 if isinstance(self.weights_version, int) else 0
        self.weights_version = version

    def release_memory(self) -> None:
        """Drop what generation keeps between requests: cached prefixes, the forward's weight copies.

        For a trainer about to update the weights (it calls :meth:`weights_updated`
        afterwards, which would drop the prefixes anyway): their memory is free for the
        update. Both come back on the next request. Call it while :meth:`paused`.
        """
        self.prefix_cache.invalidate()
        with self.weights_lock:
            self.forward.release()

    @property
    def pending_requests(self) -> int:
        """Requests queued and not yet admitted to the decode batch."""
        with self._cond:
            return len(self._queue)

    def pause(self) -> None:
        """Block until no row is decoding, and admit none until :meth:`resume` (blocking)."""
        with self._cond:
            self._pauses += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._active == 0 or self._stopping)

    def resume(self) -> None:
        """Undo one :meth:`pause`."""
        with self._cond:
            if self._pauses == 0:
                raise RuntimeError("resume() without a matching pause()")
            self._pauses -= 1
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """``async with generator.paused():`` update weights with no generation in flight."""
        await asyncio.to_thread(self.pause)
        try:
            yield
        finally:
            self.resume()

    # -- the worker ----------------------------------------------------------

    def _run(self) -> None:
        rows: list[Row] = []
        slab = KVSlab.empty()
        logits: torch.Tensor | None = None
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda busy=bool(rows): (
                        self._stopping or busy or (bool(self._queue) and not self._pauses)
                    )
                )
                if self._stopping:
                    failed = [r.req for r in rows] + list(self._queue)
                    self._queue.clear()
                    break
                admitted: list[Request] = []
                while (
                    self._queue
                    and not self._pauses
                    and len(rows) + len(admitted) < self.max_batch_size
                ):
                    admitted.append(self._queue.popleft())
                self._active += len(admitted)
            try:
                with torch.inference_mode():
                    if admitted:
                        new_rows, new_logits, sources = self._prefill_all(admitted)
                        slab = KVSlab.build(slab if rows else None, sources)
                        logits = torch.cat([logits, new_logits]) if rows else new_logits
                        rows = rows + new_rows
                        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(rows))
                    assert logits is not None
                    finished = self._sample(rows, logits)
                    if finished:
                        rows, slab = self._drop(rows, slab, finished)
                    logits = self._decode(rows, slab) if rows else None
            except Exception as exc:  # a failed forward fails its rows, not the worker
                logger.exception("generation step failed")
                error = GenerationError(f"embedded generation failed: {exc!r}")
                in_rows = {id(r.req) for r in rows}
                failed_reqs = [r.req for r in rows] + [q for q in admitted if id(q) not in in_rows]
                for req in failed_reqs:
                    deliver(req, error)
                rows, slab, logits = [], KVSlab.empty(), None
                with self._cond:
                    self._active -= len(failed_reqs)
                    self._cond.notify_all()
        for req in failed:
            deliver(req, GenerationError("the generator was closed before this request finished"))
        with self._cond:
            self._active = 0
            self._cond.notify_all()

    def _prefill_forward(
        self, ids: torch.Tensor, positions: torch.Tensor, past: KV, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        with self.weights_lock:
            return self.forward.prefill(ids, positions, past, mask)

    def _ensure_static_prefixes(self) -> None:
        device = self.device
        for ids in self.prefix_cache.static_missing_kv():
            epoch = self.prefix_cache.epoch
            tokens = torch.tensor([ids], device=device)
            positions = torch.arange(len(ids), device=device)[None]
            _, kv = self._prefill_forward(tokens, positions, [], None)
            self.stats.prefill_forwards += 1
            self.prefix_cache.set_static_kv(ids, kv, epoch)

    def _prefill_all(self, reqs: list[Request]) -> tuple[list[Row], torch.Tensor, list]:
        """Prefill admitted requests in padded groups; their rows, logits and keys/values."""
        self._ensure_static_prefixes()
        epoch = self.prefix_cache.epoch
        items = []
        for req in reqs:
            cached, entry = self.prefix_cache.lookup(req.ids, req.session_id)
            items.append(PrefillItem(tuple(req.ids), cached, entry))
        logits, sources, forwards = prefill(self._prefill_forward, items, self.device)
        self.stats.prefill_forwards += forwards
        rows = []
        for req, item in zip(reqs, items, strict=True):
            self.stats.requests += 1
            self.stats.cached_tokens += item.cached
            seed = req.params.seed if req.params.seed is not None else self._rng.getrandbits(63)
            gen = row_generator(seed, logits[0].device) if req.params.temperature > 0 else None
            rows.append(
                Row(
                    req=req,
                    stop=StopChecker(req.params, self.eos_token_ids, self._tokenizer),
                    gen=gen,
                    epoch=epoch,
                    cached_tokens=item.cached,
                    length=len(req.ids),
                )
            )
        return rows, torch.stack(logits), sources

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Sample every row's next token; return the indices of rows that are done."""
        tokens, logprobs, top = sample_batch(
            logits, [r.req.params for r in rows], [r.gen for r in rows]
        )
        return append_tokens(rows, tokens, logprobs, top, rescore=self._score_alone)

    def _score_alone(self, row: Row) -> list[float]:
        """``row``'s log-probs as a batch of one would give them (``exact_logprobs``)."""
        self.stats.rescored_requests += 1
        return score_alone(self._prefill_forward, row.req.ids, row.out, self.device)

    def _drop(self, rows: list[Row], slab: KVSlab, finished: list[int]) -> tuple[list[Row], KVSlab]:
        done = set(finished)
        for i in finished:
            row = rows[i]
            if row.req.session_id is not None and not row.req.cancelled:
                # Keys/values exist for every token but the last sampled one.
                ids = (row.req.ids + row.out)[: row.length]
                row_kv = slab.row_kv(i, row.length)
                self.prefix_cache.store_session(row.req.session_id, ids, row_kv, row.epoch)
        keep = [i for i in range(len(rows)) if i not in done]
        with self._cond:
            self._active -= len(done)
            self._cond.notify_all()
        return [rows[i] for i in keep], slab.keep(keep)

    def _decode(self, rows: list[Row], slab: KVSlab) -> torch.Tensor:
        """One decode step over every row; the next-token logits ([rows, vocab])."""
        device = self.device
        ids = torch.tensor([[r.out[-1]] for r in rows], device=device)
        positions = torch.tensor([[r.length] for r in rows], device=device)
        mask = slab.attention_mask(1)
        with self.weights_lock:
            logits = self.forward.decode(ids, positions, slab, mask)
        slab.advance(1)
        self.stats.decode_forwards += 1
        for row in rows:
            row.length += 1
        return logits
