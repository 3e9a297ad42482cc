"""The packages layer one way: no module imports a package above its own.

Bottom to top: ``tasks`` and ``policies``; ``agents``; ``aipo_env``; ``trainers``; ``aipo``
(the application: CLI, config loading). ``configs`` holds packaged data and imports
nothing. Every ``import``/``from`` statement is checked, at module level or inside a
function, and so is every string that names a module of ours the way an import string
does (``"trainers.cli"``, ``"aipo_env.env:make_consult_env"``), as
``importlib.import_module`` or an entry point would use it.

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
