"""The ``aipo`` command line: one entry point, one module per subcommand.

Each subcommand is a module of :mod:`aipo.commands` with ``add_arguments(parser)``
and ``run(args) -> int``. Only the chosen subcommand's module is imported, so
``aipo --help`` and ``aipo tasks`` never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from aipo_env import __version__

#: subcommand -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "aipo.commands.train",
        "train a policy with AIPO (embedded default, or OpenRLHF with --engine openrlhf)",
    ),
    "tasks": ("aipo.commands.tasks", "list the registered tasks with their source and size"),
    "envs": ("aipo.commands.envs", "list the registered gymnasium environment ids"),
    "eval": (
        "aipo.commands.eval",
        "evaluate a policy alone (or with agents): avg@n, pass@k, comparisons",
    ),
    "show": ("aipo.commands.show", "render trajectories from a JSONL file, coloured by source"),
    "serve": (
        "aipo.commands.serve",
        "start the agents' SGLang servers, write the endpoints file, stop them on exit",
    ),
    "data": (
        "aipo.commands.data",
        "write an OpenRLHF recipe's prompt JSONL (its keys) from the Hub or a local file",
    ),
    "doctor": (
        "aipo.commands.doctor",
        "check an OpenRLHF launch before any GPU is touched: packages, recipe, data, agents",
    ),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="aipo",
        description="AIPO: RL for LLM reasoning with consultable collaborative agents.",
        epilog=f"commands:\n{lines}\n\nRun 'aipo COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aipo {__version__}")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aipo``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _top_parser().parse_args(argv)  # handles --help and --version
        _top_parser().print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"aipo: unknown command '{name}'; expected one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"aipo {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="what the log on stderr shows (default: info)",
    )
    args = parser.parse_args(rest)
    configure_logging(args.log_level)
    return int(module.run(args) or 0)


#: ``--log-level`` choices, every subcommand's.
LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str) -> None:
    """The root logger at ``level`` on stderr, with time, level and logger name."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level.upper())


if __name__ == "__main__":
    raise SystemExit(main())
