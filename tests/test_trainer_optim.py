"""OptimConfig validation, the warmup/cosine schedule, and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from trainers.optim import OptimConfig, build_optimizer, build_scheduler, lr_multiplier


def lrs_over(cfg: OptimConfig, steps: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_linear_warmup_then_constant():
    cfg = OptimConfig(lr=1e-3, warmup_steps=4)
    assert lrs_over(cfg, 7) == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3])


def test_no_warmup_starts_at_full_lr():
    assert lrs_over(OptimConfig(lr=0.1), 2) == pytest.approx([0.1, 0.1])


def test_warmup_then_cosine_reaches_the_floor_at_total_steps():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", total_steps=6, min_lr_ratio=0.1)
    got = lrs_over(cfg, 8)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert got[4] == pytest.approx(mid)
    assert got[6:] == pytest.approx([0.1, 0.1])
    assert all(a >= b for a, b in zip(got[1:], got[2:], strict=False))


def test_weight_decay_applies_to_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6))
    decayed = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]
    }
    assert decayed == {id(model[0].weight)}
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert optimizer.param_groups[0]["eps"] == 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"betas": (0.9, 1.0)}, "beta2=1.0"),
        ({"schedule": "cosine"}, "total_steps"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"lrr": 1e-3}, "lrr"),
    ],
)
def test_invalid_settings_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        OptimConfig(**kwargs)


def test_lr_multiplier_is_a_pure_function_of_the_step():
    cfg = OptimConfig(warmup_steps=10)
    assert [lr_multiplier(s, cfg) for s in (0, 4, 9, 100)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
