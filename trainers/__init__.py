"""Trainers: advantages, the AIPO policy loss, and the machinery of the embedded trainer.

Kept light on purpose: importing ``trainers`` does not import torch; import the
submodules (``trainers.update``, ``trainers.checkpoint``, ...) for their contents.
"""

# Lazy exports: ``from trainers import AIPOLoss`` imports the submodule (and torch) on first use.
_LAZY_EXPORTS = {
    "AIPOLoss": "trainers.losses",
    "LossConfig": "trainers.losses",
    "aipo_policy_loss": "trainers.losses",
    "compute_advantages": "trainers.advantages",
    "filter_uniform_groups": "trainers.advantages",
    "overlong_penalty": "trainers.advantages",
    "token_logprobs": "trainers.logprobs",
    "UpdateBatch": "trainers.update",
    "UpdateStats": "trainers.update",
    "compute_old_logprobs": "trainers.update",
    "ppo_update": "trainers.update",
    "OptimConfig": "trainers.optim",
    "build_optimizer": "trainers.optim",
    "build_scheduler": "trainers.optim",
    "CheckpointState": "trainers.checkpoint",
    "save_checkpoint": "trainers.checkpoint",
    "load_latest": "trainers.checkpoint",
    "restore": "trainers.checkpoint",
    "MetricsLogger": "trainers.metrics",
    "plot_curves": "trainers.metrics",
    "write_config": "trainers.config",
}


def __getattr__(name: str) -> object:
    """Import a lazily exported name from its submodule on first access."""
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
