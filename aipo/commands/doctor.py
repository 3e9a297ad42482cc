"""``aipo doctor --engine openrlhf --config RECIPE``: check a launch before any GPU is touched.

One line per check: ``ok``, ``warn`` or ``FAIL``, with what it found. Exit code 1 when
any check FAILs, 0 otherwise. Checks, in order:

* installed packages: openrlhf at the pinned release; transformers, deepspeed, ray and
  flash-attn within OpenRLHF's own pins; vllm at the version OpenRLHF's ``[vllm]`` extra
  declares and importable (missing: FAIL on a machine with a GPU, warn without one);
  torch (:mod:`aipo.commands.doctor_stack`);
* the recipe (a packaged name or a path) loads through ``aipo.config.load_config``, with
  the same overrides as ``aipo train``, and OpenRLHF's own parser accepts its flags;
* the attention implementation can run here (flash-attn's CUDA kernels, or ``sdpa``);
* every local dataset exists (paths resolved against this directory, as the launcher
  resolves them; a Hugging Face dataset id is not checked) and holds the recipe's
  ``data.input_key`` and ``data.label_key``;
* TensorBoard and W&B, when the recipe turns them on, are installed (and W&B's key set);
* every served agent's server answers ``GET /health``;
* the policy's and the agents' tokenizers load from the local cache alone: a worker
  that must download them at start-up fails on an offline cluster;
* output paths, absolute after resolution, are writable, and are not uploaded with the
  job's ``working_dir``;
* the Ray dashboard answers (``ray.submit: true``), else the ``ray start`` to run.

Every FAIL says what to run or set.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from aipo.commands.doctor_check import Check

if TYPE_CHECKING:
    import httpx

    from agents.config import AgentConfig
    from trainers.openrlhf.config import OpenRLHFRecipe

#: Seconds each HTTP check waits.
HTTP_TIMEOUT_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aipo doctor``."""
    parser.add_argument(
        "--engine", choices=("openrlhf",), default="openrlhf", help="the launch to check"
    )
    parser.add_argument(
        "--config", required=True, help="a recipe: a packaged name (grpo_1node, ...) or a path"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="recipe overrides, as for 'aipo train' (e.g. executor.endpoints_file=runs/x.json)",
    )


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU (device files only: CUDA is not initialised)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_checks(has_gpu: bool) -> list[Check]:
    """Installed versions of OpenRLHF and what it runs on."""
    from trainers.openrlhf.flags import OPENRLHF_VERSION
    from trainers.openrlhf.patch import (
        ALLOW_VERSION_ENV,
        OpenRLHFVersionError,
        check_openrlhf_version,
    )

    try:
        installed = check_openrlhf_version()  # the launcher's and the workers' own guard
    except OpenRLHFVersionError as exc:
        checks = [Check("FAIL", "openrlhf", str(exc))]
    else:
        if installed is None:
            checks = [Check("FAIL", "openrlhf", f"not installed; expected {OPENRLHF_VERSION}")]
        elif installed != OPENRLHF_VERSION:
            checks = [
                Check(
                    "warn",
                    "openrlhf",
                    f"{installed}, not {OPENRLHF_VERSION}: allowed by {ALLOW_VERSION_ENV}=1",
                )
            ]
        else:
            checks = [Check("ok", "openrlhf", installed)]
    from aipo.commands.doctor_stack import pin_checks, vllm_check

    checks.append(vllm_check(has_gpu))
    checks += pin_checks()
    torch = _version("torch")
    checks.append(Check("ok", "torch", torch) if torch else Check("FAIL", "torch", "not installed"))
    return checks


