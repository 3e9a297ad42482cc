"""Build (and run) the command that trains with OpenRLHF, our executor and AIPO's loss.

``ray job submit --address A --runtime-env-json J -- python -m trainers.openrlhf.entry FLAGS``

The runtime env carries, to every Ray worker: ``worker_process_setup_hook`` (installs
:class:`AIPOPolicyLoss`), the agent-token loss config and the executor config as JSON,
and the working directory. ``FLAGS`` are the recipe's OpenRLHF flags plus
``--train.agent_func_path`` pointing at ``trainers/openrlhf/executor.py``. The recipe
arrives typed (:class:`OpenRLHFRecipe`); reading it from YAML is the application's job.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from agents.serve import EndpointsFile, load_endpoints
from trainers.openrlhf.config import ExecutorConfig, OpenRLHFRecipe
from trainers.openrlhf.loss import LOSS_CONFIG_ENV, loss_config_to_env
from trainers.openrlhf.patch import SETUP_HOOK

#: Environment variable holding the executor's JSON config on every worker.
EXECUTOR_CONFIG_ENV = "AIPO_OPENRLHF_EXECUTOR"
#: Set in the job's runtime env, so the entry module knows the setup hook is in place.
HOOK_MARKER_ENV = "AIPO_OPENRLHF_HOOK"
EXECUTOR_RELPATH = "trainers/openrlhf/executor.py"


def flag_argv(flags: dict[str, Any]) -> list[str]:
    """OpenRLHF argv from a flag map: True = bare switch, False/None omitted, lists spread."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if value is True:
            continue
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


def executor_payload(config: ExecutorConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """The executor config as workers receive it (JSON-ready), with the endpoints file inlined.

    ``ExecutorConfig.model_validate(payload)`` reads it back: ``endpoints_file`` is
    replaced by ``endpoints``, the file's content validated. Only the fields the recipe
    sets are written, so the reader still knows which ones it left to their defaults
    (:meth:`ExecutorConfig.episode_env`). A dry run may be made before ``aipo serve``
    has written the file: it then says so on stderr and leaves the endpoints out.
    """
    payload = config.model_dump(mode="json", exclude_unset=True, exclude={"endpoints_file"})
    payload.setdefault("endpoints", None)
    path = config.endpoints_file
    if path:
        file = Path(path)
        if not file.is_file() and dry_run:
            print(
                f"note: endpoints file {file} does not exist yet; a real launch inlines it "
                "(start the agents with 'aipo serve' first)",
                file=sys.stderr,
            )
            return payload
        served = EndpointsFile(agents=load_endpoints(file))
        payload["endpoints"] = served.model_dump(mode="json", exclude_unset=True)
        # Built here too, so a served agent that does not fit fails the launch, not a worker.
        config.model_copy(update={"endpoints": served}).agent_pool()
    return payload


def runtime_env(recipe: OpenRLHFRecipe, *, dry_run: bool = False) -> dict[str, Any]:
    """The Ray runtime env of the job."""
    env_vars = {
        **recipe.ray.env_vars,
        LOSS_CONFIG_ENV: loss_config_to_env(recipe.agent_loss),
        EXECUTOR_CONFIG_ENV: json.dumps(executor_payload(recipe.executor, dry_run=dry_run)),
        HOOK_MARKER_ENV: "1",
    }
    env: dict[str, Any] = {"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK}
    if recipe.ray.working_dir is not None:
        env["working_dir"] = recipe.ray.working_dir
        env["excludes"] = list(recipe.ray.excludes)
    return env


def training_argv(recipe: OpenRLHFRecipe) -> list[str]:
    """The OpenRLHF flags of the run, ``--train.agent_func_path`` included."""
    if recipe.ray.working_dir is not None:
        executor = EXECUTOR_RELPATH  # workers run inside the unpacked working_dir
    else:
        executor = str(Path(__file__).with_name("executor.py").resolve())
    return ["--train.agent_func_path", executor, *flag_argv(recipe.openrlhf)]


def build_command(recipe: OpenRLHFRecipe, *, dry_run: bool = False) -> list[str]:
    """The full command line (a list, for subprocess); ``dry_run`` tolerates a missing endpoints file."""
    driver = ["python", "-m", "trainers.openrlhf.entry", *training_argv(recipe)]
    if not recipe.ray.submit:
        return driver
    return [
        "ray", "job", "submit",
        "--address", recipe.ray.address,
        "--runtime-env-json", json.dumps(runtime_env(recipe, dry_run=dry_run), sort_keys=True),
        "--", *driver,
    ]  # fmt: skip


def check_flags(recipe: OpenRLHFRecipe) -> None:
    """Run OpenRLHF's own parser and validation over the flags (where openrlhf is installed)."""
    from trainers.openrlhf.flags import (
        OpenRLHFArgumentError,
        flag_names,
        installed_openrlhf_version,
        parse_openrlhf_args,
    )

    if installed_openrlhf_version() is None:
        return
    # argparse would accept an unambiguous prefix ('--rollout.n_samples'); recipes must
    # spell flags out, so a renamed flag fails here instead of binding to a neighbour.
    unknown = sorted(f"--{name}" for name in recipe.openrlhf if f"--{name}" not in flag_names())
    if unknown:
        raise OpenRLHFArgumentError(
            f"unknown OpenRLHF flag(s) {', '.join(unknown)}; expected flags of "
            "openrlhf/cli/train_ppo_ray.py (0.11.2), spelled out in full"
        )
    parse_openrlhf_args(training_argv(recipe))


def run_openrlhf(recipe: OpenRLHFRecipe, *, dry_run: bool = False) -> int:
    """``aipo train --engine openrlhf``: print (dry run) or run the launch command; returns the exit code.

    Raises:
        OpenRLHFArgumentError: OpenRLHF's parser refuses the flags.
        FileNotFoundError: the endpoints file is missing (a real launch only).
    """
    check_flags(recipe)
    command = build_command(recipe, dry_run=dry_run)
    if dry_run:
        print(shlex.join(command))
        return 0
    if not recipe.ray.submit:
        # Run the driver in-process environment: the entry module sets up Ray itself.
        import os

        os.environ.update(runtime_env(recipe)["env_vars"])
        command = [sys.executable, *command[1:]]
    return subprocess.call(command)
