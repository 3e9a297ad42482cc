"""Build (and run) the command that trains with OpenRLHF, our executor and AIPO's loss.

``ray job submit --address A --runtime-env-json J -- python -m trainers.openrlhf.entry FLAGS``

The runtime env carries, to every Ray worker: ``worker_process_setup_hook`` (installs
:class:`AIPOPolicyLoss`), the agent-token loss config and the executor config as JSON,
and the working directory. ``FLAGS`` are the recipe's OpenRLHF flags plus
``--train.agent_func_path`` pointing at ``trainers/openrlhf/executor.py`` (:func:`executor_path`:
the installed file, or its place inside an uploaded ``ray.working_dir``). The recipe
arrives typed (:class:`OpenRLHFRecipe`); reading it from YAML is the application's job.

With ``ray.submit: false`` the launcher runs ``python -m trainers.openrlhf.entry FLAGS``
here, with the same runtime env as JSON in ``AIPO_OPENRLHF_RUNTIME_ENV``: the entry
module starts Ray with it, so the hook and the configs reach the workers either way.

Paths. Ray runs workers inside the unpacked copy of ``working_dir`` (or wherever Ray
was started on their node), so a relative path in a flag names a place inside that
copy: checkpoints and the final model would be written there and lost, data would be
looked for there. The launcher makes every path absolute against the directory it is
run from (``launch_dir``) before it builds the flags:

* outputs (:data:`OUTPUT_PATH_FLAGS`), OpenRLHF's relative defaults included;
* datasets (:data:`DATASET_FLAGS`): comma-separated entries ``NAME[@DATA_DIR]``, read as
  OpenRLHF's ``blending_datasets`` reads them. An entry is a local path when it has a
  file extension OpenRLHF loads as a file (:data:`DATA_FILE_SUFFIXES`), is written as a
  path (absolute, ``./``, ``../``, ``~``) or exists in ``launch_dir``; anything else is a
  Hugging Face dataset id and is passed as it is. A launch whose local entry does not
  exist is refused (a dry run notes it);
* models (:data:`MODEL_PATH_FLAGS`): resolved when written as a path or existing here.

Every node must see those absolute paths (a shared filesystem), as OpenRLHF's
multi-node checkpoints need anyway.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from agents.serve import EndpointsFile, load_endpoints
from trainers.openrlhf.config import (
    EXECUTOR_CONFIG_ENV,
    HOOK_MARKER_ENV,
    RUNTIME_ENV_ENV,
    ExecutorConfig,
    FlagValue,
    OpenRLHFRecipe,
)
from trainers.openrlhf.flags import OUTPUT_FLAG_DEFAULTS
from trainers.openrlhf.loss import LOSS_CONFIG_ENV, loss_config_to_env
from trainers.openrlhf.patch import SETUP_HOOK, check_openrlhf_version

#: The agent executor OpenRLHF loads (``--train.agent_func_path``), beside this module.
EXECUTOR_FILE = "executor.py"
#: Flags naming what OpenRLHF writes: checkpoints, the final model, TensorBoard logs.
OUTPUT_PATH_FLAGS = ("ckpt.path", "ckpt.output_dir", "logger.tensorboard_dir")
#: Flags naming datasets (comma-separated, each ``NAME[@DATA_DIR]``).
DATASET_FLAGS = ("data.prompt_dataset", "eval.dataset")
#: Flags naming models: a Hugging Face id or a local directory.
MODEL_PATH_FLAGS = (
    "actor.model_name_or_path",
    "reward.model_name_or_path",
    "critic.model_name_or_path",
)
#: Extensions OpenRLHF's ``blending_datasets`` loads as local files.
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")


def _written_as_path(entry: str) -> bool:
    return entry.startswith(("/", "./", "../", "~")) or entry in (".", "..")


def _absolute(entry: str, launch_dir: Path) -> str:
    # normpath, not resolve(): a symlinked shared mount keeps the name every node knows it by.
    path = Path(entry).expanduser()
    return os.path.normpath(path if path.is_absolute() else launch_dir / path)


def is_local_dataset(entry: str, launch_dir: Path) -> bool:
    """Whether a dataset entry (``NAME`` without ``@DATA_DIR``) is a local path rather than a Hub id."""
    return (
        _written_as_path(entry)
        or Path(entry).suffix.lower() in DATA_FILE_SUFFIXES
        or (launch_dir / entry).exists()
    )


def _resolve_datasets(value: str, launch_dir: Path) -> str:
    entries = []
    for raw in value.split(","):
        name, at, data_dir = raw.strip().partition("@")
        name = name.strip()
        if name and is_local_dataset(name, launch_dir):
            name = _absolute(name, launch_dir)
        entries.append(f"{name}{at}{data_dir.strip()}")
    return ",".join(entries)


def resolved_flags(recipe: OpenRLHFRecipe, launch_dir: Path | None = None) -> dict[str, FlagValue]:
    """The recipe's OpenRLHF flags with every path absolute against ``launch_dir`` (default: cwd).

    Output flags the recipe leaves unset get OpenRLHF's default, resolved, so nothing is
    written inside a worker's working directory.
    """
    here = Path.cwd() if launch_dir is None else Path(launch_dir)
    flags = dict(recipe.openrlhf)
    for name, default in OUTPUT_FLAG_DEFAULTS.items():
        if flags.get(name) is None:
            flags[name] = default
    for name in OUTPUT_PATH_FLAGS:
        if isinstance(flags.get(name), str):
            flags[name] = _absolute(flags[name], here)
    for name in DATASET_FLAGS:
        if isinstance(flags.get(name), str):
            flags[name] = _resolve_datasets(flags[name], here)
    for name in MODEL_PATH_FLAGS:
        value = flags.get(name)
        if isinstance(value, str) and (_written_as_path(value) or (here / value).exists()):
            flags[name] = _absolute(value, here)
    return flags


def dataset_entries(flags: dict[str, FlagValue]) -> list[tuple[str, str, bool]]:
    """``(flag, entry, is_local)`` of every dataset entry of already resolved ``flags``."""
    found = []
    for name in DATASET_FLAGS:
        value = flags.get(name)
        if not isinstance(value, str):
            continue
        for raw in value.split(","):
            entry = raw.partition("@")[0].strip()
            found.append((name, entry, Path(entry).is_absolute()))
    return found


def missing_data(flags: dict[str, FlagValue]) -> list[str]:
    """``flag=path`` of each local dataset entry of resolved ``flags`` that does not exist."""
    return [
        f"{name}={entry}"
        for name, entry, local in dataset_entries(flags)
        if local and not Path(entry).exists()
    ]


def data_overlap(flags: dict[str, FlagValue]) -> tuple[int, int, list[str]]:
    """Questions of the local ``eval.dataset`` files that also occur in the local training data.

    Compared by :func:`tasks.question_text.normalize_question` of each row's ``data.input_key``
    (OpenRLHF's default ``input``). Hub datasets are not read (nothing is downloaded
    here). Returns ``(overlapping, evaluated, examples)``.
    """
    from tasks.question_text import normalize_question
    from tasks.sources import read_local

    key = str(flags.get("data.input_key") or "input")

    def questions(flag: str) -> list[str]:
        out = []
        for name, entry, local in dataset_entries(flags):
            if name == flag and local and Path(entry).is_file():
                out += [str(row[key]) for row in read_local(entry) if row.get(key) is not None]
        return out

    train = {normalize_question(q) for q in questions("data.prompt_dataset")}
    held = questions("eval.dataset")
    shared = [q for q in held if normalize_question(q) in train]
    return len(shared), len(held), shared[:2]


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


def runtime_env(
    recipe: OpenRLHFRecipe, *, dry_run: bool = False, launch_dir: Path | None = None
) -> dict[str, Any]:
    """The Ray runtime env of the job (``working_dir`` absolute against ``launch_dir``)."""
    env_vars = {
        **recipe.ray.env_vars,
        LOSS_CONFIG_ENV: loss_config_to_env(recipe.agent_loss),
        EXECUTOR_CONFIG_ENV: json.dumps(
            executor_payload(recipe.executor_for_workers(), dry_run=dry_run)
        ),
        HOOK_MARKER_ENV: "1",
    }
    env: dict[str, Any] = {"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK}
    if recipe.ray.working_dir is not None:
        here = Path.cwd() if launch_dir is None else Path(launch_dir)
        env["working_dir"] = _absolute(recipe.ray.working_dir, here)
        env["excludes"] = list(recipe.ray.excludes)
    return env


def executor_path(recipe: OpenRLHFRecipe, launch_dir: Path | None = None) -> str:
    """``--train.agent_func_path``: the executor file as OpenRLHF's vLLM actors will open it.

    OpenRLHF loads it by file path on every rollout node. When the uploaded
    ``ray.working_dir`` holds this very file (a checkout), the path is relative to it:
    workers run inside its unpacked copy. Otherwise it is the installed file's absolute
    path, which every node has when AIPO is installed at the same place on each (the
    same image or virtual environment); nothing assumes the launch directory is a checkout.
    """
    executor = Path(__file__).with_name(EXECUTOR_FILE).resolve()
    if recipe.ray.working_dir is not None:
        here = Path.cwd() if launch_dir is None else Path(launch_dir)
        uploaded = Path(_absolute(recipe.ray.working_dir, here)).resolve()
        if executor.is_relative_to(uploaded):
            return executor.relative_to(uploaded).as_posix()
    return str(executor)


def training_argv(recipe: OpenRLHFRecipe, launch_dir: Path | None = None) -> list[str]:
    """The OpenRLHF flags of the run (paths resolved), ``--train.agent_func_path`` included."""
    executor = executor_path(recipe, launch_dir)
    return ["--train.agent_func_path", executor, *flag_argv(resolved_flags(recipe, launch_dir))]


def build_command(
    recipe: OpenRLHFRecipe, *, dry_run: bool = False, launch_dir: Path | None = None
) -> list[str]:
    """The full command line (a list, for subprocess); ``dry_run`` tolerates a missing endpoints file.

    With ``ray.submit: false`` this is the driver alone; it needs the runtime env in
    ``RUNTIME_ENV_ENV`` (:func:`run_openrlhf` puts it there).
    """
    driver = ["python", "-m", "trainers.openrlhf.entry", *training_argv(recipe, launch_dir)]
    if not recipe.ray.submit:
        return driver
    runtime = runtime_env(recipe, dry_run=dry_run, launch_dir=launch_dir)
    return [
        "ray", "job", "submit",
        "--address", recipe.ray.address,
        "--runtime-env-json", json.dumps(runtime, sort_keys=True),
        "--", *driver,
    ]  # fmt: skip


def check_flags(recipe: OpenRLHFRecipe, launch_dir: Path | None = None) -> None:
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
    parse_openrlhf_args(training_argv(recipe, launch_dir))


def run_openrlhf(
    recipe: OpenRLHFRecipe, *, dry_run: bool = False, launch_dir: Path | None = None
) -> int:
    """``aipo train --engine openrlhf``: print (dry run) or run the launch command; returns the exit code.

    Paths are resolved against ``launch_dir`` (default: the current directory).

    Raises:
        OpenRLHFVersionError: the OpenRLHF installed here is not the pinned release.
        OpenRLHFArgumentError: OpenRLHF's parser refuses the flags.
        FileNotFoundError: the endpoints file or a local dataset is missing (a real launch only).
        ValueError: the local evaluation data shares questions with the training data
            (unless the recipe sets ``allow_overlap``).
    """
    here = Path.cwd() if launch_dir is None else Path(launch_dir)
    check_openrlhf_version()
    check_flags(recipe, here)
    missing = missing_data(resolved_flags(recipe, here))
    if missing and not dry_run:
        raise FileNotFoundError(
            f"training data not found: {', '.join(missing)} (paths are resolved against the "
            f"launch directory {here}; a Hugging Face dataset id is passed as it is)"
        )
    for entry in missing:
        print(f"note: {entry} does not exist yet; a real launch refuses it", file=sys.stderr)
    shared, evaluated, examples = data_overlap(resolved_flags(recipe, here))
    if shared:
        message = (
            f"{shared} of the {evaluated} evaluation questions (eval.dataset) are also training "
            f"questions (data.prompt_dataset), e.g. {examples}: evaluate on another split or "
            "dataset, or set allow_overlap: true in the recipe to launch knowingly"
        )
        if not recipe.allow_overlap:
            raise ValueError(message)
        print(f"note: {message}", file=sys.stderr)
    command = build_command(recipe, dry_run=dry_run, launch_dir=here)
    if recipe.ray.submit:
        if dry_run:
            print(shlex.join(command))
            return 0
        return subprocess.call(command)
    runtime = runtime_env(recipe, dry_run=dry_run, launch_dir=here)
    handover = json.dumps(runtime, sort_keys=True)
    if dry_run:
        print(shlex.join([f"{RUNTIME_ENV_ENV}={handover}", *command]))
        return 0
    # The driver gets the job's variables too (as a submitted driver would), but not the
    # submit marker: it starts Ray itself, with the runtime env handed over.
    driver_env = {
        **os.environ,
        **{k: v for k, v in runtime["env_vars"].items() if k != HOOK_MARKER_ENV},
        RUNTIME_ENV_ENV: handover,
    }
    return subprocess.call([sys.executable, *command[1:]], env=driver_env)
