"""Recovery that loses nothing: torn JSONL lines, damaged checkpoints, seeded agent replies, signals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny_model import random_llama

from agents.base import ConsultRequest
from agents.pool import AgentPool, AgentPoolConfig
from aipo.cli import main
from aipo_env.jsonl import JsonlError, repair_torn_tail
from aipo_env.trajectory import Trajectory, TrajectoryWriter, read_jsonl, write_jsonl
from tasks.base import Problem
from trainers.checkpoint import (
    CheckpointError,
    load_latest,
    read_model_weights,
    restore_latest,
    save_checkpoint,
)
from trainers.metrics import METRICS_FILE, MetricsLogger, read_metrics
from trainers.optim import OptimConfig, build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]

# -- a line torn by a killed writer ----------------------------------------------------


def _trajectory(i: int) -> Trajectory:
    return Trajectory(
        trajectory_id=f"t{i}",
        problem_id="p",
        task="test",
        group_id="g",
        token_ids=[1, 2, 3],
        prompt_len=1,
        source=["prompt", "policy", "policy"],
        loss_mask=[0, 1, 1],
        behavior_logprobs=[None, -0.5, -0.25],
        finish_reason="eos",
    )


def test_appending_after_a_torn_trajectory_line_keeps_every_finished_record(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    write_jsonl(path, [_trajectory(0), _trajectory(1)])
    whole = _trajectory(2).model_dump_json()
    with path.open("a") as f:
        f.write(whole[: len(whole) // 2])  # the writer was killed mid-line

    with TrajectoryWriter(path) as writer:
        writer.write(_trajectory(3))

    assert [t.trajectory_id for t in read_jsonl(path)] == ["t0", "t1", "t3"]
    with TrajectoryWriter(path) as writer:  # and the file stays appendable
        writer.write(_trajectory(4))
    assert [t.trajectory_id for t in read_jsonl(path)] == ["t0", "t1", "t3", "t4"]


def test_a_whole_record_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    write_jsonl(path, [_trajectory(0)])
    with path.open("a") as f:
        f.write(_trajectory(1).model_dump_json())  # killed between the record and its newline
    assert [t.trajectory_id for t in read_jsonl(path)] == ["t0", "t1"]

    with TrajectoryWriter(path) as writer:
        writer.write(_trajectory(2))
    assert [t.trajectory_id for t in read_jsonl(path)] == ["t0", "t1", "t2"]


def test_metrics_logger_appends_after_a_torn_line(tmp_path: Path, caplog) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text(
        '{"step": 1, "reward_mean": 0.5}\n{"step": 2, "reward_mean": 0.25}\n{"step": 3, "rew'
    )
    with MetricsLogger(tmp_path, progress=False, tensorboard=False) as log:
        log.log(3, {"reward_mean": 0.75})

    with caplog.at_level(logging.WARNING, logger="trainers.metrics"):
        records = read_metrics(path)
    assert [(r["step"], r["reward_mean"]) for r in records] == [(1, 0.5), (2, 0.25), (3, 0.75)]
    assert "malformed" not in caplog.text


def test_repair_looks_back_past_a_line_longer_than_one_read(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    first = json.dumps({"text": "a" * 200_000}) + "\n"
    path.write_text(first + '{"text": "' + "b" * 100_000)

    assert repair_torn_tail(path) == len('{"text": "') + 100_000
    assert path.read_text() == first
    assert repair_torn_tail(path) == 0  # already on a line boundary
    assert repair_torn_tail(tmp_path / "missing.jsonl") == 0


# -- text that breaks lines, a byte-order mark, a glued line ------------------------------

LINE_BREAKS = "a\u2028b\x85c\u2029d"  # str.splitlines splits at each; JSON need not escape them


def test_line_separators_in_the_policys_text_are_written_escaped(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    written = [_trajectory(0).model_copy(update={"error": LINE_BREAKS}), _trajectory(1)]
    write_jsonl(path, written)
    raw = path.read_text(encoding="utf-8")
    assert len(raw.splitlines()) == 2 and not {"\u2028", "\x85", "\u2029"} & set(raw)
    assert read_jsonl(path) == written


def test_raw_line_separators_from_an_older_writer_are_read_back(tmp_path: Path, capsys) -> None:
    path = tmp_path / "rollouts.jsonl"
    raw = _trajectory(0).model_copy(update={"error": LINE_BREAKS}).model_dump_json()
    assert "\u2028" in raw  # as the old writer wrote it
    path.write_text(raw + "\n" + _trajectory(1).model_dump_json() + "\n", encoding="utf-8")
    assert [t.error for t in read_jsonl(path)] == [LINE_BREAKS, None]
    assert main(["show", str(path), "--tokenizer", "none", "--no-color"]) == 0
    assert "2 of 2 trajectories" in capsys.readouterr().out


BOM = "\ufeff"


def test_a_file_starting_with_a_byte_order_mark_reads_every_record(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    lines = [_trajectory(i).model_dump_json() + "\n" for i in range(3)]
    path.write_text(BOM + "".join(lines), encoding="utf-8")
    assert [t.trajectory_id for t in read_jsonl(path)] == ["t0", "t1", "t2"]


def test_a_lone_record_after_a_byte_order_mark_survives_an_append(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    path.write_text(BOM + _trajectory(0).model_dump_json(), encoding="utf-8")  # no newline
    assert [t.trajectory_id for t in read_jsonl(path)] == ["t0"]
    with TrajectoryWriter(path) as writer:
        writer.write(_trajectory(1))
    assert [t.trajectory_id for t in read_jsonl(path)] == ["t0", "t1"]
    metrics = tmp_path / METRICS_FILE
    metrics.write_text(BOM + '{"step": 1, "reward_mean": 0.5}', encoding="utf-8")
    with MetricsLogger(tmp_path, progress=False, tensorboard=False) as log:
        log.log(2, {"reward_mean": 0.75})
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]


def _glued(path: Path) -> None:
    """t0, then t1's first half glued onto the whole t2 (an old writer after a kill), then t3."""
    whole = [_trajectory(i).model_dump_json() for i in range(4)]
    path.write_text(
        f"{whole[0]}\n{whole[1][: len(whole[1]) // 2]}{whole[2]}\n{whole[3]}\n", encoding="utf-8"
    )


