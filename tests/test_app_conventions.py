"""Packaging conventions: ``python -m aipo``, one version, typed packages, ``--log-level``."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import subprocess
import sys

import pytest

import aipo_env
from aipo.cli import main


def test_python_m_aipo_runs_the_command_line_with_the_metadata_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "aipo", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"aipo {importlib.metadata.version('aipo')}"
    assert aipo_env.__version__ == importlib.metadata.version("aipo")


@pytest.mark.parametrize("package", ["aipo", "aipo_env", "tasks", "policies", "agents", "trainers"])
def test_every_package_is_marked_typed(package: str) -> None:
    assert importlib.resources.files(package).joinpath("py.typed").is_file()


def test_log_level_sets_the_root_logger_and_refuses_an_unknown_level(capsys) -> None:
    root = logging.getLogger()
    before = root.level
    try:
        assert main(["tasks", "--log-level", "error"]) == 0
        assert root.level == logging.ERROR
        assert main(["tasks", "--log-level", "debug"]) == 0
        assert root.level == logging.DEBUG
        with pytest.raises(SystemExit) as exit_:
            main(["tasks", "--log-level", "loud"])
        assert exit_.value.code == 2
        assert "'loud'" in capsys.readouterr().err
    finally:
        root.setLevel(before)
