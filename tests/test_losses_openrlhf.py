"""The policy-token part of the AIPO loss against OpenRLHF's PolicyLoss on random tensors.

Skipped where OpenRLHF is not installed, as every OpenRLHF test module is (CI installs it:
``scripts/setup.sh --with-openrlhf``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

pytest.importorskip("openrlhf.models.loss", reason="openrlhf not installed")

from trainers.losses import LossConfig, aipo_policy_loss  # noqa: E402

B, T = 4, 16


@pytest.fixture(scope="module")
def openrlhf_models() -> tuple[ModuleType, ModuleType]:
    """``openrlhf.models.loss`` and ``openrlhf.models.utils`` (imported lazily, once)."""
    return (
        importlib.import_module("openrlhf.models.loss"),
        importlib.import_module("openrlhf.models.utils"),
    )


def _batch(seed: int, spread: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 - 0.05
    old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * spread
    loss_mask = (torch.rand(B, T, generator=gen) < 0.85).to(torch.float64)
    loss_mask[:, 0] = 1.0  # every row has a trained token
    agent = torch.rand(B, T, generator=gen) < 0.3
    agent[:, 0] = False
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    rollout = old + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.6
    return {
        "logprobs": logp,
        "old_logprobs": old,
        "advantages": adv,
        "loss_mask": loss_mask,
        "agent_mask": agent,
        "rollout_logprobs": rollout,
    }


def _ours(config: LossConfig, batch: dict[str, torch.Tensor], **extra: torch.Tensor):
    logp = batch["logprobs"].clone().requires_grad_()
    loss, metrics = aipo_policy_loss(
        config,
        logp,
        batch["old_logprobs"],
        batch["advantages"],
        batch["loss_mask"],
        batch["agent_mask"],
        **extra,
    )
    loss.backward()
    return loss, logp.grad, metrics


def _theirs(policy_loss: torch.nn.Module, batch: dict[str, torch.Tensor], rollout: bool = False):
    logp = batch["logprobs"].clone().requires_grad_()
    policy = batch["loss_mask"] * (~batch["agent_mask"]).to(torch.float64)
    out = policy_loss(
        logp,
        batch["old_logprobs"],
        batch["advantages"][:, None],
        action_mask=policy,
        rollout_log_probs=batch["rollout_logprobs"] if rollout else None,
    )
    out[0].backward()
    return out, logp.grad, policy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.2), (0.2, 0.28)])
def test_mask_mode_equals_openrlhf_policy_loss(openrlhf_models, seed, eps_low, eps_high) -> None:
    loss_mod, _ = openrlhf_models
    batch = _batch(seed)
    config = LossConfig(agent_mode="mask", eps_clip_low=eps_low, eps_clip_high=eps_high)
    loss, grad, metrics = _ours(config, batch)
    (ref_loss, clip_ratio, ppo_kl, _, _), ref_grad, _ = _theirs(
        loss_mod.PolicyLoss(clip_eps_low=eps_low, clip_eps_high=eps_high), batch
    )
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert metrics["policy/clip_frac"] == pytest.approx(clip_ratio.item())
    assert metrics["policy/clip_frac"] > 0  # the case exercises clipping
    assert metrics["policy/approx_kl"] == pytest.approx(ppo_kl.item())


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("normalization", ["shared", "separate"])
def test_shaped_mode_policy_part_equals_openrlhf_rescaled(
    openrlhf_models, seed, normalization
) -> None:
    """'shared': the normaliser counts agent tokens, policy part = PPO * n_pol / n_all; 'separate': PPO."""
    loss_mod, _ = openrlhf_models
    batch = _batch(seed)
    # agent_positive_only off: every agent token in loss_mask is trained and counted.
    config = LossConfig(
        eps_clip_high=0.28, agent_positive_only=False, agent_normalization=normalization
    )
    _, grad, metrics = _ours(config, batch)
    (ref_loss, *_), ref_grad, policy = _theirs(loss_mod.PolicyLoss(clip_eps_high=0.28), batch)
    n_policy = policy.sum()
    n_trained = batch["loss_mask"].sum()
    scale = n_policy / n_trained if normalization == "shared" else 1.0
    assert metrics["tokens/agent_trained"] > 0
    assert metrics["loss/policy"] == pytest.approx((ref_loss * scale).item())
    on_policy = policy.bool()
    torch.testing.assert_close(grad[on_policy], (ref_grad * scale)[on_policy])


@pytest.mark.parametrize("seed", [5, 6])
def test_dual_clip_equals_openrlhf(openrlhf_models, seed) -> None:
    loss_mod, _ = openrlhf_models
    batch = _batch(seed, spread=1.5)
    config = LossConfig(agent_mode="mask", dual_clip=3.0)
    loss, grad, metrics = _ours(config, batch)
    (ref_loss, *_), ref_grad, _ = _theirs(loss_mod.PolicyLoss(dual_clip=3.0), batch)
    assert metrics["policy/dual_clip_frac"] > 0  # the case exercises the dual clip
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize(("ours", "mode"), [("tis", "clip"), ("icepop", "mask")])
def test_rollout_correction_equals_openrlhf_is_correction(openrlhf_models, ours, mode) -> None:
    loss_mod, _ = openrlhf_models
    batch = _batch(7)
    config = LossConfig(
        agent_mode="mask", rollout_correction=ours, rollout_correction_bounds=(0.5, 2.0)
    )
    loss, grad, metrics = _ours(config, batch, rollout_logprobs=batch["rollout_logprobs"])
    reference = loss_mod.PolicyLoss(
        is_correction_level="token",
        is_correction_mode=mode,
        is_correction_gating="ratio",
        is_correction_threshold=(0.5, 2.0),
    )
    (ref_loss, _, _, vllm_kl, filter_ratio), ref_grad, _ = _theirs(reference, batch, rollout=True)
    assert metrics["rollout/filter_frac"] > 0
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert metrics["rollout/filter_frac"] == pytest.approx(filter_ratio.item())
    assert metrics["rollout/kl"] == pytest.approx(vllm_kl.item())


def test_seq_mean_token_mean_equals_openrlhf_sample_level(openrlhf_models) -> None:
    loss_mod, _ = openrlhf_models
    batch = _batch(8)
    config = LossConfig(agent_mode="mask", aggregation="seq_mean_token_mean")
    loss, grad, _ = _ours(config, batch)
    (ref_loss, *_), ref_grad, _ = _theirs(loss_mod.PolicyLoss(token_level_loss=False), batch)
    # OpenRLHF divides each row by (count + 1e-8); the difference is below 1e-8 relative.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_equal_openrlhf_compute_approx_kl(openrlhf_models, estimator) -> None:
    _, utils = openrlhf_models
    batch = _batch(9)
    gen = torch.Generator().manual_seed(10)
    ref = batch["logprobs"] + torch.randn(B, T, generator=gen, dtype=torch.float64) * 3
    config = LossConfig(agent_mode="mask", kl_coef=0.1, kl_estimator=estimator)
    _, _, metrics = _ours(config, batch, ref_logprobs=ref)
    policy = batch["loss_mask"] * (~batch["agent_mask"]).to(torch.float64)
    kl = utils.compute_approx_kl(batch["logprobs"], ref, kl_estimator=estimator)
    assert metrics["loss/kl"] == pytest.approx(utils.masked_mean(kl, policy).item())
