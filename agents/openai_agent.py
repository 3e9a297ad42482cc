"""Agents answered by any OpenAI-compatible server: ``vllm serve``, SGLang's OpenAI API, a hosted API.

An agent of ``kind: openai`` sends its prompt template, rendered as a system and a user
message, to ``{base_url}/chat/completions`` with the model name, the agent's sampling
(temperature, top-p, the reply cap as ``max_tokens``, the reply's seed) and the
template's chat-template variables (``enable_thinking: false`` for Qwen3 agents; sent
only when the template sets some, as hosted APIs refuse fields they do not know). The
reply is text only: the server's vocabulary and log-probs are not the policy's, so the
pool counts its tokens with the policy's tokenizer and cuts it at the cap like any
text reply.

Faults never raise out of :meth:`OpenAIAgent.consult`: a server that is down, too slow,
answers an error body (an unknown model is a 404 naming it), or cuts its body off comes
back as ``AgentReply(error=...)``, which the pool retries (``retries``) and the env
counts as a consult error; the run goes on. Connection failures are retried by httpx's
transport (``connect_retries``) before they count as an attempt. The API key, when the
server needs one, is read from the environment variable ``api_key_env`` names, never
from the config.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx

from agents.base import Agent, AgentReply, ConsultRequest
from agents.llm_agent import reply_seed
from agents.templates import PromptTemplate, load_template

#: The most characters of an error body quoted in a consult error.
ERROR_BODY_CHARS = 300


class OpenAIAgent(Agent):
    """An agent whose replies an OpenAI-compatible chat-completions endpoint samples.

    ``base_url`` is the API root (``http://127.0.0.1:8000/v1``); ``model`` the served
    model's name. ``timeout_s`` bounds one HTTP request (the pool's per-attempt timeout
    bounds the whole attempt too); ``connect_retries`` are httpx's retries of a failed
    connection. ``max_reply_tokens``, ``temperature`` and ``top_p`` are the agent's
    reply settings; ``seed`` the base of each reply's seed (:func:`reply_seed`).
    """

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        template: PromptTemplate | str | None = None,
        max_reply_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.8,
        timeout_s: float = 60.0,
        connect_retries: int = 2,
        include_solution: bool = False,
        max_transcript_chars: int = 4000,
        seed: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.template = (
            template if isinstance(template, PromptTemplate) else load_template(template or name)
        )
        self.max_reply_tokens = max_reply_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.include_solution = include_solution
        self.max_transcript_chars = max_transcript_chars
        self.seed = seed
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport or httpx.AsyncHTTPTransport(retries=connect_retries),
        )

    @property
    def samples(self) -> bool:
        """Whether replies are sampled (temperature above 0) rather than greedy."""
        return self.temperature > 0

    @property
    def uses_transcript(self) -> bool:
        """Whether replies depend on the policy's transcript (the pool keys its cache on it)."""
        return self.template.uses("transcript")

    def request_seed(self, request: ConsultRequest, attempt: int = 0) -> int | None:
        """The sampling seed of this agent's reply to ``request`` (:func:`reply_seed`)."""
        return reply_seed(self.seed, request, attempt)

    def messages(self, request: ConsultRequest) -> list[dict[str, str]]:
        """The chat messages of ``request``: the template's system part, then its user part."""
        problem = request.problem
        transcript = request.transcript.strip()
        if len(transcript) > self.max_transcript_chars:
            transcript = "..." + transcript[-self.max_transcript_chars :]
        variables = {
            "question": request.question.strip() or "(not given)",
            "problem": (problem.question.strip() if problem else "") or "(not given)",
            "transcript": transcript or "(nothing yet)",
            "solution": ((problem.solution or "").strip() if problem else "") or "(none)",
        }
        with_solution = bool(
            self.include_solution
            and problem is not None
            and problem.solution
            and self.template.user_with_solution
        )
        user = self.template.render_user(variables, with_solution=with_solution)
        return [
            {"role": "system", "content": self.template.system},
            {"role": "user", "content": user},
        ]

    def payload(self, request: ConsultRequest, attempt: int = 0) -> dict[str, Any]:
        """The chat-completions request body for ``request``."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages(request),
            "max_tokens": self.max_reply_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "n": 1,
            "stream": False,
        }
        seed = self.request_seed(request, attempt)
        if seed is not None:
            body["seed"] = seed
        if self.template.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(self.template.chat_template_kwargs)
        return body

    async def consult(self, request: ConsultRequest, attempt: int = 0) -> AgentReply:
        """Ask the server; every failure comes back as an error reply naming the server."""
        start = time.perf_counter()
        try:
            text, truncated = await self._complete(self.payload(request, attempt))
        except Exception as exc:  # the protocol says never raise
            return AgentReply(
                agent=self.name,
                error=f"agent {self.name!r} ({self.base_url}, model {self.model!r}): {describe(exc)}",
                latency_s=time.perf_counter() - start,
            )
        return AgentReply(
            agent=self.name,
            text=text.strip(),
            latency_s=time.perf_counter() - start,
            truncated=truncated,
        )

    async def _complete(self, body: dict[str, Any]) -> tuple[str, bool]:
        """``(reply text, cut at max_tokens)`` of one chat completion; raises on any fault."""
        response = await self._client.post(f"{self.base_url}/chat/completions", json=body)
        raw = await response.aread()
        if response.status_code != 200:
            raise ServerError(f"the server answered HTTP {response.status_code}: {error_text(raw)}")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ServerError(
                f"the server's reply is not JSON (cut off?): {len(raw)} bytes, {exc}"
            ) from None
        if not isinstance(data, dict) or ("error" in data and not data.get("choices")):
            raise ServerError(f"the server answered an error: {error_text(raw)}")
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ServerError(
                f"the server's reply has no choices[0].message.content: {error_text(raw)}"
            ) from None
        if not isinstance(text, str) or not text.strip():
            raise ServerError("empty reply")
        return text, choice.get("finish_reason") == "length"

    async def probe(self) -> str | None:
        """None when the server lists this agent's model; else what is wrong."""
        try:
            response = await self._client.get(f"{self.base_url}/models")
            raw = await response.aread()
            if response.status_code != 200:
                return f"GET /models answered HTTP {response.status_code}: {error_text(raw)}"
            served = [m.get("id") for m in json.loads(raw).get("data", [])]
        except Exception as exc:
            return describe(exc)
        if served and self.model not in served:
            return f"the server does not serve model {self.model!r}; it serves {served}"
        return None

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class ServerError(RuntimeError):
    """The server answered, but not with a usable completion."""


