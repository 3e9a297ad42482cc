"""Rows whose gradient is zero stay out of the forward; packed rows give the padded gradient.

Both are checked against the full padded computation on a tiny random Llama: the
weights after one plain SGD step (learning rate 1, no clipping: the step is the
gradient) must agree. Each test also shows its check can fail: the naive alternative
(dropping the rows from the normalisers, or letting rows see each other) gives another
gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import random_llama

import trainers.update as update_module
from trainers.advantages import compute_advantages
from trainers.logprobs import token_logprobs
from trainers.losses import AIPOLoss, LossConfig
from trainers.packing import pack_rows
from trainers.update import UpdateBatch, compute_old_logprobs, ppo_update, zero_gradient_rows

VOCAB = 89


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NoSkip(AIPOLoss):
    """The same loss, without telling the update which rows have a zero gradient."""

    def zero_gradient_rows(self, loss_mask, advantages):
        return torch.zeros(loss_mask.shape[0], dtype=torch.bool)


def grouped_batch(rewards: list[float], seed: int = 0, agent: bool = True) -> UpdateBatch:
    """Groups of 4 samples sharing a prompt (5 or 4 tokens), right-padded responses, GRPO advantages."""
    rows = len(rewards)
    gen = torch.Generator().manual_seed(seed)
    width = 16
    ids = torch.randint(1, VOCAB, (rows, width), generator=gen)
    mask = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    agent_mask = torch.zeros(rows, width, dtype=torch.bool)
    for r in range(rows):
        group = r // 4
        prompt = 5 if group % 2 == 0 else 4
        ids[r, :prompt] = ids[4 * group, :prompt]
        length = 9 + (r * 5) % 8
        mask[r, :length] = 1
        loss_mask[r, prompt:length] = 1.0
        if agent and r % 2 == 0:
            agent_mask[r, prompt + 1 : prompt + 3] = True
    ids = ids * mask
    behaviour = torch.where(agent_mask, -torch.rand(rows, width, generator=gen), torch.nan)
    groups = [f"g{r // 4}" for r in range(rows)]
    advantages = compute_advantages(torch.tensor(rewards), groups, "grpo")
    return UpdateBatch(
        input_ids=ids,
        attention_mask=mask,
        loss_mask=loss_mask,
        agent_mask=agent_mask,
        behavior_logprobs=behaviour,
        advantages=advantages,
        old_logprobs=None,
    )


#: Two groups with a reward spread, two whose rewards are all equal (zero advantage).
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def sgd_step(model, batch, loss_fn, **kwargs):
    """One optimizer step of plain SGD with learning rate 1: the weights move by minus the gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    args = dict(
        ppo_epochs=1,
        minibatch_size=len(batch),
        micro_batch_size=4,
        max_grad_norm=None,
        seed=1,
        accumulation="tokens",
    )
    args.update(kwargs)
    return ppo_update(model, optimizer, None, batch, loss_fn, **args)


def max_param_diff(a, b) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def rows_through_the_model(monkeypatch) -> list[int]:
    """Record the rows of every forward the update runs."""
    seen: list[int] = []
    real = update_module.token_logprobs

    def spy(model, input_ids, *args, **kwargs):
        seen.append(int(input_ids.shape[0]))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(update_module, "token_logprobs", spy)
    return seen


