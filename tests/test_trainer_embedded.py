"""End-to-end runs of the embedded trainer on a tiny random model (CPU).

Every run uses a task whose reward depends on the sampled text (the parity of its
length), so groups have reward variance, advantages are non-zero and the policy
loss has a gradient: a run whose weights do not move has a bug, not a flat reward.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from scripted import ScriptedGenerator
from tiny_run import (
    LengthParityTask,
    load_weights,
    make_config,
    max_weight_diff,
    parity_task_registered,
)

import trainers.embedded as embedded
import trainers.update as update_module
from aipo_env.trajectory import read_jsonl
from policies.transformers_generator import TransformersGenerator
from tasks.base import RewardResult
from trainers.checkpoint import load_latest
from trainers.config import TrainConfig
from trainers.embedded import EmbeddedTrainer, problem_order
from trainers.losses import AIPOLoss

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _parity_task():
    with parity_task_registered():
        yield


def test_short_run_trains_and_writes_every_artifact(tmp_path: Path, tiny_model_dir: str) -> None:
    cfg = make_config(
        tmp_path / "run",
        tiny_model_dir,
        task={"eval_size": 2},
        train={"plot": True, "save_every": 1, "keep_last": 2, "eval_every": 1},
    )
    summary = EmbeddedTrainer(cfg, progress=False).run()
    run = tmp_path / "run"

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("reward_mean", "consult_rate", "policy_tokens_per_s", "update/grad_norm"):
            assert key in r, key
        # A step whose groups all got equal rewards (zero advantage) is not run at all.
        assert r["update/skipped"] == (r["update/skipped_rows"] == 4)
        if not r["update/skipped"]:
            assert math.isfinite(r["update/loss"])
            assert r["update/optimizer_steps"] == 1
            assert r["update/tokens/policy"] > 0
        else:
            assert r["update/optimizer_steps"] == 0

    # Every planned trajectory is written exactly once, in its own step's file.
    for step in range(2):
        stored = read_jsonl(run / "rollouts" / f"step_{step:06d}.jsonl")
        ids = [t.trajectory_id for t in stored]
        assert len(ids) == len(set(ids)) == 4
        problems = problem_order(step, 2, 6, cfg.seed)
        assert sorted({t.problem_id for t in stored}) == sorted(f"add-{i}" for i in problems)
        assert {t.policy_version for t in stored} == {step}

    # The weights moved, and each checkpoint loads on its own as a Hugging Face model.
    before = load_weights(tiny_model_dir)
    after_1 = load_weights(run / "checkpoints" / "step_000001")
    after_2 = load_weights(summary.checkpoint)
    assert Path(summary.checkpoint).name == "step_000002"
    assert not records[0]["update/skipped"]
    assert max_weight_diff(before, after_1) > 1e-3
    # A skipped step moves nothing (the update is not run: no AdamW momentum step either).
    if records[1]["update/skipped"]:
        assert max_weight_diff(after_1, after_2) == 0.0
    else:
        assert max_weight_diff(after_1, after_2) > 1e-3

    saved = json.loads((run / "summary.json").read_text())
    assert saved["steps"] == 2 and saved["skipped_updates"] == 0
    assert saved["eval_before"]["problems"] == 2 and saved["eval_after"]["problems"] == 2
    assert len(read_jsonl(run / "eval" / "before.jsonl")) == 2
    assert len(read_jsonl(run / "eval" / "after.jsonl")) == 2
    # eval_every=1: one held-out evaluation between the steps (the last step's is "after").
    assert sorted(p.name for p in (run / "eval").glob("step*.json")) == ["step1.json"]
    mid = json.loads((run / "eval" / "step1.json").read_text())
    assert records[0]["eval/accuracy"] == mid["accuracy"] and "eval/accuracy" not in records[1]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["train_reward_first"] == pytest.approx(records[0]["reward_mean"])


def test_a_step_whose_rewards_are_all_equal_runs_no_update(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every sample gets the same reward: every advantage is exactly 0 (GRPO).
    monkeypatch.setattr(
        LengthParityTask,
        "score",
        lambda self, problem, response: RewardResult(score=1.0, correct=True, reason="flat"),
    )
    forwards = []
    real = update_module.token_logprobs

    def counted(*args: Any, **kwargs: Any):
        forwards.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(update_module, "token_logprobs", counted)
    cfg = make_config(tmp_path / "run", tiny_model_dir, train={"save_every": 1})
    EmbeddedTrainer(cfg, progress=False).run()
    run = tmp_path / "run"

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update/skipped"] for r in records] == [1, 1]
    assert [r["update/skipped_rows"] for r in records] == [4, 4]
    assert [r["update/optimizer_steps"] for r in records] == [0, 0]
    # The tokens a full update would have counted are still reported.
    assert all(r["update/tokens/policy"] > 0 for r in records)
    assert forwards == []  # no update forward at all
    initial = load_weights(tiny_model_dir)
    assert max_weight_diff(initial, load_weights(run / "checkpoints" / "step_000002")) == 0.0


class _Killed(Exception):
    """Stands in for the process dying right after a checkpoint."""


def run_killed_after_first_checkpoint(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``config`` and stop it as a kill would, right after its first checkpoint is on disk."""
    real_save = embedded.save_checkpoint

    def save_then_die(*args: Any, **kwargs: Any) -> Path:
        path = real_save(*args, **kwargs)
        raise _Killed(str(path))

    monkeypatch.setattr(embedded, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        EmbeddedTrainer(config, progress=False).run()
    monkeypatch.setattr(embedded, "save_checkpoint", real_save)


def test_resume_after_a_kill_equals_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def config(run: str) -> TrainConfig:
        return make_config(tmp_path / run, tiny_model_dir, train={"save_every": 1})

    EmbeddedTrainer(config("straight"), progress=False).run()

    # The same run, killed as soon as step 1's checkpoint is on disk.
    run_killed_after_first_checkpoint(config("killed"), monkeypatch)
    killed = tmp_path / "killed"
    assert load_latest(killed).step == 1
    assert not (killed / "rollouts" / "step_000001.jsonl").exists()

    # Step 2 was in progress: two of its four trajectories had been written.
    straight_step2 = (tmp_path / "straight" / "rollouts" / "step_000001.jsonl").read_text()
    by_id = {
        t.trajectory_id: t
        for t in read_jsonl(tmp_path / "straight" / "rollouts" / "step_000001.jsonl")
    }
    lines = straight_step2.splitlines(keepends=True)
    written = lines[:2]
    (killed / "rollouts" / "step_000001.jsonl").write_text("".join(written))
    written_ids = {json.loads(line)["trajectory_id"] for line in written}

    sessions: list[str | None] = []
    real_generate = TransformersGenerator.generate

    async def counting_generate(self, input_ids, params, *, session_id=None):
        sessions.append(session_id)
        return await real_generate(self, input_ids, params, session_id=session_id)

    monkeypatch.setattr(TransformersGenerator, "generate", counting_generate)
    with pytest.raises(embedded.RunDirError):
        EmbeddedTrainer(config("killed"), progress=False).run()  # no --resume: refused
    EmbeddedTrainer(config("killed"), resume=True, progress=False).run()

    # Only the two missing episodes were generated; the written ones were reused verbatim.
    assert sessions, "the resumed run generated nothing"
    assert not written_ids & set(sessions)
    assert set(sessions) == set(by_id) - written_ids
    resumed_lines = (killed / "rollouts" / "step_000001.jsonl").read_text().splitlines(True)
    assert resumed_lines[:2] == written

    # The resumed run saw the same problems, groups and trajectory ids, step by step.
    for step in range(2):
        a = read_jsonl(tmp_path / "straight" / "rollouts" / f"step_{step:06d}.jsonl")
        b = read_jsonl(killed / "rollouts" / f"step_{step:06d}.jsonl")
        key = lambda t: t.trajectory_id  # noqa: E731
        a, b = sorted(a, key=key), sorted(b, key=key)
        assert [(t.trajectory_id, t.group_id, t.problem_id) for t in a] == [
            (t.trajectory_id, t.group_id, t.problem_id) for t in b
        ]
        # Sampling is seeded per request, so even the regenerated episodes match.
        assert [t.token_ids for t in a] == [t.token_ids for t in b]

    metrics_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    metrics_b = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in metrics_b] == [1, 2]
    assert json.loads(metrics_a[1])["reward_mean"] == json.loads(metrics_b[1])["reward_mean"]

    straight = load_weights(tmp_path / "straight" / "checkpoints" / "step_000002")
    resumed = load_weights(killed / "checkpoints" / "step_000002")
    assert max_weight_diff(straight, resumed) < 1e-5


