"""ppo_update: exact gradient accumulation, the non-finite guard, old log-probs."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import random_llama

from aipo_env.batch import TrajectoryBatch
from aipo_env.sources import CODE_POLICY, CODE_PROMPT
from trainers.logprobs import token_logprobs
from trainers.losses import AIPOLoss, LossConfig, aipo_policy_loss
from trainers.update import (
    UpdateBatch,
    compute_old_logprobs,
    micro_batches,
    on_policy_update,
    ppo_update,
)

VOCAB = 89


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0):
    return random_llama(VOCAB, seed=seed, layers=1)


def ppo_token_mean_loss(
    *,
    logprobs,
    old_logprobs,
    advantages,
    loss_mask,
    agent_mask,
    behavior_logprobs=None,
    rollout_logprobs=None,
    ref_logprobs=None,
    entropy=None,
):
    """A plain clipped PPO surrogate, token-mean over the trained tokens."""
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    loss = (surrogate * loss_mask).sum() / loss_mask.sum()
    clipped = ((ratio - 1).abs() > 0.2).float()
    return loss, {"clip_frac": float((clipped * loss_mask).sum() / loss_mask.sum())}


def trajectory_batch(rows: int = 6, width: int = 12, seed: int = 0) -> TrajectoryBatch:
    """Right-padded rows of different lengths, prompts of 3 tokens, some agent tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, width), generator=gen)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    source = torch.full((rows, width), -1)
    for r in range(rows):
        length = 5 + (r * 3) % (width - 4)
        attention_mask[r, :length] = 1
        source[r, :3] = CODE_PROMPT
        source[r, 3:length] = CODE_POLICY
    input_ids = input_ids * attention_mask
    agent_mask = torch.zeros(rows, width, dtype=torch.bool)
    agent_mask[::2, 4] = True
    loss_mask = (source == CODE_POLICY).float()
    behavior = torch.where(loss_mask.bool(), -torch.rand(rows, width, generator=gen), torch.nan)
    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        agent_mask=agent_mask,
        behavior_logprobs=behavior,
        prompt_lens=torch.full((rows,), 3),
        rewards=torch.arange(rows, dtype=torch.float),
        group_ids=[f"g{r // 2}" for r in range(rows)],
    )


def update_batch(model, seed: int = 0) -> UpdateBatch:
    batch = trajectory_batch(seed=seed)
    advantages = torch.linspace(-1.0, 1.5, len(batch))
    old = compute_old_logprobs(model, batch, micro_batch_size=4)
    # Perturb the old log-probs so ratios differ from 1 and some clip.
    old = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9))
    return UpdateBatch.from_trajectory_batch(batch, advantages, old)


