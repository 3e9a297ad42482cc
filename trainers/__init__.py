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
}


def __getattr__(name: str) -> object:
    """Import a lazily exported name from its submodule on first access."""
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
