"""One model load at a time: :func:`load_causal_lm` and the lock it holds.

transformers' ``from_pretrained`` swaps class attributes while it builds a model
(``PreTrainedModel.tie_weights`` is replaced by a no-op and put back afterwards). Two
loads that overlap in different threads can leave the no-op in place for the rest of
the process, after which every model with tied embeddings loads with its output layer
still on the meta device. Every model load in this project goes through
:func:`load_causal_lm` (callers import it from :mod:`policies.loading`), which
serialises loads and refuses a model that came back incomplete. It lives below both
:mod:`policies.loading` and :mod:`policies.default_model`, which converts the default
model with it and which the tokenizer loader calls to resolve ``"default"``.
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