def run_update(model, batch, loss_fn, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    args = dict(ppo_epochs=2, minibatch_size=4, micro_batch_size=4, max_grad_norm=None, seed=3)
    args.update(kwargs)
    return ppo_update(model, optimizer, None, batch, loss_fn, **args)


def max_param_diff(a, b) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def test_micro_batches_give_the_same_weights_as_whole_minibatches_token_mean():
    base = tiny_llama()
    batch = update_batch(base)
    whole, micro, naive = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    stats_whole = run_update(whole, batch, ppo_token_mean_loss, micro_batch_size=4)
    stats_micro = run_update(micro, batch, ppo_token_mean_loss, micro_batch_size=1)
    # Weighting micro losses by rows is wrong for a token mean when rows differ in length.
    run_update(naive, batch, ppo_token_mean_loss, micro_batch_size=1, accumulation="rows")

    assert stats_whole.optimizer_steps == stats_micro.optimizer_steps == 4
    assert max_param_diff(whole, base) > 1e-3  # the update moved the weights
    assert max_param_diff(whole, micro) < 1e-5
    assert max_param_diff(whole, naive) > 1e-4
    assert stats_micro.loss == pytest.approx(stats_whole.loss, abs=1e-5)
    assert stats_micro.loss_metrics["clip_frac"] == pytest.approx(
        stats_whole.loss_metrics["clip_frac"], abs=1e-6
    )
    assert 0 < stats_whole.loss_metrics["clip_frac"] < 1


def test_one_step_on_policy_update_matches_the_one_with_a_separate_old_logprob_pass():
    loss_fn = AIPOLoss(LossConfig())
    base = tiny_llama(seed=2)
    batch = trajectory_batch(seed=2)
    advantages = torch.linspace(-1.0, 1.5, len(batch))
    old = compute_old_logprobs(base, batch, micro_batch_size=4)
    separate = UpdateBatch.from_trajectory_batch(batch, advantages, old)
    own = UpdateBatch.from_trajectory_batch(batch, advantages, None)
    rows = len(batch)
    assert on_policy_update(base, rows, 1, rows) and not on_policy_update(base, rows, 2, rows)
    assert not on_policy_update(base, rows, 1, rows - 1)  # two optimizer steps
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    one_step = dict(ppo_epochs=1, minibatch_size=rows, micro_batch_size=2)
    stats_a = run_update(a, separate, loss_fn, **one_step)
    stats_b = run_update(b, own, loss_fn, **one_step)
    assert max_param_diff(a, base) > 1e-3
    assert max_param_diff(a, b) < 1e-6
    assert stats_b.loss == pytest.approx(stats_a.loss, abs=1e-6)
    # More than one optimizer step needs the old log-probs computed beforehand.
    with pytest.raises(ValueError, match="ppo_epochs=2"):
        run_update(copy.deepcopy(base), own, loss_fn, ppo_epochs=2, minibatch_size=rows)
    dropout = copy.deepcopy(base)
    dropout.config.attention_dropout = 0.1
    assert not on_policy_update(dropout, rows, 1, rows)


def test_micro_batches_group_similar_lengths_and_drop_their_all_padding_columns(monkeypatch):
    import trainers.update as update_module

    widths = []
    real = update_module.token_logprobs

    def recording(model, input_ids, attention_mask, **kwargs):
        widths.append((input_ids.shape[1], int(attention_mask.sum(dim=1).max())))
        return real(model, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(update_module, "token_logprobs", recording)
    base = tiny_llama(seed=3)
    batch = trajectory_batch(rows=6, width=16, seed=3)  # lengths 5, 8, 11, 14, 5, 8
    old = compute_old_logprobs(base, batch, micro_batch_size=2)
    unpadded = [compute_old_logprobs(base, _row(batch, r), 1)[0] for r in range(6)]
    for r in range(6):
        n = int(batch.attention_mask[r].sum())
        assert torch.allclose(old[r, :n], unpadded[r][:n], atol=1e-5)
        assert (old[r, n:] == 0).all()
    # Sorted by length: (5, 5), (8, 8), (11, 14); each cut to its longest row.
    assert widths[:3] == [(5, 5), (8, 8), (14, 14)]
    widths.clear()
    update = UpdateBatch.from_trajectory_batch(batch, torch.linspace(-1, 1, 6), old)
    run_update(
        copy.deepcopy(base),
        update,
        ppo_token_mean_loss,
        ppo_epochs=1,
        minibatch_size=6,
        micro_batch_size=2,
    )
    assert sorted(widths) == [(5, 5), (8, 8), (14, 14)]


def _row(batch: TrajectoryBatch, r: int) -> TrajectoryBatch:
    n = int(batch.attention_mask[r].sum())
    return TrajectoryBatch(
        input_ids=batch.input_ids[r : r + 1, :n],
        attention_mask=batch.attention_mask[r : r + 1, :n],
        loss_mask=batch.loss_mask[r : r + 1, :n],
        agent_mask=batch.agent_mask[r : r + 1, :n],
        behavior_logprobs=batch.behavior_logprobs[r : r + 1, :n],
        prompt_lens=batch.prompt_lens[r : r + 1],
        rewards=batch.rewards[r : r + 1],
        group_ids=batch.group_ids[r : r + 1],
    )


@pytest.mark.parametrize(
    ("aggregation", "accumulation"),
    [("token_mean", "tokens"), ("seq_mean_token_mean", "rows"), ("seq_sum_norm", "rows")],
)
def test_accumulation_is_exact_with_the_aipo_loss(aggregation, accumulation):
    loss_fn = AIPOLoss(LossConfig(aggregation=aggregation))
    base = tiny_llama(seed=1)
    batch = update_batch(base, seed=1)
    whole, micro = copy.deepcopy(base), copy.deepcopy(base)
    run_update(whole, batch, loss_fn, micro_batch_size=4, accumulation=accumulation)
    run_update(micro, batch, loss_fn, micro_batch_size=1, accumulation=accumulation)
    assert max_param_diff(whole, base) > 1e-3
    assert max_param_diff(whole, micro) < 1e-5


def test_non_finite_loss_leaves_weights_bit_identical_and_dumps_the_batch(tmp_path):
    model = tiny_llama()
    batch = update_batch(model)
    batch.advantages[:] = torch.nan
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    stats = ppo_update(
        model,
        optimizer,
        scheduler,
        batch,
        ppo_token_mean_loss,
        ppo_epochs=1,
        minibatch_size=3,
        micro_batch_size=2,
        max_grad_norm=1.0,
        dump_dir=tmp_path / "dumps",
        update_index=7,
    )
    assert stats.skipped_steps == 2 and stats.optimizer_steps == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert optimizer.state_dict()["state"] == {}  # Adam moments never saw a NaN
    assert scheduler.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())
    dumps = sorted((tmp_path / "dumps").glob("nonfinite_u000007_*.pt"))
    assert len(dumps) == 2
    dumped = [torch.load(d, weights_only=True) for d in dumps]
    assert dumped[0]["reason"] == "loss"
    rows = torch.cat([d["input_ids"] for d in dumped])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, batch.input_ids.tolist()))
    assert sorted(torch.cat([d["rewards"] for d in dumped]).tolist()) == batch.rewards.tolist()
    assert {"attention_mask", "loss_mask", "agent_mask"} <= dumped[0].keys()


