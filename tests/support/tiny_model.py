"""A tiny random causal LM that shares the SmolLM2 tokenizer, for fast CPU tests."""

from __future__ import annotations

from pathlib import Path


def save_tiny_model(
    path: str | Path, tokenizer, *, seed: int = 0, hidden_size: int = 64, layers: int = 2
) -> Path:
    """Write a randomly initialised Llama with ``tokenizer``'s vocabulary to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
