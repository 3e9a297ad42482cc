"""Which interpreter runs an inference engine, and whether it can.

SGLang (and a CUDA vLLM) cannot be installed beside AIPO: their torch and transformers
pins conflict with ours. So ``aipo serve`` (:mod:`agents.serve`) starts each server with
the interpreter of the engine's own environment and, before starting anything, asks that
interpreter whether it finds the module the command runs (``INTERPRETER -m MODULE``).
Nothing is imported by the check: it is quick even for an engine that takes a minute to load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

#: The module a command runs when it starts SGLang's server (``{python} -m ...``).
SGLANG_LAUNCHER = "sglang.launch_server"
#: Seconds the engine check may take per interpreter (a cold start on a network disk).
ENGINE_CHECK_TIMEOUT_S = 120.0
#: How to give SGLang an environment of its own, for the error that finds none.
SGLANG_ENV_HINT = (
    "SGLang needs its own environment (its torch and transformers pins conflict with "
    "AIPO's): python3 -m venv /opt/sglang && /opt/sglang/bin/pip install 'sglang[all]==0.5.23', "
    "then set python: /opt/sglang/bin/python in the serve config (or python=... on the "
    "command line; servers.N.python for one server)"
)
#: Run by the engine's interpreter: exit 0 when it finds ``sys.argv[1]``'s top-level package.
_FIND_MODULE = (
    "import importlib.util, sys; "
    "sys.exit(0 if importlib.util.find_spec(sys.argv[1].split('.')[0]) else 3)"
)


def engine_module(template: list[str]) -> str | None:
    """The module a command template runs as ``INTERPRETER -m MODULE``; None for any other command."""
    if len(template) >= 3 and template[1] == "-m":
        return template[2]
    return None


def resolve_python(python: str) -> str:
    """``python`` as a path: itself when it names a file, else its location on ``PATH``.

    A name not found is returned as it is (the engine check then says so).
    """
    if os.sep in python:
        return python
    return shutil.which(python) or python


def missing_engine(interpreter: str, module: str, env: Mapping[str, str]) -> str | None:
    """Why ``interpreter`` (a path or a name on ``PATH``) cannot run ``-m module``; None when it can.

    ``env`` is added to this process's environment for the check, as for the server.
    """
    python = resolve_python(interpreter)
    hint = (
        SGLANG_ENV_HINT
        if module == SGLANG_LAUNCHER
        else f"point python at an environment with {module}"
    )
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        where = "on PATH" if os.sep not in interpreter else "(no such executable)"
        return f"interpreter {interpreter!r} not found {where}; {hint}"
    try:
        found = subprocess.run(
            [python, "-c", _FIND_MODULE, module],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=ENGINE_CHECK_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"interpreter {python} could not be asked for {module}: {exc}; {hint}"
    if found.returncode != 0:
        return f"interpreter {python} cannot import {module.split('.')[0]}; {hint}"
    return None
