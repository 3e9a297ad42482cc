"""Which forward the embedded generator runs, and in which dtype.

Two implementations share one contract (:class:`ModelForward`): the lean Llama forward
(:class:`~policies.lean_llama.LeanLlama`) and transformers' own
(:class:`~policies.hf_forward.HFForward`), the fallback for every other architecture.
The compute dtype may differ from the model's: a float32 trainer's module can be
served by bfloat16 matmuls, whose copies of the weights ``sync_weights`` refreshes.

``generator_dtype="auto"`` picks bfloat16 where that is both exact enough for a
rollout engine and faster: a float32 model on the lean path, on a CPU with native
bfloat16 dot products (``avx512_bf16`` or AMX); otherwise the model's own dtype.
bfloat16 rollouts' log-probs differ from the float32 trainer's (see
docs/generation.md for the measured difference and the ``loss.rollout_correction``
that covers it).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal, Protocol

import torch

from policies.kv_slab import KVSlab
from policies.prefix_cache import KV

logger = logging.getLogger(__name__)

GeneratorDtype = Literal["auto", "float32", "bfloat16"]
ForwardPath = Literal["auto", "lean", "hf"]
GENERATOR_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
FORWARD_PATHS: tuple[str, ...] = ("auto", "lean", "hf")


class ModelForward(Protocol):
    """A prefill and a decode forward over one model's weights, in one dtype."""

    name: str
    dtype: torch.dtype

    def prefill(
        self, ids: torch.Tensor, positions: torch.Tensor, past: KV, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        """Last-position logits ``[B, vocab]`` (float32) and per-layer keys/values, past included."""
        ...

    def decode(
        self, ids: torch.Tensor, positions: torch.Tensor, slab: KVSlab, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One token per row, keys/values written into ``slab``; next-token logits (float32)."""
        ...

    def sync_weights(self) -> None:
        """Take the model's current weights (after a trainer changed them in place)."""
        ...

    def release(self) -> None:
        """Drop weight copies the forward can remake (on its next forward); a no-op without."""
        ...


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (x86 avx512_bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def make_forward(
    model: torch.nn.Module,
    generator_dtype: GeneratorDtype | str = "auto",
    path: ForwardPath | str = "auto",
) -> ModelForward:
    """The forward the generator runs ``model`` with.

    ``path``: ``"lean"`` (Llama architecture only; refused with the reason otherwise),
    ``"hf"`` (transformers' forward) or ``"auto"`` (lean where supported).
    ``generator_dtype``: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (see the module doc).

    Raises:
        ValueError: an unknown ``path`` or ``generator_dtype``, or ``"lean"`` for a model it
            cannot run.
    """
    from policies.hf_forward import HFForward
    from policies.lean_llama import LeanLlama, lean_unsupported

    if path not in FORWARD_PATHS:
        raise ValueError(
            f"unknown forward path {path!r}; expected one of {', '.join(FORWARD_PATHS)}"
        )
    if generator_dtype not in GENERATOR_DTYPES:
        raise ValueError(
            f"unknown generator_dtype {generator_dtype!r}; expected one of {', '.join(GENERATOR_DTYPES)}"
        )
    reason = lean_unsupported(model)
    if path == "lean" and reason is not None:
        raise ValueError(f"forward path 'lean' cannot run this model: {reason}")
    lean = path == "lean" or (path == "auto" and reason is None)
    if path == "auto" and reason is not None:
        logger.info("embedded generator uses the transformers forward: %s", reason)
    param = next(model.parameters())
    if generator_dtype == "auto":
        native = param.device.type == "cpu" and cpu_has_native_bf16()
        dtype = torch.bfloat16 if lean and param.dtype == torch.float32 and native else param.dtype
    else:
        dtype = getattr(torch, generator_dtype)
    return LeanLlama(model, dtype) if lean else HFForward(model, dtype)
