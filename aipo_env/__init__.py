"""AIPO's environment layer: the consult protocol, trajectories, ConsultEnv and the rollout driver."""

__version__ = "0.1.0"
