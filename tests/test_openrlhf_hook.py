"""The Ray setup hook installs AIPO's loss without touching CUDA, and refuses another OpenRLHF.

Ray runs ``worker_process_setup_hook`` when a worker process starts and sets
``CUDA_VISIBLE_DEVICES`` only when the actor's task runs; a hook that imported torch,
transformers or DeepSpeed (which probe CUDA) would pin every rank of a node to the
same GPU. These tests run the hook in fresh processes, once by hand and once as Ray
itself runs it in real workers.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainers.openrlhf import patch
from trainers.openrlhf.loss import LOSS_CONFIG_ENV

pytest.importorskip("openrlhf", reason="openrlhf not installed")

REPO = Path(__file__).resolve().parents[1]
#: Modules that initialise CUDA on import, or import something that does.
HEAVY = ("torch", "transformers", "deepspeed", "vllm", "openrlhf", "flash_attn")


def _ppo_actor_policy_loss_import() -> str:
    """The statement by which OpenRLHF's ``ppo_actor.py`` gets ``PolicyLoss``, from its source."""
    import importlib.util

    origin = importlib.util.find_spec("openrlhf").submodule_search_locations[0]
    source = Path(origin, "trainer", "ray", "ppo_actor.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and "PolicyLoss" in {a.name for a in node.names}:
            return ast.unparse(node)
    raise AssertionError("ppo_actor.py no longer imports PolicyLoss at module level")


def _run(script: str, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hook_imports_nothing_heavy_and_openrlhfs_own_import_gets_aipos_loss():
    ppo_actor_import = _ppo_actor_policy_loss_import()
    assert ppo_actor_import.startswith("from openrlhf.models import")
    report = _run(
        f"""
        import json, sys
        from trainers.openrlhf.patch import install
        installed = install()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        # What Ray does next, for the actor's task: choose the GPUs, then import OpenRLHF.
        namespace = {{}}
        exec({ppo_actor_import!r}, namespace)  # ppo_actor.py's own import of PolicyLoss
        import openrlhf.models, openrlhf.models.loss
        cls = namespace["PolicyLoss"]
        print(json.dumps({{
            "installed": installed,
            "heavy_after_hook": heavy,
            "ppo_actor": cls.__qualname__,
            "models": openrlhf.models.PolicyLoss.__qualname__,
            "models_loss": openrlhf.models.loss.PolicyLoss.__qualname__,
            "base": cls.__mro__[1].__module__ + "." + cls.__mro__[1].__qualname__,
            "agent_mode": cls().agent_loss.agent_mode,
            "loader_restored": "Rebinding" not in type(openrlhf.models.__loader__).__name__,
        }}))
        """,
        **{LOSS_CONFIG_ENV: json.dumps({"agent_mode": "ratio"})},
    )
    assert report["installed"] is True
    assert report["heavy_after_hook"] == []
    assert report["ppo_actor"] == report["models"] == report["models_loss"] == "AIPOPolicyLoss"
    assert report["base"] == "openrlhf.models.loss.PolicyLoss"
    assert report["agent_mode"] == "ratio"
    assert report["loader_restored"]


def test_uninstall_before_openrlhf_is_imported_leaves_the_stock_loss():
    report = _run(
        """
        import json
        from trainers.openrlhf.patch import install, uninstall
        install(); install(); uninstall()
        import openrlhf.models
        print(json.dumps({"models": openrlhf.models.PolicyLoss.__qualname__}))
        """
    )
    assert report["models"] == "PolicyLoss"


def test_setup_hook_in_real_ray_workers_started_by_the_driver(tmp_path):
    """``ray.submit: false``: the entry module starts Ray; its workers get the hook and the configs."""
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"agents": {"verify": {"backend": "sglang://10.0.0.3:1"}}}))
    recipe = REPO / "configs" / "openrlhf" / "grpo_1node.yaml"
    report = _run(
        f"""
        import json, os, sys
        import ray
        from aipo.config import load_config
        from trainers.openrlhf.config import OpenRLHFRecipe, RUNTIME_ENV_ENV
        from trainers.openrlhf.entry import start_ray
        from trainers.openrlhf.launcher import runtime_env

        recipe = load_config(OpenRLHFRecipe, {str(recipe)!r}, [
            "ray.submit=false", "ray.working_dir=null",
            "executor.endpoints_file={endpoints}", "agent_loss.agent_mode=ratio",
        ])
        start_ray({{RUNTIME_ENV_ENV: json.dumps(runtime_env(recipe))}})

        @ray.remote(num_cpus=0)
        def probe():
            import os, sys
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
            import openrlhf.models
            from trainers.openrlhf.config import ExecutorConfig
            executor = ExecutorConfig.model_validate_json(os.environ["AIPO_OPENRLHF_EXECUTOR"])
            return {{
                "heavy_at_task_start": heavy,
                "policy_loss": openrlhf.models.PolicyLoss.__qualname__,
                "agent_mode": openrlhf.models.PolicyLoss().agent_loss.agent_mode,
                "served": sorted(executor.endpoints.agents),
                "nccl_debug": os.environ.get("NCCL_DEBUG"),
            }}

        report = ray.get(probe.remote())
        ray.shutdown()
        print(json.dumps(report))
        """,
        RAY_ADDRESS="local",  # a cluster of its own, even where 'ray start' runs one
    )
    assert report["heavy_at_task_start"] == []
    assert report["policy_loss"] == "AIPOPolicyLoss"
    assert report["agent_mode"] == "ratio"
    assert report["served"] == ["verify"]
    assert report["nccl_debug"] == os.environ.get("NCCL_DEBUG", "WARN")


