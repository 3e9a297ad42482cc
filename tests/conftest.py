"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random model that uses it.

tests/ is deliberately not a package (see pyproject's pytest options); helper
modules shared by several test files live in tests/support/, which is on sys.path.
"""

from __future__ import annotations

import os

import pytest
import torch


def _cuda_or_engines_available() -> bool:
    if torch.cuda.is_available():
        return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` on machines without CUDA."""
    if _cuda_or_engines_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (and SGLang or vLLM); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The converted SmolLM2-135M-Instruct directory (converted once per cache)."""
    from policies.default_model import ensure_default_model

    return str(ensure_default_model())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: str):
    """The real SmolLM2 tokenizer (vocabulary 49152, EOS ``<|im_end|>``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> str:
    """A tiny random Llama (2 layers, hidden 64) saved with the real SmolLM2 tokenizer."""
    from tiny_model import save_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(path, tokenizer)
    return str(path)


@pytest.fixture(autouse=True)
def _no_hub_access(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))
