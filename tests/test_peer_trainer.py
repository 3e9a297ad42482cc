"""ILR's multi-peer trainer on a tiny random model: per-peer runs, shared state, exact resume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from tiny_run import load_weights, make_config, max_weight_diff, parity_task_registered

import trainers.peer_trainer as peer_trainer
from aipo.config import ConfigError, load_config
from aipo_env import sources
from aipo_env.trajectory import read_jsonl
from trainers.config import TrainConfig
from trainers.peer_trainer import PeerTrainer
from trainers.stopping import TrainingInterrupted


@pytest.fixture(autouse=True)
def _parity_task():
    with parity_task_registered():
        yield


def ilr_config(run: Path, model: str, train: dict | None = None, **peers):
    return make_config(
        run,
        model,
        task={"eval_size": 2},
        env={"max_consults": 0, "max_total_tokens": 512},
        train={"save_every": 1, **(train or {})},
        peers={
            "names": ["A", "B"],
            "max_new_tokens_per_stage": 6,
            "validation_size": 2,
            "ability_every": 1,
            **peers,
        },
    )


@pytest.mark.slow
def test_two_peers_train_each_on_its_own_trajectories(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainers.run_state as run_state

    def unused(*args, **kwargs):
        raise AssertionError("a peer's run built an agent pool or a rollout driver")

    # The peers play Idea3 themselves: no answerers, no driver (no agents section either).
    monkeypatch.setattr(run_state, "make_answerers", unused)
    monkeypatch.setattr(run_state, "RolloutDriver", unused)
    summary = PeerTrainer(ilr_config(tmp_path / "run", tiny_model_dir), progress=False).run()
    run = tmp_path / "run"
    base = load_weights(tiny_model_dir)
    finals = {}
    for name, other in (("A", "B"), ("B", "A")):
        folder = run / "peers" / name
        records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        assert all(0 <= r["cooperate_rate"] <= 1 and "ability" in r for r in records)
        for step in range(2):
            ts = read_jsonl(folder / "rollouts" / f"step_{step:06d}.jsonl")
            assert len(ts) == 4 and {t.metadata["peer"] for t in ts} == {name}
            assert all(t.policy_version == step for t in ts)
            assert any(s == sources.peer(other) for t in ts for s in t.source)
            assert len({t.group_id for t in ts}) == 2  # one group per problem and peer
        finals[name] = load_weights(summary["peers"][name]["checkpoint"])
        assert max_weight_diff(base, finals[name]) > 1e-4
        assert (folder / "eval" / "after.json").is_file()
    assert max_weight_diff(finals["A"], finals["B"]) > 1e-6  # different seeds, different updates
    state = json.loads((run / "peer_state.json").read_text())
    assert state["step"] == 2 and set(state["abilities"]) == {"A", "B"}
    assert len(state["ability_history"]) == 2  # ability_every=1: steps 0 and 1
    # The calibrated reward replaced the verifier's; the raw one is kept.
    t = read_jsonl(run / "peers" / "A" / "rollouts" / "step_000000.jsonl")[0]
    assert "raw_reward" in t.metadata


@pytest.mark.slow
def test_resume_after_a_kill_restores_every_peer_exactly(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    PeerTrainer(ilr_config(tmp_path / "straight", tiny_model_dir), progress=False).run()

    class Killed(Exception):
        pass

    real = PeerTrainer._save_state

    def save_then_die(self, run_dir, done):
        real(self, run_dir, done)
        raise Killed

    monkeypatch.setattr(PeerTrainer, "_save_state", save_then_die)
    config = ilr_config(tmp_path / "killed", tiny_model_dir)
    with pytest.raises(Killed):
        PeerTrainer(config, progress=False).run()
    monkeypatch.setattr(PeerTrainer, "_save_state", real)
    assert json.loads((tmp_path / "killed" / "peer_state.json").read_text())["step"] == 1
    PeerTrainer(config, resume=True, progress=False).run()
    for name in ("A", "B"):
        a = load_weights(tmp_path / "straight" / "peers" / name / "checkpoints" / "step_000002")
        b = load_weights(tmp_path / "killed" / "peers" / name / "checkpoints" / "step_000002")
        assert max_weight_diff(a, b) < 1e-6, name
    straight = json.loads((tmp_path / "straight" / "peer_state.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "peer_state.json").read_text())
    assert straight["difficulty"] == resumed["difficulty"]


@pytest.mark.slow
def test_a_signal_mid_rollout_checkpoints_every_peer_and_resume_goes_on_exactly(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    PeerTrainer(ilr_config(tmp_path / "straight", tiny_model_dir), progress=False).run()
    real = PeerTrainer._rollout

    async def interrupt_step_2(self, runs, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(30)  # cancelled by the stop request
        return await real(self, runs, step)

    monkeypatch.setattr(PeerTrainer, "_rollout", interrupt_step_2)
    # save_every=2: step 1 is checkpointed only because the run stops after it.
    config = ilr_config(tmp_path / "stopped", tiny_model_dir, train={"save_every": 2})
    with pytest.raises(TrainingInterrupted, match=r"SIGINT after step 1 of 2") as stopped:
        PeerTrainer(config, progress=False).run()
    assert stopped.value.completed_step == 1
    for name in ("A", "B"):
        assert f"peer {name}: step 1 checkpointed now in" in str(stopped.value)
        assert not (
            tmp_path / "stopped" / "peers" / name / "rollouts" / "step_000001.jsonl"
        ).exists()
    assert json.loads((tmp_path / "stopped" / "peer_state.json").read_text())["step"] == 1
    monkeypatch.setattr(PeerTrainer, "_rollout", real)
    PeerTrainer(config, resume=True, progress=False).run()
    for name in ("A", "B"):
        a = load_weights(tmp_path / "straight" / "peers" / name / "checkpoints" / "step_000002")
        b = load_weights(tmp_path / "stopped" / "peers" / name / "checkpoints" / "step_000002")
        assert max_weight_diff(a, b) < 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("killed_at", [1, 2])
def test_a_kill_between_two_peers_checkpoints_resumes_at_the_committed_step(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, killed_at: int
) -> None:
    """A saved step ``killed_at``, B did not: resume restarts both at the step before."""
    train = {"keep_last": 1}  # the committed checkpoint must survive A's newer one anyway
    PeerTrainer(ilr_config(tmp_path / "straight", tiny_model_dir, train), progress=False).run()

    class Killed(Exception):
        pass

    real = peer_trainer.log_and_save

    def die_before_b_saves(run, step, metrics):
        if step == killed_at and run.run_dir.name == "B":
            raise Killed
        return real(run, step, metrics)

    monkeypatch.setattr(peer_trainer, "log_and_save", die_before_b_saves)
    config = ilr_config(tmp_path / "killed", tiny_model_dir, train)
    with pytest.raises(Killed):
        PeerTrainer(config, progress=False).run()
    monkeypatch.setattr(peer_trainer, "log_and_save", real)
    peers = tmp_path / "killed" / "peers"
    assert (peers / "A" / "checkpoints" / f"step_{killed_at:06d}").is_dir()
    assert not (peers / "B" / "checkpoints" / f"step_{killed_at:06d}").exists()
    state = tmp_path / "killed" / "peer_state.json"
    assert (json.loads(state.read_text())["step"] if state.is_file() else 0) == killed_at - 1

    PeerTrainer(config, resume=True, progress=False).run()
    for name in ("A", "B"):
        a = load_weights(tmp_path / "straight" / "peers" / name / "checkpoints" / "step_000002")
        b = load_weights(peers / name / "checkpoints" / "step_000002")
        assert max_weight_diff(a, b) < 1e-6, name
        steps = [json.loads(x)["step"] for x in (peers / name / "metrics.jsonl").open()]
        assert steps == [1, 2], name  # A's uncommitted record was dropped, not repeated
    straight = json.loads((tmp_path / "straight" / "peer_state.json").read_text())
    assert json.loads(state.read_text())["difficulty"] == straight["difficulty"]


def test_resume_refuses_a_peer_without_the_committed_checkpoint(tmp_path: Path) -> None:
    trainer = PeerTrainer.__new__(PeerTrainer)
    trainer.resume = True

    class Run:
        def __init__(self, step):
            self.start_step = step

    with pytest.raises(
        peer_trainer.RunDirError,
        match=r"commits step 2 but .* at steps \{'A': 2, 'B': 1\}: a peer's checkpoint of step 2",
    ):
        trainer._restore(tmp_path, {"A": Run(2), "B": Run(1)}, {"step": 2})


def test_a_damaged_shared_state_is_named(tmp_path: Path) -> None:
    trainer = PeerTrainer.__new__(PeerTrainer)
    trainer.resume = True
    (tmp_path / "peer_state.json").write_text('{"step": ')
    with pytest.raises(peer_trainer.RunDirError, match=r"peer_state.json is damaged"):
        trainer._committed(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("peers.names=[A]", "two or more peers"),
        ("peers.names=[A, A]", "two or more peers"),
        ("peers.models=[default]", "peers.models has 1 entries for 2 peers"),
    ],
)
def test_peer_config_errors_come_before_any_model_loads(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(
            TrainConfig,
            None,
            ["peers.names=[A, B]", override],
        )


@pytest.mark.parametrize(
    ("given", "expected"), [([], "mask"), (["loss.agent_mode=shaped"], "shaped")]
)
def test_peer_tokens_are_context_unless_the_loss_trains_them(given, expected) -> None:
    config = load_config(TrainConfig, None, ["peers.names=[A, B]", *given])
    assert config.loss.agent_mode == expected
    assert load_config(TrainConfig, None, []).loss.agent_mode == "shaped"  # AIPO's default


def test_the_packaged_ilr_config_declares_no_agents() -> None:
    """Idea3 consults no agent: configs/ilr.yaml has no agents section, and loads."""
    import yaml

    path = Path(__file__).parent.parent / "configs" / "ilr.yaml"
    assert "agents" not in yaml.safe_load(path.read_text())
    config = load_config(TrainConfig, path)
    assert config.peers is not None and config.env.max_consults == 0
