"""Top-k log-probs from the generators, and a branch's prompt served from its parent's cache."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from scripted import AdditionTask, ScriptedAgents
from sglang_loopback import LoopbackSGLangServer

from aipo_env.config import EnvConfig
from aipo_env.rollout import RolloutConfig, RolloutDriver
from aipo_env.tree_rollout import generation_metrics
from policies.base import Generation, GenerationError, Generator, SamplingParams
from policies.loading import load_causal_lm
from policies.sglang_generator import SGLangGenerator, parse_generate_response
from policies.transformers_generator import TransformersGenerator

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: str):
    generator = TransformersGenerator(tiny_model_dir, device="cpu", generator_dtype="float32")
    yield generator
    asyncio.run(generator.aclose())


def prompt(generator: Generator, text: str = "The capital of France is") -> list[int]:
    return generator.tokenizer.encode(text, add_special_tokens=False)


# -- the embedded generator ------------------------------------------------------------


async def test_embedded_top_logprobs_are_the_models_own_topk(backend, tiny_model_dir) -> None:
    ids = prompt(backend)
    asked, plain = await asyncio.gather(
        backend.generate(ids, GREEDY.model_copy(update={"top_logprobs": 4})),
        backend.generate(ids, GREEDY),  # same batch, asks for none
    )
    assert plain.top_logprobs == [] and plain.token_ids == asked.token_ids
    model = load_causal_lm(tiny_model_dir).eval()
    sequence = ids + asked.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    expected = [
        torch.topk(torch.log_softmax(logits[len(ids) - 1 + i], -1), 4).values.tolist()
        for i in range(len(asked.token_ids))
    ]
    assert len(asked.top_logprobs) == len(asked.token_ids)
    for got, want in zip(asked.top_logprobs, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    # Greedy: the sampled token is the most likely one.
    assert [row[0] for row in asked.top_logprobs] == pytest.approx(asked.logprobs, abs=1e-6)


async def test_a_forked_session_starts_from_its_parents_cached_prefix(backend) -> None:
    ids = prompt(backend)
    parent = await backend.generate(ids, GREEDY, session_id="tree-root")
    branch_prompt = ids + parent.token_ids[:3]  # a boundary inside what the parent processed
    cold = await backend.generate(branch_prompt, GREEDY, session_id="tree-elsewhere")
    assert cold.cached_tokens == 0  # an unrelated new session has nothing cached
    before = backend.stats.cached_tokens
    backend.fork_session("tree-root", "tree-root/1")
    branch = await backend.generate(branch_prompt, GREEDY, session_id="tree-root/1")
    assert branch.cached_tokens == len(branch_prompt) - 1
    assert backend.stats.cached_tokens - before == len(branch_prompt) - 1
    assert branch.token_ids == cold.token_ids
    assert branch.logprobs == pytest.approx(cold.logprobs, abs=1e-4)


class FirstSegmentCalls(Generator):
    """The model, except that each tree root's first segment is a scripted tool call."""

    def __init__(self, model: TransformersGenerator) -> None:
        self.model = model
        self.call = model.tokenizer.encode("<python>print(1)</python>", add_special_tokens=False)
        self.seen: set[str] = set()

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def max_context(self) -> int:
        return self.model.max_context

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, *, session_id: str | None = None
    ) -> Generation:
        if session_id not in self.seen:
            self.seen.add(str(session_id))
            n = len(self.call)
            return Generation(
                token_ids=self.call,
                logprobs=[-0.1] * n,
                top_logprobs=[[-0.1]] * n,
                finish_reason="stop",
                stop_match="</python>",
            )
        return await self.model.generate(input_ids, params, session_id=session_id)

    def fork_session(self, parent_session: str, child_session: str) -> None:
        self.seen.add(child_session)  # a branch continues its parent: the model writes it
        self.model.fork_session(parent_session, child_session)