def test_nonfinite_loss_skips_the_update_and_training_continues(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_forward = AIPOLoss.forward

    def nan_on_first_call(self, **kwargs):
        loss, metrics = real_forward(self, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), metrics) if calls["n"] == 1 else (loss, metrics)

    monkeypatch.setattr(AIPOLoss, "forward", nan_on_first_call)
    cfg = make_config(tmp_path / "run", tiny_model_dir, train={"save_every": 1, "keep_last": 2})
    summary = EmbeddedTrainer(cfg, progress=False).run()
    run = tmp_path / "run"

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update/skipped_steps"] for r in records] == [1, 0]
    assert [r["update/optimizer_steps"] for r in records] == [0, 1]
    assert summary.skipped_updates == 1

    # Step 1 left the weights exactly as loaded; step 2 trained.
    initial = load_weights(tiny_model_dir)
    after_1 = load_weights(run / "checkpoints" / "step_000001")
    after_2 = load_weights(run / "checkpoints" / "step_000002")
    assert max_weight_diff(initial, after_1) == 0.0
    assert max_weight_diff(after_1, after_2) > 1e-3

    dumps = sorted((run / "nonfinite").glob("*.pt"))
    assert [p.name for p in dumps] == ["nonfinite_u000000_e0_m0.pt"]
    dump = torch.load(dumps[0], weights_only=True)
    assert dump["reason"] == "loss"
    assert dump["input_ids"].shape[0] == 4  # the whole minibatch of step 1
    stored = read_jsonl(run / "rollouts" / "step_000000.jsonl")
    assert {tuple(t.token_ids) for t in stored} == {
        tuple(row[mask.bool()].tolist())
        for row, mask in zip(dump["input_ids"], dump["attention_mask"], strict=True)
    }


