"""The AIPO loss against hand-computed values and gradients (2 sequences x 4 tokens)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from aipo_env.masks import trained_token_masks
from trainers.losses import AIPOLoss, LossConfig, aipo_policy_loss

NAN = float("nan")
LN = math.log

# Sequence 0, A = +1: policy, policy, agent (mu unknown), padding.
# Sequence 1, A = -0.5: policy, agent (mu = 0.5), agent (mu unknown, rare token), policy.
P = [[0.5, 0.6, 0.4, NAN], [0.25, 0.3, 0.005, 0.55]]
OLD = [[0.5, 0.4, NAN, NAN], [0.5, NAN, NAN, 0.5]]  # policy ratios 1, 1.5 / 0.5, 1.1
BEH = [[NAN, NAN, NAN, NAN], [NAN, LN(0.5), NAN, NAN]]
LOSS_MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
AGENT = [[False, False, True, False], [False, True, True, False]]
ADV = [1.0, -0.5]
GAMMA = 0.1


def _inputs(**overrides: object) -> dict[str, torch.Tensor]:
    logp = torch.tensor([[LN(p) if p == p else NAN for p in row] for row in P], dtype=torch.float64)
    tensors = {
        "logprobs": logp.requires_grad_(),
        "old_logprobs": torch.tensor(
            [[LN(p) if p == p else NAN for p in row] for row in OLD], dtype=torch.float64
        ),
        "advantages": torch.tensor(ADV, dtype=torch.float64),
        "loss_mask": torch.tensor(LOSS_MASK, dtype=torch.float64),
        "agent_mask": torch.tensor(AGENT),
        "behavior_logprobs": torch.tensor(BEH, dtype=torch.float64),
    }
    tensors.update(overrides)  # type: ignore[arg-type]
    return tensors


def _shaped_grad(w: float, a: float, c_over_f: float = 1.0) -> float:
    """d(-f(w) * sg(c/f) * A) / d logp with f = w/(w+gamma): -A (c/f) gamma w / (w+gamma)^2."""
    return -a * c_over_f * GAMMA * w / (w + GAMMA) ** 2


# Per-token loss and d loss / d logp for the default (shaped) config with eps 0.2 / 0.28.
HAND_TERMS = {
    (0, 0): (-1.0 * 1.0, -1.0 * 1.0),  # r = 1, unclipped: -rA, grad -rA
    (0, 1): (-1.28 * 1.0, 0.0),  # r = 1.5 > 1.28, A > 0: clipped, no gradient
    (0, 2): (-(0.4 / 0.5) * 1.0, _shaped_grad(0.4, 1.0)),  # w = 0.4, f = 0.8
    (1, 0): (-0.8 * -0.5, 0.0),  # r = 0.5 < 0.8, A < 0: clipped, no gradient
    (1, 1): (-(0.6 / 0.7) * -0.5, _shaped_grad(0.6, -0.5)),  # w = 0.3/0.5, f = 6/7
    # w = 0.005, f = 0.005/0.105 < 0.1: the floor 0.1 holds, gradient scaled by c/f = 2.1
    (1, 2): (-0.1 * -0.5, _shaped_grad(0.005, -0.5, c_over_f=0.1 * 0.105 / 0.005)),
    (1, 3): (-1.1 * -0.5, -1.1 * -0.5),  # r = 1.1 inside the band
}


def _expected_grad(scale_of: dict[tuple[int, int], float]) -> torch.Tensor:
    grad = torch.zeros(2, 4, dtype=torch.float64)
    for (b, t), (_, g) in HAND_TERMS.items():
        grad[b, t] = g * scale_of.get((b, t), 0.0)
    return grad


def _config(**kw: object) -> LossConfig:
    # The hand-computed terms train sequence 1's agent tokens (A < 0) and share one
    # normaliser over policy and agent tokens: agent_positive_only off and 'shared', the
    # defaults before they became on and 'separate' (tests/test_loss_agent_channel.py).
    settings = {"agent_positive_only": False, "agent_normalization": "shared", **kw}
    return LossConfig(eps_clip_low=0.2, eps_clip_high=0.28, shaped_gamma=GAMMA, **settings)


def test_shaped_token_mean_matches_hand_computation() -> None:
    inputs = _inputs()
    loss, metrics = AIPOLoss(_config())(**inputs)
    loss.backward()
    expected = sum(v for v, _ in HAND_TERMS.values()) / 7
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    expected_grad = _expected_grad({k: 1 / 7 for k in HAND_TERMS})
    torch.testing.assert_close(inputs["logprobs"].grad, expected_grad)
    assert metrics["tokens/policy"] == 4 and metrics["tokens/agent"] == 3
    assert metrics["agent/coef_min"] == pytest.approx(0.1)
    assert metrics["agent/coef_max"] == pytest.approx(6 / 7)
    assert metrics["agent/clip_frac"] == pytest.approx(1 / 3)
    assert metrics["policy/clip_frac_high"] == pytest.approx(1 / 4)
    assert metrics["policy/clip_frac_low"] == pytest.approx(1 / 4)
    assert metrics["loss/policy"] + metrics["loss/agent"] == pytest.approx(expected)
    assert metrics["loss/agent"] == pytest.approx(
        sum(HAND_TERMS[k][0] for k in [(0, 2), (1, 1), (1, 2)]) / 7
    )


@pytest.mark.parametrize(
    ("aggregation", "constant", "expected"),
    [
        (
            "seq_mean_token_mean",
            None,
            (
                sum(HAND_TERMS[(0, t)][0] for t in range(3)) / 3
                + sum(HAND_TERMS[(1, t)][0] for t in range(4)) / 4
            )
            / 2,
        ),
        ("seq_sum_norm", 8.0, sum(v for v, _ in HAND_TERMS.values()) / (2 * 8.0)),
        ("seq_sum_norm", None, sum(v for v, _ in HAND_TERMS.values()) / (2 * 4)),
    ],
)
def test_aggregation_modes_match_hand_computation(
    aggregation: str, constant: float | None, expected: float
) -> None:
    inputs = _inputs()
    config = _config(aggregation=aggregation, seq_sum_norm_constant=constant)
    loss, _ = aipo_policy_loss(config, **inputs)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    if aggregation == "seq_mean_token_mean":
        scale = {k: 1 / (2 * (3 if k[0] == 0 else 4)) for k in HAND_TERMS}
    else:
        scale = {k: 1 / (2 * (constant or 4)) for k in HAND_TERMS}
    torch.testing.assert_close(inputs["logprobs"].grad, _expected_grad(scale))


def test_mask_mode_is_plain_ppo_on_policy_tokens() -> None:
    inputs = _inputs()
    loss, metrics = aipo_policy_loss(_config(agent_mode="mask"), **inputs)
    loss.backward()
    policy_keys = [(0, 0), (0, 1), (1, 0), (1, 3)]
    assert loss.item() == pytest.approx(sum(HAND_TERMS[k][0] for k in policy_keys) / 4)
    torch.testing.assert_close(
        inputs["logprobs"].grad, _expected_grad({k: 1 / 4 for k in policy_keys})
    )
    assert metrics["tokens/agent_trained"] == 0 and metrics["loss/agent"] == 0.0


def test_ratio_mode_truncates_value_and_keeps_gradient() -> None:
    inputs = _inputs()
    loss, metrics = aipo_policy_loss(_config(agent_mode="ratio", ratio_cap=0.5), **inputs)
    loss.backward()
    # value min(w, C) * -A; gradient -min(w, C) * A (w above C keeps its gradient)
    agent_terms = {(0, 2): (0.4, 1.0), (1, 1): (0.5, -0.5), (1, 2): (0.005, -0.5)}
    policy_keys = [(0, 0), (0, 1), (1, 0), (1, 3)]
    expected = (
        sum(HAND_TERMS[k][0] for k in policy_keys) + sum(-c * a for c, a in agent_terms.values())
    ) / 7
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    grad = _expected_grad({k: 1 / 7 for k in policy_keys})
    for (b, t), (c, a) in agent_terms.items():
        grad[b, t] = -c * a / 7
    torch.testing.assert_close(inputs["logprobs"].grad, grad)
    assert metrics["agent/clip_frac"] == pytest.approx(1 / 3)


def test_agent_positive_only_zeroes_agent_gradient_where_advantage_not_positive() -> None:
    inputs = _inputs()
    loss, metrics = aipo_policy_loss(_config(agent_positive_only=True), **inputs)
    loss.backward()
    kept = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 3)]
    assert loss.item() == pytest.approx(sum(HAND_TERMS[k][0] for k in kept) / 5)
    grad = inputs["logprobs"].grad
    assert grad[1, 1] == 0.0 and grad[1, 2] == 0.0
    assert grad[0, 2] == pytest.approx(HAND_TERMS[(0, 2)][1] / 5)
    assert metrics["tokens/agent_trained"] == 1


def test_gradient_preserving_clip_keeps_gradient_where_plain_clamp_loses_it() -> None:
    # One agent token under the floor and one above the ceiling.
    logp = torch.tensor([[LN(0.005), LN(0.9)]], dtype=torch.float64, requires_grad=True)
    config = LossConfig(agent_w_min=0.1, agent_w_max=0.5, shaped_gamma=GAMMA)
    ones = torch.ones(1, 2, dtype=torch.float64)
    loss, metrics = aipo_policy_loss(
        config, logp, logp.detach(), torch.tensor([1.0]), ones, torch.ones(1, 2, dtype=torch.bool)
    )
    loss.backward()
    assert metrics["agent/clip_frac"] == 1.0
    assert loss.item() == pytest.approx(-(0.1 + 0.5) / 2)

    plain = logp.detach().clone().requires_grad_()
    w = plain.exp()
    (-(w / (w + GAMMA)).clamp(0.1, 0.5).mean()).backward()
    assert torch.all(plain.grad == 0)
    assert torch.all(logp.grad != 0)
    # Under the floor the gradient tends to -w_min * A * grad logp: -A c gamma / (w + gamma) / 2.
    assert logp.grad[0, 0].item() == pytest.approx(-0.1 * GAMMA / 0.105 / 2)
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 * GAMMA / 1.0 / 2)


@pytest.mark.parametrize("p", [0.01, 0.05])
def test_shaping_boosts_gradient_of_rare_tokens(p: float) -> None:
    """LUFFY: d f / d p = gamma / (p + gamma)^2, larger than d w / d p = 1 for rare tokens."""

    def grad_wrt_p(config: LossConfig) -> float:
        prob = torch.tensor([[p]], dtype=torch.float64, requires_grad=True)
        loss, _ = aipo_policy_loss(
            config,
            prob.log(),
            torch.zeros(1, 1, dtype=torch.float64),
            torch.tensor([1.0]),
            torch.ones(1, 1),
            torch.ones(1, 1, dtype=torch.bool),
        )
        loss.backward()
        return -prob.grad.item()

    shaped = grad_wrt_p(LossConfig(shaped_gamma=GAMMA, agent_w_min=0.0))
    plain = grad_wrt_p(LossConfig(agent_mode="ratio", ratio_cap=10.0))
    assert shaped == pytest.approx(GAMMA / (p + GAMMA) ** 2)
    assert plain == pytest.approx(1.0)
    assert shaped > 3 * plain


def test_shaping_damps_gradient_of_likely_tokens() -> None:
    prob = torch.tensor([[0.6]], dtype=torch.float64, requires_grad=True)
    loss, _ = aipo_policy_loss(
        LossConfig(agent_w_min=0.0),
        prob.log(),
        torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([1.0]),
        torch.ones(1, 1),
        torch.ones(1, 1, dtype=torch.bool),
    )
    loss.backward()
    assert -prob.grad.item() == pytest.approx(0.1 / 0.7**2)
    assert -prob.grad.item() < 1.0


def test_non_finite_values_on_masked_positions_do_not_leak() -> None:
    inputs = _inputs()
    inputs["logprobs"] = inputs["logprobs"].detach().clone()
    inputs["logprobs"][0, 3] = -math.inf
    inputs["logprobs"].requires_grad_()
    adv = torch.tensor([ADV[0]] * 4 + [ADV[1]] * 4, dtype=torch.float64).view(2, 4)
    adv[0, 3] = NAN
    ref = inputs["logprobs"].detach().clone()
    ref[0, 3] = NAN
    entropy = torch.full((2, 4), 0.5, dtype=torch.float64)
    entropy[0, 3] = math.inf
    rollout = inputs["old_logprobs"].clone()
    config = _config(kl_coef=0.1, entropy_coef=0.01, rollout_correction="tis")
    loss, metrics = aipo_policy_loss(
        config,
        **{**inputs, "advantages": adv},
        ref_logprobs=ref,
        entropy=entropy,
        rollout_logprobs=rollout,
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(inputs["logprobs"].grad).all()
    assert inputs["logprobs"].grad[0, 3] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())
    # KL to an identical reference is 0; entropy is 0.5 on each trained token.
    expected = sum(v for v, _ in HAND_TERMS.values()) / 7 - 0.01 * 0.5
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["entropy/mean"] == pytest.approx(0.5)


def test_kl_and_entropy_terms_match_hand_computation() -> None:
    logp = torch.tensor([[LN(0.5), LN(0.25)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[LN(0.25), LN(0.25)]], dtype=torch.float64)
    entropy = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    ones = torch.ones(1, 2)
    no_agents = torch.zeros(1, 2, dtype=torch.bool)
    for estimator, kl_first in [
        ("k1", LN(2.0)),
        ("k2", LN(2.0) ** 2 / 2),
        ("k3", 0.5 - 1 + LN(2.0)),
    ]:
        config = LossConfig(kl_coef=0.5, kl_estimator=estimator, entropy_coef=0.1)
        loss, metrics = aipo_policy_loss(
            config,
            logp,
            logp.detach(),
            torch.tensor([0.0]),
            ones,
            no_agents,
            ref_logprobs=ref,
            entropy=entropy,
        )
        # A = 0: the policy term vanishes; KL on token 1 is 0 for every estimator.
        assert metrics["loss/kl"] == pytest.approx(kl_first / 2)
        assert loss.item() == pytest.approx(0.5 * kl_first / 2 - 0.1 * 1.5)


def test_advantages_per_token_equal_broadcast_sequence_advantages() -> None:
    a = _inputs()
    b = _inputs(advantages=torch.tensor(ADV, dtype=torch.float64)[:, None].expand(2, 4).clone())
    la, _ = aipo_policy_loss(_config(), **a)
    lb, _ = aipo_policy_loss(_config(), **b)
    assert la.item() == pytest.approx(lb.item())


def test_agent_loss_weight_scales_agent_part_only() -> None:
    _, base = aipo_policy_loss(_config(), **_inputs())
    _, half = aipo_policy_loss(_config(agent_loss_weight=0.5), **_inputs())
    assert half["loss/policy"] == pytest.approx(base["loss/policy"])
    assert half["loss/agent"] == pytest.approx(0.5 * base["loss/agent"])


@pytest.mark.parametrize(
    "bad",
    [
        {"eps_clip_low": 1.0},
        {"dual_clip": 1.0},
        {"agent_w_min": 0.6, "agent_w_max": 0.5},
        {"rollout_correction_bounds": (2.0, 1.0)},
        {"agent_mode": "shape"},
        {"aggregation": "mean"},
        {"kl_estimator": "k4"},
        {"unknown_field": 1},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LossConfig(**bad)


def test_missing_inputs_and_bad_shapes_raise_clear_errors() -> None:
    inputs = _inputs()
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        aipo_policy_loss(LossConfig(kl_coef=0.1), **inputs)
    with pytest.raises(ValueError, match="needs rollout_logprobs"):
        aipo_policy_loss(LossConfig(rollout_correction="icepop"), **inputs)
    with pytest.raises(ValueError, match="advantages has shape"):
        aipo_policy_loss(LossConfig(), **{**inputs, "advantages": torch.zeros(3)})
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        aipo_policy_loss(LossConfig(), **{**inputs, "old_logprobs": torch.zeros(2, 3)})


@pytest.mark.parametrize(
    "config",
    [_config(), _config(agent_mode="mask"), _config(agent_positive_only=True)],
    ids=["shaped", "mask", "positive_only"],
)
def test_micro_batches_weighted_by_trained_token_share_reproduce_token_mean(
    config: LossConfig,
) -> None:
    inputs = _inputs()
    full, _ = aipo_policy_loss(config, **inputs)
    policy, agent = trained_token_masks(
        config.mask_rule(), inputs["loss_mask"], inputs["agent_mask"], inputs["advantages"]
    )
    total = (policy | agent).sum()
    accumulated = 0.0
    for row in range(2):
        micro = {k: v[row : row + 1] for k, v in inputs.items()}
        share = (policy | agent)[row].sum().double() / total.double()
        loss, _ = aipo_policy_loss(config, **micro)
        accumulated += share.item() * loss.item()
    assert accumulated == pytest.approx(full.item(), rel=1e-12)


def test_trained_token_masks_follow_the_agent_mode() -> None:
    inputs = _inputs()
    args = (inputs["loss_mask"], inputs["agent_mask"], inputs["advantages"])
    policy, agent = trained_token_masks(_config().mask_rule(), *args)
    assert policy.sum() == 4 and agent.tolist() == [
        [False, False, True, False],
        [False, True, True, False],
    ]
    assert trained_token_masks(_config(agent_mode="mask").mask_rule(), *args)[1].sum() == 0
    positive = trained_token_masks(_config(agent_positive_only=True).mask_rule(), *args)[1]
    assert positive.tolist() == [[False, False, True, False], [False] * 4]


@pytest.mark.parametrize("agent_mode", ["shaped", "ratio", "mask"])
def test_loss_metrics_and_gradient_read_log_probs_only_under_the_loss_mask(agent_mode: str) -> None:
    """The trainer computes log-probs and entropy only where loss_mask is set (0 elsewhere)."""
    config = _config(
        agent_mode=agent_mode, kl_coef=0.1, entropy_coef=0.01, rollout_correction="icepop"
    )
    off = ~torch.tensor(LOSS_MASK).bool()

    def run(fill: float) -> tuple[float, dict[str, float], torch.Tensor]:
        inputs = _inputs()
        per_token = {
            "logprobs": inputs["logprobs"].detach(),
            "old_logprobs": inputs["old_logprobs"],
            "ref_logprobs": inputs["logprobs"].detach() - 0.1,
            "entropy": torch.full((2, 4), 0.7, dtype=torch.float64),
        }
        filled = {k: torch.where(off, fill, v) for k, v in per_token.items()}
        filled["logprobs"].requires_grad_()
        loss, metrics = aipo_policy_loss(
            config,
            **{**inputs, **filled},
            rollout_logprobs=inputs["old_logprobs"] - 0.2,
        )
        loss.backward()
        return loss.item(), metrics, filled["logprobs"].grad

    zero_loss, zero_metrics, zero_grad = run(0.0)
    other_loss, other_metrics, other_grad = run(-3.0)
    assert other_loss == zero_loss
    assert other_metrics == zero_metrics
    assert torch.equal(other_grad, zero_grad)
