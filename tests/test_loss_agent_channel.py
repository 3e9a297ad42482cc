"""The loss's agent-token channel (issue 25): what trains an agent's reply, and how strongly.

Supervised mode (weight 1 on grad log pi), positive-only advantages against cancellation and
inversion, separate normalisation (embedded, across micro-batches, and in OpenRLHF's loss),
baselines per prompt and consult, the refused combinations and the defaults both trainers share.
"""

from __future__ import annotations

import copy
import math
import types
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from tiny_model import random_llama

from aipo.config import ConfigError, load_config
from aipo_env.trajectory import Trajectory
from trainers.advantages import baseline_group_ids, compute_advantages
from trainers.config import TrainConfig, write_config
from trainers.embedded import shaped_advantages
from trainers.losses import AIPOLoss, LossConfig, aipo_policy_loss, loss_normalizers
from trainers.update import UpdateBatch, ppo_update

LN = math.log
RECIPES = sorted((Path(__file__).parents[1] / "configs" / "openrlhf").glob("*.yaml"))


def _loss_grad(config: LossConfig, logprobs: torch.Tensor, **inputs) -> torch.Tensor:
    logp = logprobs.detach().clone().requires_grad_()
    loss, _ = aipo_policy_loss(config, logp, **inputs)
    loss.backward()
    return logp.grad


# -- supervised mode ---------------------------------------------------------------------


def test_supervised_mode_puts_weight_one_on_grad_logp_even_for_rare_tokens() -> None:
    # Two agent tokens, one the policy finds rare (p = 0.001), behaviour log-probs unknown.
    probs = [0.001, 0.5]
    logp = torch.tensor([[LN(p) for p in probs]], dtype=torch.float64)
    inputs = dict(
        old_logprobs=logp,
        advantages=torch.tensor([2.0], dtype=torch.float64),
        loss_mask=torch.ones(1, 2),
        agent_mask=torch.ones(1, 2, dtype=torch.bool),
    )
    config = LossConfig(agent_mode="supervised", agent_loss_weight=0.5)
    loss, metrics = aipo_policy_loss(config, logp, **inputs)
    assert loss.item() == pytest.approx(-2.0 * 0.5 * (LN(0.001) + LN(0.5)) / 2)
    assert metrics["agent/coef_mean"] == 1.0 and metrics["agent/clip_frac"] == 0.0
    # d loss / d logp = -A * agent_loss_weight / 2 on both tokens: the rare one is not starved.
    supervised = _loss_grad(config, logp, **inputs)
    assert supervised[0].tolist() == pytest.approx([-0.5, -0.5])
    # In ratio mode (mu = 1) the weight is pi itself: the rare token gets 1/1000 of it.
    ratio = _loss_grad(LossConfig(agent_mode="ratio", agent_loss_weight=0.5), logp, **inputs)
    assert ratio[0, 0].item() == pytest.approx(-0.5 * 0.001)
    assert abs(supervised[0, 0]) > 100 * abs(ratio[0, 0])


# -- positive-only advantages: cancellation and inversion -------------------------------------


def _same_reply_group_grad(config: LossConfig, advantages: list[float]) -> torch.Tensor:
    """The gradient w.r.t. the logits of a group whose 4 samples got the same reply at t = 2, 3.

    The same context gives the same logits: one [T, V] tensor expanded over the group.
    """
    gen = torch.Generator().manual_seed(0)
    vocab, width = 7, 4
    shared = torch.randn(width, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (4, width), generator=gen)
    ids[:, 2:] = ids[0, 2:]  # the agent's reply: the same tokens in every sample
    logp = torch.log_softmax(shared.expand(4, width, vocab), dim=-1)
    logp = logp.gather(-1, ids[..., None]).squeeze(-1)
    agent = torch.zeros(4, width, dtype=torch.bool)
    agent[:, 2:] = True
    loss, _ = aipo_policy_loss(
        config,
        logp,
        logp.detach(),
        torch.tensor(advantages, dtype=torch.float64),
        torch.ones(4, width),
        agent,
        behavior_logprobs=torch.full((4, width), -0.3, dtype=torch.float64),
    )
    loss.backward()
    return shared.grad[2:]  # the agent tokens' logits


