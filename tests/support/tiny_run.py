"""A tiny embedded training run: a task whose reward varies for a random model, and its config.

The task rewards the parity of the response's length, so groups of a random model's
samples have reward variance, advantages are non-zero and the loss has a gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from scripted import AdditionTask

from tasks import registry
from tasks.base import Problem, RewardResult
from trainers.config import TrainConfig

TASK = "test:length-parity"


class LengthParityTask(AdditionTask):
    """Addition prompts rewarded 1.0 when the response has an even number of characters."""

    name = TASK

    def score(self, problem: Problem, response: str) -> RewardResult:
        """A reward that varies between samples of a random model."""
        even = len(response) % 2 == 0
        return RewardResult(score=float(even), correct=even, reason="length parity")


@contextlib.contextmanager
def parity_task_registered() -> Iterator[None]:
    """``TASK`` registered for the duration of the block."""
    with mock.patch.dict(registry._REGISTRY):  # restored as it was when the block ends
        registry.register_task(
            TASK,
            lambda **kw: LengthParityTask(**kw),
            description="test reward: parity of the response length",
            source="tests",
            overwrite=True,
        )
        yield


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(run_dir: Path, model_dir: str, **sections: Any) -> TrainConfig:
    """Tiny budgets: 2 steps of 2 prompts x 2 samples, 8 tokens a turn, no evaluation."""
    base: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seed": 3,
        "policy": {"model": model_dir, "device": "cpu", "max_context": 512},
        # Six problems are too few to partition; another seed's random sums share none.
        "task": {
            "name": TASK,
            "kwargs": {"n": 6},
            "eval_kwargs": {"seed": 1},
            "eval_size": 0,
            "held_out": "task",
        },
        "env": {
            "max_new_tokens_per_turn": 8,
            "max_total_tokens": 512,
            "max_reply_tokens": 8,
            "max_turns": 2,
        },
        "agents": {
            "agents": {
                "verify": {"kind": "oracle"},
                "knowledge": {"backend": "policy", "max_reply_tokens": 8},
                "reasoning": {"backend": "policy", "max_reply_tokens": 8},
            }
        },
        "rollout": {"n_samples": 2, "concurrency": 8},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {
            "steps": 2,
            "prompts_per_step": 2,
            "minibatch_size": 4,
            "micro_batch_size": 4,
            "plot": False,
        },
    }
    return TrainConfig.model_validate(_merge(base, sections))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of the model saved in ``path``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over all parameters (same keys required)."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
