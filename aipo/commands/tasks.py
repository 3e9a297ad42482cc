"""``aipo tasks``: list the registered tasks (downloads nothing, imports no torch)."""

from __future__ import annotations

import argparse

from tasks import list_tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aipo tasks``."""
    parser.add_argument(
        "--name-contains", default="", help="only tasks whose name contains this text"
    )


def run(args: argparse.Namespace) -> int:
    """Print a table of tasks: name, source, size, description."""
    specs = [s for s in list_tasks() if args.name_contains in s.name]
    rows = [("name", "source", "size", "description")]
    rows += [
        (s.name, s.source, "?" if s.size is None else str(s.size), s.description) for s in specs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
        )
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * len("description"))
    print(f"\n{len(specs)} task(s). Any reasoning-gym dataset: rg:<name>. Local files: path=...")
    return 0
