"""A loopback server that speaks SGLang's native HTTP API on top of the embedded generator.

Real tokens and log-probs flow (a :class:`TransformersGenerator` answers), so the
SGLang client can be tested end to end on a CPU machine. The server binds
127.0.0.1, runs in a thread with its own event loop (usable from sync and async
tests alike), can be stopped and started again on the same port, and injects
faults on request: 5xx replies, malformed JSON, delays, dropped connections.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from typing import Any

from policies.base import ContextOverflowError, GenerationError, SamplingParams
from policies.loading import load_causal_lm
from policies.transformers_generator import TransformersGenerator

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


class LoopbackSGLangServer:
    """``/generate``, ``/health``, ``/flush_cache``, ``/update_weights_from_disk``, ``/model_info``.

    ``generator`` may be shared by several servers (each request runs on the
    calling server's loop). ``requests`` records ``(route, body)`` of every request
    that reached a handler, faults included.
    """

    def __init__(self, generator: TransformersGenerator, *, model_path: str = "loopback") -> None:
        self.generator = generator
        self.model_path = model_path
        self.port = 0
        self.requests: list[tuple[str, Any]] = []
        self.flushes = 0
        self._faults: deque[tuple[str, float]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    # -- faults --------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` requests with HTTP ``status``."""
        self._faults.extend([("status", float(status))] * n)

    def malformed_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with a body that is not JSON."""
        self._faults.extend([("malformed", 0.0)] * n)

    def incomplete_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with JSON that lacks ``meta_info``."""
        self._faults.extend([("incomplete", 0.0)] * n)

    def delay_next(self, seconds: float, n: int = 1) -> None:
        """Hold the next ``n`` requests for ``seconds`` before answering."""
        self._faults.extend([("delay", seconds)] * n)

    def drop_next(self, n: int = 1) -> None:
        """Close the connection of the next ``n`` requests without answering."""
        self._faults.extend([("drop", 0.0)] * n)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> LoopbackSGLangServer:
        """Bind 127.0.0.1 (a free port the first time, the same port after a stop) and serve."""
        if self._thread is not None:
            raise RuntimeError(f"loopback server on port {self.port} is already running")
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, "127.0.0.1", self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # report a bind failure to start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(
            target=run, name=f"sglang-loopback-{self.port}", daemon=True
        )
        self._thread.start()
        ready.wait()
        if errors:
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close the socket, cancel requests in progress and end the loop thread."""
        if self._thread is None or self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join()
        self._thread = None
        self._loop = None

    def __enter__(self) -> LoopbackSGLangServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            method, path, _ = request_line.decode("latin-1").split(" ", 2)
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            raw = await reader.readexactly(length) if length else b""
            body = json.loads(raw) if raw else None
            self.requests.append((path, body))
            fault = self._faults.popleft() if self._faults else None
            if fault is not None:
                kind, value = fault
                if kind == "drop":
                    return
                if kind == "delay":
                    await asyncio.sleep(value)
                elif kind == "status":
                    await self._respond(writer, int(value), {"error": "injected fault"})
                    return
                elif kind == "malformed":
                    await self._respond_raw(writer, 200, b'{"output_ids": [1, 2')
                    return
                elif kind == "incomplete":
                    await self._respond(writer, 200, {"text": "", "output_ids": []})
                    return
            status, reply = await self._route(method, path, body)
            await self._respond(writer, status, reply)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/health":
            return 200, None
        if method == "GET" and path in ("/model_info", "/get_model_info"):
            return 200, {
                "model_path": self.model_path,
                "is_generation": True,
                "max_context": self.generator.max_context,
            }
        if method == "POST" and path == "/flush_cache":
            self.flushes += 1
            self.generator.weights_updated(self.generator.weights_version)
            return 200, "Cache flushed."
        if method == "POST" and path == "/update_weights_from_disk":
            return await self._update_weights(body)
        if method == "POST" and path == "/generate":
            return await self._generate(body)
        return 404, {"error": f"no route {method} {path}"}

    async def _generate(self, body: Any) -> tuple[int, Any]:
        try:
            sampling = dict(body["sampling_params"])
            seed = sampling.pop("sampling_seed", None)
            for key in ("no_stop_trim", "skip_special_tokens"):
                sampling.pop(key, None)
            top = int(body.get("top_logprobs_num") or 0)
            params = SamplingParams(**sampling, seed=seed, top_logprobs=top)
            ids = body["input_ids"]
        except (KeyError, TypeError, ValueError) as exc:
            return 400, {"error": f"bad /generate request: {exc}"}
        try:
            gen = await self.generator.generate(ids, params)
        except ContextOverflowError as exc:
            return 400, {"error": str(exc)}
        except GenerationError as exc:
            return 500, {"error": str(exc)}
        tokenizer = self.generator.tokenizer
        meta_top: dict[str, Any] = {}
        if params.top_logprobs:  # SGLang's shape; the embedded generator gives no ids here
            meta_top["output_top_logprobs"] = [
                [[lp, None, None] for lp in position] for position in gen.top_logprobs
            ]
        finish: dict[str, Any] = {"type": gen.finish_reason}
        if gen.finish_reason == "stop":
            finish["matched"] = gen.stop_match
        elif gen.finish_reason == "length":
            finish["length"] = len(gen.token_ids)
        return 200, {
            "text": tokenizer.decode(gen.token_ids, skip_special_tokens=False),
            "output_ids": gen.token_ids,
            "meta_info": {
                "id": body.get("rid"),
                "finish_reason": finish,
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": len(gen.token_ids),
                "cached_tokens": gen.cached_tokens,
                "output_token_logprobs": [
                    [lp, tok, tokenizer.decode([tok])]
                    for lp, tok in zip(gen.logprobs, gen.token_ids, strict=True)
                ],
                **meta_top,
            },
        }

    async def _update_weights(self, body: Any) -> tuple[int, Any]:
        path = (body or {}).get("model_path")
        if not path:
            return 400, {"success": False, "message": "model_path is required"}

        def load() -> None:
            new = load_causal_lm(path)
            self.generator.pause()
            try:
                self.generator.model.load_state_dict(new.state_dict())
                self.generator.weights_updated()
            finally:
                self.generator.resume()

        try:
            await asyncio.to_thread(load)
        except (OSError, ValueError, RuntimeError) as exc:
            return 400, {"success": False, "message": f"cannot load {path}: {exc}"}
        return 200, {"success": True, "message": f"loaded {path}", "num_paused_requests": 0}

    async def _respond(self, writer: asyncio.StreamWriter, status: int, reply: Any) -> None:
        if reply is None:
            payload = b""
        elif isinstance(reply, str):
            payload = reply.encode()
        else:
            payload = json.dumps(reply).encode()
        await self._respond_raw(writer, status, payload)

    async def _respond_raw(self, writer: asyncio.StreamWriter, status: int, payload: bytes) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()


def main(argv: list[str] | None = None) -> int:
    """Serve a model as a standalone process until SIGTERM or SIGINT.

    ``python tests/support/sglang_loopback.py --model PATH --port P`` (SGLang-style
    ``--model-path`` also accepted; other SGLang flags such as ``--tp`` are ignored).
    Binds 127.0.0.1 only.
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="SGLang-protocol loopback server (CPU)")
    parser.add_argument("--model", "--model-path", dest="model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args, _ = parser.parse_known_args(argv)
    if args.host != "127.0.0.1":
        parser.error(f"--host {args.host!r}: the loopback server binds 127.0.0.1 only")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = LoopbackSGLangServer(
        TransformersGenerator(args.model, device="cpu"), model_path=args.model
    )
    server.port = args.port
    server.start()
    print(f"loopback SGLang server on {server.url}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
