"""``aipo serve`` as a process: dry run, and SIGTERM stops its servers and removes the endpoints file."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from aipo.commands import serve as serve_cli

# A stand-in server: answers GET /health with 200 and logs its pid.
HEALTH_SERVER = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
print("pid", os.getpid(), flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
RUN_CLI = (
    "import argparse, sys; from aipo.commands import serve as serve_cli; p = argparse.ArgumentParser(); "
    "serve_cli.add_arguments(p); sys.exit(serve_cli.run(p.parse_args(sys.argv[1:])))"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(tmp_path: Path, port: int) -> Path:
    script = tmp_path / "health_server.py"
    script.write_text(HEALTH_SERVER)
    data = {
        "python": sys.executable,  # the stand-in server needs only the standard library
        "command": ["{python}", str(script), "{port}"],
        "endpoints_file": str(tmp_path / "endpoints.json"),
        "log_dir": str(tmp_path / "logs"),
        "health_timeout_s": 60,
        "health_poll_s": 0.05,
        "shutdown_grace_s": 10,
        "servers": [{"name": "one", "model": "Org/Model", "port": port, "agents": ["verify"]}],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dry_run_prints_commands_and_starts_nothing(tmp_path, capsys) -> None:
    port = free_port()
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(write_config(tmp_path, port)), "--dry-run"])
    assert serve_cli.run(args) == 0
    out = capsys.readouterr().out
    assert f"health_server.py {port}" in out
    assert f'"backend": "sglang://127.0.0.1:{port}"' in out
    assert not (tmp_path / "endpoints.json").exists() and not (tmp_path / "logs").exists()


def test_sigterm_stops_the_servers_and_removes_the_endpoints_file(tmp_path) -> None:
    port = free_port()
    endpoints = tmp_path / "endpoints.json"
    cli = subprocess.Popen(
        [sys.executable, "-c", RUN_CLI, "--config", str(write_config(tmp_path, port))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        # The CLI prints its ready line once the endpoints file is written.
        line = cli.stdout.readline()
        assert "healthy" in line, line + cli.stdout.read()
        served = json.loads(endpoints.read_text())["agents"]
        assert served == {
            "verify": {"backend": f"sglang://127.0.0.1:{port}", "tokenizer": "Org/Model"}
        }
        log = (tmp_path / "logs" / "one.log").read_text()
        server_pid = int(log.split()[1])
        os.kill(server_pid, 0)  # running

        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=30) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert not endpoints.exists()
    try:
        os.kill(server_pid, 0)
        gone = False
    except ProcessLookupError:
        gone = True
    assert gone, f"server {server_pid} still running"


def test_dry_run_notes_an_interpreter_without_the_engine(tmp_path, capsys) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "python": str(tmp_path / "no-env" / "bin" / "python"),
                "servers": [{"name": "a", "model": "Org/M", "port": 30000, "agents": ["verify"]}],
            }
        )
    )
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    assert serve_cli.run(parser.parse_args(["--config", str(path), "--dry-run"])) == 0
    captured = capsys.readouterr()
    assert f"{tmp_path}/no-env/bin/python -m sglang.launch_server" in captured.out
    assert "--tp-size 1" in captured.out
    assert (
        "not found (no such executable)" in captured.err
        and "a real start refuses it" in captured.err
    )