class _ConsultingPolicy(ScriptedGenerator):
    """A scripted policy that consults the verify agent, then answers; trains nothing itself."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, **_: Any) -> None:
        script = [
            '<consult agent="verify">Is the answer \\boxed{7}?</consult>',
            "So it is \\boxed{7}." + tokenizer.eos_token,
        ]
        super().__init__(tokenizer, script, max_context=512)
        self.versions: list[int | str | None] = []

    def weights_updated(self, version: int | str | None = None) -> None:
        """Record the versions the trainer announces."""
        self.versions.append(version)

    def paused(self) -> contextlib.nullcontext[None]:
        """Nothing runs between calls; the trainer may update at any time."""
        return contextlib.nullcontext()


@pytest.mark.parametrize("agent_mode", ["mask", "shaped"])
def test_agent_tokens_are_trained_only_outside_mask_mode(
    agent_mode: str, tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        TransformersGenerator,
        "from_model",
        classmethod(lambda cls, model, tokenizer, **kw: _ConsultingPolicy(model, tokenizer)),
    )
    cfg = make_config(
        tmp_path / "run",
        tiny_model_dir,
        # Every agent token trained whatever its advantage: agent_positive_only off.
        loss={"agent_mode": agent_mode, "agent_positive_only": False},
        env={"max_new_tokens_per_turn": 24, "max_reply_tokens": 16},
        train={"steps": 1},
    )
    EmbeddedTrainer(cfg, progress=False).run()

    stored = read_jsonl(tmp_path / "run" / "rollouts" / "step_000000.jsonl")
    assert all(t.consults == 1 for t in stored)
    agent_tokens = sum(s.startswith("agent:") for t in stored for s in t.source)
    trained_agent_tokens = sum(
        m
        for t in stored
        for s, m in zip(t.source, t.loss_mask, strict=True)
        if s.startswith("agent:")
    )
    (record,) = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert agent_tokens > 0
    assert record["update/tokens/policy"] > 0
    if agent_mode == "mask":
        # Not in the loss mask, so not even counted among the loss's agent tokens.
        assert trained_agent_tokens == 0
        assert record["update/tokens/agent"] == 0
        assert record["update/tokens/agent_trained"] == 0
    else:
        assert trained_agent_tokens == agent_tokens
        assert record["update/tokens/agent"] == agent_tokens
        assert record["update/tokens/agent_trained"] == agent_tokens


# -- SGLang policy backend -------------------------------------------------------------


def _greedy(server_url: str, tokenizer: Any, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and log-probs of ``prompt`` from an SGLang-protocol server."""
    import asyncio

    from policies.base import SamplingParams
    from policies.sglang_generator import SGLangGenerator

    async def go() -> tuple[list[int], list[float]]:
        client = SGLangGenerator(server_url, tokenizer=tokenizer, max_context=512, max_retries=0)
        try:
            params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
            gen = await client.generate(prompt, params)
        finally:
            await client.aclose()
        return gen.token_ids, gen.logprobs

    return asyncio.run(go())


