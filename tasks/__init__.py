"""Task definitions: datasets, prompts, answer extraction, verifiers and rewards."""

from tasks.base import Problem, RewardResult, Task

__all__ = ["Problem", "RewardResult", "Task"]
