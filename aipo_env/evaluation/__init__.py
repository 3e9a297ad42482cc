"""Evaluating a trained policy alone: sampling n responses per problem, pass@k, reports.

:mod:`aipo_env.evaluation.results` holds the results format (JSON, Markdown, PNG);
:mod:`aipo_env.evaluation.runner` runs `aipo eval` through the rollout driver;
:mod:`aipo_env.evaluation.alone` is the greedy held-out check the embedded trainer reports.
"""

from aipo_env.evaluation.results import (
    RESULTS_FORMAT,
    SampleRecord,
    TrajectoryRef,
    build_results,
    load_results,
    plot_passk,
    task_summary,
    to_markdown,
    write_json,
)

__all__ = [
    "RESULTS_FORMAT",
    "SampleRecord",
    "TrajectoryRef",
    "build_results",
    "load_results",
    "plot_passk",
    "task_summary",
    "to_markdown",
    "write_json",
]
