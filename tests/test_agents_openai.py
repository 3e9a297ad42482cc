"""Agents of kind ``openai`` against a real HTTP server on 127.0.0.1: replies, caps, every fault.

The server (tests/support/openai_loopback.py) speaks the chat-completions API the way
``vllm serve`` does; each fault a real server shows (down, slow, an error body, a body
cut off, a body that is not JSON, an unknown model) must come back as one clear consult
error, retried by the pool, counted by the env, and the episode must go on.
"""

from __future__ import annotations

import socket

import pytest
from openai_loopback import OpenAILoopback
from pydantic import ValidationError
from scripted import AdditionTask, ScriptedGenerator

from agents.base import ConsultRequest
from agents.config import AgentConfig, AgentPoolConfig
from agents.pool import AgentPool
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from trainers.summary import consult_error_kind

EOS = "<|im_end|>"


@pytest.fixture
def server():
    loopback = OpenAILoopback().start()
    yield loopback
    loopback.stop()


def ask(question: str = "Is 42 right?", episode: str = "ep0") -> ConsultRequest:
    return ConsultRequest(agent="verify", question=question, episode_id=episode)


def pool_for(base_url: str, tokenizer=None, *, max_reply_tokens=None, **settings) -> AgentPool:
    settings.setdefault("model", "served-model")
    config = AgentPoolConfig(
        agents={
            "verify": AgentConfig(
                kind="openai",
                base_url=base_url,
                max_reply_tokens=max_reply_tokens,
                **settings,
            )
        }
    )
    return AgentPool.from_config(config, policy_tokenizer=tokenizer, timeout_s=30.0, seed=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_reply_and_the_request_the_server_gets(server, tokenizer, monkeypatch):
    monkeypatch.setenv("AIPO_TEST_KEY", "sk-test-123")
    pool = pool_for(server.base_url, tokenizer, api_key_env="AIPO_TEST_KEY", max_reply_tokens=32)
    try:
        reply = await pool.consult(ask())
        assert reply.ok, reply.error
        assert reply.text == "Looks right to me." and reply.token_ids is None
        path, body, headers = server.requests[-1]
        assert path == "/v1/chat/completions"
        assert body["model"] == "served-model" and body["max_tokens"] == 32
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert "Is 42 right?" in body["messages"][1]["content"]
        assert isinstance(body["seed"], int)
        assert headers.get("Authorization") == "Bearer sk-test-123"
        assert await pool.probe() == {}
    finally:
        await pool.aclose()


async def test_long_reply_is_cut_to_the_cap_with_the_policy_tokenizer(server, tokenizer):
    server.reply = " ".join(f"word{i}" for i in range(200))
    pool = pool_for(server.base_url, tokenizer, max_reply_tokens=8)
    try:
        reply = await pool.consult(ask())
        assert reply.ok and reply.truncated
        assert len(tokenizer(reply.text, add_special_tokens=False)["input_ids"]) <= 8
        server.fault_next("length")
        cut_by_server = await pool.consult(ask("another?"))
        assert cut_by_server.ok and cut_by_server.truncated
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("fault", "value", "fragment", "kind"),
    [
        ("status", 500, "HTTP 500: boom: engine dead", "agent_error"),
        ("cut", None, "cut off", "agent_error"),
        ("not_json", None, "not JSON", "agent_error"),
        # The pool's per-attempt timeout (timeout_s) ends the attempt.
        ("slow", 5.0, "timeout after 1.0 s", "timeout"),
    ],
)
async def test_faults_become_clear_consult_errors_and_are_retried(
    server, tokenizer, fault, value, fragment, kind
):
    pool = pool_for(server.base_url, tokenizer, retries=1, timeout_s=1.0)
    try:
        server.fault_next(fault, value, times=2)
        failed = await pool.consult(ask())
        assert not failed.ok and failed.error.startswith("agent 'verify'")
        if fault != "slow":  # the server's own faults name the server and model
            assert f"({server.base_url}, model 'served-model'):" in failed.error
        assert fragment in failed.error and "gave up after 2 attempts" in failed.error
        assert consult_error_kind(failed.error) == kind
        # One failure, then an answer: the retry recovers.
        server.fault_next(fault, value, times=1)
        recovered = await pool.consult(ask("Is 41 right?"))
        assert recovered.ok, recovered.error
    finally:
        await pool.aclose()


async def test_unknown_model_names_it(server, tokenizer):
    pool = pool_for(server.base_url, tokenizer, model="no-such-model", retries=0)
    try:
        reply = await pool.consult(ask())
        assert "HTTP 404: The model `no-such-model` does not exist." in reply.error
        probe = await pool.probe()
        assert "does not serve model 'no-such-model'" in probe["verify"]
    finally:
        await pool.aclose()


async def test_server_down(tokenizer):
    url = f"http://127.0.0.1:{free_port()}/v1"
    pool = pool_for(url, tokenizer, retries=0, connect_retries=1)
    try:
        reply = await pool.consult(ask())
        assert "cannot connect to the server" in reply.error
        assert consult_error_kind(reply.error) == "agent_error"
        assert "cannot connect" in (await pool.probe())["verify"]
    finally:
        await pool.aclose()


async def test_the_episode_goes_on_and_counts_the_error(tokenizer):
    """A consult to a server that is down: error feedback, counted; the policy then answers."""
    task = AdditionTask(4)
    pool = pool_for(f"http://127.0.0.1:{free_port()}/v1", tokenizer, retries=0)
    script = [
        'Let me check. <consult agent="verify">Is 3 right?</consult>',
        f"The answer is \\boxed{{{task.problems[0].reference}}}.{EOS}",
    ]
    try:
        env = ConsultEnv(task, pool, tokenizer, EnvConfig())
        t = await run_episode(env, ScriptedGenerator(tokenizer, script), {"problem_index": 0})
    finally:
        await pool.aclose()
    assert "cannot connect to the server" in t.turns[0].consult.error
    assert (t.consults, t.consult_errors, t.finish_reason, t.reward) == (0, 1, "eos", 1.0)


def test_config_refusals(monkeypatch):
    with pytest.raises(ValidationError, match="needs base_url and model"):
        AgentConfig(kind="openai")
    with pytest.raises(ValidationError, match="http:// or https://"):
        AgentConfig(kind="openai", base_url="127.0.0.1:8000", model="m")
    monkeypatch.delenv("AIPO_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="AIPO_UNSET_KEY"):
        pool_for("http://127.0.0.1:9/v1", api_key_env="AIPO_UNSET_KEY")


def test_training_stops_before_step_1_when_an_openai_agent_is_down(tmp_path, tiny_model_dir):
    """``aipo train``'s probe names the agent and its server, before any rollout."""
    from tiny_run import make_config, parity_task_registered

    from trainers.embedded import BackendFailure, EmbeddedTrainer

    url = f"http://127.0.0.1:{free_port()}/v1"
    with parity_task_registered():
        cfg = make_config(
            tmp_path / "run",
            tiny_model_dir,
            agents={"agents": {"knowledge": {"kind": "openai", "base_url": url, "model": "m"}}},
        )
        with pytest.raises(BackendFailure, match="agents down before the first step") as caught:
            EmbeddedTrainer(cfg, progress=False).run()
    assert f"knowledge (backend {url}): cannot connect to the server" in str(caught.value)
    assert not (tmp_path / "run" / "rollouts").exists()
