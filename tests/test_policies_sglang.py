"""The SGLang client against a loopback server that speaks SGLang's native API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sglang_loopback import LoopbackSGLangServer

from policies import make_generator, sglang_hosts
from policies.base import ContextOverflowError, GenerationError, SamplingParams
from policies.sglang_generator import SGLangGenerator, parse_generate_response
from policies.transformers_generator import TransformersGenerator

FIXTURE = Path(__file__).parent / "fixtures" / "sglang_generate_response.json"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: str):
    """The embedded generator the loopback servers answer with."""
    generator = TransformersGenerator(tiny_model_dir, device="cpu")
    yield generator
    asyncio.run(generator.aclose())


@pytest.fixture
def server(backend):
    with LoopbackSGLangServer(backend) as srv:
        yield srv


def client_for(backend, *servers: LoopbackSGLangServer, **options) -> SGLangGenerator:
    options.setdefault("backoff_s", 0.01)
    options.setdefault("timeout_s", 30.0)
    return SGLangGenerator([s.url for s in servers], tokenizer=backend.tokenizer, **options)


def prompt(backend, text: str = "The capital of France is") -> list[int]:
    return backend.tokenizer.encode(text, add_special_tokens=False)


def generate_bodies(srv: LoopbackSGLangServer) -> list[dict]:
    return [body for route, body in srv.requests if route == "/generate"]


async def test_tokens_and_logprobs_round_trip(backend, server):
    client = client_for(backend, server)
    ids = prompt(backend)
    try:
        remote = await client.generate(ids, GREEDY)
        seeded = SamplingParams(temperature=1.0, max_new_tokens=4, seed=9, stop=["</consult>"])
        await client.generate(ids, seeded)
    finally:
        await client.aclose()
    local = await backend.generate(ids, GREEDY)
    assert remote.token_ids == local.token_ids
    assert remote.logprobs == pytest.approx(local.logprobs, abs=1e-6)
    assert remote.finish_reason == "length"
    assert remote.prompt_tokens == len(ids)
    first, second = generate_bodies(server)
    assert first["input_ids"] == ids
    assert first["return_logprob"] is True and first["logprob_start_len"] == -1
    assert first["sampling_params"]["no_stop_trim"] is True
    assert first["sampling_params"]["skip_special_tokens"] is False
    assert "sampling_seed" not in first["sampling_params"]
    assert second["sampling_params"]["sampling_seed"] == 9
    assert second["sampling_params"]["stop"] == ["</consult>"]
    assert first["rid"] != second["rid"]


async def test_sessions_stick_to_one_server(backend):
    with LoopbackSGLangServer(backend) as a, LoopbackSGLangServer(backend) as b:
        client = client_for(backend, a, b)
        sessions = [f"traj-{i}" for i in range(4)]
        try:
            for turn in range(2):
                for sid in sessions:
                    ids = prompt(backend, f"{sid} turn {turn}")
                    await client.generate(
                        ids, SamplingParams(temperature=0.0, max_new_tokens=2), session_id=sid
                    )
        finally:
            await client.aclose()
        served = {}
        for name, srv in (("a", a), ("b", b)):
            for body in generate_bodies(srv):
                sid = backend.tokenizer.decode(body["input_ids"]).split(" turn")[0]
                served.setdefault(sid, set()).add(name)
    assert set(served) == set(sessions)
    assert all(len(names) == 1 for names in served.values())
    assert {next(iter(n)) for n in served.values()} == {"a", "b"}  # new sessions spread out


async def test_retries_after_server_errors(backend, server):
    client = client_for(backend, server, max_retries=3)
    try:
        server.fail_next(2, status=503)
        out = await client.generate(prompt(backend), GREEDY)
        assert len(out.token_ids) == GREEDY.max_new_tokens
        assert len(generate_bodies(server)) == 3
        server.fail_next(10)
        with pytest.raises(GenerationError, match="HTTP 500"):
            await client.generate(prompt(backend), GREEDY)
    finally:
        await client.aclose()
    assert len(generate_bodies(server)) == 3 + 4


async def test_dropped_connection_is_retried(backend, server):
    client = client_for(backend, server)
    server.drop_next(1)
    try:
        out = await client.generate(prompt(backend), GREEDY)
    finally:
        await client.aclose()
    assert len(out.token_ids) == GREEDY.max_new_tokens
    assert len(generate_bodies(server)) == 2


async def test_client_errors_are_not_retried(backend, server):
    # The client believes in a longer context than the server has: the server says 400.
    client = client_for(backend, server, max_context=10 * backend.max_context)
    try:
        with pytest.raises(GenerationError, match="HTTP 400"):
            await client.generate(list(range(100, 100 + backend.max_context + 5)), GREEDY)
    finally:
        await client.aclose()
    assert len(generate_bodies(server)) == 1


async def test_malformed_replies_raise_generation_error_naming_the_server(backend, server):
    client = client_for(backend, server)
    try:
        server.malformed_next(1)
        with pytest.raises(GenerationError, match=f"127.0.0.1:{server.port}.*not JSON"):
            await client.generate(prompt(backend), GREEDY)
        server.incomplete_next(1)
        with pytest.raises(GenerationError, match=f"127.0.0.1:{server.port}.*meta_info"):
            await client.generate(prompt(backend), GREEDY)
    finally:
        await client.aclose()


async def test_server_down_gives_error_and_restart_recovers(backend, server):
    client = client_for(backend, server, max_retries=1)
    ids = prompt(backend)
    try:
        before = await client.generate(ids, GREEDY, session_id="s")
        server.stop()
        with pytest.raises(GenerationError, match="connection failed"):
            await client.generate(ids, GREEDY, session_id="s")
        server.start()  # same port
        after = await client.generate(ids, GREEDY, session_id="s")
    finally:
        await client.aclose()
    assert after.token_ids == before.token_ids


async def test_slow_server_times_out(backend, server):
    client = client_for(backend, server, timeout_s=0.2)
    server.delay_next(60.0)  # cancelled when the server stops
    try:
        with pytest.raises(GenerationError, match="did not answer within"):
            await client.generate(prompt(backend), GREEDY)
    finally:
        await client.aclose()


async def test_context_overflow_refused_before_any_call(backend, server):
    client = client_for(backend, server, max_context=16)
    try:
        with pytest.raises(ContextOverflowError):
            await client.generate(list(range(100, 120)), GREEDY)
        out = await client.generate(
            list(range(100, 112)),
            SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True),
        )
    finally:
        await client.aclose()
    assert len(generate_bodies(server)) == 1
    assert len(out.token_ids) == 4  # capped at the room left in the context


async def test_flush_and_weight_update_reach_every_server(backend, tiny_model_dir):
    with LoopbackSGLangServer(backend) as a, LoopbackSGLangServer(backend) as b:
        client = client_for(backend, a, b)
        try:
            await client.flush_cache()
            await client.update_weights_from_disk(tiny_model_dir, version=3)
            assert client.weights_version == 3
            with pytest.raises(GenerationError, match="HTTP 400"):
                await client.update_weights_from_disk(str(Path(tiny_model_dir) / "missing"))
        finally:
            await client.aclose()
        for srv in (a, b):
            assert srv.flushes == 1
            updates = [body for route, body in srv.requests if route == "/update_weights_from_disk"]
            assert updates[0] == {"model_path": tiny_model_dir}
    assert client.weights_version == 3


def test_recorded_response_parses():
    body = json.loads(FIXTURE.read_text())
    gen = parse_generate_response(body, "http://recorded")
    meta = body["meta_info"]
    assert gen.token_ids == body["output_ids"]
    assert gen.logprobs == [entry[0] for entry in meta["output_token_logprobs"]]
    assert gen.finish_reason == meta["finish_reason"]["type"]
    assert gen.stop_match == meta["finish_reason"]["matched"]
    assert (gen.prompt_tokens, gen.cached_tokens) == (meta["prompt_tokens"], meta["cached_tokens"])


def test_misaligned_logprobs_are_rejected():
    body = json.loads(FIXTURE.read_text())
    body["meta_info"]["output_token_logprobs"][1][1] += 1
    with pytest.raises(GenerationError, match=r"http://recorded.*output_token_logprobs\[1\]"):
        parse_generate_response(body, "http://recorded")


async def test_make_generator_builds_an_sglang_client(backend):
    client = make_generator("sglang://127.0.0.1:1,127.0.0.1:2", tokenizer=backend.tokenizer)
    try:
        assert isinstance(client, SGLangGenerator)
        assert client.base_urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    finally:
        await client.aclose()
    with pytest.raises(ValueError, match="no servers"):
        make_generator("sglang://", tokenizer=backend.tokenizer)


def test_sglang_hosts_parses_the_spec_and_names_one_without_servers():
    assert sglang_hosts("sglang://a:1, b:2,") == ["a:1", "b:2"]
    assert sglang_hosts("default") is None
    assert sglang_hosts("http://a:1") is None
    with pytest.raises(ValueError, match=r"no servers in 'sglang:// ,'"):
        sglang_hosts("sglang:// ,")


def test_importing_policies_loads_no_backend():
    import subprocess
    import sys

    code = "import sys, policies; print(sorted(m for m in ('torch', 'transformers', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import policies

    assert policies.SGLangGenerator is SGLangGenerator
