"""OpenRLHF recipes by name or path, from any directory.

The recipes ship as package data (``configs/openrlhf/*.yaml``), so after ``pip install``
``aipo train --engine openrlhf --config grpo_1node`` finds them wherever it runs; a
path to your own recipe works as well (see :func:`configs.resolve`).
"""

from __future__ import annotations

from pathlib import Path

import configs

#: The folder of ``configs/`` holding the shipped recipes.
RECIPE_FOLDER = "openrlhf"


def recipe_path(spec: str | Path) -> Path:
    """The file ``spec`` names: an existing path, else a packaged recipe by name.

    Raises:
        FileNotFoundError: neither; the message lists the packaged recipes.
    """
    return configs.resolve(spec, RECIPE_FOLDER)


def packaged_recipes() -> list[str]:
    """The names of the shipped recipes."""
    return configs.packaged_names(RECIPE_FOLDER)