def test_non_finite_gradient_with_finite_loss_is_skipped(tmp_path):
    def infinite_gradient_loss(*, logprobs, loss_mask, **_):
        delta = ((logprobs - logprobs.detach()) * loss_mask).sum()
        return torch.sqrt(delta.abs()), {}  # value 0, gradient 1 / (2 sqrt(0)) = inf

    model = tiny_llama()
    batch = update_batch(model)
    before = copy.deepcopy(model.state_dict())
    stats = run_update(model, batch, infinite_gradient_loss, ppo_epochs=1, dump_dir=tmp_path)
    assert stats.skipped_steps == 2 and stats.optimizer_steps == 0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    reasons = {torch.load(p, weights_only=True)["reason"] for p in tmp_path.glob("*.pt")}
    assert reasons == {"grad_norm"}


def test_one_bad_minibatch_is_skipped_and_the_others_applied(tmp_path):
    model = tiny_llama()
    batch = update_batch(model)
    batch.advantages[5] = torch.nan
    stats = run_update(
        model, batch, ppo_token_mean_loss, ppo_epochs=1, minibatch_size=2, dump_dir=tmp_path
    )
    assert (stats.optimizer_steps, stats.skipped_steps) == (2, 1)
    (dump,) = tmp_path.glob("*.pt")
    bad_row = batch.input_ids[5].tolist()
    assert bad_row in torch.load(dump, weights_only=True)["input_ids"].tolist()


def test_scheduler_steps_once_per_applied_optimizer_step_and_grad_is_clipped():
    model = tiny_llama()
    batch = update_batch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    stats = ppo_update(
        model,
        optimizer,
        scheduler,
        batch,
        ppo_token_mean_loss,
        ppo_epochs=3,
        minibatch_size=4,
        micro_batch_size=2,
        max_grad_norm=1e-3,
    )
    assert stats.optimizer_steps == 6 and scheduler.last_epoch == 6
    assert stats.lr == pytest.approx(0.5**5)
    assert stats.grad_norm > 1e-3  # measured before clipping