def test_sglang_backend_rolls_out_on_the_server_and_serves_each_update(
    tmp_path: Path, tiny_model_dir: str, tokenizer: Any
) -> None:
    from sglang_loopback import LoopbackSGLangServer

    prompt = tokenizer.encode("What is 12 + 30? Answer:", add_special_tokens=False)
    with LoopbackSGLangServer(
        TransformersGenerator(tiny_model_dir, device="cpu", max_context=512)
    ) as server:
        initial = _greedy(server.url, tokenizer, prompt)
        server.requests.clear()
        cfg = make_config(
            tmp_path / "run",
            tiny_model_dir,
            policy={"backend": f"sglang://127.0.0.1:{server.port}"},
            train={"steps": 1},
        )
        summary = EmbeddedTrainer(cfg, progress=False).run()
        requests = list(server.requests)
        served = _greedy(server.url, tokenizer, prompt)
        server_weights = {
            k: v.detach().clone() for k, v in server.generator.model.state_dict().items()
        }

    # Rollouts went through the server: every policy segment answers one /generate.
    stored = read_jsonl(tmp_path / "run" / "rollouts" / "step_000000.jsonl")
    prompts_sent = {tuple(body["input_ids"]) for route, body in requests if route == "/generate"}
    segments = [tuple(t.token_ids[: turn.policy_start]) for t in stored for turn in t.turns]
    assert len(stored) == 4 and len(segments) >= 4
    assert set(segments) <= prompts_sent

    # Weights are published before the first rollout and after the update, each load
    # followed by a cache flush before any further generation.
    routes = [route for route, _ in requests]
    loads = [body["model_path"] for route, body in requests if route == "/update_weights_from_disk"]
    weights_root = (tmp_path / "run" / "weights").resolve()
    assert loads == [str(weights_root / "step_000000"), str(weights_root / "step_000001")]
    for i, route in enumerate(routes):
        if route == "/update_weights_from_disk":
            assert routes[i + 1] == "/flush_cache"
    assert routes.index("/generate") > routes.index("/flush_cache")
    assert sorted(p.name for p in weights_root.iterdir()) == ["step_000001"]

    # The server now holds exactly the trainer's updated weights and generates with them.
    trained = load_weights(summary.checkpoint)
    assert max_weight_diff(trained, load_weights(tmp_path / "run" / "weights" / "step_000001")) == 0
    assert max_weight_diff(load_weights(tiny_model_dir), trained) > 1e-3
    assert all(torch.equal(server_weights[k], trained[k]) for k in trained)
    local = TransformersGenerator(summary.checkpoint, device="cpu", max_context=512)
    try:
        import asyncio

        from policies.base import SamplingParams

        expected = asyncio.run(
            local.generate(
                prompt, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
            )
        )
    finally:
        asyncio.run(local.aclose())
    assert served[0] == expected.token_ids
    assert served[1] == pytest.approx(expected.logprobs, abs=1e-5)
    assert served[1] != pytest.approx(initial[1], abs=1e-3)


