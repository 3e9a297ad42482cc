"""Experiment configs (YAML) and prompt templates, shipped as package data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_names(folder: str) -> list[str]:
    """Names (without ``.yaml``) of the configs shipped in ``configs/<folder>/``."""
    root = resources.files(__name__) / folder
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve(spec: str | Path, folder: str) -> Path:
    """The config file ``spec`` names, from any directory.

    In order: an existing file (relative to the current directory or absolute); a
    packaged config of ``configs/<folder>/`` by name (``grpo_1node`` or
    ``grpo_1node.yaml``); a path written from the checkout's root
    (``configs/openrlhf/grpo_1node.yaml``), read from the installed package.

    Raises:
        FileNotFoundError: none of these exists; the message lists the packaged names.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    text = str(spec)
    root = Path(str(resources.files(__name__)))
    candidates = []
    if "/" not in text:
        candidates.append(root / folder / (text if text.endswith(".yaml") else f"{text}.yaml"))
    if text.startswith("configs/"):
        candidates.append(root / text[len("configs/") :])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config {text!r} not found: no such file here ({Path.cwd()}) and no packaged "
        f"config of that name; packaged in configs/{folder}: {', '.join(packaged_names(folder))}"
    )
