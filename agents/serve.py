"""The agents' SGLang servers: start them, write the endpoints file, stop them cleanly.

``aipo serve`` runs this for a :class:`ServeConfig` until it is stopped.

The servers run in the engine's own environment, not ours: SGLang pins torch and
transformers versions that cannot be installed beside AIPO's (docs/openrlhf.md), so
``{python}`` in the command is :attr:`ServeConfig.python` (a path, or a name looked up
on ``PATH``; per server :attr:`ServerConfig.python`), never the interpreter running
``aipo serve``. Before anything starts, each interpreter is asked whether it can import
the module its command runs (``python -m MODULE``; :mod:`agents.engine_env`); one that
cannot stops the start-up with what to install and where to point ``python``.

With :attr:`ServeConfig.seed` set, SGLang servers also get ``--random-seed`` and
``--enable-deterministic-inference``: without the latter SGLang ignores each request's
``sampling_seed``, the per-reply seed seeded agents send (:func:`agents.llm_agent.reply_seed`).

What the servers return as log-probs: SGLang's ``output_token_logprobs`` are of
``softmax(logits / T)`` over the whole vocabulary, without the top-p renormalisation
the agents sample with (``top_p`` 0.8 by default). A sampled token's returned
probability is therefore at most its sampling probability (the nucleus mass divides
the latter); the behaviour probability ``mu`` recorded for agent tokens is that
returned one.

One process per configured server, each in its own process group (so a server's
workers, e.g. its tensor-parallel ranks, go down with it) and with its output in a
log file. :class:`AgentServers` waits for every server's ``GET /health``; a server
that exits or is not healthy within the timeout stops the start-up with its log
tail, and the servers already started are stopped. Once all are healthy it writes
the endpoints file that ``ExecutorConfig.endpoints_file`` (OpenRLHF) names::

    {"agents": {"knowledge": {"backend": "sglang://host:30000,host:30001",
                              "tokenizer": "Qwen/Qwen3-32B"}, ...}}

(fields of :class:`agents.config.AgentConfig`; an agent served by several servers
gets them all, and the SGLang client routes each trajectory to one of them). On stop
every group gets SIGTERM, then SIGKILL after a grace period, and the endpoints file
is removed, so a stale file never points at servers that are gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import string
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.config import AgentConfig
from agents.engine_env import SGLANG_LAUNCHER, engine_module, missing_engine, resolve_python

logger = logging.getLogger(__name__)

#: SGLang's own launcher; ``{python}`` is the engine environment's interpreter
#: (:attr:`ServeConfig.python`), not the one running ``aipo serve``.
DEFAULT_COMMAND = [
    "{python}", "-m", "sglang.launch_server",
    "--model-path", "{model}", "--port", "{port}", "--tp-size", "{tp}",
    "--mem-fraction-static", "{mem_fraction}", "--host", "{host}",
]  # fmt: skip
#: Placeholders a command template may use.
PLACEHOLDERS = ("python", "model", "port", "tp", "mem_fraction", "host", "name")


class ServerConfig(BaseModel):
    """One SGLang server and the agents it serves."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="Name of the server, used for its log file and in messages.",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    model: str = Field(description="Model path or Hugging Face id the server loads.")
    port: int = Field(ge=1, le=65535, description="Port the server listens on.")
    tp: int = Field(default=1, ge=1, description="Tensor-parallel size (GPUs). Default 1.")
    mem_fraction: float = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="GPU memory fraction for weights and KV cache (--mem-fraction-static). Default 0.85.",
    )
    agents: list[str] = Field(
        min_length=1,
        description="Agents (names as in the consult tag) this server answers; an agent on several servers is spread over them.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer written into the endpoints file for these agents; None uses model.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="Arguments appended to the command, e.g. ['--base-gpu-id', '4'].",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables of the server process, e.g. CUDA_VISIBLE_DEVICES.",
    )
    python: str | None = Field(
        default=None,
        description="Interpreter of this server's engine environment ({python}); None uses the config's python.",
    )
    command: list[str] | None = Field(
        default=None,
        description="Command template of this server (placeholders as the config's command); None uses the config's command.",
    )

    @property
    def served_tokenizer(self) -> str:
        """The tokenizer the agents on this server use."""
        return self.tokenizer or self.model