@pytest.mark.parametrize("mode", ["shaped", "ratio", "supervised"])
def test_identical_replies_cancel_exactly_unless_positive_only(mode: str) -> None:
    advantages = [1.0, 1.0, -1.0, -1.0]  # a GRPO group: they sum to zero
    off = _same_reply_group_grad(LossConfig(agent_mode=mode, agent_positive_only=False), advantages)
    assert torch.equal(off, torch.zeros_like(off))
    on = _same_reply_group_grad(LossConfig(agent_mode=mode), advantages)  # the default: on
    assert on.abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["shaped", "ratio", "supervised"])
def test_a_failed_episode_does_not_train_the_agents_reply_down(mode: str) -> None:
    assert LossConfig().agent_positive_only  # the default
    logp = torch.log(torch.tensor([[0.3, 0.2, 0.6], [0.3, 0.2, 0.6]], dtype=torch.float64))
    inputs = dict(
        old_logprobs=logp,
        advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
        loss_mask=torch.ones(2, 3),
        agent_mask=torch.tensor([[False, True, True]] * 2),
    )
    on = _loss_grad(LossConfig(agent_mode=mode), logp, **inputs)
    assert (on[1, 1:] == 0).all()  # A < 0: no agent-token gradient
    assert (on[0, 1:] < 0).all()  # A > 0: the reply is trained up
    off = _loss_grad(LossConfig(agent_mode=mode, agent_positive_only=False), logp, **inputs)
    assert (off[1, 1:] > 0).all()  # without it: trained down


# -- separate normalisation --------------------------------------------------------------------