# -- resuming reproduces the agents' replies --------------------------------------------


class _AskingPolicy(_ConsultingPolicy):
    """A scripted policy that consults the knowledge agent, then answers."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, **_: Any) -> None:
        super().__init__(model, tokenizer)
        self.script = [
            '<consult agent="knowledge">What is 3 + 4?</consult>',
            "So it is \\boxed{7}." + tokenizer.eos_token,
        ]


def test_resume_replays_the_agents_replies_of_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        TransformersGenerator,
        "from_model",
        classmethod(lambda cls, model, tokenizer, **kw: _AskingPolicy(model, tokenizer)),
    )

    def config(run: str) -> TrainConfig:
        # The knowledge agent samples from its own model, not the policy's generator.
        return make_config(
            tmp_path / run,
            tiny_model_dir,
            env={"max_new_tokens_per_turn": 24},
            agents={"agents": {"knowledge": {"backend": tiny_model_dir, "temperature": 1.0}}},
            train={"save_every": 1},
        )

    EmbeddedTrainer(config("straight"), progress=False).run()

    run_killed_after_first_checkpoint(config("killed"), monkeypatch)
    EmbeddedTrainer(config("killed"), resume=True, progress=False).run()

    # Step 2 ran in a fresh process state after the kill, and still got the same replies.
    key = lambda t: t.trajectory_id  # noqa: E731
    straight = sorted(read_jsonl(tmp_path / "straight" / "rollouts" / "step_000001.jsonl"), key=key)
    resumed = sorted(read_jsonl(tmp_path / "killed" / "rollouts" / "step_000001.jsonl"), key=key)
    assert all(t.consults == 1 for t in straight)
    replies = [
        [i for i, s in zip(t.token_ids, t.source, strict=True) if s == "agent:knowledge"]
        for t in straight
    ]
    assert all(replies)
    assert [t.token_ids for t in resumed] == [t.token_ids for t in straight]
    weights_straight = load_weights(tmp_path / "straight" / "checkpoints" / "step_000002")
    weights_resumed = load_weights(tmp_path / "killed" / "checkpoints" / "step_000002")
    assert max_weight_diff(weights_straight, weights_resumed) < 1e-5


# -- failures stop the run instead of looking like success ----------------------------


class _BrokenPolicy(_ConsultingPolicy):
    """A policy backend whose every generation fails, as a server answering garbage does."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, **_: Any) -> None:
        super().__init__(model, tokenizer)
        self.fail = lambda session, turn: True


def test_a_policy_backend_failing_every_episode_stops_the_run(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        TransformersGenerator,
        "from_model",
        classmethod(lambda cls, model, tokenizer, **kw: _BrokenPolicy(model, tokenizer)),
    )
    run = tmp_path / "run"
    with pytest.raises(embedded.BackendFailure) as caught:
        EmbeddedTrainer(make_config(run, tiny_model_dir), progress=False).run()

    message = str(caught.value)
    assert "step 1 of 2" in message and "train.max_error_rate=0.5" in message
    assert "GenerationError 100%" in message and "scripted failure" in message
    assert str(run / "rollouts" / "step_000000.jsonl") in message
    assert caught.value.completed_step == 0 and caught.value.checkpoint is None
    assert not (run / "checkpoints").exists()  # no checkpoint of an untrained model
    assert not (run / "summary.json").exists()
    assert (run / "metrics.jsonl").read_text() == ""