def test_a_record_glued_onto_a_fragment_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "step_000000.jsonl"
    _glued(path)
    with pytest.raises(JsonlError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message, message


def test_resume_over_a_glued_rollout_file_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # What --resume does first with the step's rollout file: read it back.
    path = tmp_path / "rollouts" / "step_000000.jsonl"
    path.parent.mkdir()
    _glued(path)
    from trainers.embedded import EmbeddedTrainer

    monkeypatch.setattr(EmbeddedTrainer, "run", lambda self: read_jsonl(path))
    code = main(["train", "--resume", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and f"aipo train: {path}:2: " in err and "Traceback" not in err, err


# -- a damaged checkpoint --------------------------------------------------------------

OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, schedule="cosine", total_steps=6)
CHECKPOINT_FILES = [
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "trainer_state.json",
]


def _fresh(seed: int):
    model = random_llama(61, seed=seed, hidden_size=16, layers=1, heads=2, kv_heads=1)
    optimizer = build_optimizer(model, OPTIM)
    return model, optimizer, build_scheduler(optimizer, OPTIM)


def _save(run_dir: Path, step: int, model, optimizer, scheduler) -> Path:
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data_position={"step": step},
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", CHECKPOINT_FILES)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    damaged: str, tmp_path: Path, caplog
) -> None:
    model, optimizer, scheduler = _fresh(seed=0)
    _save(tmp_path, 1, model, optimizer, scheduler)
    step_1 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    _save(tmp_path, 2, model, optimizer, scheduler)
    _truncate(tmp_path / "checkpoints" / "step_000002" / damaged)

    resumed, opt, sched = _fresh(seed=5)
    with caplog.at_level(logging.WARNING, logger="trainers.checkpoint"):
        state = restore_latest(tmp_path, model=resumed, optimizer=opt, scheduler=sched)

    assert state is not None and state.step == 1
    assert state.path.name == "step_000001"
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, step_1[name]), name
    assert f"step_000002/{damaged}" in caplog.text  # the warning names the damaged file


@pytest.mark.parametrize("damaged", CHECKPOINT_FILES)
def test_a_damaged_only_checkpoint_fails_naming_the_file(damaged: str, tmp_path: Path) -> None:
    model, optimizer, scheduler = _fresh(seed=0)
    _save(tmp_path, 1, model, optimizer, scheduler)
    _truncate(tmp_path / "checkpoints" / "step_000001" / damaged)

    resumed, opt, sched = _fresh(seed=5)
    before = {k: v.clone() for k, v in resumed.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(f"step_000001/{damaged}")):
        restore_latest(tmp_path, model=resumed, optimizer=opt, scheduler=sched)
    for name, tensor in resumed.state_dict().items():  # nothing was half-restored
        assert torch.equal(tensor, before[name]), name


