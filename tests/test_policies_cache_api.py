"""The embedded generator's reliance on transformers' cache API, on whatever transformers is installed.

The project allows transformers 5.15 (OpenRLHF 0.11.2's pin) to 5.25. Across that range
the forward's cache keyword changed name (``past_key_values`` -> ``cache`` in 5.24);
the cache classes' internals the generator reads and subclasses did not. These tests
fail if either stops holding, on the installed version: run them in each environment
(the main .venv, and .venv-vllm with vLLM's pin).
"""

from __future__ import annotations

import inspect
import warnings

import torch
import transformers
from tiny_model import random_llama
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from policies.cache_api import CACHE_KEYWORD_SINCE, cache_keyword, returned_cache
from policies.hf_forward import forward_with_cache
from policies.kv_slab import KVSlab, RowSource


def installed() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def test_keyword_is_the_one_the_forward_declares():
    model = random_llama(50, hidden_size=32, heads=2, kv_heads=1, layers=1, max_positions=64)
    params = inspect.signature(type(model).forward).parameters
    expected = "cache" if installed() >= CACHE_KEYWORD_SINCE else "past_key_values"
    assert cache_keyword(model) == expected
    assert expected in params


def test_dynamic_layer_internals_the_slab_subclasses():
    layer = DynamicLayer()
    assert layer.is_initialized is False
    k = torch.randn(1, 2, 3, 4)
    v = torch.randn(1, 2, 3, 4)
    keys, values = layer.update(k, v)
    assert layer.is_initialized is True
    assert layer.keys is keys and layer.values is values
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    cache = DynamicCache()
    cache.update(k, v, 0)
    assert isinstance(cache.layers, list) and torch.equal(cache.layers[0].keys, k)
    assert cache.get_seq_length() == 3


def test_forward_with_cache_matches_full_forward_without_warnings():
    """A prefix's keys/values then one more token equals one forward over all tokens."""
    model = random_llama(50, hidden_size=32, heads=2, kv_heads=1, layers=2, max_positions=64).eval()
    ids = torch.tensor([[3, 7, 11, 13, 17]])
    positions = torch.arange(5)[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        full_logits, full_kv = forward_with_cache(model, ids, positions, [], None)
        _, prefix_kv = forward_with_cache(model, ids[:, :4], positions[:, :4], [], None)
        step_logits, step_kv = forward_with_cache(
            model, ids[:, 4:], positions[:, 4:], prefix_kv, None
        )
        slab = KVSlab.build(None, [RowSource(prefix_kv, 0, [(0, 4)])], headroom=2)
        slab_logits, _ = forward_with_cache(
            model, ids[:, 4:], positions[:, 4:], slab.cache(1), None
        )
    torch.testing.assert_close(step_logits, full_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slab_logits, full_logits, atol=1e-5, rtol=1e-5)
    for (fk, fv), (sk, sv) in zip(full_kv, step_kv, strict=True):
        torch.testing.assert_close(sk, fk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sv, fv, atol=1e-5, rtol=1e-5)


def test_returned_cache_reads_either_field_name():
    model = random_llama(50, hidden_size=32, heads=2, kv_heads=1, layers=1, max_positions=64).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = returned_cache(out)
    assert cache is not None and cache.get_seq_length() == 3
