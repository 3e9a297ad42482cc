"""The embedded generator: batching, log-probs, stop conditions, seeds, prefix reuse, context."""

from __future__ import annotations

import asyncio

import pytest
import torch

from policies.base import ContextOverflowError, GenerationError, SamplingParams
from policies.hf_forward import forward_with_cache
from policies.prefill import PrefillItem, plan_groups, prefill
from policies.sampling import _filtered_probs, sample_batch
from policies.transformers_generator import GeneratorStats, TransformersGenerator

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
TEXTS = [
    "Hello there, how are you",
    "The capital of France is",
    "1 2 3",
    "Solve: what is 17 times 3?",
]


@pytest.fixture(scope="module", params=["lean", "hf"])
def gen(request, tiny_model_dir: str):
    """One tiny-model generator per forward path, shared by this module's tests.

    float32, so log-probs are exact on either path (policies/forward.py).
    """
    generator = TransformersGenerator(
        tiny_model_dir,
        device="cpu",
        max_batch_size=8,
        generator_dtype="float32",
        forward_path=request.param,
    )
    yield generator
    asyncio.run(generator.aclose())


def twin(gen: TransformersGenerator, **options) -> TransformersGenerator:
    """A second front end on ``gen``'s module, with the same forward path and dtype."""
    return TransformersGenerator.from_model(
        gen.model,
        gen.tokenizer,
        generator_dtype="float32",
        forward_path=gen.forward.name,
        **options,
    )


def encode(gen: TransformersGenerator, text: str) -> list[int]:
    return gen.tokenizer.encode(text, add_special_tokens=False)


def teacher_forced_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(output)]


async def wait_until_queued(gen: TransformersGenerator, n: int) -> None:
    """Yield to the event loop until ``n`` requests sit in the queue."""
    while gen.pending_requests < n:
        await asyncio.sleep(0)


async def test_concurrent_requests_share_decode_batches_and_match_single_runs(gen):
    prompts = [encode(gen, t) for t in TEXTS]
    singles = [await gen.generate(p, GREEDY) for p in prompts]
    gen.stats = GeneratorStats()
    gen.pause()  # hold the requests back so they all join the same batch
    tasks = [asyncio.create_task(gen.generate(p, GREEDY)) for p in prompts]
    await wait_until_queued(gen, len(prompts))
    gen.resume()
    batched = await asyncio.gather(*tasks)
    assert gen.stats.max_batch_rows == len(prompts)
    # Fresh prompts of different lengths are prefilled together, left-padded.
    assert gen.stats.prefill_forwards == 1
    # One request at a time would take (max_new_tokens - 1) decode steps each.
    assert gen.stats.decode_forwards < len(prompts) * (GREEDY.max_new_tokens - 1)
    for single, row in zip(singles, batched, strict=True):
        assert row.token_ids == single.token_ids
        assert row.logprobs == pytest.approx(single.logprobs, abs=1e-4)
        assert row.finish_reason == "length"


async def test_logprobs_equal_teacher_forced_log_softmax(gen):
    prompt = encode(gen, TEXTS[3])
    params = SamplingParams(temperature=0.7, top_k=50, max_new_tokens=12, seed=3, ignore_eos=True)
    out = await gen.generate(prompt, params)
    assert len(out.token_ids) == 12
    expected = teacher_forced_logprobs(gen.model, prompt, out.token_ids)
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


async def test_stop_string_is_kept_and_reported(gen):
    prompt = encode(gen, TEXTS[0])
    free = await gen.generate(
        prompt, SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    )
    # A stop string the model is known to produce: the text of one of its later tokens.
    k = next(i for i in range(4, 20) if gen.tokenizer.decode([free.token_ids[i]]).strip())
    stop = gen.tokenizer.decode([free.token_ids[k]]).strip()
    out = await gen.generate(
        prompt, SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True, stop=[stop])
    )
    assert out.finish_reason == "stop"
    assert out.stop_match == stop
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    text = gen.tokenizer.decode(out.token_ids)
    assert stop in text
    assert stop not in gen.tokenizer.decode(out.token_ids[:-1])


