"""The in-process vLLM generator (policies/vllm_generator.py) and ``aipo train`` with backend 'vllm'.

Marker ``vllm``: skipped where vLLM is not importable (the main .venv); run from
``.venv-vllm`` (``bash scripts/setup.sh --with-vllm``)::

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_generator.py

One engine on the default model (SmolLM2-135M-Instruct, float32, 0.25 GiB KV cache) serves
the module's generator tests; the training test starts its own. A refused engine (bad
path, no vLLM) needs no engine at all and runs everywhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from policies.base import GenerationError, SamplingParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not importable (use .venv-vllm)")

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
#: Engines in these tests skip torch.compile: on 2 busy cores compiling takes minutes.
EAGER = {"enforce_eager": True}


def test_bad_model_path_is_one_clear_error_before_anything_starts(tmp_path):
    from policies.vllm_generator import VLLMGenerator

    with pytest.raises(GenerationError, match="vLLM engine cannot start"):
        VLLMGenerator(str(tmp_path / "no-such-model"))


def test_train_refuses_a_bad_vllm_model_before_step_1(tmp_path, tiny_model_dir):
    """``policy.backend: vllm`` whose engine cannot start: BackendFailure naming the cause."""
    from tiny_run import make_config, parity_task_registered

    from trainers.embedded import BackendFailure, EmbeddedTrainer

    # The trainer loads its own copy from the path; the engine is pointed at a missing one.
    missing = {"engine_options": {"tokenizer": str(tmp_path / "missing"), **EAGER}}
    with parity_task_registered():
        cfg = make_config(
            tmp_path / "run",
            tiny_model_dir,
            policy={"backend": "vllm", "vllm_options": missing},
        )
        with pytest.raises(BackendFailure, match="vLLM engine") as info:
            EmbeddedTrainer(cfg, progress=False).run()
    assert info.value.completed_step == 0
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        or not (tmp_path / "run" / "metrics.jsonl").read_text().strip()
    )


@pytest.mark.vllm
@needs_vllm
def test_aipo_train_with_the_vllm_backend(tmp_path, tokenizer, monkeypatch):
    """Two steps of ``aipo train``'s trainer with policy.backend 'vllm'.

    It runs before the module's shared engine starts, so two engines never share the
    machine's memory.

    The engine serves the trainer's weights before step 1 and reloads them after every
    update that moved them (that the reload changes generations is the test above).
    """
    from tiny_model import save_tiny_model
    from tiny_run import make_config, parity_task_registered

    from policies.vllm_generator import VLLMGenerator
    from trainers.embedded import EmbeddedTrainer

    # vLLM's CPU attention needs a head size of 32 or more: 256 wide over 4 heads.
    tiny_model_dir = str(save_tiny_model(tmp_path / "tiny-llama", tokenizer, hidden_size=256))
    loaded: list[tuple[str, int]] = []
    real = VLLMGenerator.update_weights_from_disk

    async def recorded(self, path, version):
        loaded.append((Path(path).name, version))
        await real(self, path, version)

    monkeypatch.setattr(VLLMGenerator, "update_weights_from_disk", recorded)
    options = {"dtype": "float32", "kv_cache_gib": 0.25, "engine_options": EAGER}
    with parity_task_registered():
        cfg = make_config(
            tmp_path / "run",
            tiny_model_dir,
            policy={"backend": "vllm", "vllm_options": options},
            train={"save_every": 1},
        )
        EmbeddedTrainer(cfg, progress=False).run()
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(v == 0 for r in records for k, v in r.items() if k.startswith("errors/"))
    moved = [r["step"] for r in records if r["update/optimizer_steps"] > 0]
    assert moved, "no update moved the weights; the test shows nothing"
    assert loaded == [("step_000000", 0)] + [(f"step_{s:06d}", s) for s in moved]
    assert len(list((run_dir / "rollouts").glob("step_*.jsonl"))) == 2


@pytest.fixture(scope="module")
def engine(default_model_dir):
    """One vLLM engine on the default model, in float32, on a loop of its own."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not importable (use .venv-vllm)")
    from policies.vllm_generator import VLLMGenerator

    loop = asyncio.new_event_loop()

    async def build():
        return VLLMGenerator(
            default_model_dir,
            max_context=1024,
            dtype="float32",
            seed=0,
            kv_cache_gib=0.25,
            engine_options=EAGER,
        )

    generator = loop.run_until_complete(build())
    yield generator, loop
    loop.run_until_complete(generator.aclose())
    loop.close()


