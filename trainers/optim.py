"""The optimizer and learning-rate schedule: AdamW, linear warmup, then constant or cosine.

Importing this module does not import torch, so a run config that nests
:class:`OptimConfig` validates before anything heavy loads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import torch
    from torch import nn


class OptimConfig(BaseModel):
    """AdamW and its learning-rate schedule."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(
        1e-6,
        gt=0.0,
        le=1.0,
        description="Peak learning rate, reached at the end of warmup (default 1e-6, usual for RL on LLMs).",
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps of linear warmup: step i (0-based) uses lr * (i + 1) / warmup_steps. 0: no warmup.",
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After warmup: 'constant' keeps lr; 'cosine' decays it to lr * min_lr_ratio at total_steps.",
    )
    total_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps of the whole run; required by the cosine schedule, ignored by constant.",
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Floor of the cosine schedule as a fraction of lr (default 0: decays to zero).",
    )
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="AdamW decoupled weight decay; not applied to biases and normalisation weights.",
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="AdamW moment decay rates (beta1, beta2), each in [0, 1)."
    )
    eps: float = Field(
        1e-8, gt=0.0, le=1e-2, description="AdamW denominator epsilon (numerical stability)."
    )
    max_grad_norm: float | None = Field(
        1.0,
        gt=0.0,
        description="Clip the global gradient norm to this before each step; null: no clipping.",
    )

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        for name, beta in zip(("beta1", "beta2"), betas, strict=True):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}={beta} is out of range; expected 0 <= beta < 1")
        return betas

    @model_validator(mode="after")
    def _check_schedule(self) -> OptimConfig:
        if self.schedule == "cosine" and self.total_steps is None:
            raise ValueError("schedule 'cosine' needs total_steps (the run's optimizer steps)")
        return self


def lr_multiplier(step: int, cfg: OptimConfig) -> float:
    """The factor applied to ``cfg.lr`` for 0-based optimizer step ``step``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    assert cfg.total_steps is not None  # checked by OptimConfig
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    # Biases and norm scales (1-D) are not decayed: decay would pull norms towards zero.
    return param.ndim >= 2 and not name.endswith(".bias")


def fused_adamw_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether PyTorch's fused AdamW kernel takes ``params`` (floating point, on CPU or CUDA).

    The fused step updates each parameter in one pass. The unfused one builds its
    denominator ``sqrt(v) / c + eps`` as new tensors the size of the parameter: with the
    default model's 28M-entry embedding that is 216 MiB at the step, the peak of the update
    (benchmarks/memory.py). The result is the same up to float rounding.
    """
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, with weight decay only on matrices.

    Fused where PyTorch has the kernel (:func:`fused_adamw_supported`).
    """
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = fused_adamw_supported(decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following :func:`lr_multiplier`; call ``.step()`` after each optimizer step."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
