"""``aipo train``: the embedded trainer by default, OpenRLHF on a Ray cluster with ``--engine openrlhf``."""

from __future__ import annotations

import argparse
import errno
import sys
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
        help="YAML config (default: the packaged configs/default.yaml; configs/openrlhf/*.yaml with --engine openrlhf)",
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
        help="validate the config (and print the OpenRLHF command) without training",
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
            return _fail("--engine openrlhf needs --config configs/openrlhf/<recipe>.yaml")
        from trainers.openrlhf.config import OpenRLHFRecipe
        from trainers.openrlhf.launcher import run_openrlhf
        from trainers.openrlhf.patch import OpenRLHFVersionError

        try:
            recipe = load_config(OpenRLHFRecipe, args.config, args.overrides)
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
    from trainers.warmup import WarmupError

    if config.peers is not None:  # ILR: two or more peers trained together
        from trainers.peer_trainer import PeerTrainer

        trainer: Any = PeerTrainer(config, resume=args.resume, progress=not args.no_progress)
    else:
        trainer = EmbeddedTrainer(config, resume=args.resume, progress=not args.no_progress)
    resume = (
        "aipo train --resume"
        + (f" --config {args.config}" if args.config else "")
        + "".join(f" {o}" for o in args.overrides)
    )
    try:
        summary = trainer.run()
    except (RunDirError, HeldOutError) as exc:  # refused before anything loaded
        return _fail(str(exc))
    except (CheckpointError, WarmupError, JsonlError) as exc:
        print(f"aipo train: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"\naipo train: {exc}\nContinue with: {resume}", file=sys.stderr)
        return 128 + int(exc.signal)
    except BackendFailure as exc:
        print(f"aipo train: {exc}\nAfter fixing it, continue with: {resume}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"aipo train: {exc.strerror or 'no space left on device'}{where}; free some space, "
            f"then continue with: {resume}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the trainer handles signals
        print(
            f"\naipo train: {_left_on_disk(config.run_dir)}\nContinue with: {resume}",
            file=sys.stderr,
        )
        return 130
    print(summary.render())
    return 0


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
