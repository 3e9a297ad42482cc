"""Loading Hugging Face causal LMs and tokenizers: the one place that calls ``from_pretrained``.

Every model load goes through :func:`load_causal_lm`, which serialises loads and refuses
a model that came back incomplete (why: :mod:`policies.load_lock`, where it is defined);
every tokenizer comes from :func:`load_tokenizer`, which resolves ``"default"`` like the
models do.
"""

from __future__ import annotations

from typing import Any

from policies.default_model import resolve_model_path
from policies.load_lock import LOAD_LOCK, load_causal_lm

__all__ = ["LOAD_LOCK", "load_causal_lm", "load_tokenizer"]


def load_tokenizer(spec: Any, *, pad_to_eos: bool = False, local_files_only: bool = False) -> Any:
    """The tokenizer ``spec`` names, loaded with ``AutoTokenizer`` unless it is one already.

    ``spec``: a tokenizer object (returned as it is), ``"default"`` (the default model's,
    through :func:`policies.default_model.resolve_model_path`), a model directory or a
    Hugging Face id. ``pad_to_eos``: a tokenizer without a pad token gets its EOS token
    as pad token (batched training needs one; the padding is masked out).
    ``local_files_only``: never reach the network (a Hugging Face id must be cached).
    """
    if isinstance(spec, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(spec), local_files_only=local_files_only
        )
    else:
        tokenizer = spec
    if pad_to_eos and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
