"""``aipo show FILE.jsonl``: read trajectories in the terminal, coloured by source."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aipo show``."""
    parser.add_argument("file", help="a trajectories JSONL file (from training or 'aipo eval')")
    parser.add_argument(
        "--tokenizer",
        default="default",
        help="tokenizer to decode with: 'default' (the embedded SmolLM2), a model dir, an HF id, "
        "or 'none' for token counts only (default: %(default)s)",
    )
    parser.add_argument("--no-color", action="store_true", help="plain text, no ANSI colours")
    parser.add_argument("--hide-prompt", action="store_true", help="do not print prompt text")
    parser.add_argument("--reward-min", type=float, help="only trajectories with reward >= this")
    parser.add_argument("--reward-max", type=float, help="only trajectories with reward <= this")
    parser.add_argument("--task", action="append", default=[], help="only this task (repeatable)")
    parser.add_argument(
        "--finish-reason",
        action="append",
        default=[],
        help="only this finish reason: eos, length, max_turns, context_overflow, error "
        "(any error:<kind>) or error:<kind> (repeatable)",
    )
    verdict = parser.add_mutually_exclusive_group()
    verdict.add_argument("--correct", dest="correct", action="store_const", const=True)
    verdict.add_argument("--incorrect", dest="correct", action="store_const", const=False)
    parser.add_argument("--id", action="append", default=[], help="only this trajectory id")
    parser.add_argument("--limit", type=int, help="show at most this many trajectories")


def run(args: argparse.Namespace) -> int:
    """Print the selected trajectories and a summary line; 2 on bad input."""
    from aipo_env.jsonl import JsonlError
    from aipo_env.show import ShowFilter, load_tokenizer, render_trajectory, select, summary_line
    from aipo_env.trajectory import read_jsonl

    path = Path(args.file)
    if not path.is_file():
        print(f"aipo show: no such file '{path}'", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print(f"aipo show: --limit must be at least 1; got {args.limit}", file=sys.stderr)
        return 2
    try:
        trajectories = read_jsonl(path)
    except JsonlError as exc:  # names the file and the line itself
        print(f"aipo show: not a trajectories JSONL file: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"aipo show: {path} is not a trajectories JSONL file: {exc}", file=sys.stderr)
        return 2
    criteria = ShowFilter(
        reward_min=args.reward_min,
        reward_max=args.reward_max,
        tasks=tuple(args.task),
        finish_reasons=tuple(args.finish_reason),
        correct=args.correct,
        ids=tuple(args.id),
    )
    shown = select(trajectories, criteria, limit=args.limit)
    tokenizer = load_tokenizer(args.tokenizer) if shown else None
    color = not args.no_color
    out = sys.stdout
    for t in shown:
        out.write(
            render_trajectory(t, tokenizer, color=color, show_prompt=not args.hide_prompt) + "\n"
        )
    out.write(summary_line(shown, len(trajectories)) + "\n")
    return 0