def describe(exc: BaseException) -> str:
    """A one-line account of an HTTP fault, in words a user can act on."""
    if isinstance(exc, ServerError):
        return str(exc)
    if isinstance(exc, httpx.TimeoutException):
        return f"the request timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to the server (down?): {exc}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the server's reply was cut off: {exc}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def error_text(raw: bytes) -> str:
    """The message of an OpenAI-style error body, or its start."""
    try:
        data = json.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message") if isinstance(error, dict) else None
        text = message if isinstance(message, str) else json.dumps(error)
    except ValueError:
        text = raw.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:ERROR_BODY_CHARS] + ("..." if len(text) > ERROR_BODY_CHARS else "")


def api_key_from_env(variable: str | None) -> str | None:
    """The API key in environment variable ``variable``; None for no variable.

    Raises ValueError when the variable is named but not set, so the run stops before
    anything loads instead of every consult failing with a 401.
    """
    if not variable:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(
            f"api_key_env names {variable!r}, which is not set in the environment; "
            f"export {variable}=... or drop api_key_env for a server without a key"
        )
    return value


def make_openai_agent(name: str, settings: Any, *, seed: int | None = None) -> OpenAIAgent:
    """The agent an :class:`~agents.config.AgentConfig` of kind ``openai`` describes.

    ``settings`` has the pool's reply cap and timeout filled in (``with_defaults``).
    """
    return OpenAIAgent(
        name,
        base_url=settings.base_url,
        model=settings.model,
        api_key=api_key_from_env(settings.api_key_env),
        template=settings.template,
        max_reply_tokens=settings.max_reply_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        timeout_s=settings.timeout_s,
        connect_retries=settings.connect_retries,
        include_solution=settings.include_solution,
        max_transcript_chars=settings.max_transcript_chars,
        seed=seed,
    )
