"""Tiny random causal LMs for fast CPU tests."""

from __future__ import annotations

from pathlib import Path


def random_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 64,
    pad_token_id: int | None = 0,
    **config_kwargs,
):
    """A randomly initialised, seeded ``LlamaForCausalLM`` with tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
        **config_kwargs,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(
    path: str | Path, tokenizer, *, seed: int = 0, hidden_size: int = 64, layers: int = 2
) -> Path:
    """Write a randomly initialised Llama with ``tokenizer``'s vocabulary to ``path``."""
    model = random_llama(
        len(tokenizer),
        seed=seed,
        hidden_size=hidden_size,
        layers=layers,
        max_positions=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
