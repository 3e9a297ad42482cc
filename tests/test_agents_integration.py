"""Agents on real backends: the embedded generator over the tiny model, and SGLang's API on loopback."""

from __future__ import annotations

import pytest

from agents import AgentConfig, AgentPool, AgentPoolConfig, ConsultRequest, LLMAgent
from tasks.base import Problem

PROBLEM = Problem(id="p1", task="toy", question="What is 6 * 7?", reference="42")


def ask(agent: str, question: str, episode: str = "ep0") -> ConsultRequest:
    return ConsultRequest(agent=agent, question=question, problem=PROBLEM, episode_id=episode)


async def test_pool_over_the_embedded_generator_records_real_tokens(
    tiny_model_dir, tokenizer
) -> None:
    config = AgentPoolConfig(
        agents={
            name: AgentConfig(
                backend=tiny_model_dir,
                max_reply_tokens=12,
                backend_options={"device": "cpu", "seed": 1},
            )
            for name in ("verify", "reasoning")
        }
    )
    pool = AgentPool.from_config(config, policy_tokenizer=tokenizer)
    try:
        verify, reasoning = pool.agents["verify"], pool.agents["reasoning"]
        assert isinstance(verify, LLMAgent) and isinstance(reasoning, LLMAgent)
        assert verify.generator is reasoning.generator, "one backend serves both agents"
        assert verify.shares_policy_tokenizer
        generator = verify.generator
        end_ids = set(generator.eos_token_ids) | set(tokenizer.all_special_ids)

        first = await pool.consult(ask("verify", "Is 6 * 7 = 42?"))
        second = await pool.consult(ask("verify", "Is 6 * 7 = 41?"))
        guidance = await pool.consult(ask("reasoning", "How do I start?"))
        for reply in (first, second, guidance):
            assert reply.ok, reply.error
            assert reply.token_ids and len(reply.token_ids) <= 12
            assert len(reply.logprobs) == len(reply.token_ids)
            assert all(lp <= 0.0 for lp in reply.logprobs)
            assert reply.token_ids[-1] not in end_ids
            assert all(0 <= t < len(tokenizer) for t in reply.token_ids)
            assert reply.text == tokenizer.decode(reply.token_ids, skip_special_tokens=True)
        # The static system prompt was pinned, so the second verify prompt reuses it.
        static, _ = verify.render(ask("verify", "anything"))
        assert second.cached_tokens >= len(static)
    finally:
        await pool.aclose()


async def test_policy_backend_shares_the_policy_generator(tiny_model_dir, tokenizer) -> None:
    from policies.transformers_generator import TransformersGenerator

    policy = TransformersGenerator(tiny_model_dir, device="cpu")
    try:
        pool = AgentPool.from_config(
            AgentPoolConfig(agents={"knowledge": AgentConfig(max_reply_tokens=6)}),
            policy_generator=policy,
        )
        reply = await pool.consult(ask("knowledge", "Define a product."))
        assert reply.ok, reply.error
        assert reply.token_ids is not None and 0 < len(reply.token_ids) <= 6
        await pool.aclose()
        # The pool did not close the policy's generator: it still generates.
        again = await pool.agents["knowledge"].consult(ask("knowledge", "Define a sum."))
        assert again.ok, again.error
    finally:
        await policy.aclose()


@pytest.fixture
def loopback(tiny_model_dir):
    from sglang_loopback import LoopbackSGLangServer

    from policies.transformers_generator import TransformersGenerator

    generator = TransformersGenerator(tiny_model_dir, device="cpu")
    server = LoopbackSGLangServer(generator).start()
    yield server
    server.stop()


def sglang_pool(server, tiny_model_dir, tokenizer, **settings) -> AgentPool:
    config = AgentPoolConfig(
        agents={
            "verify": AgentConfig(
                backend=f"sglang://127.0.0.1:{server.port}",
                tokenizer=tiny_model_dir,
                max_reply_tokens=8,
                backend_options={"max_retries": 0, "timeout_s": 30.0},
                **settings,
            )
        }
    )
    return AgentPool.from_config(config, policy_tokenizer=tokenizer)


async def test_sglang_backend_answers_and_failures_become_error_replies(
    loopback, tiny_model_dir, tokenizer
) -> None:
    pool = sglang_pool(loopback, tiny_model_dir, tokenizer, retries=0)
    try:
        ok = await pool.consult(ask("verify", "Is 42 right?"))
        assert ok.ok, ok.error
        assert ok.token_ids and len(ok.logprobs) == len(ok.token_ids)
        assert loopback.requests[-1][0] == "/generate"

        loopback.fail_next(1, status=500)
        failed = await pool.consult(ask("verify", "Is 41 right?"))
        assert not failed.ok and "500" in failed.error

        loopback.malformed_next(1)
        malformed = await pool.consult(ask("verify", "Is 40 right?"))
        assert not malformed.ok and malformed.error.startswith("agent 'verify' failed:")
    finally:
        await pool.aclose()


async def test_sglang_backend_retried_after_a_500(loopback, tiny_model_dir, tokenizer) -> None:
    pool = sglang_pool(loopback, tiny_model_dir, tokenizer, retries=1)
    try:
        loopback.fail_next(1, status=500)
        reply = await pool.consult(ask("verify", "Is 39 right?"))
        assert reply.ok, reply.error
        generate_calls = [route for route, _ in loopback.requests if route == "/generate"]
        assert len(generate_calls) == 2
    finally:
        await pool.aclose()


async def test_slow_and_down_sglang_backends_end_within_the_timeout(
    loopback, tiny_model_dir, tokenizer
) -> None:
    pool = sglang_pool(loopback, tiny_model_dir, tokenizer, retries=0, timeout_s=0.2)
    try:
        loopback.delay_next(30.0)
        slow = await pool.consult(ask("verify", "Is 38 right?"))
        assert slow.error == "agent 'verify': timeout after 0.2 s"
        loopback.stop()
        down = await pool.consult(ask("verify", "Is 37 right?"))
        assert not down.ok and down.error is not None
    finally:
        await pool.aclose()
