"""token_logprobs: aligned with input_ids, equal to a direct log_softmax gather."""

from __future__ import annotations

import pytest
import torch
from tiny_model import random_llama

from trainers.logprobs import logprobs_from_logits, token_logprobs

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0):
    return random_llama(VOCAB, seed=seed).eval()


def direct(model, input_ids, attention_mask):
    """The textbook computation: full log_softmax, gather, shift by one."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)[:, :-1]
    return picked, entropy


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_token_logprobs_equal_direct_log_softmax_gather(chunk_size):
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logprobs, entropy = token_logprobs(
            model, ids, mask, with_entropy=True, chunk_size=chunk_size
        )
        want_lp, want_h = direct(model, ids, mask)
    assert logprobs.shape == ids.shape and logprobs.dtype == torch.float32
    assert torch.equal(logprobs[:, 0], torch.zeros(3))
    torch.testing.assert_close(logprobs[:, 1:], want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[:, 1:], want_h, rtol=1e-5, atol=1e-5)
    assert (logprobs[:, 1:] < 0).all() and (entropy[:, 1:] > 0).all()


def test_right_padding_positions_are_zero_and_real_tokens_unchanged():
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    padded = ids.clone()
    padded[1, 5:] = 0
    with torch.no_grad():
        logprobs, _ = token_logprobs(model, padded, mask)
        alone, _ = token_logprobs(model, ids[1:, :5], mask[1:, :5])
    assert torch.equal(logprobs[1, 5:], torch.zeros(3))
    torch.testing.assert_close(logprobs[1, :5], alone[0], rtol=1e-5, atol=1e-5)


def test_gradient_flows_to_parameters():
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    logprobs, _ = token_logprobs(model, ids, torch.ones_like(ids), chunk_size=2)
    logprobs.sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_logprobs_from_logits_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match="disagree"):
        logprobs_from_logits(torch.zeros(1, 4, 5), torch.zeros(1, 3, dtype=torch.long))


def test_chunked_gradients_equal_unchunked_gradients():
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    weights = torch.rand(2, 7, generator=torch.Generator().manual_seed(5))
    grads = []
    for chunk_size in (None, 2):
        model.zero_grad()
        logprobs, entropy = token_logprobs(
            model, ids, torch.ones_like(ids), with_entropy=True, chunk_size=chunk_size
        )
        ((logprobs + 0.1 * entropy) * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for whole, chunked in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