def flag_and_data_checks(
    recipe: OpenRLHFRecipe, launch_dir: Path, config: str = "RECIPE"
) -> list[Check]:
    """OpenRLHF's parser over the flags, and every dataset entry (``config``: the recipe as named)."""
    from trainers.openrlhf.flags import OpenRLHFArgumentError
    from trainers.openrlhf.launcher import check_flags, dataset_entries, resolved_flags

    if _version("openrlhf") is None:
        checks = [Check("warn", "openrlhf flags", "not checked (openrlhf is not installed)")]
    else:
        try:
            check_flags(recipe, launch_dir)
            checks = [Check("ok", "openrlhf flags", "accepted by OpenRLHF's parser")]
        except OpenRLHFArgumentError as exc:
            checks = [Check("FAIL", "openrlhf flags", str(exc))]
    entries = dataset_entries(resolved_flags(recipe, launch_dir))
    if not entries:
        checks.append(Check("FAIL", "data.prompt_dataset", "not set"))
    for flag, entry, local in entries:
        if not local:
            checks.append(Check("ok", flag, f"{entry} (Hugging Face dataset id, not checked)"))
        elif Path(entry).exists():
            checks.append(Check("ok", flag, entry))
        else:
            target = "" if flag == "data.prompt_dataset" else f" --target {flag}"
            checks.append(
                Check(
                    "FAIL",
                    flag,
                    f"{entry} does not exist; write it: aipo data --config {config}{target}",
                )
            )
    return checks


def _health(client: httpx.Client, host: str) -> str | None:
    """None when ``http://host/health`` answers 200, else what went wrong."""
    import httpx

    try:
        response = client.get(f"http://{host}/health")
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"HTTP {response.status_code}"


def agent_checks(recipe: OpenRLHFRecipe) -> tuple[list[Check], dict[str, AgentConfig]]:
    """The endpoints file and each served agent's health; also returns the agents' configs."""
    import httpx

    from policies import sglang_hosts
    from trainers.openrlhf.config import ExecutorConfig
    from trainers.openrlhf.launcher import executor_payload

    path = recipe.executor.endpoints_file
    if path and not Path(path).is_file():
        return [
            Check(
                "FAIL",
                "endpoints file",
                f"{path} does not exist: start the agents with 'aipo serve' first (e.g. "
                "aipo serve --config single_node python=/opt/sglang/bin/python)",
            )
        ], {}
    try:
        payload = executor_payload(recipe.executor_for_workers())
        agents = ExecutorConfig.model_validate(payload).agent_pool().agents
    except ValueError as exc:  # pydantic's ValidationError included
        return [Check("FAIL", "agents", str(exc).splitlines()[0])], {}
    checks = [Check("ok", "endpoints file", f"{path}: {', '.join(sorted(agents)) or 'no agents'}")]
    if not path:
        checks = [Check("warn", "endpoints file", "none set: no served agents")]
    hosts: dict[str, list[str]] = {}
    for name, agent in sorted(agents.items()):
        for host in sglang_hosts(agent.backend) or []:
            hosts.setdefault(host, []).append(name)
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        for host, names in hosts.items():
            problem = _health(client, host)
            label = f"agent {','.join(names)}"
            if problem is None:
                checks.append(Check("ok", label, f"http://{host}/health answers"))
            else:
                checks.append(Check("FAIL", label, f"http://{host}/health: {problem}"))
    return checks, agents


def _tokenizer_names(
    recipe: OpenRLHFRecipe, agents: dict[str, AgentConfig], launch_dir: Path
) -> dict[str, list[str]]:
    from policies import sglang_hosts
    from trainers.openrlhf.launcher import resolved_flags

    names: dict[str, list[str]] = {}
    policy = resolved_flags(recipe, launch_dir).get("actor.model_name_or_path")
    if isinstance(policy, str):
        names.setdefault(policy, []).append("policy")
    for name, agent in sorted(agents.items()):
        if agent.kind != "llm" or agent.backend in ("policy", "default"):
            continue  # no model, or not one of its own
        spec = agent.tokenizer if sglang_hosts(agent.backend) else agent.backend
        if spec:
            names.setdefault(spec, []).append(f"agent {name}")
    return names


def tokenizer_checks(
    recipe: OpenRLHFRecipe, agents: dict[str, AgentConfig], launch_dir: Path
) -> list[Check]:
    """Each tokenizer the run needs loads from the local cache, without the network."""
    from policies.loading import load_tokenizer

    checks = []
    for spec, users in _tokenizer_names(recipe, agents, launch_dir).items():
        label = f"tokenizer ({', '.join(users)})"
        try:
            load_tokenizer(spec, local_files_only=True)
        except (OSError, ValueError) as exc:
            if Path(spec).is_dir():
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                checks.append(Check("FAIL", label, f"{spec} does not load: {reason}"))
            else:
                checks.append(
                    Check(
                        "FAIL",
                        label,
                        f"{spec} is not in the local Hugging Face cache; "
                        f"fetch it first: hf download {spec}",
                    )
                )
        else:
            checks.append(Check("ok", label, f"{spec} loads offline"))
    return checks


