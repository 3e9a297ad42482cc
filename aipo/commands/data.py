"""``aipo data``: write a recipe's prompt dataset (:mod:`trainers.openrlhf.prepare_data`).

The command line only; reading, filtering and writing the rows live in the trainer's
module, below the app layer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from trainers.openrlhf.prepare_data import (
    TARGETS,
    PrepareError,
    excluded_questions,
    load_problems,
    parse_where,
    prepare,
    recipe_keys,
    recipe_target,
    write_jsonl,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the command."""
    parser.add_argument(
        "--config", required=True, help="the recipe: a packaged name (grpo_1node) or a path"
    )
    parser.add_argument(
        "--source",
        default=None,
        help="a Hugging Face dataset id or a local .jsonl/.json/.parquet file (default: the "
        "recipe task's own dataset, e.g. zwhe99/DeepMath-103K for deepmath)",
    )
    parser.add_argument("--split", default=None, help="the split to read (default: the task's)")
    parser.add_argument(
        "--question-field", default=None, help="the source's question column (default: the task's)"
    )
    parser.add_argument(
        "--answer-field",
        default=None,
        help="the source's answer column (default: the task's; DeepMath: final_answer)",
    )
    parser.add_argument(
        "--task", default=None, help="the task whose rows are read (default: executor.task)"
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD OP VALUE",
        help="keep rows whose metadata passes, e.g. 'difficulty>=7' (repeatable)",
    )
    parser.add_argument("--limit", type=int, default=None, help="draw at most N rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit draw")
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="FILE",
        help="drop questions that occur in FILE (a held-out set; repeatable)",
    )
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="data.prompt_dataset",
        help="which of the recipe's dataset flags to write (default: data.prompt_dataset)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write here instead of the recipe's file (keys still the recipe's)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as for 'aipo train'"
    )


def run(args: argparse.Namespace) -> int:
    """Write the file; 0 on success, 2 on a bad option or source (the message says which)."""
    from aipo.config import ConfigError
    from aipo.recipes import load_recipe
    from tasks.sources import DatasetUnavailable

    here = Path.cwd()
    try:
        recipe = load_recipe(args.config, args.overrides)
        input_key, label_key = recipe_keys(recipe)
        path = (
            recipe_target(recipe, args.target, here)
            if args.out is None
            else Path(args.out).expanduser().absolute()
        )
        where = [parse_where(text) for text in args.where]
        problems, skipped = load_problems(
            args.task or recipe.executor.task,
            source=args.source,
            split=args.split,
            question_field=args.question_field,
            answer_field=args.answer_field,
        )
        exclude = excluded_questions(args.exclude, input_key) if args.exclude else None
        rows, left_out = prepare(
            problems,
            input_key=input_key,
            label_key=label_key,
            where=where,
            limit=args.limit,
            seed=args.seed,
            exclude=exclude,
        )
    except (ConfigError, PrepareError, DatasetUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"aipo data: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"aipo data: no row left to write ({left_out}); nothing written", file=sys.stderr)
        return 2
    write_jsonl(rows, path)
    print(
        f"wrote {len(rows)} rows ({input_key}, {label_key}) to {path}; left out: "
        f"{skipped} malformed, {left_out['filtered']} by --where, "
        f"{left_out['excluded']} by --exclude"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``aipo data`` without the top-level parser (tests, scripts)."""
    parser = argparse.ArgumentParser(
        prog="aipo data",
        description="Write a recipe's prompt dataset (JSONL with its input and label keys).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
