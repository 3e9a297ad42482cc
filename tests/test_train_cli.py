"""``aipo train`` through the one entry point: config errors, run-directory safety, dry runs.

No test here trains: each points ``policy.model`` at a path that does not exist, so
any attempt to load a model would fail with a different error than the one expected,
and the trainer's model loading is replaced by a recorder on top of that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aipo.cli import main
from trainers import run_state

# A Hugging Face id that is nowhere: loading it would fail (a local path is refused earlier).
MISSING_MODEL = "policy.model=nonexistent-org/aipo-model"


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every attempt of the trainer to load its policy model."""
    calls: list[str] = []

    def refuse(policy):
        calls.append(policy.model)
        raise AssertionError("the trainer loaded a model")

    monkeypatch.setattr(run_state, "load_policy", refuse)
    return calls


@pytest.mark.parametrize(
    ("override", "named", "expected"),
    [
        ("train.stepz=2", "train.stepz", "valid keys under 'train'"),
        ("loss.agent_mod=mask", "loss.agent_mod", "agent_mode"),
        ("train.steps=0", "train.steps", "1 <= value"),
        ("rollout.temperature=-1", "rollout.temperature", "0.0 <= value"),
        ("policy.backend=http://127.0.0.1:1", "policy.backend", "sglang://host:port"),
        ("policy.sglang_options={timeout: 3}", "policy.sglang_options", "timeout_s"),
    ],
)
def test_bad_override_is_rejected_by_name_before_any_model_loads(
    override: str,
    named: str,
    expected: str,
    tmp_path: Path,
    model_loads: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", MISSING_MODEL, f"run_dir={run_dir}", override, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and expected in err
    assert "nonexistent" not in err  # a config error, not a model-loading error
    assert model_loads == []
    assert not run_dir.exists()


def test_existing_run_dir_is_refused_without_resume(
    tmp_path: Path, model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    code = main(["train", MISSING_MODEL, f"run_dir={run_dir}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "already holds a run" in err and "--resume" in err and str(run_dir) in err
    assert model_loads == []
    # Nothing of the earlier run was touched.
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "reward_mean": 0.5}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_dry_run_prints_the_validated_config_with_overrides(
    tmp_path: Path, model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            MISSING_MODEL,
            f"run_dir={run_dir}",
            "train.steps=3",
            "loss.agent_mode=mask",
            "policy.backend=sglang://127.0.0.1:30000,127.0.0.1:30001",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    printed = json.loads(out)
    assert printed["train"]["steps"] == 3
    assert printed["loss"]["agent_mode"] == "mask"
    assert printed["policy"]["backend"] == "sglang://127.0.0.1:30000,127.0.0.1:30001"
    assert printed["policy"]["model"] == "nonexistent-org/aipo-model"
    # Untouched keys keep the packaged defaults, validated and complete.
    assert printed["rollout"]["n_samples"] == 4
    assert set(printed["agents"]["agents"]) == {"verify", "knowledge", "reasoning"}
    assert model_loads == []
    assert not run_dir.exists()


def test_openrlhf_recipe_goes_through_the_same_loader(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = Path(__file__).resolve().parents[1] / "configs" / "openrlhf" / "grpo_1node.yaml"
    code = main(
        ["train", "--engine", "openrlhf", "--config", str(recipe), "executor.env.max_turnz=2"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown config key 'executor.env.max_turnz'; valid keys under 'executor.env'" in err