def _uploaded(path: Path, working_dir: Path, excludes: list[str]) -> bool:
    """Whether ``path`` lies inside ``working_dir`` and outside every exclude pattern."""
    try:
        parts = path.relative_to(working_dir).parts
    except ValueError:
        return False
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in excludes:
        pattern = pattern.strip("/")
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, f"**/{pattern}") for p in prefixes
        ):
            return False
    return True


def output_checks(recipe: OpenRLHFRecipe, launch_dir: Path) -> list[Check]:
    """Where OpenRLHF writes: absolute, writable, not uploaded with the next job."""
    from trainers.openrlhf.launcher import OUTPUT_PATH_FLAGS, resolved_flags

    flags = resolved_flags(recipe, launch_dir)
    working_dir = recipe.ray.working_dir
    checks = []
    for name in OUTPUT_PATH_FLAGS:
        value = flags.get(name)
        if not isinstance(value, str):
            continue
        path = Path(value)
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not path.is_absolute():
            checks.append(Check("FAIL", name, f"{value} is relative"))
        elif not os.access(existing, os.W_OK):
            checks.append(Check("FAIL", name, f"{value}: {existing} is not writable"))
        elif working_dir is not None and _uploaded(
            path, (launch_dir / working_dir).resolve(), recipe.ray.excludes
        ):
            checks.append(
                Check(
                    "warn",
                    name,
                    f"{value} is inside ray.working_dir and not in "
                    "ray.excludes: the next launch would upload it",
                )
            )
        else:
            checks.append(Check("ok", name, value))
    return checks


def ray_check(recipe: OpenRLHFRecipe) -> list[Check]:
    """The Ray dashboard that ``ray job submit`` will talk to."""
    import httpx

    if not recipe.ray.submit:
        return [Check("ok", "ray", "the driver runs here and starts or joins Ray itself")]
    address = recipe.ray.address.rstrip("/")
    try:
        response = httpx.get(f"{address}/api/version", timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()
        version = json.loads(response.text).get("ray_version", "?")
    except (httpx.HTTPError, ValueError) as exc:
        return [
            Check(
                "FAIL",
                "ray dashboard",
                f"{address} does not answer ({type(exc).__name__}); start Ray first: on the "
                "head node 'ray start --head --port 6379 --dashboard-host 0.0.0.0 --num-gpus N' "
                "(N: the GPUs Ray may use), on every other node 'ray start --address HEAD_IP:6379'",
            )
        ]
    return [Check("ok", "ray dashboard", f"{address} answers (ray {version})")]


def run(args: argparse.Namespace) -> int:
    """Print one line per check; 1 if any FAILs."""
    from aipo.config import ConfigError
    from aipo.recipes import load_recipe

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the report says what each request found
    launch_dir = Path.cwd()
    checks = package_checks(gpu_present())
    try:
        recipe = load_recipe(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        checks.append(Check("FAIL", "recipe", str(exc).replace("\n", "; ")))
        recipe = None
    if recipe is not None:
        from aipo.commands.doctor_stack import attention_check, data_field_checks, logger_checks
        from trainers.openrlhf.launcher import resolved_flags

        flags = resolved_flags(recipe, launch_dir)
        checks.append(Check("ok", "recipe", f"{args.config} loads"))
        checks += flag_and_data_checks(recipe, launch_dir, args.config)
        checks += data_field_checks(flags, args.config)
        checks.append(attention_check(flags))
        checks += logger_checks(recipe, flags)
        agent_lines, agents = agent_checks(recipe)
        checks += agent_lines
        checks += tokenizer_checks(recipe, agents, launch_dir)
        checks += output_checks(recipe, launch_dir)
        checks += ray_check(recipe)
    for check in checks:
        print(check.render())
    failed = sum(c.status == "FAIL" for c in checks)
    print(f"{failed} check(s) failed" if failed else "no check failed")
    return 1 if failed else 0
