"""The embedded generator's forwards: the lean Llama forward against transformers', dtypes, fallback.

The lean forward (policies/lean_llama.py) recomputes what transformers' Llama forward
computes; these tests pin it to transformers' logits and keys/values on a tiny random
Llama, with padding, with a cached prefix, at several positions, and pin the
generator's behaviour around it: identical greedy generations on either path in
float32, bfloat16 copies refreshed by ``weights_updated``, the transformers forward for
other architectures, and no deprecation warning from transformers while generating.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import warnings

import pytest
import torch
from tiny_model import random_llama

from policies.base import SamplingParams
from policies.forward import make_forward
from policies.hf_forward import HFForward, forward_with_cache
from policies.kv_slab import KVSlab, RowSource
from policies.lean_llama import LeanLlama, lean_unsupported
from policies.transformers_generator import TransformersGenerator

VOCAB = 300
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """A tiny random Llama with grouped queries (4 heads over 2 key/value heads).

    Its RMS norm weights are random too (they start at one), so a norm weight applied
    twice or not at all shows.
    """
    model = random_llama(VOCAB, hidden_size=64, heads=4, kv_heads=2, layers=2, max_positions=256)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, positions and padding mask of ``rows`` left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, positions, mask


def assert_kv_close(lean_kv, hf_kv, mask: torch.Tensor, atol: float) -> None:
    """Keys/values equal at every real (unpadded) position of every layer."""
    real = mask.bool()
    for (lk, lv), (hk, hv) in zip(lean_kv, hf_kv, strict=True):
        for row in range(mask.shape[0]):
            cols = real[row]
            torch.testing.assert_close(
                lk[row][:, cols].float(), hk[row][:, cols], atol=atol, rtol=0
            )
            torch.testing.assert_close(
                lv[row][:, cols].float(), hv[row][:, cols], atol=atol, rtol=0
            )


@pytest.mark.parametrize("lengths", [[9, 9, 9], [9, 4, 1]], ids=["unpadded", "left-padded"])
def test_lean_prefill_equals_transformers_logits_and_keys_values(llama, lengths):
    torch.manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,)).tolist() for n in lengths]
    ids, positions, mask = left_padded(rows)
    hf_mask = None if len(set(lengths)) == 1 else mask
    with torch.inference_mode():
        expected, hf_kv = forward_with_cache(llama, ids, positions, [], hf_mask)
        logits, kv = LeanLlama(llama).prefill(ids, positions, [], hf_mask)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert_kv_close(kv, hf_kv, mask, atol=1e-5)


def test_lean_prefill_over_a_cached_prefix_equals_transformers(llama):
    """Past keys/values of different lengths (left-padded), then left-padded suffixes."""
    torch.manual_seed(2)
    prefixes = [torch.randint(1, VOCAB, (n,)).tolist() for n in (7, 3, 0)]
    suffixes = [torch.randint(1, VOCAB, (n,)).tolist() for n in (2, 5, 6)]
    with torch.inference_mode():
        pre_ids, pre_pos, pre_mask = left_padded([p or [0] for p in prefixes])
        pre_mask[2] = 0  # the third row has no cached prefix
        _, past = forward_with_cache(llama, pre_ids, pre_pos, [], pre_mask)
        suf_ids, _, suf_mask = left_padded(suffixes)
        starts = torch.tensor([len(p) for p in prefixes])[:, None]
        suf_pos = (starts + suf_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([pre_mask, suf_mask], dim=1)
        expected, hf_kv = forward_with_cache(llama, suf_ids, suf_pos, past, mask)
        logits, kv = LeanLlama(llama).prefill(suf_ids, suf_pos, past, mask)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert_kv_close(kv, hf_kv, mask, atol=1e-5)


def test_lean_decode_steps_equal_transformers_with_padded_rows(llama):
    """Rows of different lengths decode together for several positions; same logits, same slab."""
    torch.manual_seed(3)
    rows = [torch.randint(1, VOCAB, (n,)).tolist() for n in (8, 3, 5)]
    ids, positions, mask = left_padded(rows)
    lean = LeanLlama(llama)
    with torch.inference_mode():
        _, kv = forward_with_cache(llama, ids, positions, [], mask)
        sources = [
            RowSource(kv, i, [(ids.shape[1] - len(r), ids.shape[1])]) for i, r in enumerate(rows)
        ]
        slabs = {name: KVSlab.build(None, sources, headroom=2) for name in ("hf", "lean")}
        lengths = torch.tensor([len(r) for r in rows])
        step = torch.randint(1, VOCAB, (3, 1))
        for _ in range(5):  # outgrows the headroom on the way
            pos = lengths[:, None].clone()
            expected = HFForward(llama).decode(
                step, pos, slabs["hf"], slabs["hf"].attention_mask(1)
            )
            got = lean.decode(step, pos, slabs["lean"], slabs["lean"].attention_mask(1))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            for slab in slabs.values():
                slab.advance(1)
            for (lk, lv), (hk, hv) in zip(slabs["lean"].layers, slabs["hf"].layers, strict=True):
                width = slabs["hf"].width
                torch.testing.assert_close(lk[:, :, :width], hk[:, :, :width], atol=1e-5, rtol=0)
                torch.testing.assert_close(lv[:, :, :width], hv[:, :, :width], atol=1e-5, rtol=0)
            lengths += 1
            step = expected.argmax(-1, keepdim=True)


@pytest.mark.parametrize("packed", [True, False], ids=["onednn-prepacked", "plain-matmuls"])
def test_bfloat16_lean_forward_stays_near_float32(llama, packed, monkeypatch):
    """Both ways of running the bfloat16 copies (prepacked with fused epilogues, or not)."""
    if not packed:
        monkeypatch.setattr("policies.lean_llama._packable", lambda device, dtype: False)
    torch.manual_seed(4)
    ids, positions, mask = left_padded([torch.randint(1, VOCAB, (n,)).tolist() for n in (12, 7)])
    lean = LeanLlama(llama, torch.bfloat16)
    if packed and not lean.layers[0].gate.packed:
        pytest.skip("this torch build has no oneDNN bfloat16 matmul")
    assert lean.layers[0].gate.packed == packed
    with torch.inference_mode():
        expected, _ = forward_with_cache(llama, ids, positions, [], mask)
        logits, kv = lean.prefill(ids, positions, [], mask)
    assert kv[0][0].dtype == torch.bfloat16
    logp = torch.log_softmax(logits, -1)
    ref = torch.log_softmax(expected, -1)
    assert 0 < (logp - ref).abs().max() < 0.05


async def _greedy(gen: TransformersGenerator, prompts: list[list[int]]) -> list:
    try:
        return await asyncio.gather(*(gen.generate(p, GREEDY) for p in prompts))
    finally:
        await gen.aclose()


async def test_greedy_generations_identical_on_both_paths_in_float32(tiny_model_dir):
    hf = TransformersGenerator(
        tiny_model_dir, device="cpu", generator_dtype="float32", forward_path="hf"
    )
    lean = TransformersGenerator.from_model(hf.model, hf.tokenizer, generator_dtype="float32")
    assert (hf.forward.name, lean.forward.name) == ("hf", "lean")
    texts = ["Hello there, how are you", "1 2 3", "Solve: what is 17 times 3?", "The capital"]
    prompts = [hf.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    expected = await _greedy(hf, prompts)
    got = await _greedy(lean, prompts)
    for g, e in zip(got, expected, strict=True):
        assert g.token_ids == e.token_ids
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-5)


async def test_bfloat16_copies_follow_the_model_after_weights_updated(tiny_model_dir):
    base = TransformersGenerator(tiny_model_dir, device="cpu", generator_dtype="float32")
    model = copy.deepcopy(base.model)
    prompt = base.tokenizer.encode("The capital of France is", add_special_tokens=False)
    await base.aclose()
    gen = TransformersGenerator.from_model(model, base.tokenizer, generator_dtype="bfloat16")
    assert gen.forward.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    before = await gen.generate(prompt, GREEDY)
    with torch.no_grad():
        torch.manual_seed(5)
        for param in model.model.layers.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    gen.weights_updated()
    after = await gen.generate(prompt, GREEDY)
    fresh = TransformersGenerator.from_model(model, base.tokenizer, generator_dtype="bfloat16")
    expected = (await _greedy(fresh, [prompt]))[0]
    await gen.aclose()
    assert after.token_ids != before.token_ids
    assert after.token_ids == expected.token_ids
    assert after.logprobs == pytest.approx(expected.logprobs, abs=1e-6)


def test_auto_forward_and_dtype_choice(llama, monkeypatch):
    monkeypatch.setattr("policies.forward.cpu_has_native_bf16", lambda: True)
    chosen = make_forward(llama)
    assert (chosen.name, chosen.dtype) == ("lean", torch.bfloat16)
    monkeypatch.setattr("policies.forward.cpu_has_native_bf16", lambda: False)
    chosen = make_forward(llama)
    assert (chosen.name, chosen.dtype) == ("lean", torch.float32)
    with pytest.raises(ValueError, match="generator_dtype 'float64'"):
        make_forward(llama, "float64")


def tiny_qwen2(vocab: int) -> torch.nn.Module:
    """A tiny random Qwen2 (biased query/key/value projections: not the lean path's maths)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


async def test_other_architectures_fall_back_to_the_transformers_forward(tokenizer):
    model = tiny_qwen2(len(tokenizer))
    assert "qwen2" in (lean_unsupported(model) or "")
    with pytest.raises(ValueError, match="'lean' cannot run this model: model_type 'qwen2'"):
        make_forward(model, path="lean")
    gen = TransformersGenerator.from_model(model, tokenizer)
    assert (gen.forward.name, gen.forward.dtype) == ("hf", torch.float32)
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("Hi there", "1 2 3 4 5 6")]
    outs = await _greedy(gen, prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
        assert out.token_ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_transformers_forward_in_another_dtype_runs_on_a_synced_copy():
    model = tiny_qwen2(VOCAB)
    forward = make_forward(model, "bfloat16")
    assert isinstance(forward, HFForward) and forward.module is not model
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # tied: the embedding doubles too
    forward.sync_weights()
    for mine, theirs in zip(forward.module.parameters(), model.parameters(), strict=True):
        assert mine.dtype == torch.bfloat16
        assert torch.equal(mine, theirs.to(torch.bfloat16))


@pytest.mark.parametrize("path", ["hf", "lean"])
async def test_generation_emits_no_transformers_deprecation_warning(tiny_model_dir, path, caplog):
    prompt = [100, 200, 300, 400]
    gen = TransformersGenerator(
        tiny_model_dir, device="cpu", generator_dtype="float32", forward_path=path
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        first = await gen.generate(prompt, GREEDY, session_id="s")
        # A second turn reuses the session's cached prefix: both prefill forms run.
        await gen.generate(prompt + first.token_ids + [500], GREEDY, session_id="s")
        await gen.aclose()
    # transformers warns with stacklevel=2, so the file named is its caller's (often torch's).
    noisy = [
        f"{w.filename}: {w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    noisy += [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert noisy == []
