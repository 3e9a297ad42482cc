"""``aipo serve`` starts each server under the engine environment's interpreter, not ours.

A fake SGLang environment stands in for a real one: a directory holding a package
``sglang`` whose ``launch_server`` parses SGLang's flags (spelled out, no argparse
abbreviations), records what it was started with and answers ``GET /health``; and a
``python`` wrapper script that runs with that directory on its path. The servers are
real processes started by :class:`AgentServers`.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from agents.serve import AgentServers, ServeConfig, ServeError, server_command

FAKE_LAUNCH_SERVER = """
import argparse, http.server, json, os, sys

# SGLang's own flag names; allow_abbrev=False so '--tp' (an abbreviation) fails here.
parser = argparse.ArgumentParser(allow_abbrev=False)
parser.add_argument("--model-path", required=True)
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--tp-size", type=int, default=1)
parser.add_argument("--mem-fraction-static", type=float)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--random-seed", type=int)
parser.add_argument("--enable-deterministic-inference", action="store_true")
args = parser.parse_args()
record = {"interpreter": os.environ["FAKE_ENGINE_INTERPRETER"], "args": vars(args)}
with open(os.path.join(os.environ["FAKE_ENGINE_RECORDS"], f"{args.port}.json"), "w") as f:
    json.dump(record, f)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

http.server.HTTPServer((args.host, args.port), Health).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def interpreter(path: Path, engine_dir: Path | None, records: Path) -> Path:
    """A ``python`` that runs this test's interpreter with ``engine_dir`` (if any) importable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pythonpath = f"export PYTHONPATH={engine_dir}\n" if engine_dir else "unset PYTHONPATH\n"
    path.write_text(
        "#!/bin/sh\n"
        f"{pythonpath}"
        f'export FAKE_ENGINE_INTERPRETER="$0" FAKE_ENGINE_RECORDS={records}\n'
        f'exec {sys.executable} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def engine_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake SGLang environment whose ``python`` is first on PATH; returns that interpreter."""
    engine = tmp_path / "engine"
    (engine / "sglang").mkdir(parents=True)
    (engine / "sglang" / "__init__.py").write_text("")
    (engine / "sglang" / "launch_server.py").write_text(FAKE_LAUNCH_SERVER)
    records = tmp_path / "records"
    records.mkdir()
    python = interpreter(tmp_path / "sglang-env" / "bin" / "python", engine, records)
    monkeypatch.setenv("PATH", f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return python


def serve_config(tmp_path: Path, **fields) -> ServeConfig:
    servers = fields.pop(
        "servers", [{"name": "agents", "model": "Org/M", "port": free_port(), "agents": ["verify"]}]
    )
    return ServeConfig(
        servers=servers,
        endpoints_file=str(tmp_path / "endpoints.json"),
        log_dir=str(tmp_path / "logs"),
        health_timeout_s=120.0,
        health_poll_s=0.05,
        shutdown_grace_s=10.0,
        **fields,
    )


def test_default_python_is_the_engine_environments_on_path_with_sglangs_flags(
    tmp_path, engine_env
) -> None:
    config = serve_config(
        tmp_path,
        seed=7,
        servers=[
            {"name": "a", "model": "Org/M", "port": free_port(), "tp": 2, "agents": ["verify"]}
        ],
    )
    assert config.python == "python"  # the default: whatever 'python' PATH finds
    servers = AgentServers(config)
    try:
        servers.start()
        pid = servers._running[0].process.pid
        port = config.servers[0].port
        record = json.loads((tmp_path / "records" / f"{port}.json").read_text())
    finally:
        servers.stop()
    assert record["interpreter"] == str(engine_env)
    assert str(engine_env) != sys.executable
    assert record["args"] == {
        "model_path": "Org/M",
        "port": port,
        "tp_size": 2,
        "mem_fraction_static": 0.85,
        "host": "127.0.0.1",
        "random_seed": 7,
        "enable_deterministic_inference": True,
    }
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(config.endpoints_file).exists()


def test_an_interpreter_without_the_engine_is_refused_before_anything_starts(
    tmp_path, monkeypatch
) -> None:
    bare = interpreter(tmp_path / "plain" / "bin" / "python", None, tmp_path)
    monkeypatch.setenv("PATH", f"{bare.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    servers = AgentServers(serve_config(tmp_path))
    with pytest.raises(ServeError) as info:
        servers.start()
    message = str(info.value)
    assert f"interpreter {bare} cannot import sglang" in message
    assert "python: /opt/sglang/bin/python" in message  # says where to point it
    assert not (tmp_path / "logs").exists()  # no server was started
    assert servers._running == []


def test_a_missing_interpreter_is_named(tmp_path) -> None:
    servers = AgentServers(serve_config(tmp_path, python=str(tmp_path / "nowhere" / "python")))
    with pytest.raises(ServeError, match=r"interpreter '.*nowhere/python' not found"):
        servers.start()


def test_per_server_interpreter_and_command_and_no_seed_flags_without_a_seed(tmp_path) -> None:
    config = ServeConfig(
        python="/opt/sglang/bin/python",
        servers=[
            {"name": "a", "model": "M", "port": 1, "agents": ["verify"]},
            {"name": "b", "model": "M", "port": 2, "agents": ["knowledge"],
             "python": "/opt/other/bin/python"},
            {"name": "c", "model": "M", "port": 3, "agents": ["reasoning"],
             "command": ["/usr/bin/vllm", "serve", "{model}", "--port", "{port}"]},
        ],
    )  # fmt: skip
    a, b, c = (server_command(config, s) for s in config.servers)
    assert a[:3] == ["/opt/sglang/bin/python", "-m", "sglang.launch_server"]
    assert a[a.index("--tp-size") + 1] == "1" and "--tp" not in a
    assert "--enable-deterministic-inference" not in a and "--random-seed" not in a
    assert b[0] == "/opt/other/bin/python"
    assert c == ["/usr/bin/vllm", "serve", "M", "--port", "3"]


def test_a_seed_for_a_server_that_is_not_sglang_is_refused() -> None:
    with pytest.raises(ValueError, match=r"server 'c' does not run sglang.launch_server"):
        ServeConfig(
            seed=1,
            servers=[
                {"name": "c", "model": "M", "port": 3, "agents": ["verify"],
                 "command": ["vllm", "serve", "{model}"]},
            ],
        )  # fmt: skip


def test_an_interpreter_written_into_the_command_is_checked_and_seeded(tmp_path) -> None:
    missing = str(tmp_path / "py" / "bin" / "python")
    config = serve_config(
        tmp_path,
        seed=3,
        command=[missing, "-m", "sglang.launch_server", "--model-path", "{model}"],
    )
    assert server_command(config, config.servers[0]) == [
        missing, "-m", "sglang.launch_server", "--model-path", "Org/M",
        "--random-seed", "3", "--enable-deterministic-inference",
    ]  # fmt: skip
    with pytest.raises(ServeError, match=rf"interpreter '{missing}' not found"):
        AgentServers(config).start()
