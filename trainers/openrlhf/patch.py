"""Install :class:`AIPOPolicyLoss` as OpenRLHF's ``PolicyLoss``, without touching CUDA.

OpenRLHF 0.11.2 builds its policy loss in ``ActorPPOTrainer.__init__`` from the name
``PolicyLoss`` that ``openrlhf/trainer/ray/ppo_actor.py`` imports from
``openrlhf.models``. Rebinding that name (in ``openrlhf.models``,
``openrlhf.models.loss`` and, if already imported, ``ppo_actor``) makes the stock
trainer build our subclass with the stock arguments; nothing else changes.

The trainer runs in Ray worker processes, so the launcher names :func:`install` as
the job's ``worker_process_setup_hook``. Ray runs that hook when a worker process
starts, *before* it assigns the worker its GPUs (``CUDA_VISIBLE_DEVICES`` is set when
the actor's first task runs). Importing ``openrlhf.models`` there would import
transformers and DeepSpeed, which probe CUDA; a process that has initialised CUDA
ignores later changes of ``CUDA_VISIBLE_DEVICES``, so every rank of a node would take
the same GPU. The hook therefore imports nothing heavy: it puts a finder on
``sys.meta_path`` that rebinds ``PolicyLoss`` right after ``openrlhf.models`` is
executed, i.e. when OpenRLHF's own actor code imports it, after Ray has set the GPUs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

#: Import path of :func:`install`, as Ray's ``worker_process_setup_hook`` wants it.
SETUP_HOOK = "trainers.openrlhf.patch.install"
#: Set to ``1`` to run AIPO's loss on an OpenRLHF other than the pinned release.
ALLOW_VERSION_ENV = "AIPO_ALLOW_OPENRLHF_VERSION"

#: The package whose import triggers the rebinding.
_TRIGGER = "openrlhf.models"
#: Modules whose ``PolicyLoss`` name is rebound.
_REBOUND_IN = ("openrlhf.models", "openrlhf.models.loss", "openrlhf.trainer.ray.ppo_actor")


class OpenRLHFVersionError(RuntimeError):
    """The installed OpenRLHF is not the release AIPO's policy loss is written against."""


def check_openrlhf_version(environ: Mapping[str, str] | None = None) -> str | None:
    """The installed OpenRLHF version (None if absent); raises unless it is the pinned one.

    ``PolicyLoss.forward``'s return tuple changed within 0.11.x, so the subclass is tied
    to :data:`~trainers.openrlhf.flags.OPENRLHF_VERSION`. ``ALLOW_VERSION_ENV=1`` in
    ``environ`` (default ``os.environ``) turns the refusal into a warning.

    Raises:
        OpenRLHFVersionError: another version is installed and the override is not set.
    """
    from trainers.openrlhf import flags

    installed = flags.installed_openrlhf_version()
    if installed is None or installed == flags.OPENRLHF_VERSION:
        return installed
    env = os.environ if environ is None else environ
    if env.get(ALLOW_VERSION_ENV) == "1":
        logger.warning(
            "OpenRLHF %s is installed; AIPO's policy loss is written against %s (%s=1 set)",
            installed,
            flags.OPENRLHF_VERSION,
            ALLOW_VERSION_ENV,
        )
        return installed
    raise OpenRLHFVersionError(
        f"OpenRLHF {installed} is installed; AIPO's policy loss is written against "
        f"openrlhf=={flags.OPENRLHF_VERSION} (PolicyLoss.forward's return tuple changed within "
        f"0.11.x). Install openrlhf=={flags.OPENRLHF_VERSION} on every node, or set "
        f"{ALLOW_VERSION_ENV}=1 to run anyway (in your shell and in the recipe's ray.env_vars, "
        "so the workers see it too)"
    )


def _rebind() -> None:
    """Point every ``PolicyLoss`` name OpenRLHF's trainer reads at :class:`AIPOPolicyLoss`."""
    from trainers.openrlhf.loss import (
        LOSS_CONFIG_ENV,
        loss_config_from_env,
        make_aipo_policy_loss_class,
    )

    aipo_cls = make_aipo_policy_loss_class()  # subclass of the stock class, built first
    for name in _REBOUND_IN:
        module = sys.modules.get(name)
        if module is not None:
            module.PolicyLoss = aipo_cls
    if not os.environ.get(LOSS_CONFIG_ENV):
        logger.warning(
            "%s is not set in this process: AIPO's policy loss trains agent tokens in mode "
            "'mask' (the job's runtime env did not reach it)",
            LOSS_CONFIG_ENV,
        )
    # WARNING: OpenRLHF configures only its own logger, so INFO from a worker is dropped.
    logger.warning(
        "AIPO policy loss installed (agent tokens: %s)", loss_config_from_env().agent_mode
    )


class _RebindingLoader(importlib.abc.Loader):
    """The real loader of ``openrlhf.models``, then :func:`_rebind`."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        # Hand the module its own loader back: nothing of ours stays behind in it.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _rebind()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _RebindOnImport(importlib.abc.MetaPathFinder):
    """Finds ``openrlhf.models`` like the other finders do, with a loader that rebinds after it."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _RebindingLoader(spec.loader)
        return spec


def _finders() -> list[_RebindOnImport]:
    return [f for f in sys.meta_path if isinstance(f, _RebindOnImport)]


def install() -> bool:
    """Make OpenRLHF's ``PolicyLoss`` :class:`AIPOPolicyLoss` in this process; returns whether it will be.

    Where ``openrlhf.models`` is already imported, rebinds now; otherwise registers the
    rebinding for the moment it is imported, and imports nothing itself (no torch, no
    CUDA: safe as a Ray setup hook). Idempotent. Returns False, changing nothing, where
    openrlhf is not installed, so the hook is harmless in processes of other libraries.

    Raises:
        OpenRLHFVersionError: see :func:`check_openrlhf_version`.
    """
    if importlib.util.find_spec("openrlhf") is None:
        return False
    check_openrlhf_version()
    if _TRIGGER in sys.modules:
        _rebind()
    elif not _finders():
        sys.meta_path.insert(0, _RebindOnImport())
    return True


def uninstall() -> None:
    """Undo :func:`install`: no pending rebinding, the stock ``PolicyLoss`` back (tests, sessions)."""
    for finder in _finders():
        sys.meta_path.remove(finder)
    if "openrlhf.models.loss" not in sys.modules:
        return
    from trainers.openrlhf.loss import make_aipo_policy_loss_class

    stock = make_aipo_policy_loss_class().__mro__[1]
    for name in _REBOUND_IN:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "PolicyLoss"):
            module.PolicyLoss = stock