def _batch(seed: int = 0, rows: int = 4, width: int = 10) -> dict[str, torch.Tensor]:
    """float64 inputs with policy and agent tokens (consulting and solo rows), some padding."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 4 - 0.01
    old = (logp + 0.2 * torch.randn(rows, width, generator=gen, dtype=torch.float64)).clamp(max=0)
    mask = torch.ones(rows, width, dtype=torch.float64)
    mask[1, 8:] = 0.0
    mask[3, 6:] = 0.0
    agent = torch.zeros(rows, width, dtype=torch.bool)
    agent[0, 3:7] = True  # consulting rows; rows 1 and 3 are solo
    agent[2, 2:4] = True
    beh = torch.where(agent, -torch.rand(rows, width, generator=gen, dtype=torch.float64), 0.0)
    return dict(
        logprobs=logp,
        old_logprobs=old,
        advantages=torch.tensor([1.2, -0.4, 0.7, -1.5], dtype=torch.float64),
        loss_mask=mask,
        agent_mask=agent,
        behavior_logprobs=beh,
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_separate_policy_part_equals_mask_mode_and_shared_dilutes_it(aggregation: str) -> None:
    inputs = _batch()
    logp = inputs.pop("logprobs")
    policy = inputs["loss_mask"].bool() & ~inputs["agent_mask"]

    def grad(**kw) -> torch.Tensor:
        return _loss_grad(LossConfig(aggregation=aggregation, **kw), logp, **inputs)

    masked = grad(agent_mode="mask")
    separate = grad(agent_normalization="separate")
    shared = grad(agent_normalization="shared")
    torch.testing.assert_close(separate[policy], masked[policy], rtol=1e-12, atol=1e-15)
    assert shared[policy].abs().sum() < 0.9 * masked[policy].abs().sum()
    if aggregation == "token_mean":
        n_policy = float(policy.sum())
        n_trained = n_policy + float(inputs["agent_mask"][inputs["advantages"] > 0].sum())
        torch.testing.assert_close(shared[policy], masked[policy] * n_policy / n_trained)


def test_separate_agent_part_is_a_mean_over_the_trained_agent_tokens() -> None:
    inputs = _batch()
    _, shared = aipo_policy_loss(LossConfig(agent_normalization="shared"), **inputs)
    _, separate = aipo_policy_loss(LossConfig(agent_normalization="separate"), **inputs)
    n_agent = separate["tokens/agent_trained"]  # rows 0 and 2, A > 0: 4 + 2 tokens
    assert n_agent == 6
    n_trained = separate["tokens/policy"] + n_agent
    assert separate["loss/agent"] == pytest.approx(shared["loss/agent"] * n_trained / n_agent)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
@pytest.mark.parametrize("normalization", ["separate", "shared"])
def test_micro_batches_with_the_minibatch_counts_add_up_to_the_minibatch_loss(
    aggregation: str, normalization: str
) -> None:
    config = LossConfig(aggregation=aggregation, agent_normalization=normalization)
    inputs = _batch()
    logp = inputs.pop("logprobs")
    whole = _loss_grad(config, logp, **inputs)
    counts = loss_normalizers(
        config, inputs["loss_mask"], inputs["agent_mask"], inputs["advantages"]
    )
    split = logp.detach().clone().requires_grad_()
    total = 0.0
    for rows in ([0, 1], [2, 3]):  # one consulting row each, different agent shares
        micro = {k: v[rows] for k, v in inputs.items()}
        loss, _ = aipo_policy_loss(config, split[rows], normalizers=counts, **micro)
        total = total + loss
    total.backward()
    full, _ = aipo_policy_loss(config, logp, **inputs)
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(split.grad, whole, rtol=1e-12, atol=1e-15)


def _update_batch() -> UpdateBatch:
    """4 rows: two short consulting rows, two long solo rows (micro-batches of 2 by length)."""
    gen = torch.Generator().manual_seed(4)
    vocab, width = 61, 14
    lengths = [7, 8, 13, 14]
    ids = torch.randint(1, vocab, (4, width), generator=gen)
    attention = torch.zeros(4, width, dtype=torch.long)
    loss_mask = torch.zeros(4, width)
    for r, n in enumerate(lengths):
        attention[r, :n] = 1
        loss_mask[r, 3:n] = 1.0
    agent = torch.zeros(4, width, dtype=torch.bool)
    agent[0, 4:6] = True
    agent[1, 4:7] = True
    return UpdateBatch(
        input_ids=ids * attention,
        attention_mask=attention,
        loss_mask=loss_mask,
        agent_mask=agent,
        behavior_logprobs=torch.where(agent, -0.5, torch.nan),
        advantages=torch.tensor([1.0, 0.5, -0.5, 1.0]),
        old_logprobs=None,
    )


def _updated(model, loss_fn, micro_batch_size: int):
    model = copy.deepcopy(model)
    ppo_update(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        None,
        _update_batch(),
        loss_fn,
        ppo_epochs=1,
        minibatch_size=4,
        micro_batch_size=micro_batch_size,
        max_grad_norm=None,
        share_prefix=False,
    )
    return model


def _max_diff(a, b) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


@pytest.fixture
def one_thread():
    """A tiny model runs fastest on one thread (and does not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_separate_update_in_two_micro_batches_equals_one(aggregation: str, one_thread) -> None:
    base = random_llama(61, seed=2, layers=1)
    loss_fn = AIPOLoss(LossConfig(aggregation=aggregation, agent_mode="supervised"))
    whole = _updated(base, loss_fn, micro_batch_size=4)
    halves = _updated(base, loss_fn, micro_batch_size=2)
    assert _max_diff(whole, base) > 1e-3  # the update moved the weights
    assert _max_diff(whole, halves) < 1e-6

    # Without the minibatch's counts, weighting each micro-batch by its token share is not
    # exact: the consulting micro-batch has a larger agent share than the minibatch.
    def without_counts(**kwargs):
        return loss_fn(**kwargs)

    accumulation = "tokens" if aggregation == "token_mean" else "rows"
    naive = copy.deepcopy(base)
    ppo_update(
        naive, torch.optim.SGD(naive.parameters(), lr=0.5), None, _update_batch(),
        without_counts, ppo_epochs=1, minibatch_size=4, micro_batch_size=2,
        max_grad_norm=None, share_prefix=False, accumulation=accumulation,
    )  # fmt: skip
    assert _max_diff(whole, naive) > 1e-4


# -- separate normalisation in OpenRLHF's loss --------------------------------------------------


@pytest.mark.parametrize("token_level", [True, False], ids=["token-mean", "seq-mean-token-mean"])
def test_openrlhf_separate_over_an_optimizer_step_equals_the_embedded_loss(token_level) -> None:
    loss_utils = pytest.importorskip("openrlhf.utils.loss_utils")
    from trainers.openrlhf.loss import (
        AGENT_FLAG_OFFSET,
        install_separate_normalizers,
        make_aipo_policy_loss_class,
    )

    config = LossConfig(agent_mode="shaped", agent_normalization="separate")
    inputs = _batch(seed=3)
    mu = inputs["behavior_logprobs"]
    rollout = torch.where(inputs["agent_mask"], AGENT_FLAG_OFFSET - mu, inputs["old_logprobs"])
    adv = inputs["advantages"][:, None].expand_as(mu).contiguous()
    ppo_actor = types.ModuleType("ppo_actor")  # the module whose counting the loss wraps
    ppo_actor.iter_grad_accum_global_norm = loss_utils.iter_grad_accum_global_norm
    assert install_separate_normalizers(ppo_actor, config)
    loss_fn = make_aipo_policy_loss_class()(agent_loss=config, token_level_loss=token_level)

    logp = inputs["logprobs"].clone().requires_grad_()
    micro = [
        types.SimpleNamespace(
            rows=rows,
            action_mask=inputs["loss_mask"][rows],
            rollout_log_probs=rollout[rows],
            advantages=adv[rows],
        )
        for rows in ([0, 1], [2, 3])
    ]
    gas = 2
    total = 0.0
    stream = ppo_actor.iter_grad_accum_global_norm(iter(micro), None, gas, lambda e: e.action_mask)
    for experience, info in stream:  # as ActorPPOTrainer.ppo_train and training_step call it
        out = loss_fn(
            logp[experience.rows],
            inputs["old_logprobs"][experience.rows],
            experience.advantages,
            action_mask=experience.action_mask,
            rollout_log_probs=experience.rollout_log_probs,
            **info,
        )
        total = total + out[0] / gas  # DeepSpeed scales each micro loss by 1 / gas
    total.backward()

    aggregation = "token_mean" if token_level else "seq_mean_token_mean"
    embedded_config = LossConfig(
        agent_mode="shaped", agent_normalization="separate", aggregation=aggregation
    )
    embedded_logp = inputs["logprobs"].clone().requires_grad_()
    embedded, _ = aipo_policy_loss(
        embedded_config, embedded_logp, **{k: v for k, v in inputs.items() if k != "logprobs"}
    )
    embedded.backward()
    assert total.item() == pytest.approx(embedded.item(), rel=1e-6)
    torch.testing.assert_close(logp.grad, embedded_logp.grad, rtol=1e-6, atol=1e-9)


def test_openrlhf_separate_without_the_steps_counts_is_refused() -> None:
    pytest.importorskip("openrlhf.models")
    from trainers.openrlhf.config import OpenRLHFRecipe
    from trainers.openrlhf.loss import encode_agent_logprob, make_aipo_policy_loss_class

    loss_fn = make_aipo_policy_loss_class()(agent_loss=LossConfig())
    logp = torch.full((1, 3), -0.5)
    rollout = torch.tensor([[-0.5, encode_agent_logprob(-0.2), -0.5]])
    with pytest.raises(RuntimeError, match="agent_normalization"):
        loss_fn(logp, logp, torch.ones(1, 3), torch.ones(1, 3), rollout, batch_num_tokens=3.0)
    with pytest.raises(ValidationError, match="dynamic_batch_enable"):
        OpenRLHFRecipe.model_validate({"openrlhf": {"train.dynamic_batch_enable": True}})
    shared = {"agent_normalization": "shared"}
    recipe = OpenRLHFRecipe.model_validate(
        {"agent_loss": shared, "openrlhf": {"train.dynamic_batch_enable": True}}
    )
    assert recipe.agent_loss.agent_normalization == "shared"


# -- baselines per prompt and consult ----------------------------------------------------------


def _trajectory(group: str, reward: float, consults: int, n: int) -> Trajectory:
    return Trajectory(
        trajectory_id=f"{group}-{n}",
        problem_id="p",
        task="t",
        group_id=group,
        token_ids=[1, 2, 3, 4],
        prompt_len=2,
        source=["prompt"] * 2 + ["policy"] * 2,
        loss_mask=[0, 0, 1, 1],
        behavior_logprobs=[None, None, -1.0, -1.0],
        reward=reward,
        consults=consults,
        finish_reason="eos",
    )


def _advantages(rows: list[Trajectory], groups: str) -> torch.Tensor:
    config = TrainConfig(
        policy={"max_context": 128},
        env={"max_total_tokens": 100},
        train={"advantage": "grpo", "advantage_groups": groups},
    )
    return shaped_advantages(rows, config)[0]


def test_solo_samples_are_judged_against_solo_samples_only() -> None:
    rows = [
        _trajectory("g", 0.0, consults=0, n=0),
        _trajectory("g", 1.0, consults=0, n=1),
        _trajectory("g", 1.0, consults=2, n=2),
        _trajectory("g", 1.0, consults=1, n=3),
    ]
    split = _advantages(rows, "prompt_and_consult")
    solo_only = compute_advantages(torch.tensor([0.0, 1.0]), ["g", "g"], "grpo")
    torch.testing.assert_close(split[:2], solo_only)  # +-0.707: GRPO of (0, 1)
    assert split[2:].tolist() == [0.0, 0.0]
    # One baseline for the whole group judges the solo attempts against help-boosted rewards:
    # the solo success counts for less (0.5), the solo failure is punished harder (-1.5).
    shared = _advantages(rows, "prompt")
    assert shared[1] < split[1] and shared[0] < 2 * split[0]


def test_a_sample_alone_in_its_subgroup_gets_advantage_zero() -> None:
    ids = baseline_group_ids(["a", "a", "a", "b", "b"], [True, False, False, True, True],
                             "prompt_and_consult")  # fmt: skip
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    for estimator in ("grpo", "dr_grpo", "rloo", "reinforce_baseline"):
        advantages = compute_advantages(rewards, ids, estimator, lone_groups="zero")
        assert advantages[0] == 0.0  # a's only consulting sample
        assert advantages[1] < 0 < advantages[2] and advantages[3] < 0 < advantages[4]
    with pytest.raises(ValueError, match="groups of size 1"):
        compute_advantages(rewards, ids, "grpo")


# -- refused combinations ----------------------------------------------------------------------


def test_positive_only_or_separate_set_with_mask_are_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match="agent_positive_only.*agent_mode='mask'"):
        LossConfig(agent_mode="mask", agent_positive_only=True)
    with pytest.raises(ValidationError, match="agent_normalization='separate'.*agent_mode='mask'"):
        LossConfig(agent_mode="mask", agent_normalization="separate")
    # Left at their defaults (or set to what mask does anyway), mask is accepted.
    assert not LossConfig(agent_mode="mask").trains_agent_tokens()
    LossConfig(agent_mode="mask", agent_positive_only=False, agent_normalization="shared")
    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, None, ["loss.agent_mode=mask", "loss.agent_positive_only=true"])
    assert "loss" in str(caught.value) and "agent_positive_only" in str(caught.value)
    from trainers.openrlhf.config import OpenRLHFRecipe

    with pytest.raises(ValidationError, match="agent_normalization='separate'"):
        OpenRLHFRecipe.model_validate(
            {"agent_loss": {"agent_mode": "mask", "agent_normalization": "separate"}}
        )


def test_a_mask_runs_written_config_reads_back(tmp_path: Path) -> None:
    config = load_config(TrainConfig, None, ["loss.agent_mode=mask"])
    path = write_config(config, tmp_path / "config.yaml")  # as a run directory holds it
    back = load_config(TrainConfig, path)
    assert back.loss == config.loss


# -- the defaults both trainers share ----------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_train_agent_tokens_with_the_embedded_defaults(recipe: Path) -> None:
    defaults = LossConfig()
    assert (defaults.agent_mode, defaults.agent_w_min) == ("shaped", 0.1)
    assert defaults.agent_positive_only and defaults.agent_normalization == "separate"
    loss = LossConfig.model_validate(yaml.safe_load(recipe.read_text())["agent_loss"])
    if loss.trains_agent_tokens():
        assert loss.agent_w_min == defaults.agent_w_min
        assert loss.agent_positive_only == defaults.agent_positive_only
        assert loss.agent_normalization == defaults.agent_normalization