def full_logprobs(model, input_ids, attention_mask):
    """The textbook log-probs of every token: full logits, log_softmax, gather, shift by one."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    first = torch.zeros(input_ids.shape[0], 1)
    return torch.cat([first, picked], dim=1), torch.cat([first, entropy], dim=1)


def test_compute_old_logprobs_fills_the_loss_mask_and_keeps_train_mode():
    model = tiny_llama()
    model.train()
    batch = trajectory_batch()
    old = compute_old_logprobs(model, batch, micro_batch_size=4)
    assert model.training and not old.requires_grad
    with torch.no_grad():
        want, _ = full_logprobs(model.eval(), batch.input_ids, batch.attention_mask)
    trained = batch.loss_mask.bool()
    torch.testing.assert_close(old[trained], want[trained], rtol=1e-5, atol=1e-6)
    assert torch.equal(old[~trained], torch.zeros(int((~trained).sum())))


def test_compute_old_logprobs_without_a_loss_mask_covers_every_real_token():
    model = tiny_llama().eval()
    batch = trajectory_batch()
    old = compute_old_logprobs(model, ids_only(batch), micro_batch_size=4)
    with torch.no_grad():
        want, _ = token_logprobs(model, batch.input_ids, batch.attention_mask)
        full, _ = full_logprobs(model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(old, want, rtol=1e-5, atol=1e-6)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(old[real], full[real], rtol=1e-5, atol=1e-6)


class ids_only:  # noqa: N801 - a record with only the attributes a reference-model pass needs
    def __init__(self, batch):
        self.input_ids, self.attention_mask = batch.input_ids, batch.attention_mask


def test_one_update_equals_the_aipo_loss_on_full_log_probs_of_the_whole_minibatch():
    """Old, reference and current log-probs and entropy only on the loss mask, micro-batched,
    give the weights and loss of the textbook computation on every position at once."""
    config = LossConfig(
        eps_clip_high=0.28, kl_coef=0.05, entropy_coef=0.01, rollout_correction="tis"
    )
    base, ref_model = tiny_llama(seed=2), tiny_llama(seed=3).eval()
    batch = trajectory_batch(seed=2)
    advantages = torch.linspace(-1.0, 1.5, len(batch))
    noise = 0.3 * torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(4))

    ours = copy.deepcopy(base)
    old = compute_old_logprobs(ours, batch, micro_batch_size=4) + noise
    ref = compute_old_logprobs(ref_model, batch, micro_batch_size=4)
    update = UpdateBatch.from_trajectory_batch(batch, advantages, old, ref)
    stats = run_update(
        ours,
        update,
        AIPOLoss(config),
        ppo_epochs=1,
        minibatch_size=len(batch),
        micro_batch_size=2,
        with_entropy=True,
    )

    textbook = copy.deepcopy(base)
    with torch.no_grad():
        full_old = full_logprobs(textbook, batch.input_ids, batch.attention_mask)[0] + noise
        full_ref = full_logprobs(ref_model, batch.input_ids, batch.attention_mask)[0]
    logprobs, entropy = full_logprobs(textbook, batch.input_ids, batch.attention_mask)
    loss, _ = aipo_policy_loss(
        config,
        logprobs,
        full_old,
        advantages,
        batch.loss_mask,
        batch.agent_mask,
        behavior_logprobs=batch.behavior_logprobs,
        rollout_logprobs=batch.behavior_logprobs,
        ref_logprobs=full_ref,
        entropy=entropy,
    )
    loss.backward()
    torch.optim.SGD(textbook.parameters(), lr=0.5).step()

    assert stats.optimizer_steps == 1 and stats.loss == pytest.approx(loss.item(), abs=1e-5)
    assert stats.loss_metrics["tokens/agent_trained"] > 0  # the agent-token term took part
    assert max_param_diff(ours, base) > 1e-3
    assert max_param_diff(ours, textbook) < 1e-5


def test_update_batch_rejects_misaligned_tensors():
    batch = trajectory_batch()
    with pytest.raises(ValueError, match="old_logprobs"):
        UpdateBatch.from_trajectory_batch(batch, torch.zeros(len(batch)), torch.zeros(2, 3))


def test_the_loss_receives_the_rollout_log_probs_for_its_rollout_correction():
    model = tiny_llama()
    batch = update_batch(model)
    seen = []

    def recording_loss(**kwargs):
        seen.append(kwargs["rollout_logprobs"])
        return ppo_token_mean_loss(**kwargs)

    run_update(
        model,
        batch,
        recording_loss,
        ppo_epochs=1,
        minibatch_size=len(batch),
        micro_batch_size=len(batch),
    )
    assert len(seen) == 1 and seen[0] is not None
    # One minibatch of every row (shuffled): the rows' behaviour log-probs, as a multiset.
    got = torch.sort(torch.nan_to_num(seen[0], nan=9.0).flatten()).values
    want = torch.sort(torch.nan_to_num(batch.behavior_logprobs, nan=9.0).flatten()).values
    assert torch.equal(got, want)


def grouped_batch(seed: int = 5) -> TrajectoryBatch:
    """Three prompts (3, 4 and 3 tokens) with 3, 2 and 1 samples: rows of one prompt share it."""
    batch = trajectory_batch(rows=6, width=14, seed=seed)
    prompts = {0: [0, 1, 2], 1: [3, 4], 2: [5]}
    for lead, rows in prompts.items():
        start = 4 if lead == 1 else 3
        for r in rows:
            batch.input_ids[r, :start] = batch.input_ids[rows[0], :start]
            batch.loss_mask[r, :start] = 0
            batch.agent_mask[r, :start] = False
    return batch


def test_micro_batches_keep_a_prompts_samples_together_with_the_prefix_they_share():
    batch = grouped_batch()
    update = UpdateBatch.from_trajectory_batch(batch, torch.zeros(6), None)
    shared = [(rows.tolist(), groups) for rows, groups in micro_batches(update, 3)]
    # Prompt 0 (3 tokens, rows 0-2) fills a micro-batch; prompt 1 (4 tokens, rows 3-4) is
    # a group of its own; row 5 shares nothing.
    assert sorted(sorted(rows) for rows, _ in shared) == [[0, 1, 2], [3, 4], [5]]
    groups = {tuple(sorted(rows)): g for rows, g in shared}
    assert groups == {(0, 1, 2): [(2, 3)], (3, 4): [(3, 2)], (5,): None}
    # Room for both groups: one micro-batch, each group's rows together, in its order.
    (rows, packed), alone = list(micro_batches(update, 5))
    assert sorted(packed) == [(2, 3), (3, 2)] and alone[1] is None
    first = packed[0][1]
    assert {tuple(sorted(rows.tolist()[:first])), tuple(sorted(rows.tolist()[first:]))} == {
        (0, 1, 2),
        (3, 4),
    }
    plain = list(micro_batches(update, 2, share_prefix=False))
    assert all(g is None for _, g in plain)
    assert sorted(r for rows, _ in plain for r in rows.tolist()) == list(range(6))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_sharing_the_prompt_gives_the_same_update(with_entropy):
    loss_fn = AIPOLoss(LossConfig(entropy_coef=0.01 if with_entropy else 0.0))
    base = tiny_llama(seed=6)
    batch = grouped_batch()
    update = UpdateBatch.from_trajectory_batch(batch, torch.linspace(-1.0, 1.5, 6), None)
    one_step = dict(ppo_epochs=1, minibatch_size=6, micro_batch_size=5, with_entropy=with_entropy)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    stats_a = run_update(a, update, loss_fn, share_prefix=True, **one_step)
    stats_b = run_update(b, update, loss_fn, share_prefix=False, **one_step)
    assert max_param_diff(a, base) > 1e-3
    assert max_param_diff(a, b) < 1e-5
    assert stats_a.loss == pytest.approx(stats_b.loss, abs=1e-6)
    assert stats_a.grad_norm == pytest.approx(stats_b.grad_norm, rel=1e-5)
    # Token counts add up over micro-batches: the same as from one micro-batch of all rows.
    whole = run_update(copy.deepcopy(base), update, loss_fn, **{**one_step, "micro_batch_size": 6})
    for key in ("tokens/policy", "tokens/agent"):
        assert whole.loss_metrics[key] > 0
        assert stats_a.loss_metrics[key] == stats_b.loss_metrics[key] == whole.loss_metrics[key]
