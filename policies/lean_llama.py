"""A lean inference forward for Llama-architecture causal LMs, for the embedded generator.

transformers' forward spends as long on bookkeeping (mask construction, cache
objects, per-module dispatch, rotary tables) as on the matmuls for a 135M model at
32 rows on a CPU, and its bfloat16 path loses the faster bfloat16 matmuls in
non-matmul ops. This forward runs the same computation with the least work around
the matmuls:

- in the model's own dtype it reads the model's weight tensors (no copy); in another
  (bfloat16 for a float32 trainer's module) it holds copies, the query/key/value
  projections fused into one matmul and gate/up into another, prepacked for oneDNN
  on CPU, and re-copied by :meth:`LeanLlama.sync_weights`;
- the residual stream and the RMS norms stay in float32 whatever the matmul dtype,
  so a bfloat16 generator differs from the float32 trainer only by its matmuls;
- rotary embedding runs once on queries and keys together; attention is
  ``F.scaled_dot_product_attention`` on the key/value heads (grouped queries folded
  into the query axis at decode, ``enable_gqa`` at prefill);
- a decode step writes each layer's new key/value straight into the decode batch's
  buffers (:class:`~policies.kv_slab.KVSlab`), and only the last position reaches
  the output layer.

:func:`lean_unsupported` says why a model cannot take this path (another
architecture, biases, a dynamic rotary scaling, ...); the generator then keeps the
transformers forward (:mod:`policies.hf_forward`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from policies.kv_slab import KVSlab
from policies.prefix_cache import KV

#: Model types whose modules this forward reads (same parameter names and maths as Llama).
LEAN_MODEL_TYPES = ("llama",)
#: Rotary scalings whose frequencies do not change with the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def lean_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run on :class:`LeanLlama`, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(LEAN_MODEL_TYPES)}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (expected silu)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp {config.pretraining_tp}"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "per-layer"
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} (expected one of {', '.join(STATIC_ROPE_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb modules"
    return None


class _Projection:
    """Linear maps of one input (q/k/v, gate/up, ...), over the model's weights or copies.

    Shared (``dtype`` the weights' own): the model's tensors as they are, one matmul each,
    always current. Copied: stacked into one ``dtype`` matrix, with ``scale`` (the
    preceding RMS norm's weight) folded into its input axis and, on CPU, prepacked for
    oneDNN (whose bfloat16 kernels then neither reorder the weights on every call nor
    need separate passes for an activation or a product after the matmul).
    """

    def __init__(
        self, weights: tuple[torch.Tensor, ...], dtype: torch.dtype, scale: torch.Tensor | None
    ) -> None:
        self.sizes = [w.shape[0] for w in weights]
        self.shared = weights[0].dtype == dtype
        self.packed = False
        if self.shared:
            self.weights = tuple(w.detach() for w in weights)
            return
        fused = torch.cat([w.detach() for w in weights])
        if scale is not None:
            fused = fused * scale.to(fused.dtype)
        fused = fused.to(dtype)
        packed = _pack(fused)
        self.packed = packed is not None
        self.weights = (packed if packed is not None else fused,)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One output per weight, in order (views of one output when copied)."""
        if self.shared:
            return [F.linear(x, w) for w in self.weights]
        out = self.stacked(x)
        return list(out.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [out]

    def stacked(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """A copy's whole output, the weights' outputs side by side; ``activation`` "swish" or "none"."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weights[0], None, activation, [], "")
        out = F.linear(x, self.weights[0])
        return F.silu(out) if activation == "swish" else out

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``(x W^T) * other`` for one copied weight, the product inside the matmul when packed."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weights[0], None, "mul")
        return F.linear(x, self.weights[0]) * other


def _packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked bfloat16 matmul (``torch.ops.mkldnn``) serves this copy."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` prepacked for oneDNN's bfloat16 matmul, or None where that is unavailable."""
    if not _packable(weight.device, weight.dtype):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    except (AttributeError, RuntimeError):  # a build without these ops
        return None


class _Layer:
    """One decoder layer's weights in the forward's dtype (norm weights folded into copies)."""

    def __init__(self, block: torch.nn.Module, dtype: torch.dtype) -> None:
        attn, mlp = block.self_attn, block.mlp
        shared = attn.q_proj.weight.dtype == dtype
        norm_in = block.input_layernorm.weight.detach().float()
        norm_post = block.post_attention_layernorm.weight.detach().float()
        #: RMS norm weights still to multiply by (None where folded into the copies).
        self.input_norm = norm_in if shared else None
        self.post_norm = norm_post if shared else None
        fold_in, fold_post = (None, None) if shared else (norm_in, norm_post)
        qkv = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        self.qkv = _Projection(qkv, dtype, fold_in)
        self.o = _Projection((attn.o_proj.weight,), dtype, None)
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        # Packed, the activation and the product run inside the gate and up matmuls;
        # otherwise one gate/up matmul (``up`` None) is cheaper.
        self.up: _Projection | None = None
        if not shared and _packable(gate.device, dtype):
            self.gate = _Projection((gate,), dtype, fold_post)
            self.up = _Projection((up,), dtype, fold_post)
        else:
            self.gate = _Projection((gate, up), dtype, fold_post)
        self.down = _Projection((mlp.down_proj.weight,), dtype, None)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate(x)) * up(x))``."""
        if self.up is not None:
            return self.down.stacked(self.up.times(x, self.gate.stacked(x, "swish")))
        gate, up = self.gate(x)
        return self.down(F.silu(gate) * up)[0]


class LeanLlama:
    """Prefill and decode forwards over a Llama model's weights, in ``dtype`` matmuls.

    In the model's own dtype the forward reads the model's weight tensors directly;
    in another it holds fused copies, refreshed by :meth:`sync_weights` after the
    model's weights change. Keys/values are kept in ``dtype``.
    """

    name = "lean"

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        reason = lean_unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean forward cannot run this model: {reason}")
        config = model.config
        self.model = model
        self.dtype = next(model.parameters()).dtype if dtype is None else dtype
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.groups = self.heads // self.kv_heads
        self.eps = float(config.rms_norm_eps)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float()
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.sync_weights()

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Take the model's current weights (copying them where this forward holds copies)."""
        inner = self.model.model
        self.release()  # the old copies go before the new ones are made, not after
        self.layers = [_Layer(block, self.dtype) for block in inner.layers]
        head = self.model.get_output_embeddings().weight
        final_norm = inner.norm.weight.detach().float()
        shared = head.dtype == self.dtype
        self.final_norm = final_norm if shared else None
        self.lm_head = _Projection((head,), self.dtype, None if shared else final_norm)
        self.embed = inner.embed_tokens.weight.detach()

    def release(self) -> None:
        """Drop this forward's weight copies (a trainer's update needs the memory).

        The next forward takes the model's weights again, as :meth:`sync_weights` does.
        """
        self.layers: list[_Layer] | None = None
        self.lm_head: _Projection | None = None

    def _ready(self) -> list[_Layer]:
        if self.layers is None:
            self.sync_weights()
        assert self.layers is not None
        return self.layers

    # -- forwards -------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, ids: torch.Tensor, positions: torch.Tensor, past: KV, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        """Logits of the last position (float32) and all keys/values, past included.

        ``ids``/``positions``: ``[B, S]``; ``past``: per-layer keys/values ``[B, kv, P, D]``
        (empty for none); ``mask``: ``[B, P + S]``, 1 for a real token, or None when no
        token is padding.
        """
        batch, seq = ids.shape
        past_len = past[0][0].shape[2] if past else 0
        attn_mask = _additive(_prefill_mask(mask, batch, past_len, seq, ids.device), self.dtype)
        cos, sin = self._rotary(positions)
        hidden = F.embedding(ids, self.embed).float()
        kv: KV = []
        for i, layer in enumerate(self._ready()):
            q, k, v = self._qkv(hidden, layer, cos, sin)
            if past:
                k = torch.cat([past[i][0].to(k.dtype), k], dim=2)
                v = torch.cat([past[i][1].to(v.dtype), v], dim=2)
            kv.append((k, v))
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=attn_mask is None,
                scale=self.scale,
                enable_gqa=self.groups > 1,
            )
            hidden = self._finish_layer(hidden, out.transpose(1, 2), layer)
        return self._logits(hidden[:, -1]), kv

    @torch.inference_mode()
    def decode(
        self, ids: torch.Tensor, positions: torch.Tensor, slab: KVSlab, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One token per row: its keys/values written into ``slab`` at column ``slab.width``.

        ``ids``/``positions``: ``[B, 1]``; ``mask``: ``[B, width + 1]`` or None. Returns
        next-token logits ``[B, vocab]`` (float32). The caller advances the slab.
        """
        batch = ids.shape[0]
        slab.reserve(1)
        start, end = slab.width, slab.width + 1
        attn_mask = None if mask is None else _additive(mask.bool()[:, None, None, :], self.dtype)
        cos, sin = self._rotary(positions)
        hidden = F.embedding(ids, self.embed).float()
        for layer, (kbuf, vbuf) in zip(self._ready(), slab.layers, strict=True):
            q, k, v = self._qkv(hidden, layer, cos, sin)
            kbuf[:, :, start:end].copy_(k)
            vbuf[:, :, start:end].copy_(v)
            # The query heads sharing a key/value head become that head's query axis:
            # one attention per key/value head, no repeated keys/values.
            grouped = q.reshape(batch, self.kv_heads, self.groups, self.head_dim)
            out = F.scaled_dot_product_attention(
                grouped, kbuf[:, :, :end], vbuf[:, :, :end], attn_mask=attn_mask, scale=self.scale
            )
            hidden = self._finish_layer(
                hidden, out.reshape(batch, 1, self.heads, self.head_dim), layer
            )
        return self._logits(hidden[:, -1])

    # -- pieces ---------------------------------------------------------------

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[B, S, 1, D]`` for ``positions`` (computed in float32, like transformers)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scaling != 1.0:
            cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
        return cos.to(self.dtype), sin.to(self.dtype)

    def _qkv(
        self, hidden: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[B, H, S, D]``, keys and values ``[B, KV, S, D]`` of one layer, rotated."""
        batch, seq, _ = hidden.shape
        x = _rms_norm(hidden, layer.input_norm, self.eps).to(self.dtype)
        if layer.qkv.shared:
            q, k, v = (t.view(batch, seq, -1, self.head_dim) for t in layer.qkv(x))
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        else:  # queries and keys are neighbours in one output: rotate them in one pass
            qkv = layer.qkv.stacked(x).view(batch, seq, -1, self.head_dim)
            rotated = self.heads + self.kv_heads
            qk = _rotate(qkv[:, :, :rotated], cos, sin)
            q, k, v = qk[:, :, : self.heads], qk[:, :, self.heads :], qkv[:, :, rotated:]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _finish_layer(
        self, hidden: torch.Tensor, attn: torch.Tensor, layer: _Layer
    ) -> torch.Tensor:
        """Output projection, residual, MLP, residual; ``attn`` is ``[B, S, H, D]``."""
        batch, seq, _ = hidden.shape
        hidden = hidden + layer.o(attn.reshape(batch, seq, -1))[0]
        return hidden + layer.mlp(_rms_norm(hidden, layer.post_norm, self.eps).to(self.dtype))

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        x = _rms_norm(last, self.final_norm, self.eps).to(self.dtype)
        assert self.lm_head is not None  # set with the layers (_ready)
        return self.lm_head(x)[0].float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, S, heads, D]``: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm in float32: ``weight * x / sqrt(mean(x^2) + eps)``.

    ``weight`` None: folded into the next matmul's weights.
    """
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed if weight is None else weight * normed


def _prefill_mask(
    mask: torch.Tensor | None, batch: int, past: int, seq: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean attention mask ``[B, 1, S, P + S]`` (True: attend), or None for plain causal.

    A padded query position may see no real key at all; it attends to itself so its
    output stays finite (a NaN there would reach real tokens through its value).
    """
    if mask is None and past == 0:
        return None
    query_pos = torch.arange(seq, device=device)[:, None] + past
    key_pos = torch.arange(past + seq, device=device)[None]
    allowed = (key_pos <= query_pos)[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
        allowed = allowed | (key_pos == query_pos)[None, None]
    return allowed.expand(batch, 1, seq, past + seq)


def _additive(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the additive one attention adds to its scores, built once per forward."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )
