"""Client for SGLang's native HTTP API (``POST /generate`` with token ids).

Requests carry ``input_ids`` and come back as ``output_ids`` with
``meta_info.output_token_logprobs`` ``[(logprob, token_id, text), ...]``, so no text
is re-tokenized. A request with ``SamplingParams.top_logprobs = k`` also sends
``top_logprobs_num: k`` and reads ``meta_info.output_top_logprobs``: per output token,
a list of ``k`` ``[logprob, token_id, text]`` entries (text null unless
``return_text_in_logprobs``), highest first. Every request of one ``session_id`` goes to the same server
(sticky, bounded LRU map) so SGLang's RadixAttention reuses the session's prefix;
new sessions go to the server with the fewest requests in flight.

SGLang computes ``output_token_logprobs`` from the logits the sampler saw; whether
the temperature is applied first depends on the server version and its settings.
Sample at temperature 1 (or recompute with the trainer) where exact behaviour
probabilities matter.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import httpx

from policies.base import Generation, GenerationError, Generator, SamplingParams
from policies.loading import load_tokenizer

logger = logging.getLogger(__name__)

_FINISH_TYPES = {"stop", "length", "abort"}


def parse_generate_response(body: Any, server: str, top_logprobs: int = 0) -> Generation:
    """Turn one ``/generate`` JSON reply into a :class:`Generation`; GenerationError names what is missing.

    With ``top_logprobs`` > 0 (the ``top_logprobs_num`` sent), ``output_top_logprobs``
    must hold one list of entries per output token.
    """

    def bad(what: str) -> GenerationError:
        return GenerationError(f"malformed /generate reply from {server}: {what}")

    if not isinstance(body, dict):
        raise bad(f"expected a JSON object, got {type(body).__name__}")
    output_ids = body.get("output_ids")
    if not isinstance(output_ids, list) or not all(isinstance(t, int) for t in output_ids):
        raise bad("'output_ids' is missing or not a list of ints")
    meta = body.get("meta_info")
    if not isinstance(meta, dict):
        raise bad("'meta_info' is missing or not an object")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise bad("'meta_info.output_token_logprobs' is missing (was return_logprob sent?)")
    if len(entries) != len(output_ids):
        raise bad(
            f"'meta_info.output_token_logprobs' has {len(entries)} entries for "
            f"{len(output_ids)} output_ids"
        )
    logprobs: list[float] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise bad(
                f"output_token_logprobs[{i}] is {entry!r}; expected [logprob, token_id, text]"
            )
        logprob, token_id = entry[0], entry[1]
        if token_id != output_ids[i]:
            raise bad(
                f"output_token_logprobs[{i}] is for token {token_id} but output_ids[{i}] is {output_ids[i]}"
            )
        if not isinstance(logprob, (int, float)):
            raise bad(f"output_token_logprobs[{i}] has logprob {logprob!r}; expected a number")
        logprobs.append(float(logprob))
    top = _parse_top_logprobs(meta, len(output_ids), top_logprobs, bad) if top_logprobs else []
    finish = meta.get("finish_reason")
    if not isinstance(finish, dict) or finish.get("type") not in _FINISH_TYPES:
        raise bad(f"'meta_info.finish_reason' is {finish!r}; expected {{type: stop|length|abort}}")
    reason = finish["type"]
    matched = finish.get("matched") if reason == "stop" else None
    if matched is not None and not isinstance(matched, (int, str)):
        matched = str(matched)
    return Generation(
        token_ids=list(output_ids),
        logprobs=logprobs,
        finish_reason=reason,
        stop_match=matched,
        prompt_tokens=int(meta.get("prompt_tokens") or 0),
        cached_tokens=int(meta.get("cached_tokens") or 0),
        top_logprobs=top,
    )


def _parse_top_logprobs(meta: dict[str, Any], n_tokens: int, k: int, bad: Any) -> list[list[float]]:
    """``meta_info.output_top_logprobs`` as per-token lists of at most ``k`` log-probs, highest first."""
    entries = meta.get("output_top_logprobs")
    if not isinstance(entries, list):
        raise bad("'meta_info.output_top_logprobs' is missing (was top_logprobs_num sent?)")
    if len(entries) != n_tokens:
        raise bad(
            f"'meta_info.output_top_logprobs' has {len(entries)} entries for {n_tokens} output_ids"
        )
    out: list[list[float]] = []
    for i, position in enumerate(entries):
        if not isinstance(position, list) or not position:
            raise bad(
                f"output_top_logprobs[{i}] is {position!r}; expected a list of [logprob, token_id, text]"
            )
        values = []
        for entry in position:
            if (
                not isinstance(entry, (list, tuple))
                or len(entry) < 2
                or not isinstance(entry[0], (int, float))
            ):
                raise bad(
                    f"output_top_logprobs[{i}] holds {entry!r}; expected [logprob, token_id, text]"
                )
            values.append(float(entry[0]))
        out.append(sorted(values, reverse=True)[:k])
    return out


class SGLangGenerator(Generator):
    """Generation on one or more SGLang servers, with sticky per-session routing.

    ``base_urls``: ``http://host:port`` of each server. ``tokenizer``: the model's
    tokenizer, or a path/id (``"default"`` included) to load it from locally; it is
    only used for ``tokenizer`` and never to re-tokenize outputs. ``max_context``:
    the servers' context length, checked before any call. ``timeout_s``: limit of one
    HTTP attempt; ``max_retries`` more attempts follow connection errors and 5xx
    replies, ``backoff_s * 2**attempt`` apart. ``cache_salt_by_version``: send the
    weights version as ``cache_salt`` so prefixes cached under old weights never match.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        tokenizer: Any,
        max_context: int = 32768,
        max_concurrency: int = 64,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_sessions: int = 100_000,
        cache_salt_by_version: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("base_urls is empty; expected at least one http://host:port")
        self.base_urls = [u.rstrip("/") for u in urls]
        self._tokenizer = load_tokenizer(tokenizer)
        if max_context < 2:
            raise ValueError(f"max_context must be at least 2; got {max_context}")
        self._max_context = max_context
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError(
                f"max_concurrency must be >= 1 and max_retries >= 0; got {max_concurrency}, {max_retries}"
            )
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_sessions = max_sessions
        self.cache_salt_by_version = cache_salt_by_version
        self.weights_version: int | str = 0
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client = httpx.AsyncClient(timeout=self._timeout, transport=transport)
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._in_flight = dict.fromkeys(self.base_urls, 0)
        self._assigned = dict.fromkeys(self.base_urls, 0)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the servers' model uses."""
        return self._tokenizer

    @property
    def max_context(self) -> int:
        """The servers' context length in tokens."""
        return self._max_context

    def server_for(self, session_id: str | None) -> str:
        """The server a request of ``session_id`` goes to (recorded for sticky routing)."""
        if session_id is not None and session_id in self._sessions:
            self._sessions.move_to_end(session_id)
            return self._sessions[session_id]
        # Fewest requests in flight; ties go to the server given the fewest sessions.
        server = min(self.base_urls, key=lambda u: (self._in_flight[u], self._assigned[u]))
        if session_id is not None:
            self._assigned[server] += 1
            self._sessions[session_id] = server
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return server

    def request_body(self, input_ids: Sequence[int], params: SamplingParams) -> dict[str, Any]:
        """The JSON body of ``POST /generate`` for one request."""
        sampling: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "stop": list(params.stop),
            "stop_token_ids": list(params.stop_token_ids),
            "ignore_eos": params.ignore_eos,
            # Keep the stop string and special tokens: the trajectory holds what was sampled.
            "no_stop_trim": True,
            "skip_special_tokens": False,
        }
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        body: dict[str, Any] = {
            "input_ids": [int(t) for t in input_ids],
            "sampling_params": sampling,
            "return_logprob": True,
            "logprob_start_len": -1,
            "rid": uuid.uuid4().hex,
        }
        if params.top_logprobs:
            body["top_logprobs_num"] = params.top_logprobs
        if self.cache_salt_by_version:
            body["cache_salt"] = f"weights-{self.weights_version}"
        return body

    async def generate(
        self,
        input_ids: Sequence[int],
        params: SamplingParams,
        *,
        session_id: str | None = None,
    ) -> Generation:
        """POST one request to the session's server; retry connection errors and 5xx."""
        self.check_context(input_ids)
        # Cap like the embedded backend: the sequence never outgrows the context.
        room = self._max_context - len(input_ids)
        if params.max_new_tokens > room:
            params = params.model_copy(update={"max_new_tokens": room})
        body = self.request_body(input_ids, params)
        server = self.server_for(session_id)
        async with self._semaphore:
            self._in_flight[server] += 1
            try:
                reply = await self._post(server, "/generate", body)
            except GenerationError:
                # Let the session move to a server that answers next time.
                if session_id is not None:
                    self._sessions.pop(session_id, None)
                raise
            finally:
                self._in_flight[server] -= 1
        return parse_generate_response(reply, server, params.top_logprobs)

    async def _post(
        self, server: str, route: str, body: dict[str, Any] | None, *, parse_json: bool = True
    ) -> Any:
        url = server + route
        last: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._client.post(url, json=body)
            except httpx.TimeoutException as exc:
                raise GenerationError(
                    f"{url} did not answer within the timeout ({self._timeout.read}s): {exc!r}"
                ) from exc
            except httpx.TransportError as exc:
                last = f"connection failed: {exc!r}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise GenerationError(
                    f"{url} refused the request: HTTP {response.status_code}: {response.text[:500]}"
                )
            if not parse_json or not response.content:
                return response.text
            try:
                return response.json()
            except ValueError as exc:
                raise GenerationError(
                    f"malformed reply from {url}: not JSON ({response.text[:200]!r})"
                ) from exc
        raise GenerationError(f"{url} failed after {self.max_retries + 1} attempts; last: {last}")

    def fork_session(self, parent_session: str, child_session: str) -> None:
        """Route ``child_session`` to ``parent_session``'s server, whose radix cache holds their prefix."""
        server = self._sessions.get(parent_session)
        if server is not None:
            self._assigned[server] += 1
            self._sessions[child_session] = server
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def register_prefix(self, ids: Sequence[int]) -> None:
        """Accepted for parity with the embedded backend: RadixAttention caches shared prefixes by itself."""

    async def flush_cache(self) -> None:
        """``POST /flush_cache`` on every server (after a weight update)."""
        await asyncio.gather(
            *(self._post(s, "/flush_cache", None, parse_json=False) for s in self.base_urls)
        )

    async def update_weights_from_disk(
        self, model_path: str, version: int | str | None = None
    ) -> None:
        """Load new weights on every server from ``model_path``, then record ``version``."""
        replies = await asyncio.gather(
            *(
                self._post(s, "/update_weights_from_disk", {"model_path": model_path})
                for s in self.base_urls
            )
        )
        for server, reply in zip(self.base_urls, replies, strict=True):
            if isinstance(reply, dict) and reply.get("success") is False:
                raise GenerationError(
                    f"{server} failed to load weights from {model_path}: {reply.get('message')}"
                )
        self.weights_version = (
            version
            if version is not None
            else (self.weights_version + 1 if isinstance(self.weights_version, int) else 0)
        )

    async def aclose(self) -> None:
        """Close the HTTP client (idempotent)."""
        await self._client.aclose()
