"""Keeping the policy's generator on the trainer's weights: pausing generation, publishing updates.

The embedded generator serves the very module the optimizer updates, so there is no
weight copy: the update runs while its decode loop is held (:func:`generation_paused`)
and afterwards the generator is told the version changed, which drops its cached
prefixes. SGLang servers keep their own copy: :func:`publish_weights` saves the
trainer's model to ``run_dir/weights/step_<version>/`` (safetensors, renamed into place
only once complete), has every server load it with ``/update_weights_from_disk`` and
then flushes their prefix caches, so no rollout reuses keys/values computed under old
weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from policies.base import Generator
from trainers import heap

WEIGHTS_DIR = "weights"


@contextlib.asynccontextmanager
async def generation_paused(generator: Generator) -> AsyncIterator[None]:
    """Hold the embedded generator's decode loop while its module's weights change.

    While held, the generator's cached prefixes and weight copies are dropped
    (``release_memory``): the new weights make them stale, and the update needs the memory.
    Free heap pages are given back on the way in and out (:func:`trainers.heap.trim`), so
    neither the rollout's nor the update's leftovers add to the other's peak.
    """
    paused = getattr(generator, "paused", None)
    if paused is None:  # remote servers keep their own copy; nothing to hold
        yield
        return
    async with paused():
        release = getattr(generator, "release_memory", None)
        if release is not None:
            release()
        heap.trim()
        try:
            yield
        finally:
            heap.trim()


async def publish_weights(
    generator: Generator,
    model: torch.nn.Module,
    version: int,
    *,
    backend: str,
    run_dir: Path,
) -> None:
    """Make ``generator`` serve ``model``'s current weights as ``version``.

    ``backend``: the run's ``policy.backend``; ``"embedded"`` only announces the new
    version (the generator already holds ``model``), anything else goes through
    :func:`publish_to_servers`.
    """
    if backend == "embedded":
        generator.weights_updated(version)  # type: ignore[attr-defined]
        return
    await publish_to_servers(generator, model, version, run_dir / WEIGHTS_DIR)


async def publish_to_servers(
    generator: Generator, model: torch.nn.Module, version: int, root: Path
) -> Path:
    """Save the weights to ``root/step_<version>``, load them on every server, flush caches.

    The directory is written under a temporary name and renamed once complete, so a
    server never reads a half-written file; older versions are removed after every
    server has loaded the new one. Returns the published directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{version:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # An absolute path: the servers' working directory is not ours.
    await generator.update_weights_from_disk(str(final.resolve()), version)  # type: ignore[attr-defined]
    # The servers' radix caches hold keys/values of the old weights; drop them.
    await generator.flush_cache()  # type: ignore[attr-defined]
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final
