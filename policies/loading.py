"""Loading Hugging Face causal LMs and tokenizers: the one place that calls ``from_pretrained``.

transformers' ``from_pretrained`` swaps class attributes while it builds a model
(``PreTrainedModel.tie_weights`` is replaced by a no-op and put back afterwards). Two
loads that overlap in different threads can leave the no-op in place for the rest of
the process, after which every model with tied embeddings loads with its output layer
still on the meta device. Every load in this project goes through :func:`load_causal_lm`,
which serialises loads and refuses a model that came back incomplete; every tokenizer
comes from :func:`load_tokenizer`, which resolves ``"default"`` like the models do.
"""

from __future__ import annotations

import threading
from typing import Any

#: Held for the duration of every model load in this process.
LOAD_LOCK = threading.Lock()


def load_causal_lm(path: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, one load at a time.

    Raises:
        RuntimeError: the loaded model still has parameters on the meta device (named).
    """
    from transformers import AutoModelForCausalLM

    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise RuntimeError(
            f"loading {path} left {len(missing)} parameter(s) without data ({', '.join(missing[:4])}); "
            "another thread probably loaded a model at the same time outside load_causal_lm"
        )
    return model


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

        from policies.default_model import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(spec), local_files_only=local_files_only
        )
    else:
        tokenizer = spec
    if pad_to_eos and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
