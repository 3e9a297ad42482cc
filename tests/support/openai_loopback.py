"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions API, with faults on demand.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` like ``vllm serve``
does (an unknown model is a 404 whose error names it), and the next requests can be
made to fail the ways a real server does: slow, an error status with an error body, a
body cut off mid-way (the connection closes before Content-Length bytes), a body that
is not JSON. Every request body is recorded. It runs in a thread of the test process
and stops by itself when the test stops it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (a timeout test) closes its socket; that is no error here."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class OpenAILoopback:
    """A programmable OpenAI-compatible server serving ``model`` on 127.0.0.1."""

    def __init__(self, model: str = "served-model", reply: str = "Looks right to me.") -> None:
        self.model = model
        self.reply = reply
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self._faults: deque[tuple[str, Any]] = deque()
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAILoopback:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fault_next(self, kind: str, value: Any = None, times: int = 1) -> None:
        """The next ``times`` completions fail as ``kind``: slow, status, cut, not_json, length."""
        with self._lock:
            self._faults.extend([(kind, value)] * times)

    def _next_fault(self) -> tuple[str, Any] | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def _json(self, status: int, data: Any) -> None:
                self._send(status, json.dumps(data).encode())

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": server.model}]})
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(size) or b"{}")
                server.requests.append((self.path, body, dict(self.headers)))
                if self.path != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if body.get("model") != server.model:
                    self._json(
                        404,
                        {
                            "error": {
                                "message": f"The model `{body.get('model')}` does not exist.",
                                "type": "NotFoundError",
                                "code": 404,
                            }
                        },
                    )
                    return
                fault = server._next_fault()
                finish = "stop"
                if fault is not None:
                    kind, value = fault
                    if kind == "slow":
                        time.sleep(value)
                    elif kind == "status":
                        self._json(
                            value, {"error": {"message": "boom: engine dead", "code": value}}
                        )
                        return
                    elif kind == "cut":
                        whole = json.dumps(completion(server.model, server.reply, "stop")).encode()
                        self._send(200, whole[: len(whole) // 2], length=len(whole))
                        self.close_connection = True
                        return
                    elif kind == "not_json":
                        self._send(200, b"<html>502 Bad Gateway</html>")
                        return
                    elif kind == "length":
                        finish = "length"
                self._json(200, completion(server.model, server.reply, finish))

        return Handler


def completion(model: str, text: str, finish_reason: str) -> dict[str, Any]:
    """A chat-completions response body with one choice."""
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
