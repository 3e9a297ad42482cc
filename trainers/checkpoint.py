"""Resumable checkpoints: ``run_dir/checkpoints/step_XXXXXX/`` plus a ``latest`` pointer.

A checkpoint directory is a loadable Hugging Face model directory (safetensors weights,
config, tokenizer) with the trainer's state beside it:

    step_000100/
        model.safetensors, config.json, tokenizer files   (AutoModelForCausalLM.from_pretrained works)
        optimizer.pt       optimizer state_dict
        scheduler.pt       LR scheduler state_dict
        rng.pt             python, numpy, torch CPU and CUDA generator states
        trainer_state.json step, data position (whatever JSON the trainer passes), run config

Saving is atomic: everything is written to ``checkpoints/.tmp-step_XXXXXX-<pid>/`` and
renamed into place, and the ``latest`` pointer is replaced (also by rename) only after
that. A process killed mid-save leaves the previous checkpoint and pointer intact; the
leftover temporary directory is removed by the next save.

A checkpoint damaged on disk afterwards (a truncated weights, optimizer, scheduler, RNG
or state file) is read in full before anything is restored, so the error names the
file; :func:`restore_latest` then falls back to the newest older checkpoint that reads
whole, with a warning naming the damaged one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or cannot be read; the message names the file."""


@dataclass
class CheckpointState:
    """A saved checkpoint as read back by :func:`load_latest`."""

    path: Path  #: the step directory (a loadable HF model directory)
    step: int  #: trainer step at which it was saved
    data_position: dict[str, Any]  #: what the trainer passed to save (epoch, sampler state, ...)
    config: dict[str, Any] | None  #: the run config, as JSON


def step_dir_name(step: int) -> str:
    """``step_000042`` for step 42."""
    return f"step_{step:06d}"


def should_save(step: int, every: int) -> bool:
    """Whether to checkpoint after ``step`` (1-based count of completed steps) when saving every ``every``."""
    return every > 0 and step > 0 and step % every == 0


def capture_rng_state() -> dict[str, Any]:
    """The states of every random generator the trainer draws from."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def apply_rng_state(state: dict[str, Any]) -> None:
    """Put every random generator back in the state :func:`capture_rng_state` recorded."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_json(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def _disk_full(exc: BaseException, where: Path) -> bool:
    """Whether a failed write failed because the disk is full."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    tokenizer: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    data_position: dict[str, Any] | None = None,
    config: Any = None,
    keep_last: int = 3,
    rng_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the last ``keep_last``.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints/``.
        step: the trainer step just completed.
        model: a Hugging Face model (saved with ``save_pretrained``, safetensors).
        tokenizer: saved beside the model so the directory loads on its own.
        optimizer, scheduler: their ``state_dict``s are saved when given.
        data_position: JSON-serialisable position in the data (epoch, sampler state, ...).
        config: the run config (pydantic model or dict), saved as JSON.
        keep_last: how many step directories to keep (oldest removed first; >= 1).
        rng_state: the generators' states to record, from :func:`capture_rng_state` at the
            end of ``step`` (default: captured now).

    Returns:
        The final step directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)

    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state if rng_state is not None else capture_rng_state(), tmp / "rng.pt")
        # Written last: a step directory with trainer_state.json is complete.
        (tmp / TRAINER_STATE).write_text(
            json.dumps(
                {
                    "step": step,
                    "data_position": data_position or {},
                    "config": _config_json(config),
                },
                indent=2,
            )
        )
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            trash = root / f".tmp-{name}-old-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RuntimeError | OSError) and _disk_full(exc, root):
            # torch.save reports a full disk as "unexpected pos ..." from its zip writer.
            raise OSError(
                errno.ENOSPC, f"no space left on device while saving checkpoint {final}"
            ) from exc
        raise
    _write_text_atomic(root / LATEST, name + "\n")

    for old_step, old_dir in _step_dirs(root)[:-keep_last]:
        if old_dir != final:
            shutil.rmtree(old_dir, ignore_errors=True)
            logger.debug("removed old checkpoint step %d", old_step)
    return final


def _read(path: Path, reader: Any) -> Any:
    """``reader(path)``, or :class:`CheckpointError` naming ``path`` when it is missing or damaged."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as exc:  # truncated or corrupt: each reader fails its own way
        raise CheckpointError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc


def _torch_file(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def read_state(path: str | Path) -> CheckpointState:
    """The :class:`CheckpointState` of step directory ``path``; CheckpointError when unreadable."""
    path = Path(path)
    meta = _read(path / TRAINER_STATE, lambda p: json.loads(p.read_text()))
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path / TRAINER_STATE} is damaged (no 'step' in it)")
    return CheckpointState(
        path=path,
        step=int(meta["step"]),
        data_position=meta.get("data_position") or {},
        config=meta.get("config"),
    )


def _candidates(run_dir: str | Path, max_step: int | None = None) -> list[Path]:
    """Complete step directories, the one ``latest`` points to first, then newest first.

    ``max_step``: only steps up to it (the pointer is then ignored when it points past it).
    """
    root = Path(run_dir) / CHECKPOINTS
    ordered = [
        path for step, path in reversed(_step_dirs(root)) if max_step is None or step <= max_step
    ]
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate in ordered:
            ordered = [candidate] + [p for p in ordered if p != candidate]
        elif not (candidate / TRAINER_STATE).is_file():
            logger.warning(
                "%s points to missing %s; using the newest checkpoint", pointer, candidate
            )
    return ordered


def load_latest(run_dir: str | Path) -> CheckpointState | None:
    """The checkpoint ``latest`` points to, or the newest complete one, or ``None`` if there is none.

    A checkpoint whose ``trainer_state.json`` cannot be read is skipped with a warning.
    """
    for path in _candidates(run_dir):
        try:
            return read_state(path)
        except CheckpointError as exc:
            logger.warning("skipping a damaged checkpoint: %s", exc)
    return None


def read_model_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of ``checkpoint_dir`` (CheckpointError names a bad file)."""
    from safetensors.torch import load_file

    directory = Path(checkpoint_dir)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read(file, lambda p: load_file(str(p))))
    return state


def _apply_weights(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{directory} has weights the model lacks: {result.unexpected_keys[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [
        k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs
    ]
    if untied:
        raise ValueError(f"{directory} lacks weights for {untied[:5]}")


def restore(
    state: CheckpointState,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint's weights, optimizer, scheduler and RNG states in place.

    Build the model, optimizer and scheduler exactly as for a fresh run, then call this
    (or load the model with ``from_pretrained(state.path)`` and pass ``model=None``).
    Every file is read before anything changes, so a damaged one raises
    :class:`CheckpointError` naming it and leaves the objects as they were.
    Returns the saved data position, for the trainer to continue from.
    """
    weights = read_model_weights(state.path) if model is not None else None
    optim_state = _read(state.path / "optimizer.pt", _torch_file) if optimizer is not None else None
    sched_state = _read(state.path / "scheduler.pt", _torch_file) if scheduler is not None else None
    rng = _read(state.path / "rng.pt", _torch_file) if restore_rng else None
    if model is not None and weights is not None:
        _apply_weights(model, weights, state.path)
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    if rng is not None:
        try:
            apply_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{state.path / 'rng.pt'} is damaged ({type(exc).__name__}: {exc})"
            ) from exc
    return dict(state.data_position)


def restore_latest(
    run_dir: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    max_step: int | None = None,
) -> CheckpointState | None:
    """:func:`restore` the newest checkpoint that reads whole; None when the run has none.

    A damaged checkpoint is skipped with a warning naming the file, and the previous
    complete one is restored instead. ``max_step``: the newest at or before that step
    (a run whose state was committed elsewhere at that step, e.g. several peers').

    Raises:
        CheckpointError: every checkpoint is damaged (each one named).
    """
    damaged: list[str] = []
    for path in _candidates(run_dir, max_step):
        try:
            state = read_state(path)
            restore(
                state,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                restore_rng=restore_rng,
            )
        except CheckpointError as exc:
            damaged.append(str(exc))
            logger.warning("checkpoint %s is damaged: %s; trying the previous one", path.name, exc)
            continue
        if damaged:
            logger.warning("resuming from %s instead of the damaged newer checkpoint", path)
        return state
    if damaged:
        raise CheckpointError(
            "no checkpoint of this run can be read: "
            + "; ".join(damaged)
            + ". Delete the damaged ones to start over, or restore them from a copy"
        )
    return None