class ServeConfig(BaseModel):
    """The agents' SGLang servers of one machine, and where their endpoints are written."""

    model_config = ConfigDict(extra="forbid")

    servers: list[ServerConfig] = Field(
        min_length=1, description="The servers to start, one process (group) each."
    )
    python: str = Field(
        default="python",
        description=(
            "Interpreter of the engine's environment, put where a command has {python}: a path "
            "(/opt/sglang/bin/python) or a name looked up on PATH. Not the interpreter running "
            "aipo serve: SGLang cannot be installed beside AIPO. Before starting, aipo serve "
            "checks that it imports the module the command runs (-m MODULE). Default 'python' "
            "on PATH."
        ),
    )
    command: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COMMAND),
        description="Command template of one server; placeholders {python}, {model}, {port}, {tp}, {mem_fraction}, {host}, {name}. Default: {python} -m sglang.launch_server with --model-path, --port, --tp-size, --mem-fraction-static, --host.",
    )
    seed: int | None = Field(
        default=None,
        description=(
            "Seed of the SGLang servers: adds --random-seed SEED and "
            "--enable-deterministic-inference, without which SGLang ignores the per-reply "
            "sampling_seed that seeded agents send (replies then differ between a run and its "
            "resumed copy). Deterministic inference needs the FlashInfer, FA3 or Triton "
            "attention backend and costs some throughput. None (default): neither flag. Only "
            "for servers whose command runs sglang.launch_server."
        ),
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address the servers bind ({host}); 0.0.0.0 to serve other nodes. Default 127.0.0.1.",
    )
    advertise_host: str | None = Field(
        default=None,
        description="Host written into the endpoints file (how trainers reach the servers); None uses host, or this machine's hostname when host is 0.0.0.0.",
    )
    endpoints_file: str = Field(
        default="runs/agents_endpoints.json",
        description="Where the endpoints JSON is written once every server is healthy; removed on shutdown.",
    )
    log_dir: str = Field(
        default="runs/serve_logs",
        description="Directory of the servers' log files (<name>.log).",
    )
    health_timeout_s: float = Field(
        default=1800.0,
        gt=0.0,
        description="Most seconds to wait for all servers to answer GET /health (loading a 32B model takes minutes). Default 1800.",
    )
    health_poll_s: float = Field(
        default=2.0, gt=0.0, description="Seconds between health checks. Default 2."
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0.0,
        description="Seconds between SIGTERM and SIGKILL of a server's process group. Default 30.",
    )
    log_tail_lines: int = Field(
        default=40, ge=0, description="Lines of a failed server's log shown in the error."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        names: set[str] = set()
        ports: dict[int, str] = {}
        for server in self.servers:
            if server.name in names:
                raise ValueError(f"server name {server.name!r} is used twice; names must differ")
            names.add(server.name)
            owner = ports.setdefault(server.port, server.name)
            if owner != server.name:
                raise ValueError(
                    f"servers {owner!r} and {server.name!r} both use port {server.port}"
                )
        tokenizers: dict[str, tuple[str, str]] = {}
        for server in self.servers:
            for agent in server.agents:
                first = tokenizers.setdefault(agent, (server.name, server.served_tokenizer))
                if first[1] != server.served_tokenizer:
                    raise ValueError(
                        f"agent {agent!r} is served by {first[0]!r} ({first[1]}) and "
                        f"{server.name!r} ({server.served_tokenizer}); one agent needs one model"
                    )
        for where, template in [("command", self.command)] + [
            (f"servers {s.name!r} command", s.command) for s in self.servers if s.command
        ]:
            fields = {
                name for _, name, _, _ in string.Formatter().parse(" ".join(template)) if name
            }
            unknown = sorted(fields - set(PLACEHOLDERS))
            if unknown:
                raise ValueError(
                    f"unknown placeholder(s) {', '.join(unknown)} in {where}; expected some of {', '.join(PLACEHOLDERS)}"
                )
        if self.seed is not None:
            for server in self.servers:
                if engine_module(self.template_of(server)) != SGLANG_LAUNCHER:
                    raise ValueError(
                        f"seed adds SGLang's --random-seed and --enable-deterministic-inference, "
                        f"but server {server.name!r} does not run {SGLANG_LAUNCHER}; put its "
                        "engine's own seed flags in its extra_args and leave seed unset"
                    )
        return self

    def template_of(self, server: ServerConfig) -> list[str]:
        """The command template ``server`` starts from: its own, else the config's."""
        return list(server.command) if server.command is not None else list(self.command)

    def python_of(self, server: ServerConfig) -> str:
        """The interpreter ``server`` runs under ({python}): its own, else the config's."""
        return server.python or self.python

    def public_host(self) -> str:
        """The host name trainers use to reach the servers."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::"):
            import socket

            return socket.gethostname()
        return self.host


class EndpointsFile(BaseModel):
    """The endpoints file's content, typed: how each served agent reaches its servers."""

    model_config = ConfigDict(extra="forbid")

    agents: dict[str, AgentConfig] = Field(
        description="Agent name -> the AgentConfig fields that point it at its servers (backend, tokenizer)."
    )


class ServeError(RuntimeError):
    """A server could not be started or died; the message names it and quotes its log."""


def interpreter_of(config: ServeConfig, server: ServerConfig) -> tuple[str, str]:
    """``(as written, as found)``: the first word of ``server``'s command, ``{python}`` filled in."""
    written = config.template_of(server)[0].replace("{python}", config.python_of(server))
    return written, resolve_python(written)


def server_command(config: ServeConfig, server: ServerConfig) -> list[str]:
    """The argv of one server: the template filled in, SGLang's seed flags, then its extra arguments."""
    values = {
        "python": resolve_python(config.python_of(server)),
        "model": server.model,
        "port": server.port,
        "tp": server.tp,
        "mem_fraction": server.mem_fraction,
        "host": config.host,
        "name": server.name,
    }
    template = config.template_of(server)
    argv = [part.format(**values) for part in template]
    if config.seed is not None and engine_module(template) == SGLANG_LAUNCHER:
        argv += ["--random-seed", str(config.seed), "--enable-deterministic-inference"]
    return argv + list(server.extra_args)


def engine_problem(config: ServeConfig, server: ServerConfig) -> str | None:
    """Why ``server``'s interpreter cannot run its engine; None when it can (or nothing to check).

    Checked for commands of the form ``INTERPRETER -m MODULE`` (``{python}`` or a path),
    by :func:`agents.engine_env.missing_engine`.
    """
    module = engine_module(config.template_of(server))
    if module is None:
        return None
    return missing_engine(interpreter_of(config, server)[0], module, server.env)


def endpoints(config: ServeConfig) -> dict[str, Any]:
    """The endpoints file's content: agent -> ``sglang://`` backend of its servers and tokenizer."""
    host = config.public_host()
    agents: dict[str, dict[str, str]] = {}
    for server in config.servers:
        for agent in server.agents:
            entry = agents.setdefault(
                agent, {"backend": "sglang://", "tokenizer": server.served_tokenizer}
            )
            sep = "" if entry["backend"] == "sglang://" else ","
            entry["backend"] += f"{sep}{host}:{server.port}"
    return {"agents": agents}


def load_endpoints(path: str | Path) -> dict[str, dict[str, Any]]:
    """Agent name -> :class:`agents.config.AgentConfig` fields, from an endpoints file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"endpoints file {path} not found; start the agents with 'aipo serve' first"
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("agents"), dict):
        raise ValueError(f'endpoints file {path} must hold {{"agents": {{name: {{...}}}}}}')
    return data["agents"]


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) if lines else ""


def _health_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class _Running:
    """A started server: its process, log file handle and health state."""

    def __init__(self, server: ServerConfig, process: subprocess.Popen, log: IO, log_path: Path):
        self.server = server
        self.process = process
        self.log = log
        self.log_path = log_path
        self.healthy = False


class AgentServers:
    """Start, health-check, watch and stop the servers of a :class:`ServeConfig`.

    ``start()`` returns once every server answers ``/health`` and the endpoints file
    is written; ``wait()`` blocks until ``stop_event`` is set or a server exits;
    ``stop()`` (also on leaving a ``with`` block) stops every server and removes the file.
    """

    def __init__(self, config: ServeConfig, stop_event: threading.Event | None = None) -> None:
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self._running: list[_Running] = []
        self._wrote_endpoints = False

    @property
    def endpoints_path(self) -> Path:
        """Where the endpoints file is written."""
        return Path(self.config.endpoints_file)

    def commands(self) -> list[list[str]]:
        """Every server's argv, in config order."""
        return [server_command(self.config, s) for s in self.config.servers]

    def engine_problems(self) -> list[str]:
        """``server 'x': why`` for each server whose interpreter cannot run its engine (one check per interpreter and module)."""
        problems, seen = [], set()
        for server in self.config.servers:
            key = (
                interpreter_of(self.config, server)[1],
                engine_module(self.config.template_of(server)),
                tuple(sorted(server.env.items())),
            )
            if key in seen:
                continue
            seen.add(key)
            problem = engine_problem(self.config, server)
            if problem:
                problems.append(f"server {server.name!r}: {problem}")
        return problems

    def start(self) -> dict[str, Any]:
        """Check the engines, launch all servers, wait until healthy, write the endpoints file; returns its content.

        Raises :class:`ServeError` (after stopping whatever started) when a server's
        interpreter cannot import its engine (nothing is started then), a server
        exits, is not healthy within ``health_timeout_s``, or ``stop_event`` is set.
        """
        problems = self.engine_problems()
        if problems:
            raise ServeError("; ".join(problems))
        try:
            log_dir = Path(self.config.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            for server, argv in zip(self.config.servers, self.commands(), strict=True):
                log_path = log_dir / f"{server.name}.log"
                log = log_path.open("w")
                logger.info("starting %s: %s (log %s)", server.name, " ".join(argv), log_path)
                try:
                    process = subprocess.Popen(
                        argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env={**os.environ, **server.env},
                        start_new_session=True,  # its own process group, out of our terminal's
                    )
                except OSError as exc:
                    log.close()
                    raise ServeError(
                        f"server {server.name!r} could not start {argv[0]!r}: {exc}"
                    ) from exc
                self._running.append(_Running(server, process, log, log_path))
            self._wait_healthy()
            content = endpoints(self.config)
            self._write_endpoints(content)
            return content
        except BaseException:
            self.stop()
            raise

    def _failure(self, running: _Running, why: str) -> ServeError:
        tail = log_tail(running.log_path, self.config.log_tail_lines)
        return ServeError(
            f"server {running.server.name!r} (port {running.server.port}) {why}; "
            f"log {running.log_path}:\n{tail}"
        )

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.config.health_timeout_s
        with httpx.Client(timeout=min(5.0, self.config.health_poll_s + 1.0)) as client:
            while True:
                for running in self._running:
                    code = running.process.poll()
                    if code is not None:
                        raise self._failure(
                            running, f"exited with code {code} before it was healthy"
                        )
                    if running.healthy:
                        continue
                    url = f"http://{_health_host(self.config.host)}:{running.server.port}/health"
                    try:
                        running.healthy = client.get(url).status_code == 200
                    except httpx.HTTPError:
                        running.healthy = False
                if all(r.healthy for r in self._running):
                    logger.info("all %d servers healthy", len(self._running))
                    return
                if time.monotonic() >= deadline:
                    waiting = next(r for r in self._running if not r.healthy)
                    raise self._failure(
                        waiting,
                        f"did not answer GET /health within {self.config.health_timeout_s} s",
                    )
                remaining = deadline - time.monotonic()
                if self.stop_event.wait(max(0.0, min(self.config.health_poll_s, remaining))):
                    raise ServeError("interrupted while waiting for the servers to become healthy")

    def _write_endpoints(self, content: dict[str, Any]) -> None:
        path = self.endpoints_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # readers never see a half-written file
        self._wrote_endpoints = True
        logger.info("endpoints written to %s", path)

    def wait(self) -> int:
        """Block until ``stop_event`` is set (0) or a server exits (1, with its log tail logged)."""
        while not self.stop_event.wait(self.config.health_poll_s):
            for running in self._running:
                code = running.process.poll()
                if code is not None:
                    logger.error("%s", self._failure(running, f"exited with code {code}"))
                    return 1
        return 0

    def stop(self) -> None:
        """SIGTERM every server's group, SIGKILL after the grace period; remove the endpoints file."""
        if self._wrote_endpoints:
            self.endpoints_path.unlink(missing_ok=True)
            self._wrote_endpoints = False
        for running in self._running:
            _signal_group(running.process, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s
        for running in self._running:
            try:
                running.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("server %r ignored SIGTERM; killing it", running.server.name)
            # The group may hold workers that outlive the leader: kill what is left.
            _signal_group(running.process, signal.SIGKILL)
            running.process.wait()
            running.log.close()
        self._running.clear()

    def __enter__(self) -> AgentServers:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``process`` leads (it was started in a new session)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
