"""``aipo serve`` end to end on CPU: the loopback SGLang server stands in for sglang.launch_server."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from agents.serve import AgentServers, ServeConfig, ServeError, load_endpoints, server_command

LOOPBACK = str(Path(__file__).parent / "support" / "sglang_loopback.py")
LOOPBACK_COMMAND = ["{python}", LOOPBACK, "--model", "{model}", "--port", "{port}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def pids_of(servers: AgentServers) -> list[int]:
    """Process ids of the servers ``servers`` has started and not yet stopped."""
    return [running.process.pid for running in servers._running]


def config(tmp_path: Path, command: list[str], servers: list[dict], **fields) -> ServeConfig:
    return ServeConfig(
        python=sys.executable,  # the loopback server runs in this environment
        command=command,
        servers=servers,
        endpoints_file=str(tmp_path / "runs" / "endpoints.json"),
        log_dir=str(tmp_path / "logs"),
        health_poll_s=0.1,
        shutdown_grace_s=10.0,
        **fields,
    )


async def test_serve_starts_writes_endpoints_answers_a_consult_and_stops(
    tmp_path, tiny_model_dir, tokenizer
) -> None:
    from agents.base import ConsultRequest
    from agents.config import AgentConfig, AgentPoolConfig
    from agents.pool import AgentPool
    from policies.sglang_generator import SGLangGenerator

    ports = [free_port(), free_port()]
    cfg = config(
        tmp_path,
        LOOPBACK_COMMAND,
        [
            {
                "name": "a",
                "model": tiny_model_dir,
                "port": ports[0],
                "agents": ["verify", "knowledge"],
            },
            {"name": "b", "model": tiny_model_dir, "port": ports[1], "agents": ["reasoning"]},
        ],
        health_timeout_s=120.0,
    )
    servers = AgentServers(cfg)
    try:
        content = servers.start()
        path = Path(cfg.endpoints_file)
        assert json.loads(path.read_text()) == content
        served = load_endpoints(path)
        assert served == {
            "verify": {"backend": f"sglang://127.0.0.1:{ports[0]}", "tokenizer": tiny_model_dir},
            "knowledge": {"backend": f"sglang://127.0.0.1:{ports[0]}", "tokenizer": tiny_model_dir},
            "reasoning": {"backend": f"sglang://127.0.0.1:{ports[1]}", "tokenizer": tiny_model_dir},
        }
        pids = pids_of(servers)
        assert len(pids) == 2 and all(alive(pid) for pid in pids)

        agents = {
            name: AgentConfig(**entry, max_reply_tokens=6, retries=0)
            for name, entry in served.items()
        }
        pool = AgentPool.from_config(AgentPoolConfig(agents=agents), policy_tokenizer=tokenizer)
        async with pool:
            backend = pool.agents["reasoning"].generator
            assert isinstance(backend, SGLangGenerator)
            reply = await pool.consult(ConsultRequest(agent="reasoning", question="What next?"))
            assert reply.ok, reply.error
            assert reply.token_ids and len(reply.logprobs) == len(reply.token_ids) <= 6
        log = (Path(cfg.log_dir) / "b.log").read_text()
        assert f"127.0.0.1:{ports[1]}" in log
    finally:
        servers.stop()
    assert not Path(cfg.endpoints_file).exists()
    assert not any(alive(pid) for pid in pids)
    assert pids_of(servers) == []


def test_server_that_exits_at_once_reports_its_log_and_leaves_nothing(tmp_path) -> None:
    command = ["{python}", "-c", "import sys; print('cannot load model {model}'); sys.exit(3)"]
    cfg = config(
        tmp_path,
        command,
        [{"name": "broken", "model": "m-x", "port": free_port(), "agents": ["verify"]}],
        health_timeout_s=60.0,
    )
    servers = AgentServers(cfg)
    with pytest.raises(ServeError) as info:
        servers.start()
    message = str(info.value)
    assert "'broken'" in message and "exited with code 3" in message
    assert "cannot load model m-x" in message  # the log tail
    assert pids_of(servers) == []
    assert not Path(cfg.endpoints_file).exists()


def test_neighbour_of_a_failed_server_is_stopped(tmp_path) -> None:
    # The template runs the server's model as a script: one sleeps, the other exits with 2.
    cfg = config(
        tmp_path,
        ["{python}", "{model}"],
        [
            {"name": "sleeper", "model": str(_script(tmp_path, "import time; time.sleep(60)")),
             "port": free_port(), "agents": ["knowledge"]},
            {"name": "dies", "model": str(_script(tmp_path, "print('boom'); raise SystemExit(2)")),
             "port": free_port(), "agents": ["verify"]},
        ],
        health_timeout_s=60.0,
    )  # fmt: skip
    servers = AgentServers(cfg)
    started: list[int] = []
    original = servers._wait_healthy

    def record() -> None:
        started.extend(pids_of(servers))
        original()

    servers._wait_healthy = record  # type: ignore[method-assign]
    with pytest.raises(ServeError, match=r"'dies'.*exited with code 2[\s\S]*boom"):
        servers.start()
    assert len(started) == 2
    assert not any(alive(pid) for pid in started)


def _script(tmp_path: Path, source: str) -> Path:
    path = tmp_path / f"server_{abs(hash(source))}.py"
    path.write_text(source + "\n")
    return path


def test_health_timeout_errors_and_kills_the_server(tmp_path) -> None:
    cfg = config(
        tmp_path,
        ["{python}", "-c", "import time; print('loading', flush=True); time.sleep(60)"],
        [{"name": "mute", "model": "m", "port": free_port(), "agents": ["verify"]}],
        health_timeout_s=1.0,
    )
    servers = AgentServers(cfg)
    started: list[int] = []
    original = servers._wait_healthy

    def record() -> None:
        started.extend(pids_of(servers))
        original()

    servers._wait_healthy = record  # type: ignore[method-assign]
    with pytest.raises(ServeError, match=r"'mute'.*within 1.0 s"):
        servers.start()
    assert len(started) == 1 and not alive(started[0])
    assert not Path(cfg.endpoints_file).exists()


def test_command_template_and_endpoints_of_a_shared_agent(tmp_path) -> None:
    cfg = ServeConfig(
        python="/opt/sglang/bin/python",
        host="0.0.0.0",
        advertise_host="node3",
        servers=[
            {"name": "s0", "model": "Qwen/Qwen3-32B", "port": 30000, "tp": 4,
             "agents": ["knowledge"], "extra_args": ["--base-gpu-id", "0"]},
            {"name": "s1", "model": "Qwen/Qwen3-32B", "port": 30001, "tp": 4,
             "mem_fraction": 0.8, "agents": ["knowledge", "verify"]},
        ],
    )  # fmt: skip
    assert server_command(cfg, cfg.servers[1]) == [
        "/opt/sglang/bin/python", "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-32B",
        "--port", "30001", "--tp-size", "4", "--mem-fraction-static", "0.8", "--host", "0.0.0.0",
    ]  # fmt: skip
    assert server_command(cfg, cfg.servers[0])[-2:] == ["--base-gpu-id", "0"]
    from agents.serve import endpoints

    assert endpoints(cfg)["agents"]["knowledge"]["backend"] == "sglang://node3:30000,node3:30001"
    assert endpoints(cfg)["agents"]["verify"]["backend"] == "sglang://node3:30001"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"command": ["{python}", "{gpu}"]}, "unknown placeholder"),
        ({"servers": [{"name": "a", "model": "m", "port": 1, "agents": ["v"]},
                      {"name": "b", "model": "m", "port": 1, "agents": ["k"]}]}, "both use port 1"),
        ({"servers": [{"name": "a", "model": "m1", "port": 1, "agents": ["v"]},
                      {"name": "b", "model": "m2", "port": 2, "agents": ["v"]}]}, "one agent needs one model"),
    ],
)  # fmt: skip
def test_inconsistent_configs_are_refused(change, message) -> None:
    base = {"servers": [{"name": "a", "model": "m", "port": 1, "agents": ["v"]}]}
    with pytest.raises(ValueError, match=message):
        ServeConfig(**{**base, **change})