def run(engine, coro):
    return engine[1].run_until_complete(coro)


def chat_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    rendered = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": text}], add_generation_prompt=True
    )
    return list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)


def long_ids(tokenizer, text: str) -> list[int]:
    """A prompt of several hundred tokens: longer than a KV-cache block, so its prefix caches."""
    passage = " ".join(
        f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60)
    )
    return chat_ids(tokenizer, text, system=passage)


@pytest.mark.vllm
@needs_vllm
def test_ids_logprobs_and_finish_reasons(engine, default_model_dir):
    from transformers import AutoModelForCausalLM

    gen = engine[0]
    ids = chat_ids(gen.tokenizer, "What is 2 + 3?")
    out = run(engine, gen.generate(ids, GREEDY))
    assert len(out.token_ids) == 12 == len(out.logprobs)
    assert out.finish_reason == "length" and out.prompt_tokens == len(ids)
    # Log-probs are the model's own (before temperature): teacher-forced float32 agrees.
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids + out.token_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    expected = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert max(abs(a - b) for a, b in zip(out.logprobs, expected, strict=True)) < 0.05
    # Greedy picks the argmax at every step (where the top two are not a near tie).
    top2 = logp[len(ids) - 1 : -1].topk(2, dim=-1)
    for i, token in enumerate(out.token_ids):
        if float(top2.values[i, 0] - top2.values[i, 1]) > 0.01:
            assert token == int(top2.indices[i, 0])
    # A long prompt again is served from the prefix cache.
    prompt = long_ids(gen.tokenizer, "Is 7 odd?")
    first = run(engine, gen.generate(prompt, GREEDY))
    again = run(engine, gen.generate(prompt, GREEDY))
    assert again.token_ids == first.token_ids and again.cached_tokens > 0
    # EOS ends a reply, kept; a stop string ends it, its tokens kept.
    free = run(engine, gen.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=200)))
    assert free.finish_reason == "stop" and free.token_ids[-1] == gen.tokenizer.eos_token_id
    first_word = gen.tokenizer.decode(out.token_ids[:3]).split()[0]
    stopped = run(
        engine,
        gen.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=12, stop=[first_word])),
    )
    assert stopped.finish_reason == "stop" and stopped.stop_match == first_word
    assert first_word in gen.tokenizer.decode(stopped.token_ids)


@pytest.mark.vllm
@needs_vllm
def test_seeded_sampling_reproducible_and_concurrent(engine):
    gen = engine[0]
    ids = chat_ids(gen.tokenizer, "Name a prime number.")
    seeded = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11, ignore_eos=True)

    async def many():
        return await asyncio.gather(*(gen.generate(ids, seeded) for _ in range(4)))

    outs = run(engine, many())
    assert all(o.token_ids == outs[0].token_ids for o in outs)


@pytest.mark.vllm
@needs_vllm
def test_weights_published_from_the_trainer_change_generations(engine, default_model_dir, tmp_path):
    """publish_weights (the trainer's path for non-embedded backends) reloads the engine."""
    from transformers import AutoModelForCausalLM

    from trainers.weights import publish_weights

    gen = engine[0]
    ids = long_ids(gen.tokenizer, "Count to five.")
    before = run(engine, gen.generate(ids, GREEDY))
    assert run(engine, gen.generate(ids, GREEDY)).cached_tokens > 0
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # Saved in bfloat16 (the checkpoint's own dtype): half the disk of float32.
    model = model.to(torch.bfloat16)
    run(engine, publish_weights(gen, model, 1, backend="vllm", run_dir=tmp_path))
    after = run(engine, gen.generate(ids, GREEDY))
    assert gen.version == 1
    assert after.token_ids != before.token_ids
    assert after.cached_tokens == 0  # the prefix cache was flushed with the old weights
    original = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16)
    run(engine, publish_weights(gen, original, 2, backend="vllm", run_dir=tmp_path))
    restored = run(engine, gen.generate(ids, GREEDY))
    assert restored.token_ids == before.token_ids
