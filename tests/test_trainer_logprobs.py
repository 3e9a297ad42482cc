"""token_logprobs: aligned with input_ids, equal to a direct log_softmax gather where asked for."""

from __future__ import annotations

import pytest
import torch
from tiny_model import random_llama

from trainers import logprobs as logprobs_module
from trainers.logprobs import token_logprobs

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


@pytest.mark.parametrize("chunk_size", [None, 2, 5])
def test_chunked_gradients_equal_the_full_computation(chunk_size):
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    weights = torch.rand(2, 7, generator=torch.Generator().manual_seed(5))
    logprobs, entropy = token_logprobs(
        model, ids, torch.ones_like(ids), with_entropy=True, chunk_size=chunk_size
    )
    ((logprobs + 0.1 * entropy) * weights).sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    # The textbook computation: the model's own full logits and log_softmax.
    model.zero_grad()
    want_lp, want_h = direct(model, ids, torch.ones_like(ids))
    ((want_lp + 0.1 * want_h) * weights[:, 1:]).sum().backward()
    for got, want in zip(chunked, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def prompt_and_response_rows(seed: int = 6):
    """Right-padded rows: prompts of 3 to 5 tokens, responses after them, padding last."""
    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt, length) in enumerate([(3, 12), (5, 9), (4, 7)]):
        mask[row, :length] = 1
        response[row, prompt:length] = True
    return ids * mask, mask, response


def test_log_probs_only_at_response_positions_equal_the_full_computation_there():
    model = tiny_llama()
    ids, mask, response = prompt_and_response_rows()
    with torch.no_grad():
        logprobs, entropy = token_logprobs(model, ids, mask, positions=response, with_entropy=True)
        want_lp, want_h = direct(model, ids, mask)
    # Position t holds the log-prob of token t, read from the logits at t - 1: a result
    # shifted by one, or one that kept a prompt position, fails one of these.
    want_lp = torch.cat([torch.zeros(3, 1), want_lp], dim=1) * response
    want_h = torch.cat([torch.zeros(3, 1), want_h], dim=1) * response
    torch.testing.assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, want_h, rtol=1e-5, atol=1e-5)
    assert torch.equal(logprobs[~response], torch.zeros(int((~response).sum())))
    assert (logprobs[response] < 0).all()


def test_only_the_asked_for_positions_reach_the_output_head(monkeypatch):
    model = tiny_llama()
    ids, mask, response = prompt_and_response_rows()
    rows_seen = []
    real = logprobs_module._chunk_logits

    def spy(rows, weight):
        rows_seen.append((tuple(rows.shape), weight is model.lm_head.weight))
        return real(rows, weight)

    monkeypatch.setattr(logprobs_module, "_chunk_logits", spy)
    with torch.no_grad():
        token_logprobs(model, ids, mask, positions=response)
    assert rows_seen == [((int(response.sum()), model.config.hidden_size), True)]