async def test_a_tree_branch_prompt_is_served_from_the_cache(backend) -> None:
    names = ["python", "search"]
    driver = RolloutDriver(
        FirstSegmentCalls(backend),
        AdditionTask(1),
        ScriptedAgents(names=names),
        EnvConfig(protocol="tools", agent_names=names, max_new_tokens_per_turn=6),
        RolloutConfig(
            n_samples=2, initial_samples=1, branch_probability=1.0, strategy="arpo", seed=0
        ),
    )
    root, branch = await driver.run([0])
    assert branch.parent_id == root.trajectory_id
    first_own = next(t for t in branch.turns if t.policy_start == branch.branch_point)
    assert first_own.policy_cached_tokens == branch.branch_point - 1
    assert generation_metrics([root, branch])["cached_prompt_tokens"] >= branch.branch_point - 1


# -- the SGLang client ---------------------------------------------------------------


def sglang_body(top: Any) -> dict[str, Any]:
    """A /generate reply as SGLang writes it with return_logprob and top_logprobs_num=2."""
    return {
        "text": " 4",
        "output_ids": [216, 36],
        "meta_info": {
            "finish_reason": {"type": "length", "length": 2},
            "prompt_tokens": 5,
            "cached_tokens": 0,
            "output_token_logprobs": [[-0.52, 216, None], [-0.04, 36, None]],
            "output_top_logprobs": top,
        },
    }


def test_sglang_top_logprobs_are_parsed_per_token_highest_first() -> None:
    top = [[[-0.52, 216, None], [-1.9, 17, None]], [[-3.0, 9, None], [-0.04, 36, None]]]
    generation = parse_generate_response(sglang_body(top), "http://s", top_logprobs=2)
    assert generation.top_logprobs == [[-0.52, -1.9], [-0.04, -3.0]]
    assert parse_generate_response(sglang_body(top), "http://s", 1).top_logprobs == [
        [-0.52],
        [-0.04],
    ]
    # Not asked for: ignored even when present.
    assert parse_generate_response(sglang_body(top), "http://s").top_logprobs == []


@pytest.mark.parametrize(
    "top",
    [None, [[[-0.5, 216, None]]], [None, [[-0.1, 36, None]]], [[["x", 216, None]], [[-0.1, 36]]]],
)
def test_sglang_missing_or_malformed_top_logprobs_are_named(top) -> None:
    with pytest.raises(GenerationError, match="output_top_logprobs"):
        parse_generate_response(sglang_body(top), "http://s", top_logprobs=2)


async def test_sglang_client_asks_for_top_logprobs_and_matches_the_backend(backend) -> None:
    ids = prompt(backend)
    asking = GREEDY.model_copy(update={"top_logprobs": 3})
    with LoopbackSGLangServer(backend) as server:
        client = SGLangGenerator(server.url, tokenizer=backend.tokenizer, backoff_s=0.01)
        try:
            remote = await client.generate(ids, asking)
            plain = await client.generate(ids, GREEDY)
        finally:
            await client.aclose()
        bodies = [body for route, body in server.requests if route == "/generate"]
    local = await backend.generate(ids, asking)
    assert bodies[0]["top_logprobs_num"] == 3 and "top_logprobs_num" not in bodies[1]
    assert plain.top_logprobs == []
    assert len(remote.top_logprobs) == len(remote.token_ids)
    for got, want in zip(remote.top_logprobs, local.top_logprobs, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


async def test_sglang_routes_a_fork_to_its_parents_server(backend) -> None:
    with LoopbackSGLangServer(backend) as a, LoopbackSGLangServer(backend) as b:
        client = SGLangGenerator([a.url, b.url], tokenizer=backend.tokenizer, backoff_s=0.01)
        try:
            parent = client.server_for("p")
            assert client.server_for("unrelated") != parent  # a new session goes elsewhere
            client.fork_session("p", "p/1")
            assert client.server_for("p/1") == parent
        finally:
            await client.aclose()
