"""Task definitions: datasets, prompts, answer extraction, verifiers and rewards.

Importing :mod:`tasks` registers the built-in tasks; nothing is downloaded until
a task's problems are read. Make one with ``make_task("math500")``, list them
with ``list_tasks()``, add your own with ``register_task``.
"""

from tasks import builtin as _builtin  # noqa: F401  (registers the built-in tasks)
from tasks.base import Problem, RewardResult, Task
from tasks.registry import TaskSpec, list_tasks, make_task, register_task

__all__ = [
    "Problem",
    "RewardResult",
    "Task",
    "TaskSpec",
    "list_tasks",
    "make_task",
    "register_task",
]
