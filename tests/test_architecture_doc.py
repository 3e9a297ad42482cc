"""docs/architecture.md names what the code holds: its registries' lists, its modules, its large files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agents.kinds import AGENT_KINDS
from aipo_env.protocols import PROTOCOLS
from aipo_env.strategies import STRATEGIES
from trainers.advantages import ESTIMATORS
from trainers.losses import LOSS_MODES
from trainers.tool_config import TOOL_SERVICES

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text()

#: The doc's registry line (``- **NAME** (...): `a`, `b```) -> what the code registers.
REGISTRIES = {
    "protocols": lambda: list(PROTOCOLS),
    "rollout strategies": lambda: list(STRATEGIES),
    "tool services": lambda: list(TOOL_SERVICES),
    "loss modes": lambda: list(LOSS_MODES),
    "agent kinds": lambda: list(AGENT_KINDS),
    "advantage estimators": lambda: list(ESTIMATORS),
}


def section(title: str) -> str:
    """The text of the doc's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.M | re.S)
    assert match is not None, f"docs/architecture.md has no section {title!r}"
    return match.group(1)


def listed(name: str) -> list[str]:
    """The names the Registries section lists for ``name``."""
    line = re.search(rf"^- \*\*{re.escape(name)}\*\* \(.*?\): (.*)$", section("Registries"), re.M)
    assert line is not None, f"the Registries section does not list {name!r}"
    return re.findall(r"`([^`]+)`", line.group(1))


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_the_doc_lists_each_registry_as_the_code_holds_it(name: str) -> None:
    assert listed(name) == REGISTRIES[name]()


def test_every_environment_and_trainer_module_is_in_the_concept_map() -> None:
    concept_map = section("Where each concept lives")
    modules = [
        path.relative_to(REPO).as_posix()
        for package in ("aipo_env", "trainers")
        for path in sorted((REPO / package).glob("*.py")) + sorted((REPO / package).glob("*/*.py"))
        if path.name != "__init__.py"
    ]
    # A module is named by its path, or by its file name in a row of its package's files.
    missing = [
        m for m in modules if m not in concept_map and f"`{Path(m).name}`" not in concept_map
    ]
    missing = [m for m in missing if not m.startswith("trainers/openrlhf/")]  # one row for all
    assert not missing, f"not in docs/architecture.md's concept map: {missing}"


def test_every_module_over_450_lines_is_explained_in_the_size_list() -> None:
    sizes = section("Module sizes")
    large = [
        path.relative_to(REPO).as_posix()
        for package in ("aipo", "aipo_env", "agents", "trainers", "policies", "tasks")
        for path in (REPO / package).rglob("*.py")
        if len(path.read_text().splitlines()) > 450
    ]
    missing = [m for m in large if m not in sizes]
    assert not missing, f"over 450 lines but not in docs/architecture.md's size list: {missing}"
