"""Model loading from many threads at once; tokenizer loading by spec.

transformers' ``from_pretrained`` replaces ``PreTrainedModel.tie_weights`` while it
builds a model; overlapping loads in two threads can leave the replacement in place,
after which tied output layers load without data. Without the lock in
``load_causal_lm``, a burst of six concurrent loads broke it in 4 of 5 tries here.
"""

from __future__ import annotations

import threading

import pytest
from transformers import PreTrainedModel

from policies.loading import load_causal_lm, load_tokenizer


@pytest.fixture
def original_tie_weights():
    """transformers' own tie_weights, put back whatever a failing load left behind."""
    original = PreTrainedModel.tie_weights
    yield original
    PreTrainedModel.tie_weights = original


def _load_concurrently(path: str, threads: int = 6) -> list:
    start = threading.Barrier(threads)
    models: list = [None] * threads
    errors: list = []

    def work(i: int) -> None:
        start.wait()
        try:
            models[i] = load_causal_lm(path)
        except Exception as exc:  # noqa: BLE001 - collected and asserted on
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    return models


def test_concurrent_loads_keep_tied_embeddings(tiny_model_dir: str, original_tie_weights) -> None:
    for _ in range(3):
        models = _load_concurrently(tiny_model_dir)
        models.append(load_causal_lm(tiny_model_dir))  # and a load after the burst
        for model in models:
            assert not any(p.is_meta for p in model.parameters())
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert PreTrainedModel.tie_weights is original_tie_weights


def test_load_tokenizer_loads_a_path_and_passes_an_object_through(tiny_model_dir: str) -> None:
    loaded = load_tokenizer(tiny_model_dir)
    assert loaded.eos_token == "<|im_end|>"  # the model directory's own tokenizer
    assert load_tokenizer(loaded) is loaded


def test_load_tokenizer_pads_with_eos_only_when_asked(tiny_model_dir: str) -> None:
    loaded = load_tokenizer(tiny_model_dir)
    loaded.pad_token = None
    assert load_tokenizer(loaded).pad_token_id is None
    assert load_tokenizer(loaded, pad_to_eos=True).pad_token_id == loaded.eos_token_id
