"""The smoke test's dump: what the executor sent equals what AIPOPolicyLoss trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("openrlhf.models.loss", reason="openrlhf not installed")

from aipo_env.trajectory import Trajectory  # noqa: E402
from trainers.losses import LossConfig  # noqa: E402
from trainers.openrlhf import dump  # noqa: E402
from trainers.openrlhf.loss import make_aipo_policy_loss_class  # noqa: E402
from trainers.openrlhf.rollout import trajectory_to_openrlhf  # noqa: E402


def _trajectory(tid: str, agent_lp: float) -> Trajectory:
    sources = ["prompt"] * 3 + ["policy"] * 2 + ["env", "agent:verify", "agent:verify", "env"]
    sources += ["policy"] * 2
    return Trajectory(
        trajectory_id=tid,
        problem_id="p",
        task="t",
        group_id="g",
        token_ids=list(range(10, 10 + len(sources))),
        prompt_len=3,
        source=sources,
        loss_mask=[0] * len(sources),
        behavior_logprobs=[None] * 3 + [-0.2, -0.3, None, agent_lp, -0.4, None, -0.1, -0.6],
        finish_reason="eos",
        reward=1.0,
    )


def _loss_rows(results: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``action_mask`` and ``rollout_log_probs`` as OpenRLHF hands them to the loss."""
    width = max(len(r["rollout_log_probs"]) for r in results)
    mask = torch.zeros(len(results), width)
    rollout = torch.zeros(len(results), width)
    for row, r in enumerate(results):
        for start, end in r["action_ranges"]:
            mask[row, start:end] = 1
        rollout[row, : len(r["rollout_log_probs"])] = torch.tensor(r["rollout_log_probs"])
    return mask, rollout


def test_the_loss_dump_matches_the_executor_samples_and_a_tampered_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dump.DUMP_ENV, str(tmp_path))
    monkeypatch.setattr(dump, "_state", {"samples": 0, "loss_saved": False})
    rule = LossConfig(agent_mode="shaped").mask_rule()
    results = [
        trajectory_to_openrlhf(_trajectory(f"t{i}", -0.5 - i), prompt="q", label="1", rule=rule)
        for i in range(2)
    ]
    for result in results:
        dump.dump_sample(result)
    mask, rollout = _loss_rows(results)
    logp = torch.full_like(rollout, -0.7, requires_grad=True)
    loss_fn = make_aipo_policy_loss_class()(agent_loss=LossConfig(agent_mode="shaped"))
    loss_fn(logp, logp.detach(), torch.ones_like(rollout), mask, rollout)

    assert len(list(tmp_path.glob("executor-*.jsonl"))) == 1
    assert len(list(tmp_path.glob("loss-rank0-*.pt"))) == 1
    assert dump.compare(tmp_path) == 0

    saved = next(tmp_path.glob("loss-*.pt"))
    batch = torch.load(saved)
    agent_at = int((batch["rollout_log_probs"][0] >= dump.AGENT_FLAG_THRESHOLD).nonzero()[0])
    batch["rollout_log_probs"][0, agent_at] += 0.25  # one agent token's behaviour log-prob differs
    torch.save(batch, saved)
    assert dump.compare(tmp_path) == 1


def test_nothing_is_written_without_the_dump_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dump.DUMP_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    dump.dump_sample({"action_ranges": [], "rollout_log_probs": [], "reward": 0.0})
    assert list(tmp_path.iterdir()) == []
