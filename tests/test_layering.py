"""The packages layer one way: no module imports a package above its own.

Bottom to top: ``tasks`` and ``policies``; ``agents``; ``aipo_env``; ``trainers``; ``aipo``
(the application: CLI, config loading). ``configs`` holds packaged data and imports
nothing. Every ``import``/``from`` statement is checked, at module level or inside a
function, and so is every string that names a module of ours the way an import string
does (``"trainers.cli"``, ``"aipo_env.env:make_consult_env"``), as
``importlib.import_module`` or an entry point would use it.

Within and across packages, the modules import one another without a cycle: every import
statement counts, at the top of a module, inside a function or under ``TYPE_CHECKING``
(a lazy or type-only import hides a cycle; it does not remove it). Importing ``a.b.c``
imports the packages ``a`` and ``a.b`` too; a module importing its own package (a
package re-exporting its submodules) is not a cycle.

Run it alone to check a change: ``.venv/bin/python -m pytest tests/test_layering.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Package -> layer; a module may import packages of its own layer or below.
LAYERS: dict[str, int] = {
    "configs": 0,
    "tasks": 0,
    "policies": 0,
    "agents": 1,
    "aipo_env": 2,
    "trainers": 3,
    "aipo": 4,
}
_IMPORT_STRING = re.compile(r"^([a-z_]+)(\.[a-z_][a-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_]*)?$")


def _modules() -> list[Path]:
    return sorted(p for package in LAYERS for p in (ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every import and import string of ours in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _IMPORT_STRING.match(node.value)
            if match and match.group(1) in LAYERS:
                found.append((node.lineno, match.group(1)))
    return [(line, package) for line, package in found if package in LAYERS]


def layering_violations() -> list[str]:
    """Every import that runs from a lower layer to a higher one, as ``file:line: a -> b``."""
    problems = []
    for path in _modules():
        own = path.relative_to(ROOT).parts[0]
        for line, package in imported_packages(path):
            if LAYERS[package] > LAYERS[own]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {own} -> {package}")
    return problems


def test_no_package_imports_a_higher_layer() -> None:
    assert layering_violations() == []


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name of the module at ``path`` (a package's ``__init__.py`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """The modules of ``known`` that any import statement of ``path`` runs, wherever it stands.

    ``import a.b.c`` and ``from a.b.c import x`` run ``a``, ``a.b`` and ``a.b.c`` (and
    ``a.b.c.x`` when that is a module); the module's own packages are left out.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module in known and module != name and module not in own:
                found.add(module)
    return found


def import_cycles(root: Path = ROOT) -> list[str]:
    """One cycle of every group of modules that import one another, as ``a -> b -> a``."""
    paths = {module_name(p, root): p for package in LAYERS for p in (root / package).rglob("*.py")}
    graph = {name: imported_modules(path, set(paths), root) for name, path in paths.items()}
    cycles = []
    for group in _strongly_connected(graph):
        chain = _shortest_cycle(graph, group, min(group))
        cycles.append(f"{' -> '.join(chain)}  (cycle group: {', '.join(sorted(group))})")
    return sorted(cycles)


def _shortest_cycle(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """The shortest way from ``start`` back to itself inside ``group`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while start not in previous:
        reached = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt not in previous:
                    previous[nxt] = node
                    reached.append(nxt)
        frontier = reached
    chain = [start]
    while len(chain) == 1 or chain[-1] != start:
        chain.append(previous[chain[-1]])
    return chain[::-1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of more than one node that reach each other (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycle_between_our_modules() -> None:
    assert import_cycles() == []


def test_the_cycle_check_sees_lazy_type_only_and_package_imports(tmp_path: Path) -> None:
    (tmp_path / "aipo_env" / "sub").mkdir(parents=True)
    files = {
        "aipo_env/__init__.py": "",
        "aipo_env/a.py": "def f():\n    from aipo_env import b\n",
        "aipo_env/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import aipo_env.a\n",
        "aipo_env/sub/__init__.py": "from aipo_env.c import X\n",
        "aipo_env/sub/d.py": "from . import e\n",  # its own package: not a cycle
        "aipo_env/sub/e.py": "",
        "aipo_env/c.py": "from aipo_env.sub.e import Y\n",  # runs aipo_env.sub first
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for package in LAYERS:
        (tmp_path / package).mkdir(exist_ok=True)
    assert imported_modules(
        tmp_path / "aipo_env/sub/d.py", {"aipo_env.sub", "aipo_env.sub.e"}, tmp_path
    ) == {"aipo_env.sub.e"}
    cycles = import_cycles(tmp_path)
    assert [c.split("  ")[0] for c in cycles] == [
        "aipo_env.a -> aipo_env.b -> aipo_env.a",
        "aipo_env.c -> aipo_env.sub -> aipo_env.c",
    ]


def test_the_checker_sees_static_lazy_and_string_imports(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text(
        "import trainers.embedded\n"
        "def f():\n"
        "    from aipo.cli import main\n"
        "    return 'aipo_env.env:make_consult_env', 'not a module', 'numpy.linalg'\n"
    )
    assert imported_packages(module) == [(1, "trainers"), (3, "aipo"), (4, "aipo_env")]


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_every_layer_exists(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