def test_gradients_of_the_sliced_log_probs_equal_the_full_computation():
    model = tiny_llama()
    ids, mask, response = prompt_and_response_rows(seed=7)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(8)) * response
    logprobs, entropy = token_logprobs(model, ids, mask, positions=response, with_entropy=True)
    ((logprobs + 0.1 * entropy) * weights).sum().backward()
    sliced = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want_lp, want_h = direct(model, ids, mask)
    ((want_lp + 0.1 * want_h) * weights[:, 1:]).sum().backward()
    for got, want in zip(sliced, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_outside_the_plain_head_list_uses_its_own_logits_with_the_same_result(
    monkeypatch,
):
    model = tiny_llama()
    ids, mask, response = prompt_and_response_rows()
    with torch.no_grad():
        fast, _ = token_logprobs(model, ids, mask, positions=response)
        monkeypatch.setattr(logprobs_module, "PLAIN_HEAD_MODELS", frozenset())
        assert logprobs_module.decoder_and_head(model) is None
        fallback, _ = token_logprobs(model, ids, mask, positions=response)
    torch.testing.assert_close(fallback, fast, rtol=1e-5, atol=1e-6)


def test_no_asked_for_position_gives_zeros_that_still_backpropagate():
    model = tiny_llama()
    ids, mask, _ = prompt_and_response_rows()
    logprobs, _ = token_logprobs(model, ids, mask, positions=torch.zeros_like(mask))
    assert torch.equal(logprobs, torch.zeros(ids.shape))
    logprobs.sum().backward()  # a micro-batch without a trained token must not raise


def test_the_callers_masks_are_left_unchanged():
    model = tiny_llama()
    ids, mask, response = prompt_and_response_rows()
    bool_mask, before = mask.bool(), response.clone()
    response[:, 0] = True
    with torch.no_grad():
        token_logprobs(model, ids, bool_mask, positions=response)
    assert bool_mask[:, 0].all() and response[:, 0].all()
    assert torch.equal(response[:, 1:], before[:, 1:])


def group_rows(prompt_len: int = 6, seed: int = 0):
    """Three samples of one prompt, right-padded responses of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 14), generator=gen)
    ids[:, :prompt_len] = ids[0, :prompt_len]
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 8:] = 0
    ids = ids * mask
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt_len:] = True
    return ids, mask, response & mask.bool()


@pytest.mark.parametrize("plain_head", [True, False])
def test_a_shared_prefix_gives_the_same_log_probs_entropy_and_gradients(monkeypatch, plain_head):
    if not plain_head:
        monkeypatch.setattr(logprobs_module, "PLAIN_HEAD_MODELS", frozenset())
    model = tiny_llama(seed=4)
    ids, mask, response = group_rows()

    def run(groups):
        model.zero_grad()
        lp, h = token_logprobs(
            model, ids, mask, positions=response, with_entropy=True, prefix_groups=groups
        )
        (lp.sum() + 0.5 * h.sum()).backward()
        return lp.detach(), h.detach(), [p.grad.clone() for p in model.parameters()]

    full, shared = run(None), run([(5, 3)])  # the prompt's last token predicts the first response
    assert (full[0][response] != 0).all()
    torch.testing.assert_close(shared[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], full[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(shared[2], full[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_shared_prefix_that_is_not_shared_or_covers_an_asked_for_token_is_refused():
    model = tiny_llama()
    ids, mask, response = group_rows()
    with pytest.raises(ValueError, match=r"rows 0..2 ask for a log-prob at a position <= 6"):
        token_logprobs(model, ids, mask, positions=response, prefix_groups=[(6, 3)])
    with pytest.raises(ValueError, match="do not cover the 3 rows"):
        token_logprobs(model, ids, mask, positions=response, prefix_groups=[(5, 2)])
    ids[1, 2] = (ids[1, 2] + 1) % VOCAB
    with pytest.raises(ValueError, match=r"rows 0..2 do not share 5 real first tokens"):
        token_logprobs(model, ids, mask, positions=response, prefix_groups=[(5, 3)])


def test_several_prefix_groups_of_different_lengths_in_one_call_give_the_same_result():
    model = tiny_llama(seed=5)
    a_ids, a_mask, a_response = group_rows(prompt_len=6, seed=1)
    b_ids, b_mask, b_response = group_rows(prompt_len=3, seed=2)
    ids, mask = torch.cat([a_ids, b_ids[:2]]), torch.cat([a_mask, b_mask[:2]])
    response = torch.cat([a_response, b_response[:2]])

    def run(groups):
        model.zero_grad()
        lp, _ = token_logprobs(model, ids, mask, positions=response, prefix_groups=groups)
        lp.sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    full, grouped = run(None), run([(5, 3), (2, 2)])
    assert torch.isfinite(grouped[0]).all() and (grouped[0][response] != 0).all()
    torch.testing.assert_close(grouped[0], full[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped[1], full[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
