"""benchmarks/update.py: the batch is the trainer's shape, the two sides do what they claim."""

from __future__ import annotations

import argparse

import pytest
import torch
from benchmark_script import load_script

bench = load_script("update")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(**overrides) -> argparse.Namespace:
    values = dict(rows=4, prompt_tokens=20, response_tokens=12, agent_tokens=3, seed=0)
    values["samples_per_prompt"] = 1
    return argparse.Namespace(**(values | overrides))


def test_the_batch_is_deterministic_with_responses_after_prompts_and_agent_tokens_inside():
    batch = bench.build_batch(_args(), vocab_size=97, device="cpu")
    again = bench.build_batch(_args(), vocab_size=97, device="cpu")
    assert torch.equal(batch.input_ids, again.input_ids)
    assert torch.equal(batch.advantages, again.advantages)
    trained, real = batch.loss_mask.bool(), batch.attention_mask.bool()
    assert (trained <= real).all() and not trained[:, 0].any()
    assert (batch.agent_mask <= trained).all()
    assert batch.agent_mask[::2].sum(dim=1).tolist() == [3, 3]
    assert not batch.agent_mask[1::2].any()
    assert torch.isfinite(batch.behavior_logprobs[batch.agent_mask]).all()
    for row in range(4):  # each row: prompt, then one contiguous response, then padding
        positions = trained[row].nonzero().flatten()
        assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1))
        assert int(positions[-1]) + 1 == int(real[row].sum())
        assert int(positions[0]) >= 20 - 6


def test_samples_of_one_prompt_share_it_and_differ_after_it():
    batch = bench.build_batch(_args(samples_per_prompt=2), vocab_size=97, device="cpu")
    starts = [int(row.nonzero()[0]) for row in batch.loss_mask.bool()]
    assert starts[0] == starts[1] and starts[2] == starts[3] and starts[0] != starts[2]
    for a, b in ((0, 1), (2, 3)):
        assert torch.equal(batch.input_ids[a, : starts[a]], batch.input_ids[b, : starts[b]])
        assert not torch.equal(batch.input_ids[a, starts[a] :], batch.input_ids[b, starts[b] :])
    alone = bench.build_batch(_args(), vocab_size=97, device="cpu")
    assert not torch.equal(alone.input_ids[0, :10], alone.input_ids[1, :10])


def test_ours_steps_the_optimizer_and_bare_only_computes_gradients(monkeypatch):
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tiny |= dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=97)
    monkeypatch.setattr(bench, "DEFAULT_ARCHITECTURE", bench.DEFAULT_ARCHITECTURE | tiny)
    model = bench.load_model("random", torch.float32, "cpu")
    config = bench.load_config(bench.TrainConfig, bench.default_config_path(), ["optim.lr=0.01"])
    sides = bench.Sides(model, bench.build_batch(_args(), 97, "cpu"), config)
    before = [p.detach().clone() for p in model.parameters()]
    sides.bare()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    sides.ours()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    # 16 rows in one minibatch, one epoch: the update's own forward gives the old log-probs.
    assert sides.batch.old_logprobs is None
