"""Driver of an OpenRLHF run: install AIPO's loss, then run ``openrlhf.cli.train_ppo_ray``.

``python -m trainers.openrlhf.entry <OpenRLHF flags>``. Under ``ray job submit`` the
job's runtime env already names :func:`trainers.openrlhf.patch.install` as the
workers' setup hook; run directly on a head node, this module starts Ray with that
hook itself (before OpenRLHF would start it without one).
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Run OpenRLHF's PPO entry point with AIPO's policy loss installed everywhere."""
    from trainers.openrlhf.launcher import EXECUTOR_CONFIG_ENV, HOOK_MARKER_ENV
    from trainers.openrlhf.loss import LOSS_CONFIG_ENV
    from trainers.openrlhf.patch import SETUP_HOOK, install

    install()
    if not os.environ.get(HOOK_MARKER_ENV):
        import ray

        passed = {
            k: os.environ[k] for k in (LOSS_CONFIG_ENV, EXECUTOR_CONFIG_ENV) if k in os.environ
        }
        # OpenRLHF's own defaults for the variables it would set in its ray.init.
        passed.setdefault(
            "TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "true")
        )
        passed.setdefault("NCCL_DEBUG", os.environ.get("NCCL_DEBUG", "WARN"))
        passed.setdefault(
            "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS",
            os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
        )
        ray.init(runtime_env={"env_vars": passed, "worker_process_setup_hook": SETUP_HOOK})
    sys.argv = ["train_ppo_ray", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
