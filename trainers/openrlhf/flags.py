"""Check OpenRLHF flags with OpenRLHF's own parser and validation, without Ray, vLLM or CUDA.

``openrlhf/cli/train_ppo_ray.py`` builds its argument parser and validates the parsed
arguments inside ``if __name__ == "__main__":``, after module-level imports of Ray
and vLLM. :func:`parse_openrlhf_args` reads that block from the installed source,
runs it with ``train`` replaced by a function that captures the final arguments,
and so applies exactly OpenRLHF's parser and its assertions to our command line.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import importlib.util
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The OpenRLHF release whose flags the recipes use.
OPENRLHF_VERSION = "0.11.2"

#: The variables OpenRLHF's ``train()`` puts in the runtime env of its own ``ray.init``
#: (``cli/train_ppo_ray.py``), each read from the driver's environment with this default.
#: Ray refuses to merge a submitted job's runtime env that sets one of them too.
OPENRLHF_RAY_ENV_DEFAULTS: dict[str, str] = {
    "TOKENIZERS_PARALLELISM": "true",
    "NCCL_DEBUG": "WARN",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}

#: OpenRLHF's defaults for the flags naming what it writes (relative: they would
#: resolve inside each worker's working directory).
OUTPUT_FLAG_DEFAULTS: dict[str, str] = {
    "ckpt.path": "./ckpt/checkpoints_ppo_ray",
    "ckpt.output_dir": "./ckpt",
}
#: OpenRLHF's default for ``--data.max_len`` (prompt plus response).
DATA_MAX_LEN_DEFAULT = 2048


class OpenRLHFArgumentError(ValueError):
    """OpenRLHF's parser or its validation refused a command line."""


def installed_openrlhf_version() -> str | None:
    """The installed openrlhf version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("openrlhf")
    except metadata.PackageNotFoundError:
        return None


def _train_ppo_ray_source() -> Path:
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise OpenRLHFArgumentError(
            f"openrlhf is not installed; install openrlhf=={OPENRLHF_VERSION} to check flags"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "cli" / "train_ppo_ray.py"
    if not path.is_file():
        raise OpenRLHFArgumentError(f"expected OpenRLHF's PPO entry point at {path}; not found")
    return path


def _main_block(source: str, filename: str) -> list[ast.stmt]:
    tree = ast.parse(source, filename=filename)
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            return list(node.body)
    raise OpenRLHFArgumentError(f"no 'if __name__ == \"__main__\"' block in {filename}")


def _load_config_module(openrlhf_dir: Path) -> Any:
    # openrlhf.utils/__init__ imports DeepSpeed (seconds); config.py itself is standalone.
    spec = importlib.util.spec_from_file_location(
        "aipo_openrlhf_config", openrlhf_dir / "utils" / "config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiled_main(*, parser_only: bool) -> tuple[Any, dict[str, Any]]:
    """OpenRLHF's main block compiled, and the globals it needs (``train`` left to the caller).

    ``from openrlhf.utils.config import X`` statements are dropped and ``X`` is provided
    from config.py loaded on its own. With ``parser_only`` the block stops before
    ``args = parser.parse_args()``.
    """
    path = _train_ppo_ray_source()
    body = _main_block(path.read_text(), str(path))
    config = _load_config_module(path.parent.parent)
    namespace: dict[str, Any] = {
        "__name__": "aipo_flag_check",
        "argparse": argparse,
        "os": os,
        "datetime": datetime.datetime,
    }
    kept: list[ast.stmt] = []
    for stmt in body:
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "openrlhf.utils.config":
            for alias in stmt.names:
                namespace[alias.asname or alias.name] = getattr(config, alias.name)
            continue
        if parser_only and "parser.parse_args" in ast.unparse(stmt):
            break
        kept.append(stmt)
    module = ast.Module(body=kept, type_ignores=[])
    return compile(module, str(path), "exec"), namespace


def parse_openrlhf_args(argv: Sequence[str]) -> Any:
    """Parse and validate ``argv`` (flags after ``train_ppo_ray``) as OpenRLHF would.

    Returns OpenRLHF's hierarchical argument namespace (``args.actor.adam.lr``, ...).
    Raises :class:`OpenRLHFArgumentError` with OpenRLHF's message when its parser
    rejects a flag or one of its assertions fails.
    """
    code, namespace = _compiled_main(parser_only=False)
    captured: list[Any] = []
    namespace["train"] = captured.append
    stderr = io.StringIO()
    saved_argv = sys.argv
    sys.argv = ["train_ppo_ray", *argv]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)  # noqa: S102 - OpenRLHF's own parser code, from its installed source
    except SystemExit as exc:
        message = stderr.getvalue().strip().splitlines()
        raise OpenRLHFArgumentError(
            f"OpenRLHF's parser rejected the command line: {message[-1] if message else exc}"
        ) from None
    except AssertionError as exc:
        raise OpenRLHFArgumentError(f"OpenRLHF's argument validation failed: {exc}") from None
    finally:
        sys.argv = saved_argv
    if not captured:
        raise OpenRLHFArgumentError("OpenRLHF's entry block ended without calling train(args)")
    return captured[0]


@functools.cache
def _parser() -> argparse.ArgumentParser:
    code, namespace = _compiled_main(parser_only=True)
    exec(code, namespace)  # noqa: S102 - OpenRLHF's own parser code, from its installed source
    return namespace["parser"]


def flag_names() -> frozenset[str]:
    """Every ``--flag`` OpenRLHF's PPO parser defines."""
    return frozenset(n for n in _parser()._option_string_actions if n.startswith("--"))
