"""The embedded generator's bookkeeping: queued requests, decode rows, counters, hand-off."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from policies.base import Generation, SamplingParams
from policies.sampling import StopChecker


@dataclass
class GeneratorStats:
    """Counters of the work done, for tests and benchmarks."""

    requests: int = 0
    prefill_forwards: int = 0
    decode_forwards: int = 0
    max_batch_rows: int = 0
    cached_tokens: int = 0
    rescored_requests: int = 0  #: finished requests scored again alone (exact_logprobs)


@dataclass
class Request:
    """One queued ``generate`` call: its prompt, sampling and the future that awaits it."""

    ids: list[int]
    params: SamplingParams
    max_new: int
    session_id: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]
    cancelled: bool = False


@dataclass
class Row:
    """One admitted request in the decode batch: its sampling state and output so far."""

    req: Request
    stop: StopChecker
    gen: torch.Generator | None
    epoch: int
    cached_tokens: int
    length: int  # tokens whose keys/values are computed
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)  # only when the request asks


def deliver(req: Request, result: Generation | BaseException) -> None:
    """Hand a result to the awaiting coroutine from the worker thread."""

    def _set() -> None:
        if req.future.done():
            return
        if isinstance(result, BaseException):
            req.future.set_exception(result)
        else:
            req.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
        req.loop.call_soon_threadsafe(_set)


def eos_token_ids(model: object, tokenizer: object) -> list[int]:
    """Every end-of-sequence id the model's config, generation config or tokenizer names."""
    eos: set[int] = set()
    sources = (
        getattr(getattr(model, "config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    )
    for source in sources:
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, (list, tuple)):
            eos.update(int(t) for t in source)
    return sorted(eos)


def append_tokens(
    rows: list[Row],
    tokens: list[int],
    logprobs: list[float],
    top_logprobs: list[list[float]] | None = None,
    rescore: Callable[[Row], list[float]] | None = None,
) -> list[int]:
    """Give each row its sampled token; deliver the rows now done and return their indices.

    ``top_logprobs`` (from :func:`policies.sampling.sample_batch`) is kept for the rows
    whose request asked for it. A finished row whose request asks ``exact_logprobs``
    gets its log-probs from ``rescore(row)`` before it is delivered.

    A row is done when its request was cancelled, when the token completes a stop
    condition (EOS, a stop token id, a stop string) or when it reached its token cap.
    """
    finished: list[int] = []
    for i, row in enumerate(rows):
        if row.req.cancelled:
            finished.append(i)
            continue
        row.out.append(tokens[i])
        row.logprobs.append(logprobs[i])
        if top_logprobs is not None and row.req.params.top_logprobs > 0:
            row.top_logprobs.append(top_logprobs[i])
        match = row.stop.check(row.out)
        if match is not None:
            _finish(row, "stop", match, rescore)
            finished.append(i)
        elif len(row.out) >= row.req.max_new:
            _finish(row, "length", None, rescore)
            finished.append(i)
    return finished


def _finish(
    row: Row,
    reason: str,
    match: str | int | None,
    rescore: Callable[[Row], list[float]] | None = None,
) -> None:
    if rescore is not None and row.req.params.exact_logprobs:
        row.logprobs = rescore(row)
    generation = Generation(
        token_ids=row.out,
        logprobs=row.logprobs,
        finish_reason=reason,  # type: ignore[arg-type]
        stop_match=match,
        prompt_tokens=len(row.req.ids),
        cached_tokens=row.cached_tokens,
        top_logprobs=row.top_logprobs,
    )
    deliver(row.req, generation)