async def test_stop_token_id_is_kept_and_reported(gen):
    prompt = encode(gen, TEXTS[1])
    free = await gen.generate(
        prompt, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    )
    stop_id = free.token_ids[5]
    out = await gen.generate(
        prompt,
        SamplingParams(
            temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]
        ),
    )
    first = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_match) == ("stop", stop_id)


async def test_eos_stops_unless_ignored(gen):
    prompt = encode(gen, TEXTS[2])
    free = await gen.generate(
        prompt, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    )
    # A second front end on the same module whose EOS is a token the model emits.
    other = twin(gen)
    other.eos_token_ids = [free.token_ids[3]]
    try:
        stopped = await other.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=8))
        ignored = await other.generate(
            prompt, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
        )
    finally:
        await other.aclose()
    first = free.token_ids.index(free.token_ids[3])
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_match) == ("stop", free.token_ids[3])
    assert ignored.token_ids == free.token_ids
    assert ignored.finish_reason == "length"


async def test_max_new_tokens_ends_with_length(gen):
    out = await gen.generate(
        encode(gen, TEXTS[0]),
        SamplingParams(temperature=1.0, max_new_tokens=5, ignore_eos=True, seed=1),
    )
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"
    assert out.stop_match is None


async def test_seeded_sampling_is_reproducible(gen):
    prompt = encode(gen, TEXTS[1])
    params = SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True, seed=11)
    a, b = await asyncio.gather(gen.generate(prompt, params), gen.generate(prompt, params))
    c = await gen.generate(prompt, params)
    d = await gen.generate(prompt, params.model_copy(update={"seed": 12}))
    assert a.token_ids == b.token_ids == c.token_ids
    assert d.token_ids != a.token_ids


async def test_session_prefix_reuse_matches_fresh_computation(gen):
    prompt = encode(gen, TEXTS[3])
    first = await gen.generate(prompt, GREEDY, session_id="reuse")
    assert first.cached_tokens == 0
    turn2 = prompt + first.token_ids + encode(gen, " <feedback>ok</feedback>")
    reused = await gen.generate(turn2, GREEDY, session_id="reuse")
    fresh = await gen.generate(turn2, GREEDY)
    # Keys/values exist for all but the last sampled token of turn one.
    assert reused.cached_tokens == len(prompt) + len(first.token_ids) - 1
    assert fresh.cached_tokens == 0
    assert reused.token_ids == fresh.token_ids
    assert reused.logprobs == pytest.approx(fresh.logprobs, abs=1e-4)


async def test_registered_prefix_is_reused_in_a_mixed_batch(gen):
    static = encode(gen, "You are the knowledge agent. Answer with one fact.")
    questions = [
        static + encode(gen, q) for q in (" Q: pi?", " Q: the boiling point of water in kelvin?")
    ]
    plain = [encode(gen, TEXTS[0]), encode(gen, TEXTS[2])]
    other = twin(gen)
    other.register_prefix(static)
    try:
        expected = [await gen.generate(p, GREEDY) for p in questions + plain]
        other.pause()
        tasks = [asyncio.create_task(other.generate(p, GREEDY)) for p in questions + plain]
        await wait_until_queued(other, 4)
        other.resume()
        got = await asyncio.gather(*tasks)
    finally:
        await other.aclose()
    assert [g.cached_tokens for g in got] == [len(static), len(static), 0, 0]
    for g, e in zip(got, expected, strict=True):
        assert g.token_ids == e.token_ids
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)


async def test_weights_update_invalidates_cached_prefixes(gen):
    prompt = encode(gen, TEXTS[1])
    first = await gen.generate(prompt, GREEDY, session_id="versioned")
    gen.weights_updated(7)
    assert gen.weights_version == 7
    again = await gen.generate(prompt + first.token_ids, GREEDY, session_id="versioned")
    assert again.cached_tokens == 0


async def test_context_overflow_refused_and_new_tokens_capped(gen):
    small = twin(gen, max_context=32)
    try:
        with pytest.raises(ContextOverflowError):
            await small.generate(list(range(100, 132)), GREEDY)
        assert small.stats.requests == 0
        out = await small.generate(
            list(range(100, 128)),
            SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True),
        )
    finally:
        await small.aclose()
    assert len(out.token_ids) == 4
    assert out.finish_reason == "length"


