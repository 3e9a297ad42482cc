"""Driver of an OpenRLHF run: AIPO's setup checked and Ray started, then ``openrlhf.cli.train_ppo_ray``.

``python -m trainers.openrlhf.entry <OpenRLHF flags>``, started by the launcher in one
of two ways, each of which brings the setup hook (:data:`~trainers.openrlhf.patch.SETUP_HOOK`)
and the configs (:data:`~trainers.openrlhf.loss.LOSS_CONFIG_ENV`,
:data:`~trainers.openrlhf.config.EXECUTOR_CONFIG_ENV`) to every Ray worker:

* ``ray job submit``: the job's runtime env already carries them (and
  :data:`~trainers.openrlhf.config.HOOK_MARKER_ENV`); OpenRLHF's own ``ray.init``
  joins that runtime env, adding its three variables.
* run here (``ray.submit: false``): the launcher hands the runtime env over as JSON in
  :data:`~trainers.openrlhf.config.RUNTIME_ENV_ENV`; this module starts Ray with it
  (plus OpenRLHF's three variables), before OpenRLHF would start it without them.

Started any other way, it refuses to run: without them OpenRLHF's workers would train
with the stock ``PolicyLoss`` and the executor's defaults, and nothing would say so.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections.abc import Mapping, Sequence
from typing import Any


class DriverSetupError(RuntimeError):
    """The driver was started without what AIPO's Ray workers need."""


def check_worker_env(env_vars: Mapping[str, str], where: str) -> None:
    """Both AIPO configs are in ``env_vars`` and parse; ``where`` names their origin in the error.

    Raises:
        DriverSetupError: one is missing or does not parse (named).
    """
    from trainers.openrlhf.config import EXECUTOR_CONFIG_ENV, ExecutorConfig
    from trainers.openrlhf.loss import LOSS_CONFIG_ENV, loss_config_from_env

    missing = [name for name in (LOSS_CONFIG_ENV, EXECUTOR_CONFIG_ENV) if not env_vars.get(name)]
    if missing:
        raise DriverSetupError(
            f"{', '.join(missing)} missing from {where}: the workers would run OpenRLHF's stock "
            "PolicyLoss and the executor's defaults; launch with 'aipo train --engine openrlhf "
            "--config RECIPE'"
        )
    try:
        loss_config_from_env(env_vars)
        ExecutorConfig.model_validate(json.loads(env_vars[EXECUTOR_CONFIG_ENV]))
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError included
        raise DriverSetupError(f"bad AIPO config in {where}: {exc}") from exc


def driver_runtime_env(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The runtime env this driver must start Ray with; None for a submitted job (Ray has it).

    Raises:
        DriverSetupError: neither a submitted job's marker nor a handed-over runtime env
            is present, or what is there lacks the setup hook or a config (named).
    """
    from trainers.openrlhf.config import HOOK_MARKER_ENV, RUNTIME_ENV_ENV
    from trainers.openrlhf.flags import OPENRLHF_RAY_ENV_DEFAULTS
    from trainers.openrlhf.patch import SETUP_HOOK

    raw = environ.get(RUNTIME_ENV_ENV)
    if raw:
        try:
            runtime = json.loads(raw)
        except ValueError as exc:
            raise DriverSetupError(f"{RUNTIME_ENV_ENV} is not JSON: {exc}") from exc
        hook = runtime.get("worker_process_setup_hook")
        if hook != SETUP_HOOK:
            raise DriverSetupError(
                f"{RUNTIME_ENV_ENV} names worker_process_setup_hook {hook!r}; expected {SETUP_HOOK!r}"
            )
        env_vars = dict(runtime.get("env_vars") or {})
        check_worker_env(env_vars, RUNTIME_ENV_ENV)
        for name, default in OPENRLHF_RAY_ENV_DEFAULTS.items():
            # What OpenRLHF's own ray.init would have set (it is skipped once Ray runs).
            env_vars.setdefault(name, environ.get(name, default))
        return {**runtime, "env_vars": env_vars}
    if environ.get(HOOK_MARKER_ENV):
        check_worker_env(environ, "the submitted job's runtime env")
        return None
    raise DriverSetupError(
        f"neither {RUNTIME_ENV_ENV} nor {HOOK_MARKER_ENV} is set: this driver was not started "
        f"by the launcher, so Ray's workers would get no setup hook ({SETUP_HOOK}) and no AIPO "
        "config, and would train with OpenRLHF's stock PolicyLoss; launch with 'aipo train "
        "--engine openrlhf --config RECIPE' (add --dry-run to see the command)"
    )


def start_ray(environ: Mapping[str, str] | None = None) -> None:
    """Start Ray with AIPO's runtime env where this driver must (see :func:`driver_runtime_env`)."""
    runtime = driver_runtime_env(os.environ if environ is None else environ)
    if runtime is not None:
        import ray

        ray.init(runtime_env=runtime)


def main(argv: Sequence[str] | None = None) -> None:
    """Run OpenRLHF's PPO entry point with AIPO's policy loss installed everywhere."""
    from trainers.openrlhf.patch import OpenRLHFVersionError, install
    from trainers.openrlhf.recipe_secrets import MissingSecretError, fill_secrets

    flags = list(sys.argv[1:] if argv is None else argv)
    try:
        install()  # here too: checks the version before any worker starts
        # env:NAME values (the W&B key) come from this driver's environment, here only.
        flags = fill_secrets(flags, os.environ)
        start_ray()
    except (DriverSetupError, OpenRLHFVersionError, MissingSecretError) as exc:
        print(f"trainers.openrlhf.entry: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = ["train_ppo_ray", *flags]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
