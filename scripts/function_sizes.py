"""The longest functions of a source tree, in lines (docstrings included), as a table.

    python scripts/function_sizes.py              # this tree, the 15 longest
    python scripts/function_sizes.py /some/tree --top 30

Reads the project's packages (``aipo``, ``aipo_env``, ``agents``, ``policies``, ``tasks``,
``trainers``); benchmarks, scripts and tests are left out.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGES = ("aipo", "aipo_env", "agents", "policies", "tasks", "trainers")


def function_sizes(root: Path) -> list[tuple[int, str]]:
    """``(lines, 'path:qualified_name')`` of every function and method under ``root``'s packages."""
    sizes = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            rel = path.relative_to(root)

            def visit(node: ast.AST, prefix: str, rel: Path = rel) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                        name = f"{prefix}{child.name}"
                        start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                        sizes.append((child.end_lineno - start + 1, f"{rel}:{name}"))
                        visit(child, f"{name}.")
                    elif isinstance(child, ast.ClassDef):
                        visit(child, f"{prefix}{child.name}.")

            visit(tree, "")
    return sorted(sizes, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--top", type=int, default=15, help="how many to list (default 15)")
    args = parser.parse_args()
    for lines, name in function_sizes(args.root)[: args.top]:
        print(f"{lines:5d}  {name}")


if __name__ == "__main__":
    main()