def test_a_missing_optimizer_file_is_named(tmp_path: Path) -> None:
    model, optimizer, scheduler = _fresh(seed=0)
    _save(tmp_path, 1, model, optimizer, scheduler)
    (tmp_path / "checkpoints" / "step_000001" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_000001/optimizer\.pt is missing"):
        restore_latest(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)


# -- agents' replies are a function of the seed and the request --------------------------

PROBLEM = Problem(id="p1", task="test", question="What is 17 * 3?", reference="51")


def _requests() -> list[ConsultRequest]:
    out = []
    for episode in ("s0-g0-p1-n0", "s0-g0-p1-n1", "s1-g0-p1-n0"):
        for turn, agent in enumerate(("knowledge", "reasoning")):
            out.append(
                ConsultRequest(
                    agent=agent,
                    question="Is the answer 51?",
                    problem=PROBLEM,
                    transcript="17 * 3 = 51" * (turn + 1),
                    episode_id=episode,
                )
            )
    return out


def _pool(model_dir: str, tokenizer, seed: int | None) -> AgentPool:
    config = AgentPoolConfig.model_validate(
        {
            "agents": {
                "knowledge": {"backend": model_dir, "temperature": 1.0, "top_p": 1.0},
                "reasoning": {"backend": model_dir, "temperature": 1.0, "top_p": 1.0},
            }
        }
    )
    return AgentPool.from_config(
        config, policy_tokenizer=tokenizer, max_reply_tokens=6, timeout_s=60.0, seed=seed
    )


async def test_pools_with_one_seed_reply_alike_in_any_order_and_concurrency(
    tiny_model_dir: str, tokenizer
) -> None:
    requests = _requests()
    # Same requests twice: the second pass must not change what the first one got.
    requests = requests + requests
    first = _pool(tiny_model_dir, tokenizer, seed=11)
    second = _pool(tiny_model_dir, tokenizer, seed=11)
    other = _pool(tiny_model_dir, tokenizer, seed=12)
    try:
        # One pool answers one at a time, in order; the other all at once, in reverse.
        in_order = [await first.consult(r) for r in requests]
        concurrent = await asyncio.gather(*(second.consult(r) for r in reversed(requests)))
        concurrent = list(reversed(concurrent))
        reseeded = [await other.consult(r) for r in requests]
    finally:
        for pool in (first, second, other):
            await pool.aclose()

    assert all(r.ok and r.token_ids for r in in_order), [r.error for r in in_order]
    assert [r.token_ids for r in in_order] == [r.token_ids for r in concurrent]
    # And their log-probs, bit for bit: the update weighs a reply's tokens by them, so they
    # must not follow which requests shared a decode step (they did, by up to 0.1 in bf16).
    assert all(r.logprobs for r in in_order)
    assert [r.logprobs for r in in_order] == [r.logprobs for r in concurrent]
    assert [r.token_ids for r in in_order] != [r.token_ids for r in reseeded]
    # Different episodes asking the same thing are sampled apart, not served one cached reply.
    assert in_order[0].token_ids != in_order[2].token_ids


# -- SIGINT and SIGTERM ---------------------------------------------------------------


def _config_file(tmp_path: Path, model_dir: str, run_dir: Path) -> Path:
    config = {
        "run_dir": str(run_dir),
        "seed": 1,
        "policy": {"model": model_dir, "device": "cpu", "max_context": 512},
        "task": {"name": "rg:chain_sum_easy", "kwargs": {"size": 40, "seed": 0}, "eval_size": 0},
        "env": {
            "max_new_tokens_per_turn": 8,
            "max_total_tokens": 512,
            "max_reply_tokens": 8,
            "max_turns": 2,
        },
        "agents": {
            "agents": {
                "verify": {"kind": "oracle"},
                "knowledge": {"backend": "policy"},
                "reasoning": {"backend": "policy"},
            }
        },
        "rollout": {"n_samples": 2, "concurrency": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {
            "steps": 40,
            "prompts_per_step": 2,
            "minibatch_size": 4,
            "micro_batch_size": 4,
            "keep_last": 5,
            "plot": False,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_last_completed_step_and_resume_continues(
    sig: signal.Signals, tmp_path: Path, tiny_model_dir: str, capsys
) -> None:
    run_dir = tmp_path / "run"
    config = _config_file(tmp_path, tiny_model_dir, run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aipo.cli", "train", "--config", str(config), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / METRICS_FILE
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step finished in time"
            time.sleep(0.2)
        proc.send_signal(sig)
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr.close()
    err = (tmp_path / "stderr.txt").read_text()

    assert code == 128 + sig, err[-3000:]
    assert f"stopped by {sig.name}" in err
    found = re.search(r"step (\d+), the last completed: checkpointed (?:now )?in (\S+)", err)
    assert found, err[-3000:]
    completed, checkpoint = int(found.group(1)), Path(found.group(2))
    assert completed >= 1
    assert checkpoint == run_dir / "checkpoints" / f"step_{completed:06d}"
    assert load_latest(run_dir).step == completed
    assert [r["step"] for r in read_metrics(run_dir / METRICS_FILE)] == list(
        range(1, completed + 1)
    )
    assert "Continue with: aipo train --resume" in err

    code = main(
        [
            "train",
            "--resume",
            "--config",
            str(config),
            f"train.steps={completed + 1}",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / METRICS_FILE)] == list(
        range(1, completed + 2)
    )
    assert load_latest(run_dir).step == completed + 1


# -- a kill mid-rollout, then --resume, lands on the uninterrupted run ------------------


def _consulting_config(tmp_path: Path, model_dir: str, name: str) -> Path:
    """Two steps in bfloat16 where every episode opens with a consult the policy's generator answers."""
    run_dir = tmp_path / name
    config = {
        "run_dir": str(run_dir),
        "seed": 2,
        "policy": {
            "model": model_dir,
            "device": "cpu",
            "max_context": 512,
            "generator_dtype": "bfloat16",
        },
        "task": {"name": "rg:chain_sum_easy", "kwargs": {"size": 40, "seed": 0}, "eval_size": 0},
        "env": {
            "max_new_tokens_per_turn": 12,
            "max_total_tokens": 512,
            "max_reply_tokens": 8,
            "max_turns": 2,
            "auto_consult": "knowledge",
        },
        "agents": {
            "agents": {
                "verify": {"kind": "oracle"},
                "knowledge": {"backend": "policy"},
                "reasoning": {"kind": "oracle"},
            }
        },
        "rollout": {
            "n_samples": 2,
            "concurrency": 3,
            "schedule": {"start_fraction": 1.0, "end_fraction": 1.0},
        },
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {
            "steps": 2,
            "prompts_per_step": 4,
            "minibatch_size": 8,
            "micro_batch_size": 4,
            "save_every": 1,
            "keep_last": 2,
            "plot": False,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _agent_logprobs(t: Trajectory) -> list[float | None]:
    return [
        lp for lp, s in zip(t.behavior_logprobs, t.source, strict=True) if s.startswith("agent")
    ]


@pytest.mark.slow
def test_a_run_killed_mid_rollout_resumes_to_the_uninterrupted_runs_logprobs_and_weights(
    tmp_path: Path, tiny_model_dir: str, capsys
) -> None:
    straight = _consulting_config(tmp_path, tiny_model_dir, "straight")
    assert main(["train", "--config", str(straight), "--no-progress"]) == 0

    killed = _consulting_config(tmp_path, tiny_model_dir, "killed")
    run_dir = tmp_path / "killed"
    rollout = run_dir / "rollouts" / "step_000001.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aipo.cli", "train", "--config", str(killed), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        # SIGKILL (nothing saved on the way out) once step 2's first episode is on disk.
        while not (rollout.is_file() and rollout.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr.close()
    assert [r["step"] for r in read_metrics(run_dir / METRICS_FILE)] == [1]  # died in step 2
    code = main(["train", "--resume", "--config", str(killed), "--no-progress"])
    assert code == 0, capsys.readouterr().err[-3000:]

    for step in (0, 1):
        name = Path("rollouts") / f"step_{step:06d}.jsonl"
        key = lambda t: t.trajectory_id  # noqa: E731
        a = sorted(read_jsonl(tmp_path / "straight" / name), key=key)
        b = sorted(read_jsonl(run_dir / name), key=key)
        assert [t.token_ids for t in b] == [t.token_ids for t in a]
        assert all(_agent_logprobs(t) for t in a)  # each holds a reply of the policy's generator
        # Bit for bit: the update weighs these tokens by them (agent_mode shaped).
        assert [_agent_logprobs(t) for t in b] == [_agent_logprobs(t) for t in a]
    final = Path("checkpoints") / "step_000002"
    weights_a = read_model_weights(tmp_path / "straight" / final)
    weights_b = read_model_weights(run_dir / final)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
