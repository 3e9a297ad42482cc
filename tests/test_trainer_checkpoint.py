"""Checkpoints: exact round trip, atomic saves, keep-last-K, and exact resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_model import random_llama

import trainers.checkpoint as checkpoint
from trainers.checkpoint import load_latest, restore, save_checkpoint, should_save
from trainers.optim import OptimConfig, build_optimizer, build_scheduler
from trainers.update import UpdateBatch, compute_old_logprobs, ppo_update

VOCAB = 61


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int):
    return random_llama(
        VOCAB, seed=seed, hidden_size=16, layers=1, heads=2, kv_heads=1, max_positions=32
    )


OPTIM = OptimConfig(lr=1e-2, warmup_steps=3, schedule="cosine", total_steps=6, weight_decay=0.01)


def fresh_run(seed: int):
    model = tiny_llama(seed)
    optimizer = build_optimizer(model, OPTIM)
    return model, optimizer, build_scheduler(optimizer, OPTIM)


def toy_loss(*, logprobs, old_logprobs, advantages, loss_mask, **_):
    """Deterministic policy-gradient loss (token mean)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return -(ratio * advantages[:, None] * loss_mask).sum() / loss_mask.sum(), {}


def train_steps(model, optimizer, scheduler, start: int, stop: int) -> None:
    """Each step draws its data from the torch, numpy and python generators."""
    for step in range(start, stop):
        ids = torch.randint(1, VOCAB, (4, 8))
        mask = torch.ones_like(ids)
        loss_mask = (torch.rand(4, 8) < 0.7).float()
        loss_mask[:, 0] = 0
        loss_mask[:, -1] = 1
        advantages = torch.randn(4) + float(np.random.normal()) + random.uniform(-1, 1)
        batch = UpdateBatch(
            input_ids=ids,
            attention_mask=mask,
            loss_mask=loss_mask,
            agent_mask=torch.zeros(4, 8, dtype=torch.bool),
            behavior_logprobs=torch.full((4, 8), torch.nan),
            advantages=advantages,
            old_logprobs=compute_old_logprobs(model, ids_and_mask(ids, mask), 4),
        )
        ppo_update(
            model,
            optimizer,
            scheduler,
            batch,
            toy_loss,
            ppo_epochs=2,
            minibatch_size=2,
            micro_batch_size=1,
            max_grad_norm=1.0,
            seed=1000 + step,
        )


class ids_and_mask:  # noqa: N801 - a tiny record with the attributes compute_old_logprobs reads
    def __init__(self, input_ids, attention_mask):
        self.input_ids, self.attention_mask = input_ids, attention_mask


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = fresh_run(seed=0)
    seed_all(123)
    train_steps(model, optimizer, scheduler, 0, 5)
    straight_draws = rng_draws()

    first, opt1, sched1 = fresh_run(seed=0)
    seed_all(123)
    train_steps(first, opt1, sched1, 0, 2)
    save_checkpoint(
        tmp_path,
        2,
        model=first,
        optimizer=opt1,
        scheduler=sched1,
        data_position={"step": 2, "epoch": 0},
        config=OPTIM,
    )
    del first, opt1, sched1
    torch.manual_seed(999)  # the resumed process starts from unrelated RNG states
    np.random.seed(999)
    random.seed(999)

    resumed, opt2, sched2 = fresh_run(seed=7)  # different init: weights must come from disk
    state = load_latest(tmp_path)
    assert state is not None and state.step == 2
    position = restore(state, model=resumed, optimizer=opt2, scheduler=sched2)
    assert position == {"step": 2, "epoch": 0}
    train_steps(resumed, opt2, sched2, position["step"], 5)

    assert_same_weights(model, resumed)
    assert rng_draws() == straight_draws
    assert sched2.last_epoch == scheduler.last_epoch == 20
    assert opt2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_round_trip_restores_every_state_exactly(tmp_path, tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = build_optimizer(model, OPTIM)
    scheduler = build_scheduler(optimizer, OPTIM)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    seed_all(5)
    path = save_checkpoint(
        tmp_path,
        10,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        data_position={"sampler": [3, 1, 2]},
        config=OPTIM,
    )
    expected_draws = rng_draws()

    assert path == tmp_path / "checkpoints" / "step_000010"
    assert (path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(path)  # a plain HF model directory
    assert_same_weights(model, loaded)
    assert AutoTokenizer.from_pretrained(path).encode("2+2=4") == tokenizer.encode("2+2=4")

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh_opt = build_optimizer(fresh, OPTIM)
    fresh_sched = build_scheduler(fresh_opt, OPTIM)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    state = load_latest(tmp_path)
    assert state.config == OPTIM.model_dump(mode="json")
    assert restore(state, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched) == {
        "sampler": [3, 1, 2]
    }
    assert_same_weights(model, fresh)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    saved_state = optimizer.state_dict()["state"]
    for key, value in fresh_opt.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, saved_state[key][name])
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert rng_draws() == expected_draws


def test_failure_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = fresh_run(seed=0)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, data_position={"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    real_save = torch.save

    def crash_on_rng(obj, path, *args, **kwargs):
        if str(path).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", crash_on_rng)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, data_position={"step": 2})
    monkeypatch.undo()

    # A hard kill leaves a temporary directory behind; it is never mistaken for a checkpoint.
    stale = tmp_path / "checkpoints" / ".tmp-step_000003-4242"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")

    state = load_latest(tmp_path)
    assert state.step == 1 and state.data_position == {"step": 1}
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    restored, _, _ = fresh_run(seed=3)
    restore(state, model=restored, restore_rng=False)
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    save_checkpoint(tmp_path, 4, model=model)
    assert not stale.exists()
    assert load_latest(tmp_path).step == 4


def test_pointer_is_updated_last(tmp_path, monkeypatch):
    model, _, _ = fresh_run(seed=0)
    save_checkpoint(tmp_path, 1, model=model)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=model)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert load_latest(tmp_path).step == 1


def test_keeps_only_the_last_k(tmp_path):
    model, _, _ = fresh_run(seed=0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_000004", "step_000005"]
    assert load_latest(tmp_path).step == 5


def test_max_step_restores_the_newest_at_or_before_it(tmp_path):
    """A step committed elsewhere (several peers) wins over this run's newer checkpoint."""
    saved = {}
    for step in (1, 2, 3):
        model, _, _ = fresh_run(seed=step)
        save_checkpoint(tmp_path, step, model=model, keep_last=3)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    model, _, _ = fresh_run(seed=0)
    state = checkpoint.restore_latest(tmp_path, model=model, max_step=2, restore_rng=False)
    assert state.step == 2
    assert all(torch.equal(v, saved[2][k]) for k, v in model.state_dict().items())
    assert checkpoint.restore_latest(tmp_path, model=model, max_step=0) is None
    assert checkpoint.restore_latest(tmp_path, model=model, restore_rng=False).step == 3


def test_no_checkpoint_and_save_schedule(tmp_path):
    assert load_latest(tmp_path) is None
    assert [s for s in range(0, 11) if should_save(s, 5)] == [5, 10]
    assert not should_save(3, 0)