async def test_paused_generator_admits_nothing_until_resumed(gen):
    prompt = encode(gen, TEXTS[2])
    async with gen.paused():
        task = asyncio.create_task(gen.generate(prompt, GREEDY))
        await wait_until_queued(gen, 1)
        with torch.no_grad():
            gen.model.lm_head.weight.mul_(1.0)  # an in-place update, as a trainer would do
        assert gen.pending_requests == 1
        assert not task.done()
    out = await task
    assert len(out.token_ids) == GREEDY.max_new_tokens


async def test_closed_generator_refuses_requests(gen):
    other = twin(gen)
    await other.generate(encode(gen, TEXTS[0]), GREEDY)
    await other.aclose()
    with pytest.raises(GenerationError, match="closed"):
        await other.generate(encode(gen, TEXTS[0]), GREEDY)


async def test_cache_hits_prefilled_in_one_batch_match_fresh_runs(gen):
    prompts = [encode(gen, t) for t in TEXTS[:3]]
    firsts = [await gen.generate(p, GREEDY, session_id=f"batch-{i}") for i, p in enumerate(prompts)]
    feedback = encode(gen, " <feedback>check it</feedback>")
    turns = [p + f.token_ids + feedback for p, f in zip(prompts, firsts, strict=True)]
    turns.append(encode(gen, TEXTS[3]))  # a fresh prompt in the same admission
    expected = [await gen.generate(t, GREEDY) for t in turns]
    gen.stats = GeneratorStats()
    gen.pause()
    tasks = [
        asyncio.create_task(gen.generate(t, GREEDY, session_id=f"batch-{i}"))
        for i, t in enumerate(turns)
    ]
    await wait_until_queued(gen, len(turns))
    gen.resume()
    got = await asyncio.gather(*tasks)
    assert gen.stats.prefill_forwards == 1
    assert [g.cached_tokens for g in got[:3]] == [
        len(p) + len(f.token_ids) - 1 for p, f in zip(prompts, firsts, strict=True)
    ]
    assert got[3].cached_tokens == 0
    for g, e in zip(got, expected, strict=True):
        assert g.token_ids == e.token_ids
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)


def test_identical_prompts_share_one_prefill_row(gen):
    prompt = tuple(encode(gen, TEXTS[1]))
    other = tuple(encode(gen, TEXTS[2]))
    widths: list[int] = []

    def forward(ids, positions, past, mask):
        widths.append(ids.shape[0])
        return forward_with_cache(gen.model, ids, positions, past, mask)

    items = [
        PrefillItem(prompt, 0, None),
        PrefillItem(other, 0, None),
        PrefillItem(prompt, 0, None),
    ]
    with torch.inference_mode():
        logits, sources, forwards = prefill(forward, items, gen.device)
    assert (forwards, widths) == (1, [2])
    assert torch.equal(logits[0], logits[2])
    assert sources[0].index == sources[2].index != sources[1].index
    assert [s.length for s in sources] == [len(prompt), len(other), len(prompt)]


def test_prefill_groups_keep_padding_bounded():
    lengths = [240, 10, 238, 12, 240, 600]
    groups = plan_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert {frozenset(g) for g in groups} == {
        frozenset({5}),
        frozenset({0, 2, 4}),
        frozenset({1, 3}),
    }
    assert plan_groups([100] * 10, max_tokens=300) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


async def test_rows_joining_and_leaving_mid_decode_match_single_runs(gen):
    long_params = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True)
    long_prompt, short_prompt = encode(gen, TEXTS[0]), encode(gen, TEXTS[3])
    long_single = await gen.generate(long_prompt, long_params)
    short_single = await gen.generate(short_prompt, GREEDY)
    gen.stats = GeneratorStats()
    long_task = asyncio.create_task(gen.generate(long_prompt, long_params))
    while gen.stats.decode_forwards < 2:  # the long row is decoding alone
        await asyncio.sleep(0)
    short = await gen.generate(short_prompt, GREEDY)
    long = await long_task
    assert gen.stats.max_batch_rows == 2
    assert short.token_ids == short_single.token_ids
    assert long.token_ids == long_single.token_ids
    assert long.logprobs == pytest.approx(long_single.logprobs, abs=1e-4)