def test_a_worker_without_the_loss_config_says_so(monkeypatch, caplog):
    pytest.importorskip("openrlhf.models", reason="openrlhf's models do not import here")
    monkeypatch.delenv(LOSS_CONFIG_ENV, raising=False)
    monkeypatch.delenv(patch.ALLOW_VERSION_ENV, raising=False)
    try:
        with caplog.at_level("WARNING", logger="trainers.openrlhf.patch"):
            assert patch.install()  # openrlhf.models is imported here: rebinds at once
    finally:
        patch.uninstall()
    assert f"{LOSS_CONFIG_ENV} is not set in this process" in caplog.text
    assert "'mask'" in caplog.text


# -- the version guard ---------------------------------------------------------------------


@pytest.fixture
def openrlhf_0_11_3(monkeypatch):
    """The installed OpenRLHF reports version 0.11.3."""
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.11.3" if name == "openrlhf" else real(name)
    )
    monkeypatch.delenv(patch.ALLOW_VERSION_ENV, raising=False)


def test_install_refuses_another_openrlhf_naming_both_versions_and_the_override(openrlhf_0_11_3):
    try:
        with pytest.raises(patch.OpenRLHFVersionError) as err:
            patch.install()
    finally:
        patch.uninstall()
    message = str(err.value)
    assert "OpenRLHF 0.11.3 is installed" in message and "openrlhf==0.11.2" in message
    assert f"{patch.ALLOW_VERSION_ENV}=1" in message


def test_the_override_lets_install_proceed(openrlhf_0_11_3, monkeypatch):
    monkeypatch.setenv(patch.ALLOW_VERSION_ENV, "1")
    try:
        assert patch.install() is True
    finally:
        patch.uninstall()


def test_the_launcher_refuses_another_openrlhf_before_building_anything(openrlhf_0_11_3):
    from aipo.config import load_config
    from trainers.openrlhf.config import OpenRLHFRecipe
    from trainers.openrlhf.launcher import run_openrlhf

    recipe = load_config(
        OpenRLHFRecipe, REPO / "configs" / "openrlhf" / "grpo_1node.yaml", ["ray.submit=false"]
    )
    with pytest.raises(patch.OpenRLHFVersionError, match="0.11.3"):
        run_openrlhf(recipe, dry_run=True)


def test_aipo_train_reports_another_openrlhf_as_an_error(openrlhf_0_11_3, capsys):
    from aipo.cli import main

    recipe = REPO / "configs" / "openrlhf" / "grpo_1node.yaml"
    assert main(["train", "--engine", "openrlhf", "--config", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "aipo train: OpenRLHF 0.11.3 is installed" in err and patch.ALLOW_VERSION_ENV in err
