"""AIPO's PolicyLoss subclass against OpenRLHF's stock PolicyLoss, called as OpenRLHF's actor calls it."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip(
    "openrlhf.models", reason="openrlhf (with the CPU flash-attn shim) not installed"
)

from openrlhf.models.loss import PolicyLoss  # noqa: E402

from trainers.losses import LossConfig, aipo_policy_loss  # noqa: E402
from trainers.openrlhf.loss import (  # noqa: E402
    AGENT_FLAG_OFFSET,
    LOSS_CONFIG_ENV,
    decode_rollout_log_probs,
    encode_agent_logprob,
    loss_config_from_env,
    loss_config_to_env,
    make_aipo_policy_loss_class,
)
from trainers.openrlhf.metrics import status_metrics  # noqa: E402

STOCK_POLICY_LOSS = PolicyLoss
#: The agent-token defaults before agent_positive_only became on and agent_normalization
#: 'separate': tests whose expected values train agent tokens of A < 0 and count them in
#: OpenRLHF's own normaliser pin them (tests/test_loss_agent_channel.py covers the new ones).
OLD_AGENT_DEFAULTS = dict(agent_positive_only=False, agent_normalization="shared")


def _batch(seed: int = 0, b: int = 3, a: int = 7):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, a, generator=g) * 3).requires_grad_(True)
    old = (logp.detach() + 0.1 * torch.randn(b, a, generator=g)).clamp(max=0)
    adv = torch.randn(b, 1, generator=g).expand(b, a).contiguous()
    mask = torch.ones(b, a)
    mask[0, :2] = 0
    mask[2, 5:] = 0
    rollout = (old + 0.05 * torch.randn(b, a, generator=g)).clamp(max=0)
    return logp, old, adv, mask, rollout


def _call(loss_fn, logp, old, adv, mask, rollout, **batch_info):
    # The exact call shape of openrlhf/trainer/ray/ppo_actor.py (0.11.2) training_step.
    return loss_fn(logp, old, adv, action_mask=mask, rollout_log_probs=rollout, **batch_info)


STOCK_SETTINGS = [
    dict(),
    dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0),
    dict(token_level_loss=False),
    dict(
        is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.5, 2.0)
    ),
    dict(is_correction_level="seq", is_correction_mode="mask"),
]


@pytest.mark.parametrize("settings", STOCK_SETTINGS)
@pytest.mark.parametrize("batch_info", [dict(), dict(dp_size=2, batch_num_tokens=40.0)])
def test_mask_mode_reproduces_stock_loss_and_gradient(settings, batch_info):
    aipo_cls = make_aipo_policy_loss_class()
    logp, old, adv, mask, rollout = _batch()
    stock_out = _call(STOCK_POLICY_LOSS(**settings), logp, old, adv, mask, rollout, **batch_info)
    (stock_grad,) = torch.autograd.grad(stock_out[0], logp)
    ours_out = _call(
        aipo_cls(**settings, agent_loss=LossConfig(agent_mode="mask")),
        logp, old, adv, mask, rollout, **batch_info,
    )  # fmt: skip
    (ours_grad,) = torch.autograd.grad(ours_out[0], logp)
    assert torch.equal(ours_out[0], stock_out[0])
    assert torch.equal(ours_grad, stock_grad)
    for mine, theirs in zip(ours_out[1:], stock_out[1:], strict=True):
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)


@pytest.mark.parametrize("settings", STOCK_SETTINGS[:4])
def test_shaped_mode_without_agent_tokens_equals_stock(settings):
    logp, old, adv, mask, rollout = _batch(seed=1)
    stock = _call(
        STOCK_POLICY_LOSS(**settings), logp, old, adv, mask, rollout, batch_num_tokens=30.0
    )
    ours = _call(
        make_aipo_policy_loss_class()(**settings, agent_loss=LossConfig(**OLD_AGENT_DEFAULTS)),
        logp, old, adv, mask, rollout, batch_num_tokens=30.0,
    )  # fmt: skip
    assert torch.allclose(ours[0], stock[0], atol=0, rtol=0)


def test_agent_tokens_get_the_shaped_coefficient_and_gradient():
    cfg = LossConfig(
        agent_mode="shaped", shaped_gamma=0.1, agent_w_min=0.0, agent_w_max=1.0,
        **OLD_AGENT_DEFAULTS,
    )  # fmt: skip
    logp, old, adv, mask, rollout = _batch(seed=2)
    agent = torch.zeros_like(mask, dtype=torch.bool)
    agent[1, 2:5] = True
    mu = torch.full_like(logp, -0.7)
    rollout_encoded = torch.where(
        agent, torch.tensor([encode_agent_logprob(-0.7)]).expand_as(rollout), rollout
    )
    total = _call(
        make_aipo_policy_loss_class()(agent_loss=cfg), logp, old, adv, mask, rollout_encoded,
        batch_num_tokens=float(mask.sum()),
    )[0]  # fmt: skip
    (grad,) = torch.autograd.grad(total, logp)

    # Policy part: the stock loss with agent tokens contributing zero (zero advantage).
    policy_only = _call(
        STOCK_POLICY_LOSS(), logp, old, torch.where(agent, 0.0, adv), mask, rollout,
        batch_num_tokens=float(mask.sum()),
    )[0]  # fmt: skip
    w = (logp.detach() - mu).exp()
    f = w / (w + 0.1)
    expected_agent = (-(f * adv)[agent]).sum() / mask.sum()
    assert torch.allclose(total, policy_only + expected_agent, atol=1e-6)
    # d/dlogp of -f(w) A = -A * gamma * w / (w + gamma)^2 (chain rule through w = exp(logp - mu)).
    expected_grad = (-adv * 0.1 * w / (w + 0.1) ** 2 / mask.sum())[agent]
    assert torch.allclose(grad[agent], expected_grad, atol=1e-6)
    assert (grad[agent] != 0).all()


def test_clipped_agent_coefficient_keeps_its_gradient():
    cfg = LossConfig(agent_mode="shaped", shaped_gamma=0.1, agent_w_min=0.0, agent_w_max=0.5)
    logp = torch.tensor([[-0.01]], requires_grad=True)  # f(w) ~ 0.9 > w_max
    rollout = torch.tensor([[encode_agent_logprob(None)]])
    adv = torch.tensor([[1.0]])
    loss = make_aipo_policy_loss_class()(agent_loss=cfg)(
        logp, logp.detach(), adv, action_mask=torch.ones(1, 1), rollout_log_probs=rollout
    )[0]
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-0.5)
    assert grad.item() < 0  # still pushes the agent token's probability up


def test_ratio_mode_truncates_and_positive_only_drops_nonpositive_advantages():
    cfg = LossConfig(agent_mode="ratio", ratio_cap=0.5, agent_positive_only=True)
    logp = torch.tensor([[-0.1, -3.0, -0.1]])
    rollout = torch.tensor([[encode_agent_logprob(0.0)] * 3])
    adv = torch.tensor([[2.0, 2.0, -2.0]])
    loss = make_aipo_policy_loss_class()(agent_loss=cfg)(
        logp, logp, adv, action_mask=torch.ones(1, 3), rollout_log_probs=rollout
    )[0]
    # The A <= 0 agent token is neither trained nor counted, as in the embedded trainer.
    expected = (-(0.5 * 2.0) - torch.tensor(-3.0).exp() * 2.0) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_side_channel_round_trip():
    values = [encode_agent_logprob(-2.5), -0.3, 0.0, encode_agent_logprob(None)]
    agent, mu, policy = decode_rollout_log_probs(torch.tensor([values]))
    assert agent.tolist() == [[True, False, False, True]]
    assert mu[0].tolist() == pytest.approx([-2.5, 0.0, 0.0, 0.0])
    assert policy[0].tolist() == pytest.approx([0.0, -0.3, 0.0, 0.0])
    assert encode_agent_logprob(None) == AGENT_FLAG_OFFSET
    with pytest.raises(ValueError, match="<= 0"):
        encode_agent_logprob(0.5)


def test_signature_matches_stock_policy_loss():
    aipo_cls = make_aipo_policy_loss_class()
    assert issubclass(aipo_cls, STOCK_POLICY_LOSS)
    stock_fwd = inspect.signature(STOCK_POLICY_LOSS.forward).parameters
    ours_fwd = inspect.signature(aipo_cls.forward).parameters
    assert list(ours_fwd) == list(stock_fwd)
    stock_init = set(inspect.signature(STOCK_POLICY_LOSS.__init__).parameters)
    assert stock_init <= set(inspect.signature(aipo_cls.__init__).parameters) | {
        n for n in stock_init if n != "self"
    }


def test_gspo_with_trained_agent_tokens_is_refused():
    with pytest.raises(ValueError, match="policy_loss_type 'ppo'"):
        make_aipo_policy_loss_class()(policy_loss_type="gspo", agent_loss=LossConfig())


def test_install_rebinds_policy_loss_and_reads_config_from_env(monkeypatch):
    import openrlhf.models
    import openrlhf.models.loss

    from trainers.openrlhf import patch

    monkeypatch.setenv(
        LOSS_CONFIG_ENV, loss_config_to_env(LossConfig(agent_mode="ratio", ratio_cap=2.0))
    )
    try:
        assert patch.install()
        assert openrlhf.models.PolicyLoss is make_aipo_policy_loss_class()
        # Built exactly as ActorPPOTrainer builds it (stock keyword arguments only).
        built = openrlhf.models.PolicyLoss(
            clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=None, token_level_loss=True,
            policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
            is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0),
        )  # fmt: skip
        assert built.agent_loss.agent_mode == "ratio" and built.agent_loss.ratio_cap == 2.0
    finally:
        patch.uninstall()
    assert openrlhf.models.PolicyLoss is STOCK_POLICY_LOSS
    assert openrlhf.models.loss.PolicyLoss is STOCK_POLICY_LOSS


def test_bad_env_config_names_the_variable(monkeypatch):
    monkeypatch.setenv(LOSS_CONFIG_ENV, '{"agent_mode": "sometimes"}')
    with pytest.raises(ValueError, match=LOSS_CONFIG_ENV):
        loss_config_from_env()


def _shared_batch(seed: int):
    """float64 tensors for both trainers: policy and agent tokens, known and unknown mu."""
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 12
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 8 - 0.01
    old = (logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)).clamp(max=0)
    mask = (torch.rand(b, t, generator=g) < 0.9).to(torch.float64)
    mask[:, 0] = 1.0
    agent = torch.rand(b, t, generator=g) < 0.4
    agent[:, 0] = False
    mu = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    known = torch.rand(b, t, generator=g) < 0.6
    adv = torch.tensor([1.3, -0.7, 0.4, -2.0], dtype=torch.float64)
    return logp, old, mask, agent, mu, known, adv


AGENT_CONFIGS = [
    LossConfig(agent_mode="shaped"),  # the defaults: floor 0.1, positive only, separate
    LossConfig(agent_mode="shaped", **OLD_AGENT_DEFAULTS),  # default floor clips rare tokens
    LossConfig(
        agent_mode="shaped",
        shaped_gamma=0.5,
        agent_w_min=0.2,
        agent_w_max=0.6,
        **OLD_AGENT_DEFAULTS,
    ),  # fmt: skip
    LossConfig(agent_mode="ratio", ratio_cap=0.3, agent_loss_weight=0.5, **OLD_AGENT_DEFAULTS),
    LossConfig(agent_mode="shaped", agent_positive_only=True, agent_normalization="shared"),
    LossConfig(agent_mode="ratio", ratio_cap=2.0, agent_positive_only=True),
    LossConfig(agent_mode="supervised", agent_loss_weight=0.5),
    LossConfig(agent_mode="supervised", **OLD_AGENT_DEFAULTS),
]


@pytest.mark.parametrize("config", AGENT_CONFIGS, ids=lambda c: c.agent_mode)
@pytest.mark.parametrize("seed", [0, 1])
def test_openrlhf_path_equals_embedded_loss_and_gradient(config, seed):
    logp, old, mask, agent, mu, known, adv = _shared_batch(seed)

    embedded_logp = logp.clone().requires_grad_()
    embedded, metrics = aipo_policy_loss(
        config, embedded_logp, old, adv, mask, agent,
        behavior_logprobs=torch.where(known, mu, torch.nan),
    )  # fmt: skip
    embedded.backward()

    encoded = torch.where(known, AGENT_FLAG_OFFSET - mu, torch.full_like(mu, AGENT_FLAG_OFFSET))
    rollout = torch.where(agent, encoded, old)
    ours_logp = logp.clone().requires_grad_()
    ours = make_aipo_policy_loss_class()(agent_loss=config)(
        ours_logp, old, adv[:, None].expand_as(logp), action_mask=mask, rollout_log_probs=rollout
    )[0]
    ours.backward()

    # Both sides train agent tokens, and some coefficients are clipped: the comparison
    # covers the gradient-preserving clip, not only the unclipped formula.
    assert metrics["tokens/agent_trained"] > 0
    assert metrics["agent/clip_frac"] > 0 or config.agent_mode == "supervised"
    assert torch.allclose(ours, embedded, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ours_logp.grad, embedded_logp.grad, rtol=1e-12, atol=1e-12)
    trained_agent = agent & mask.bool()
    assert (ours_logp.grad[trained_agent] != 0).any()

    # The agent-token part alone: ours minus the stock loss with agent tokens at zero advantage
    # (over the policy tokens; rescaled to the shared normaliser under 'shared').
    policy_only = LossConfig(
        **{**config.model_dump(exclude={"agent_positive_only", "agent_normalization"}),
           "agent_mode": "mask"}
    )  # fmt: skip
    stock_part, _ = aipo_policy_loss(policy_only, logp, old, adv, mask, agent)
    n_policy = float((mask.bool() & ~agent).sum())
    n_trained = metrics["tokens/policy"] + metrics["tokens/agent_trained"]
    assert n_policy == metrics["tokens/policy"]
    shared = config.agent_normalization == "shared"
    agent_part = ours.detach() - stock_part * (n_policy / n_trained if shared else 1.0)
    assert agent_part.item() == pytest.approx(metrics["loss/agent"], rel=1e-10, abs=1e-12)


def test_loss_config_round_trips_through_the_environment():
    config = LossConfig(
        agent_mode="ratio", ratio_cap=3.0, agent_w_min=0.0, agent_positive_only=True,
        agent_loss_weight=0.25,
    )  # fmt: skip
    back = loss_config_from_env({LOSS_CONFIG_ENV: loss_config_to_env(config)})
    for name in ("agent_mode", "ratio_cap", "agent_w_min", "agent_positive_only"):
        assert getattr(back, name) == getattr(config, name)
    assert back.agent_loss_weight == 0.25
    assert loss_config_from_env({}).agent_mode == "mask"


def test_policy_token_fields_are_refused_where_openrlhf_would_ignore_them():
    from trainers.openrlhf.config import OpenRLHFRecipe

    with pytest.raises(ValueError, match="eps_clip_low"):
        OpenRLHFRecipe.model_validate({"agent_loss": {"agent_mode": "shaped", "eps_clip_low": 0.3}})
    with pytest.raises(ValueError, match="kl_coef"):
        loss_config_from_env({LOSS_CONFIG_ENV: '{"agent_mode": "shaped", "kl_coef": 0.1}'})
    recipe = OpenRLHFRecipe.model_validate({"agent_loss": {"agent_mode": "ratio", "ratio_cap": 2}})
    assert recipe.agent_loss.agent_mode == "ratio" and recipe.agent_loss.ratio_cap == 2.0


def _flagged_batch(seed: int = 5):
    """Policy and agent tokens (flagged in the channel), with ratios far enough from 1 to clip."""
    logp, old, adv, mask, rollout = _batch(seed=seed)
    old = (
        logp.detach() + 0.5 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))
    ).clamp(max=0)
    agent = torch.zeros_like(mask, dtype=torch.bool)
    agent[0, 3:6] = True
    agent[1, 1:3] = True
    encoded = torch.full_like(rollout, encode_agent_logprob(-0.5))
    return logp, old, adv, mask, torch.where(agent, encoded, old), agent


def test_policy_only_clip_ratio_and_kl_are_stock_over_policy_tokens():
    logp, old, adv, mask, rollout, agent = _flagged_batch()
    loss_fn = make_aipo_policy_loss_class()(
        agent_loss=LossConfig(agent_mode="shaped", **OLD_AGENT_DEFAULTS)
    )
    _, clip_all, kl_all, _, _ = _call(loss_fn, logp, old, adv, mask, rollout)
    metrics = status_metrics(loss_fn.stats.reduce())

    policy = mask.bool() & ~agent
    _, clip, kl, _, _ = _call(STOCK_POLICY_LOSS(), logp, old, adv, policy.float(), rollout)
    assert metrics["policy/clip_frac"] == pytest.approx(clip.item())
    assert metrics["policy/approx_kl"] == pytest.approx(kl.item())
    assert metrics["tokens/policy"] == float(policy.sum())
    assert metrics["tokens/agent_trained"] == float((agent & mask.bool()).sum())
    # OpenRLHF's own pair counts the agent tokens too (never clipped: advantage 0 there).
    n_trained = float(mask.sum())
    assert clip_all.item() == pytest.approx(clip.item() * float(policy.sum()) / n_trained)
    agent_kl = (old - logp.detach())[agent & mask.bool()].sum()
    assert kl_all.item() == pytest.approx((kl * float(policy.sum()) + agent_kl).item() / n_trained)
    assert clip.item() > 0


def test_stats_accumulate_over_calls_until_cleared():
    logp, old, adv, mask, rollout, agent = _flagged_batch()
    loss_fn = make_aipo_policy_loss_class()(agent_loss=LossConfig(agent_mode="ratio"))
    _call(loss_fn, logp, old, adv, mask, rollout)
    once = status_metrics(loss_fn.stats.reduce())
    _call(loss_fn, logp, old, adv, mask, rollout)
    twice = status_metrics(loss_fn.stats.reduce())
    assert twice["tokens/agent_trained"] == 2 * once["tokens/agent_trained"] > 0
    assert twice["agent/coef_mean"] == pytest.approx(once["agent/coef_mean"])
    loss_fn.stats.clear()
    assert status_metrics(loss_fn.stats.reduce())["tokens/agent_trained"] == 0.0


@pytest.mark.parametrize("mode", ["mask", "shaped"])
def test_micro_batch_without_trained_tokens_reports_zero_not_nan(mode):
    logp, old, adv, mask, rollout = _batch(seed=6)
    empty = torch.zeros_like(mask)
    stock = _call(STOCK_POLICY_LOSS(), logp, old, adv, empty, rollout, batch_num_tokens=10.0)
    assert torch.isnan(stock[1]) and torch.isnan(stock[2])  # what OpenRLHF would all-reduce
    # 'shared': OpenRLHF's global batch_num_tokens without the step's separate counts.
    shared = {} if mode == "mask" else {"agent_normalization": "shared"}
    ours = _call(
        make_aipo_policy_loss_class()(agent_loss=LossConfig(agent_mode=mode, **shared)),
        logp, old, adv, empty, rollout, batch_num_tokens=10.0,
    )  # fmt: skip
    assert ours[0].item() == 0.0 and ours[1].item() == 0.0 and ours[2].item() == 0.0
    (grad,) = torch.autograd.grad(ours[0], logp)
    assert (grad == 0).all()
