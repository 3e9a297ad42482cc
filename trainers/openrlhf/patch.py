"""Install :class:`AIPOPolicyLoss` as OpenRLHF's ``PolicyLoss`` in the current process.

OpenRLHF 0.11.2 builds its policy loss in ``ActorPPOTrainer.__init__`` from the name
``PolicyLoss`` that ``openrlhf/trainer/ray/ppo_actor.py`` imports from
``openrlhf.models``. Rebinding that name (in ``openrlhf.models``,
``openrlhf.models.loss`` and, if already imported, ``ppo_actor``) makes the stock
trainer build our subclass with the stock arguments; nothing else changes.

The trainer runs in Ray worker processes, so the launcher names :func:`install` as
the job's ``worker_process_setup_hook``: Ray calls it in every worker before any
actor code runs. Only workers that will import OpenRLHF's models pay for it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

#: Import path of :func:`install`, as Ray's ``worker_process_setup_hook`` wants it.
SETUP_HOOK = "trainers.openrlhf.patch.install"


def install() -> bool:
    """Rebind OpenRLHF's ``PolicyLoss`` to :class:`AIPOPolicyLoss`; returns whether it did.

    Idempotent. Returns False (and changes nothing) where openrlhf is not installed,
    so the hook is harmless in processes of other libraries.
    """
    if importlib.util.find_spec("openrlhf") is None:
        return False
    from trainers.openrlhf.loss import loss_config_from_env, make_aipo_policy_loss_class

    aipo_cls = make_aipo_policy_loss_class()
    import openrlhf.models
    import openrlhf.models.loss

    for module in (
        openrlhf.models,
        openrlhf.models.loss,
        sys.modules.get("openrlhf.trainer.ray.ppo_actor"),
    ):
        if module is not None:
            module.PolicyLoss = aipo_cls
    logger.info("AIPO policy loss installed (agent tokens: %s)", loss_config_from_env().agent_mode)
    return True


def uninstall() -> None:
    """Restore the stock ``PolicyLoss`` (for tests and interactive sessions)."""
    if "openrlhf.models.loss" not in sys.modules:
        return
    from trainers.openrlhf.loss import make_aipo_policy_loss_class

    stock = make_aipo_policy_loss_class().__mro__[1]
    for name in ("openrlhf.models", "openrlhf.models.loss", "openrlhf.trainer.ray.ppo_actor"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "PolicyLoss"):
            module.PolicyLoss = stock