@pytest.mark.parametrize(
    ("aggregation", "accumulation", "positive_only", "normalization"),
    [
        ("token_mean", "tokens", True, "separate"),
        ("token_mean", "tokens", False, "separate"),
        ("token_mean", "tokens", False, "shared"),
        ("seq_mean_token_mean", "rows", True, "separate"),
        ("seq_mean_token_mean", "rows", False, "shared"),
        ("seq_sum_norm", "rows", False, "separate"),
    ],
)
@pytest.mark.parametrize("pack", [False, True])
def test_rows_with_zero_advantage_stay_out_of_the_forward_and_the_gradient_is_unchanged(
    monkeypatch, aggregation, accumulation, positive_only, normalization, pack
):
    config = LossConfig(
        aggregation=aggregation,
        agent_positive_only=positive_only,
        agent_normalization=normalization,
        agent_mode="shaped",
    )
    base = random_llama(VOCAB, seed=2, layers=1)
    batch = grouped_batch(REWARDS)
    zero = zero_gradient_rows(AIPOLoss(config), batch)
    assert zero.tolist() == [r // 4 in (1, 3) for r in range(16)]

    full = copy.deepcopy(base)
    sgd_step(full, batch, NoSkip(config), accumulation=accumulation, pack=pack)
    seen = rows_through_the_model(monkeypatch)
    skipped = copy.deepcopy(base)
    stats = sgd_step(skipped, batch, AIPOLoss(config), accumulation=accumulation, pack=pack)
    assert stats.skipped_rows == 8 and stats.skipped == 0 and stats.optimizer_steps == 1
    assert sum(seen) == 8  # only the rows with a gradient went through the model
    assert max_param_diff(full, base) > 1e-3
    assert max_param_diff(skipped, full) < 1e-6
    # The control: dropping the rows from the batch drops them from the normalisers too.
    dropped = copy.deepcopy(base)
    live = (~zero).nonzero(as_tuple=True)[0]
    sgd_step(dropped, batch.select(live), NoSkip(config), accumulation=accumulation, pack=pack)
    assert max_param_diff(dropped, full) > 1e-4


def test_a_batch_without_a_nonzero_advantage_is_not_run(monkeypatch):
    base = random_llama(VOCAB, seed=3, layers=1)
    batch = grouped_batch([1.0] * 4 + [0.0] * 4)
    assert torch.equal(batch.advantages, torch.zeros(8))
    seen = rows_through_the_model(monkeypatch)
    model = copy.deepcopy(base)
    stats = sgd_step(model, batch, AIPOLoss())
    assert (stats.skipped, stats.skipped_rows, stats.optimizer_steps) == (1, 8, 0)
    assert seen == [] and max_param_diff(model, base) == 0.0
    # The full computation's gradient is zero everywhere: nothing was lost...
    full = copy.deepcopy(base)
    full_stats = sgd_step(full, batch, NoSkip())
    assert max_param_diff(full, base) == 0.0
    assert stats.loss_metrics["tokens/policy"] == full_stats.loss_metrics["tokens/policy"] > 0
    # ...but AdamW with momentum would still have moved the weights on that zero gradient.
    adam = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(adam.parameters(), lr=0.1)
    moving = grouped_batch([1.0, 0.0, 1.0, 0.0] * 2)
    for b in (moving, batch):
        before = copy.deepcopy(adam)
        ppo_update(
            adam, optimizer, None, b, NoSkip(), ppo_epochs=1, minibatch_size=8,
            micro_batch_size=8, max_grad_norm=None,
        )  # fmt: skip
    assert max_param_diff(adam, before) > 1e-3


@pytest.mark.parametrize("term", ["kl", "entropy"])
def test_a_kl_or_entropy_term_keeps_every_row(term):
    config = LossConfig(kl_coef=0.5) if term == "kl" else LossConfig(entropy_coef=0.5)
    base = random_llama(VOCAB, seed=4, layers=1)
    batch = grouped_batch(REWARDS)
    if term == "kl":
        batch.ref_logprobs = compute_old_logprobs(random_llama(VOCAB, seed=9, layers=1), batch, 4)
    assert not zero_gradient_rows(AIPOLoss(config), batch).any()
    kept = copy.deepcopy(base)
    stats = sgd_step(kept, batch, AIPOLoss(config), with_entropy=term == "entropy")
    assert stats.skipped_rows == 0
    # Those rows do carry a gradient here: leaving them out would change the step.
    zero_adv = batch.advantages == 0
    alone = copy.deepcopy(base)
    sgd_step(
        alone,
        batch.select(zero_adv.nonzero(as_tuple=True)[0]),
        AIPOLoss(config),
        with_entropy=term == "entropy",
    )
    assert max_param_diff(alone, base) > 1e-4


def test_old_log_probs_of_skipped_rows_are_never_read():
    base = random_llama(VOCAB, seed=5, layers=1)
    batch = grouped_batch(REWARDS)
    batch.old_logprobs = compute_old_logprobs(base, batch, 4)
    poisoned = copy.deepcopy(batch)
    zero = zero_gradient_rows(AIPOLoss(), batch)
    poisoned.old_logprobs[zero] = torch.nan
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    kwargs = dict(ppo_epochs=2, minibatch_size=8)
    stats = sgd_step(a, poisoned, AIPOLoss(), **kwargs)
    sgd_step(b, batch, AIPOLoss(), **kwargs)
    assert stats.skipped_steps == 0 and stats.optimizer_steps == 4
    assert max_param_diff(a, b) == 0.0


def test_all_equal_rewards_give_exactly_zero_advantage():
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.25])
    groups = ["a", "a", "a", "b", "b", "b"]
    # The formula's floats: 0.9 three times sums to a mean that is not 0.9, and GRPO
    # divides the rounding error by a standard deviation of about 0.
    mean = rewards[:3].sum() / 3
    assert float((rewards[0] - mean) / ((rewards[:3] - mean).std() + 1e-6)) != 0.0
    for estimator in ("grpo", "dr_grpo", "rloo"):
        advantages = compute_advantages(rewards, groups, estimator)
        assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
        assert (advantages[3:] != 0).all()


# -- packing ---------------------------------------------------------------------------


