"""Bad configs fail before anything loads, in one line that names the problem (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aipo.cli import main
from trainers import run_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(policy):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_state, "load_policy", refuse)


def train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit code and stderr of ``aipo train --dry-run ARGS``; stdout stays in ``capsys``."""
    code = main(["train", "--dry-run", *args])
    captured = capsys.readouterr()
    print(captured.out, end="")
    return code, captured.err


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  plot: [true,\n")
    code, err = train(capsys, "--config", str(bad))
    assert code == 2
    assert f"{bad}:4:1: not valid YAML" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override", ["train.steps=true", "optim.lr=false"])
def test_a_switch_where_a_number_belongs_is_refused(capsys, override: str) -> None:
    code, err = train(capsys, override)
    assert code == 2 and "is not a number" in err and override.split("=")[0] in err


def test_an_unknown_task_names_the_closest_ones(capsys) -> None:
    code, err = train(capsys, "task.name=rg:chain_sum_esy")
    assert code == 2 and "unknown task 'rg:chain_sum_esy'" in err
    assert "did you mean 'rg:chain_sum_easy'" in err


def test_a_model_path_that_does_not_exist_is_named(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    code, err = train(capsys, f"policy.model={missing}")
    assert code == 2 and f"model path '{missing}' does not exist" in err


def test_a_negative_seed_is_refused(capsys) -> None:
    code, err = train(capsys, "seed=-1")
    assert code == 2 and "seed: -1 is out of range" in err


def test_an_sglang_agent_without_a_tokenizer_is_refused(capsys) -> None:
    code, err = train(capsys, "agents.agents.knowledge.backend=sglang://127.0.0.1:30000")
    assert code == 2 and "agents.agents.knowledge.tokenizer is not set" in err


def test_an_empty_config_file_is_valid(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, err = train(capsys, "--config", str(empty))
    assert code == 0, err
    # The env's context follows the policy's when left at its default.
    assert '"max_total_tokens": 1024' in capsys.readouterr().out


def test_a_run_dir_that_cannot_be_written_is_named_before_anything_loads(
    tmp_path: Path, capsys
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["train", f"run_dir={blocker / 'run'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err and "a-file" in err


def test_a_failed_start_leaves_nothing_that_blocks_a_rerun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "rollouts").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")  # opened, never written: the start failed
    (run_dir / "config.yaml").write_text("seed: 0\n")
    run_state.check_run_dir(run_dir, resume=False)  # no error
    (run_dir / "rollouts" / "step_000000.jsonl").write_text('{"trajectory_id": "a"}\n')
    with pytest.raises(run_state.RunDirError, match="already holds a run"):
        run_state.check_run_dir(run_dir, resume=False)


def test_a_full_disk_is_said_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno
    import shutil

    import torch

    from trainers import checkpoint
    from trainers.embedded import EmbeddedTrainer

    def unexpected_pos(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", unexpected_pos)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))

    class Model(torch.nn.Linear):
        def save_pretrained(self, path, **kwargs) -> None:
            (Path(path) / "model.safetensors").write_bytes(b"")

    with pytest.raises(OSError) as raised:
        checkpoint.save_checkpoint(tmp_path, 1, model=Model(1, 1))
    assert raised.value.errno == errno.ENOSPC and "no space left on device" in str(raised.value)

    def full(self):
        raise raised.value

    monkeypatch.setattr(EmbeddedTrainer, "run", full)
    rollout = tmp_path / "run" / "rollouts" / "step_000000.jsonl"  # step 1 ran, then the save
    rollout.parent.mkdir(parents=True)
    rollout.write_text('{"trajectory_id": "a"}\n')
    code = main(["train", f"run_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "no space left on device while saving checkpoint" in err and "--resume" in err


def test_an_empty_agent_pool_is_refused_before_anything_loads(capsys) -> None:
    code, err = train(capsys, "agents.agents={}", "env.auto_consult=null")
    assert code == 2 and "agents.agents is empty" in err


# -- run dirs that are not a run's, and resume with nothing to resume ----------------------


def test_a_non_empty_run_dir_holding_no_run_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    system = tmp_path / "etc"  # stands for /etc: a folder of someone else's files
    system.mkdir()
    (system / "passwd").write_text("root:x:0:0\n")
    link = tmp_path / "run-link"
    link.symlink_to(system)
    for run_dir, named in ((system, f"'{system}'"), (link, f"'{link}' (-> {system})")):
        code = main(["train", f"run_dir={run_dir}", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and named in err and "holds no run" in err, err
        assert sorted(p.name for p in system.iterdir()) == ["passwd"]  # nothing written


def test_resume_of_a_run_dir_holding_no_run_is_refused(tmp_path: Path, capsys) -> None:
    failed_start = tmp_path / "failed"
    failed_start.mkdir()
    (failed_start / "config.yaml").write_text("seed: 0\n")
    for run_dir in (tmp_path / "new", failed_start):
        code = main(["train", "--resume", f"run_dir={run_dir}", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "holds no run to resume" in err and str(run_dir) in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_resume_is_advised_only_when_a_checkpoint_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, checkpointed: bool
) -> None:
    from trainers.embedded import BackendFailure, EmbeddedTrainer

    saved = tmp_path / "run" / "checkpoints" / "step_000002" if checkpointed else None

    def fail(self):
        raise BackendFailure(
            "the policy backend failed its probe", completed_step=2 * checkpointed, checkpoint=saved
        )

    monkeypatch.setattr(EmbeddedTrainer, "run", fail)
    code = main(["train", f"run_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and ("aipo train --resume" in err) == checkpointed, err
    if not checkpointed:
        assert "nothing to resume" in err and f"aipo train run_dir={tmp_path / 'run'}" in err


# -- YAML that expands, numbers that cannot be read, bytes that are not text -----------------


def _alias_bomb(levels: int, width: int) -> str:
    """``levels`` lists of ``width`` aliases of the list before: width**levels values."""
    lines = ["task:", "  kwargs:", "    l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        aliases = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"    l{level}: &l{level} [{aliases}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("levels", "width"), [(5, 10), (9, 9)])
def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path: Path, levels: int, width: int) -> None:
    # In a child with its address space capped: before the refusal, the 9-level bomb
    # (578 bytes) ended the process in a native allocation failure, and the 5-level one
    # grew 346 bytes into 1.8 MB of config.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(levels, width))
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from aipo.cli import main\n"
        "sys.exit(main(['train', '--dry-run', '--config', sys.argv[1]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bomb)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, (done.returncode, err[-500:])
    assert f"{bomb}:" in err and "alias" in err and not done.stdout


def test_an_alias_within_the_budget_still_loads(tmp_path: Path, capsys) -> None:
    reused = tmp_path / "reused.yaml"
    reused.write_text("task:\n  kwargs: &kw {size: 8}\n  eval_kwargs: *kw\n")
    code, err = train(capsys, "--config", str(reused))
    assert code == 0, err


def test_an_integer_too_long_to_read_is_named(tmp_path: Path, capsys) -> None:
    digits = "1" * 5000
    in_file = tmp_path / "seed.yaml"
    in_file.write_text(f"train:\n  steps: 2\nseed: {digits}\n")
    code, err = train(capsys, "--config", str(in_file))
    assert code == 2 and f"{in_file}:3:" in err and "5000 digits" in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 300
    code, err = train(capsys, f"seed={digits}")
    assert code == 2 and "override seed=" in err and "5000 digits" in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 300


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path, capsys) -> None:
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("seed: 1\nrun_dir: runs/caf\xe9\n".encode("latin-1"))
    code, err = train(capsys, "--config", str(latin))
    assert code == 2 and f"{latin}:2:" in err and "UTF-8" in err, err
    assert len(err.strip().splitlines()) == 1


def test_an_invalid_override_is_named_as_the_override(tmp_path: Path, capsys) -> None:
    code, err = train(capsys, "train.steps=-1")
    assert code == 2 and "override train.steps=-1" in err and "default.yaml" not in err, err
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("train:\n  steps: 0\n")
    code, err = train(capsys, "--config", str(bad_file), "optim.lr=5")
    assert code == 2 and f"in {bad_file}" in err and "override optim.lr=5" in err, err
    assert "train.steps" in err and "optim.lr" in err
