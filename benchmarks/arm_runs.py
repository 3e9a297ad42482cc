"""What the arm-comparison benchmarks share: their budget flags and their resumable run records.

``arpo.py``, ``efficacy.py`` and ``ilr.py`` each train every (arm, seed) once and keep
each finished run's record as JSON; a later invocation with the same budget reads it
back instead of training again. A record keeps the held-out problems each run solved
(:func:`held_out_correct`), so that arms can be compared seed by seed on the same
problems (:mod:`benchmarks.seed_stats`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    steps: int,
    samples_help: str,
    run_root: Path,
    out: Path,
) -> None:
    """``--seeds --steps --prompts --samples --set --run-root --out --no-progress``."""
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per arm each"
    )
    parser.add_argument("--steps", type=int, default=steps, help="training steps per run")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help=samples_help)
    add_set_argument(parser, "extra override for every run (e.g. task.eval_size=8); repeatable")
    parser.add_argument("--run-root", default=str(run_root), help="run directories")
    parser.add_argument("--out", default=str(out), help="where the results go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, collected in ``args.extra``."""
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def read_finished(path: Path, budget: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` when it was made with ``budget``, else None (run it again)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("budget") == budget:
        print(f"== done before, read from {path}", flush=True)
        return saved
    print(f"== {path} has another budget; running again", flush=True)
    return None


def write_record(path: Path, record: Any) -> None:
    """``record`` as JSON at ``path``, replaced atomically (a stop never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


def held_out_correct(samples: Path) -> dict[str, bool]:
    """``{problem id: solved}`` from a run's held-out samples alone (``eval/<tag>.jsonl``).

    The trainer's evaluation writes one greedy sample per problem; ``{}`` when the file
    is not there (a run without a held-out task).
    """
    from aipo_env.trajectory import read_jsonl
    from trainers.consulting import correct

    if not samples.is_file():
        return {}
    return {t.problem_id: bool(correct(t)) for t in read_jsonl(samples)}
