"""AIPO's environment layer: the consult protocol, trajectories, ConsultEnv and the rollout driver."""

from importlib.metadata import PackageNotFoundError, version

try:  # one version, the package's own metadata (pyproject.toml)
    __version__ = version("aipo")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from aipo_env.registration import make, register_envs  # noqa: E402

# Importing the package registers the gymnasium ids (cheap: import paths only).
register_envs()

__all__ = ["__version__", "make", "register_envs"]