async def test_keys_values_buffers_grow_without_changing_outputs(gen, monkeypatch):
    prompt = encode(gen, TEXTS[2])
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    roomy = await gen.generate(prompt, params, session_id="grow")
    monkeypatch.setattr("policies.kv_slab.HEADROOM", 1)  # every step outgrows the buffers
    tight = await gen.generate(prompt, params)
    assert tight.token_ids == roomy.token_ids
    assert tight.logprobs == pytest.approx(roomy.logprobs, abs=1e-5)
    turn2 = prompt + tight.token_ids + encode(gen, " ok")
    reused = await gen.generate(turn2, GREEDY, session_id="grow")
    assert reused.cached_tokens == len(prompt) + len(tight.token_ids) - 1
    assert reused.token_ids == (await gen.generate(turn2, GREEDY)).token_ids


def test_batched_sampling_matches_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=20, seed=1),
        SamplingParams(temperature=1.2, top_p=0.9, seed=2),
        SamplingParams(temperature=1.0, top_k=50, top_p=0.5, seed=3),
    ]

    def gens():
        return [None] + [torch.Generator().manual_seed(p.seed) for p in params[1:]]

    tokens, logprobs, _ = sample_batch(logits, params, gens())
    alone = [
        sample_batch(logits[i : i + 1], [params[i]], [gens()[i]])[0][0] for i in range(len(params))
    ]
    assert tokens == alone
    assert tokens[0] == int(logits[0].argmax())
    expected = torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor(tokens)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_batched_draws_follow_each_rows_filtered_distribution():
    """Many seeded draws per row: frequencies match the filtered probabilities; none outside them."""
    torch.manual_seed(2)
    logits = torch.randn(3, 12) * 2
    params = [
        SamplingParams(temperature=0.9, seed=0),
        SamplingParams(top_k=4, seed=0),
        SamplingParams(top_p=0.7, seed=0),
    ]
    probs = _filtered_probs(logits, params, [0, 1, 2])
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    draws = torch.tensor([sample_batch(logits, params, gens)[0] for _ in range(3000)])
    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=12).double()
        allowed = probs[row] > 0
        assert counts[~allowed].sum() == 0, f"row {row} drew a filtered-out token"
        expected = probs[row].double() * len(draws)
        # Within 5 binomial standard deviations of its expected count, every token.
        spread = (expected * (1 - probs[row].double())).sqrt()
        assert ((counts - expected).abs() <= 5 * spread + 1e-9).all(), f"row {row}: {counts}"


@pytest.mark.parametrize("scale", [4.0, 0.01])  # peaked: nucleus in the candidates; flat: not
def test_top_p_keeps_exactly_the_full_sort_nucleus(scale):
    torch.manual_seed(1)
    logits = torch.randn(3, 2000) * scale
    params = [SamplingParams(top_p=p) for p in (0.3, 0.9, 1.0)]
    probs = _filtered_probs(logits, params, [0, 1, 2])
    for row, p in enumerate(params):
        sorted_logits, order = torch.sort(logits[row], descending=True)
        mass = torch.softmax(sorted_logits, -1)
        keep = ((torch.cumsum(mass, -1) - mass) < p.top_p) | (p.top_p == 1.0)
        expected = set(order[keep].tolist())
        assert set(probs[row].nonzero()[:, 0].tolist()) == expected


@pytest.mark.slow
async def test_real_model_batched_greedy_and_logprobs(default_model_dir: str):
    real = TransformersGenerator("default", device="cpu", generator_dtype="float32")
    chat = [
        real.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        for q in ("What is 2+2?", "Name a prime number larger than 10.")
    ]
    chat = [list(c["input_ids"]) if hasattr(c, "keys") else list(c) for c in chat]
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    try:
        singles = [await real.generate(c, params) for c in chat]
        batched = await asyncio.gather(*(real.generate(c, params) for c in chat))
    finally:
        await real.aclose()
    for s, b, c in zip(singles, batched, chat, strict=True):
        assert b.token_ids == s.token_ids
        assert s.logprobs == pytest.approx(
            teacher_forced_logprobs(real.model, c, s.token_ids), abs=1e-4
        )