def test_errors_below_the_threshold_are_reported_by_kind(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        TransformersGenerator,
        "from_model",
        classmethod(lambda cls, model, tokenizer, **kw: _BrokenPolicy(model, tokenizer)),
    )
    cfg = make_config(tmp_path / "run", tiny_model_dir, train={"max_error_rate": 1.0})
    summary = EmbeddedTrainer(cfg, progress=False).run()

    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["errors/GenerationError"] for r in records] == [1.0, 1.0]
    assert [r["update/optimizer_steps"] for r in records] == [0, 0]
    assert summary.errors == {"errors/GenerationError": 1.0, "finish_error": 1.0}
    assert "errors      : errors/GenerationError 100.0%" in summary.render()


def _policy_failing_for(prefix: str) -> Any:
    class _Policy(_AskingPolicy):
        """The asking policy, whose backend fails every request of the knowledge agent."""

        def __init__(self, model: torch.nn.Module, tokenizer: Any, **_: Any) -> None:
            super().__init__(model, tokenizer)
            self.fail = lambda session, turn: session.startswith(prefix)

    return classmethod(lambda cls, model, tokenizer, **kw: _Policy(model, tokenizer))


def test_an_agent_failing_every_consult_stops_the_run(
    tmp_path: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TransformersGenerator, "from_model", _policy_failing_for("knowledge:"))
    cfg = make_config(tmp_path / "run", tiny_model_dir, env={"max_new_tokens_per_turn": 24})
    with pytest.raises(embedded.BackendFailure) as caught:
        EmbeddedTrainer(cfg, progress=False).run()

    message = str(caught.value)
    assert "train.max_agent_error_rate=0.5" in message
    assert "agent_error 100%" in message and "knowledge" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_agent_backend_down_fails_before_the_first_step(
    tmp_path: Path, tiny_model_dir: str, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agents.pool

    down = ScriptedGenerator(tokenizer, ["never"], fail=lambda session, turn: True)
    monkeypatch.setattr(agents.pool, "make_backend", lambda spec, **kw: down)
    cfg = make_config(
        tmp_path / "run",
        tiny_model_dir,
        agents={"agents": {"knowledge": {"backend": tiny_model_dir}}},
    )
    with pytest.raises(
        embedded.BackendFailure, match="agents down before the first step"
    ) as caught:
        EmbeddedTrainer(cfg, progress=False).run()

    assert f"knowledge (backend {tiny_model_dir}): a one-token probe failed" in str(caught.value)
    assert "reasoning" not in str(caught.value)  # on the policy's backend, which is up
    assert not (tmp_path / "run" / "rollouts").exists()


def test_a_policy_server_answering_garbage_fails_before_the_first_step(
    tmp_path: Path, tiny_model_dir: str
) -> None:
    from sglang_loopback import LoopbackSGLangServer

    class GarbageServer(LoopbackSGLangServer):
        """Loads weights fine, answers every /generate with JSON that lacks meta_info."""

        async def _generate(self, body: Any) -> tuple[int, Any]:
            return 200, {"text": "", "output_ids": [1, 2]}

    with GarbageServer(
        TransformersGenerator(tiny_model_dir, device="cpu", max_context=512)
    ) as server:
        cfg = make_config(
            tmp_path / "run",
            tiny_model_dir,
            policy={
                "backend": f"sglang://127.0.0.1:{server.port}",
                "sglang_options": {"max_retries": 0},
            },
        )
        with pytest.raises(embedded.BackendFailure, match="failed its health check") as caught:
            EmbeddedTrainer(cfg, progress=False).run()
    assert "meta_info" in str(caught.value)
    assert not (tmp_path / "run" / "rollouts").exists()