def padded_rows(seed: int = 0, left: bool = False):
    """Two samples of a 5-token prompt, then a row alone; right- (or left-) padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 13), generator=gen)
    ids[1, :5] = ids[0, :5]
    lengths = [13, 9, 7]
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        if left:
            mask[r, 13 - n :] = 1
        else:
            mask[r, :n] = 1
    response = mask.bool() & (mask.cumsum(1) > 5)
    return ids * mask, mask, response


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("groups", "left"), [(None, False), ([(4, 2), (4, 1)], False), (None, True)]
)
def test_packed_log_probs_and_gradients_equal_the_padded_ones(attention, groups, left):
    model = random_llama(VOCAB, seed=6)
    model.config._attn_implementation = attention
    ids, mask, response = padded_rows(left=left)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(7))
    results = []
    for pack in (False, True):
        model.zero_grad()
        lp, h = token_logprobs(
            model, ids, mask, positions=response, with_entropy=True, prefix_groups=groups, pack=pack
        )
        ((lp + 0.1 * h) * weights).sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    (padded, padded_grads), (packed, packed_grads) = results
    assert (padded[response] < 0).all()
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    for got, want in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_packed_sequence_holds_each_real_token_once_and_a_shared_prompt_once():
    ids, mask, _ = padded_rows()
    alone = pack_rows(ids, mask)
    assert alone.input_ids.shape == (1, int(mask.sum()))
    shared = pack_rows(ids, mask, [(4, 2)])
    assert shared.input_ids.shape == (1, int(mask.sum()) - 4)
    # Positions restart at every row (and continue after the shared prompt).
    assert shared.position_ids[0].tolist() == list(range(13)) + list(range(4, 9)) + list(range(7))
    # Every real (row, column) maps to its own token.
    real = mask.bool()
    assert torch.equal(shared.input_ids[0][shared.index[real]], ids[real])
    assert (shared.index[~real] == -1).all()


def test_a_packed_row_sees_only_its_own_tokens_and_its_groups_prompt():
    model = random_llama(VOCAB, seed=8)
    ids, mask, response = padded_rows(seed=3)
    groups = [(4, 2), (4, 1)]
    with torch.no_grad():
        before, _ = token_logprobs(
            model, ids, mask, positions=response, prefix_groups=groups, pack=True
        )
        other = ids.clone()
        other[2, :7] = (other[2, :7] + 1) % VOCAB + 1  # the row alone changes
        other[1, 6:9] = (other[1, 6:9] + 1) % VOCAB + 1  # the second sample's response too
        after, _ = token_logprobs(
            model, other, mask, positions=response, prefix_groups=groups, pack=True
        )
        prompt = ids.clone()
        prompt[:2, 2] = (prompt[0, 2] + 1) % VOCAB + 1  # the prompt both samples share
        moved, _ = token_logprobs(
            model, prompt, mask, positions=response, prefix_groups=groups, pack=True
        )
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # row 0 never sees them
    assert not torch.equal(after[2], before[2])
    assert not torch.equal(moved[0], before[0]) and not torch.equal(moved[1], before[1])


@pytest.mark.parametrize("share_prefix", [False, True])
def test_a_packed_checkpointed_update_gives_the_weights_of_the_padded_one(share_prefix):
    base = random_llama(VOCAB, seed=10)
    batch = grouped_batch([1.0, 0.0, 0.5, 0.0, 0.2, 1.0, 0.0, 0.7], agent=True)
    models = {}
    for name, options in {
        "padded": dict(pack=False),
        "packed": dict(pack=True, checkpoint_layers=True),
    }.items():
        models[name] = copy.deepcopy(base)
        sgd_step(models[name], batch, AIPOLoss(), share_prefix=share_prefix, **options)
    assert max_param_diff(models["padded"], base) > 1e-3
    assert max_param_diff(models["packed"], models["padded"]) < 1e-5


def test_checkpointing_a_shared_prompt_without_packing_is_refused_by_the_config():
    from aipo.config import ConfigError, load_config
    from trainers.config import TrainConfig, default_config_path

    overrides = ["train.pack_rows=false", "train.checkpoint_layers=true"]
    with pytest.raises(ConfigError, match="needs train.pack_rows"):
        load_config(TrainConfig, default_config_path(), overrides)
    config = load_config(
        TrainConfig, default_config_path(), [*overrides[:1], "train.share_prefix=false"]
    )
    assert config.train.checkpoint_layers and not config.train.pack_rows


def test_token_counts_include_the_rows_left_out():
    base = random_llama(VOCAB, seed=11, layers=1)
    batch = grouped_batch(REWARDS)
    config = LossConfig(agent_positive_only=False)
    skipped = sgd_step(copy.deepcopy(base), batch, AIPOLoss(config))
    full = sgd_step(copy.deepcopy(base), batch, NoSkip(config))
    assert skipped.skipped_rows == 8
    for key in ("tokens/policy", "tokens/agent", "tokens/agent_trained"):
        assert skipped.loss_metrics[key] == full.loss_metrics[key] > 0
    assert skipped.loss_metrics["loss/total"] == pytest.approx(full.loss_metrics["loss/total"])
