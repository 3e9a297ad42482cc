"""``aipo envs``: list the registered consult environments (no torch import)."""

from __future__ import annotations

import argparse

from aipo_env.registration import env_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aipo envs``."""
    parser.add_argument("--ids-only", action="store_true", help="print only the ids")


def run(args: argparse.Namespace) -> int:
    """Print one line per environment id: id, task, description."""
    rows = env_table()
    if args.ids_only:
        for env_id, _, _ in rows:
            print(env_id)
        return 0
    width = max(len(r[0]) for r in rows)
    task_width = max(len(r[1]) for r in rows)
    print(f"{'id':<{width}}  {'task':<{task_width}}  description")
    for env_id, task, text in rows:
        print(f"{env_id:<{width}}  {task:<{task_width}}  {text}")
    print("any other reasoning-gym dataset: aipo/RG-<name>-v0 (registered on aipo_env.make)")
    return 0
