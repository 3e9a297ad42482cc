"""Load an OpenRLHF recipe by packaged name or path, as every ``aipo`` command does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aipo.config import load_config
from trainers.openrlhf.config import OpenRLHFRecipe
from trainers.openrlhf.recipes import recipe_path


def load_recipe(spec: str | Path, overrides: Sequence[str] = ()) -> OpenRLHFRecipe:
    """The recipe ``spec`` names (a path, or a shipped recipe's name), with ``overrides``.

    Raises:
        FileNotFoundError: no such file or packaged recipe (the message lists them).
        aipo.config.ConfigError: the recipe or an override is invalid.
    """
    return load_config(OpenRLHFRecipe, recipe_path(spec), list(overrides))
