"""OpenRLHF flags that hold secrets: a recipe names an environment variable, never the value.

OpenRLHF 0.11.2 turns W&B on with ``--logger.wandb.key KEY`` (its ``PPOTrainer`` creates
its ``WandbLogger`` only when that flag is set). A key written in a recipe would be in
version control, in ``ray job submit``'s command line and in the dry run's output. So a
recipe writes ``logger.wandb.key: env:WANDB_API_KEY``; the launcher passes that text on,
and the driver (:mod:`trainers.openrlhf.entry`) replaces it with the variable's value
from its own environment just before OpenRLHF parses its flags: the environment of
``ray start --head`` for a submitted job, your shell with ``ray.submit: false``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

#: Flags whose value must be an environment reference (``env:NAME``).
SECRET_FLAGS = ("logger.wandb.key",)
#: ``env:NAME``: the value of the driver's environment variable NAME.
ENV_REFERENCE = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")


class MissingSecretError(RuntimeError):
    """A secret flag names an environment variable the driver does not have."""


def check_secret_flags(flags: Mapping[str, Any]) -> None:
    """Refuse a secret flag whose value is not ``env:NAME`` (the message names the flag).

    Raises:
        ValueError: a literal value, or not a string.
    """
    for name in SECRET_FLAGS:
        value = flags.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not ENV_REFERENCE.match(value):
            raise ValueError(
                f"openrlhf {name} must name an environment variable, e.g. "
                f"'env:WANDB_API_KEY', not hold the key: a recipe is committed, printed and "
                "passed on command lines. Export the key where the driver starts"
            )


def secret_variable(flags: Mapping[str, Any], name: str) -> str | None:
    """The environment variable the secret flag ``name`` refers to, None when unset."""
    value = flags.get(name)
    match = ENV_REFERENCE.match(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def fill_secrets(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """``argv`` with each secret flag's ``env:NAME`` replaced by ``environ[NAME]``.

    Raises:
        MissingSecretError: ``NAME`` is unset or empty (named, with where to export it).
    """
    out = list(argv)
    for index, arg in enumerate(out[:-1]):
        if arg.lstrip("-") not in SECRET_FLAGS:
            continue
        match = ENV_REFERENCE.match(out[index + 1])
        if not match:
            continue
        variable = match.group(1)
        if not environ.get(variable):
            raise MissingSecretError(
                f"{arg} names ${variable}, which the driver's environment lacks: export it "
                "before 'ray start --head' (a submitted job) or in the shell that runs "
                "'aipo train' (ray.submit: false)"
            )
        out[index + 1] = environ[variable]
    return out
