"""AIPO's environment layer: the consult protocol, trajectories, ConsultEnv and the rollout driver."""

__version__ = "0.1.0"

from aipo_env.registration import make, register_envs  # noqa: E402

# Importing the package registers the gymnasium ids (cheap: import paths only).
register_envs()

__all__ = ["__version__", "make", "register_envs"]
