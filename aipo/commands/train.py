"""``aipo train``: the embedded trainer by default, OpenRLHF on a Ray cluster with ``--engine openrlhf``."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aipo train``."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides with dotted keys, e.g. train.steps=4 rollout.n_samples=8 loss.agent_mode=mask",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config (default: the packaged configs/default.yaml); with --engine openrlhf a recipe: a packaged name (grpo_1node, ...) or a path",
    )
    parser.add_argument(
        "--engine",
        choices=("embedded", "openrlhf"),
        default="embedded",
        help="where to train (default: embedded)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in run_dir from its last checkpoint"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print it and every value resolved from other settings (and the OpenRLHF command) without training",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(message: str) -> int:
    print(f"aipo train: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Validate the config before loading anything heavy, then train."""
    from aipo.config import ConfigError, load_config

    if args.engine == "openrlhf":
        if args.config is None:
            return _fail(
                "--engine openrlhf needs --config RECIPE: a packaged recipe's name "
                "(e.g. grpo_1node) or a path"
            )
        from aipo.recipes import load_recipe
        from trainers.openrlhf.launcher import run_openrlhf
        from trainers.openrlhf.patch import OpenRLHFVersionError

        try:
            recipe = load_recipe(args.config, args.overrides)
            if args.dry_run:
                _print_resolved(recipe.resolved)
            return run_openrlhf(recipe, dry_run=args.dry_run)
        except (ConfigError, ValueError, FileNotFoundError, OpenRLHFVersionError) as exc:
            return _fail(str(exc))

    from trainers.config import TrainConfig, default_config_path

    path = args.config or default_config_path()
    try:
        config = load_config(TrainConfig, path, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        return _fail(str(exc))
    if args.dry_run:
        print(config.model_dump_json(indent=2))
        _print_resolved(config.resolved)
        return 0

    from aipo_env.jsonl import JsonlError
    from trainers.checkpoint import CheckpointError
    from trainers.embedded import (
        BackendFailure,
        EmbeddedTrainer,
        RunDirError,
        TrainingInterrupted,
    )
    from trainers.held_out import HeldOutError
    from trainers.run_state import check_resumable
    from trainers.warmup import WarmupError

    if args.resume:
        try:
            check_resumable(config)
        except RunDirError as exc:
            return _fail(str(exc))
    if config.peers is not None:  # ILR: two or more peers trained together
        from trainers.peer_trainer import PeerTrainer

        trainer: Any = PeerTrainer(config, resume=args.resume, progress=not args.no_progress)
    else:
        trainer = EmbeddedTrainer(config, resume=args.resume, progress=not args.no_progress)
    again = (f" --config {args.config}" if args.config else "") + "".join(
        f" {o}" for o in args.overrides
    )
    resume, fresh = f"aipo train --resume{again}", f"aipo train{again}"
    try:
        summary = trainer.run()
    except (RunDirError, HeldOutError) as exc:  # refused before anything loaded
        return _fail(str(exc))
    except (CheckpointError, WarmupError, JsonlError) as exc:
        print(f"aipo train: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"\naipo train: {exc}\n{_go_on(config.run_dir, resume, fresh)}", file=sys.stderr)
        return 128 + int(exc.signal)
    except BackendFailure as exc:
        print(
            f"aipo train: {exc}\n{_after_failure(config.run_dir, exc, resume, fresh)}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        then = _go_on(config.run_dir, resume, fresh)
        print(
            f"aipo train: {exc.strerror or 'no space left on device'}{where}; free some space, "
            f"then {then[0].lower()}{then[1:]}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the trainer handles signals
        print(
            f"\naipo train: {_left_on_disk(config.run_dir)}\n"
            f"{_go_on(config.run_dir, resume, fresh)}",
            file=sys.stderr,
        )
        return 130
    print(summary.render())
    return 0


def _print_resolved(changes: list[Any]) -> None:
    """The values resolution derived from others (``trainers/resolve.py``), one per line."""
    from trainers.resolve import describe

    # On stderr: stdout stays the config's JSON (or the launch command) for tools to read.
    print(f"resolved (set from other settings):\n{describe(changes)}", file=sys.stderr)


def _left_on_disk(run_dir: str) -> str:
    """What a run killed at once (no clean stop) has on disk: its newest checkpoint, if any."""
    from trainers.checkpoint import load_latest

    latest = load_latest(run_dir)
    saved = (
        f"the newest checkpoint is step {latest.step} in {latest.path}"
        if latest is not None
        else "no checkpoint was saved"
    )
    return f"interrupted at once: {saved}; finished trajectories are in {run_dir}/rollouts."


def _go_on(run_dir: str, resume: str, fresh: str) -> str:
    """How to go on after a stop: ``--resume`` where the run dir holds something to resume."""
    from trainers.run_state import run_contents

    if run_contents(Path(run_dir)):
        return f"Continue with: {resume}"
    return f"Nothing was saved to resume; start again with: {fresh}"


def _after_failure(run_dir: str, exc: Any, resume: str, fresh: str) -> str:
    """How to go on after a backend failure: resume only from a checkpoint.

    Without one, ``--resume`` would read the failed step's trajectories back and fail
    again (or, with none on disk, be refused), so the advice is to start afresh.
    """
    from trainers.run_state import run_contents

    if exc.checkpoint is not None:
        failed = Path(run_dir) / "rollouts" / f"step_{exc.completed_step:06d}.jsonl"
        aside = (
            f"move {failed} aside (its failed episodes would be read back), then "
            if failed.is_file()
            else ""
        )
        return f"After fixing it, {aside}continue with: {resume}"
    if run_contents(Path(run_dir)):
        return (
            f"No checkpoint was saved, so there is nothing to resume: after fixing it, remove "
            f"{run_dir} (it holds only the failed step's trajectories) and start again with: {fresh}"
        )
    return f"No checkpoint was saved, so there is nothing to resume: after fixing it, start again with: {fresh}"
