"""AIPO's loss metrics reach the status OpenRLHF 0.11.2's actor returns for logging.

``openrlhf/trainer/ray/ppo_actor.py`` needs vLLM and CUDA to import, so the stock
``ActorPPOTrainer.ppo_train`` and ``training_step`` are compiled from the installed source
(with the module-level imports they use) and run on CPU against stand-in model, strategy
and replay buffer: the status they return is the one the driver logs.
"""

from __future__ import annotations

import logging
import math
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

openrlhf = pytest.importorskip("openrlhf.models", reason="openrlhf not installed")

from openrlhf.models.loss import PolicyLoss  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf_source import stock_methods  # noqa: E402

from trainers.losses import LossConfig  # noqa: E402
from trainers.openrlhf.loss import encode_agent_logprob, make_aipo_policy_loss_class  # noqa: E402
from trainers.openrlhf.metrics import (  # noqa: E402
    METRIC_KEYS,
    LossStats,
    install_metrics,
    status_metrics,
)

PPO_ACTOR = "openrlhf.trainer.ray.ppo_actor"


class TokenTableActor(torch.nn.Module):
    """Stand-in policy: ``log p(token) = -softplus(w[token])``, one weight per vocabulary id."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 2.0, vocab))

    def forward(self, sequences, action_mask, attention_mask=None, return_output=False, **_):
        logp = -torch.nn.functional.softplus(self.w[sequences[:, 1:]])
        logp = logp[:, -action_mask.shape[1] :]
        return (logp, SimpleNamespace(aux_loss=0.0)) if return_output else logp


class ListReplayBuffer:
    """The replay buffer's interface ``ppo_train`` reads: ready micro-batches by index."""

    sample_batch_size = 1

    def __init__(self, batches: list[Experience]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, idx: int) -> Experience:
        return self.batches[idx]

    @staticmethod
    def collate_fn(items: list[Experience]) -> Experience:
        return items[0]


def _args(epochs: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        train=SimpleNamespace(max_epochs=epochs, dynamic_batch_enable=False),
        ds=SimpleNamespace(tensor_parallel_size=1, ring_attn_size=1),
        actor=SimpleNamespace(entropy_coef=None, aux_loss_coef=0.0),
        algo=SimpleNamespace(
            kl=SimpleNamespace(
                use_loss=True, init_coef=0.01, estimator="k3", unbiased_gradient=False
            )
        ),
    )


def _strategy(args: SimpleNamespace) -> SimpleNamespace:
    """One rank: ``all_reduce`` is the identity (OpenRLHF's divides by world size 1 for 'mean')."""
    return SimpleNamespace(
        args=args,
        ring_attn_group=None,
        accumulated_gradient=1,
        all_reduce=lambda data, op="mean": data,
        is_rank_0=lambda: True,
        backward=lambda loss, model, optim: loss.backward(),
        optimizer_step=lambda *a, **k: None,
        get_grad_norm=lambda model: 0.0,
    )


def _micro_batch(seed: int, actor: TokenTableActor) -> Experience:
    """Two samples: prompt, policy tokens, agent tokens (flagged), some off the action mask."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, 50, (2, 13), generator=g)
    action_mask = torch.ones(2, 12, dtype=torch.long)
    action_mask[:, :3] = 0  # the prompt
    agent = torch.zeros(2, 12, dtype=torch.bool)
    agent[0, 6:9] = True
    agent[1, 4:6] = True
    with torch.no_grad():
        logp = actor(seqs, action_mask)
    # Old log-probs far enough from the current ones that PPO clips some policy tokens.
    old = (logp + 0.6 * torch.randn(2, 12, generator=g)).clamp(max=0.0)
    mu = -torch.rand(2, 12, generator=g) * 4
    rollout = torch.where(agent, torch.tensor(encode_agent_logprob(0.0)) - mu, old)
    adv = torch.tensor([[1.5], [-0.8]]).expand(2, 12).contiguous()
    return Experience(
        sequences=seqs,
        attention_mask=torch.ones(2, 13, dtype=torch.long),
        action_mask=action_mask,
        action_log_probs=old,
        base_action_log_probs=logp - 0.1,
        rollout_log_probs=rollout,
        advantages=adv,
        info={"reward": torch.tensor([1.0, 0.0])},
    )


def _trainer(cls: type, loss_fn, batches, epochs: int = 1) -> object:
    trainer = cls.__new__(cls)
    args = _args(epochs)
    trainer.args, trainer.strategy = args, _strategy(args)
    trainer.actor = TokenTableActor()
    trainer.actor_loss_fn = loss_fn
    trainer.actor_optim = None
    trainer.actor_scheduler = SimpleNamespace(get_last_lr=lambda: [1e-6])
    trainer.ema_model = None
    trainer.aux_loss = False
    trainer.replay_buffer = ListReplayBuffer(batches)
    trainer.dataloader_pin_memory = False
    trainer.max_epochs = epochs
    return trainer


@pytest.fixture
def stock_trainer_module(monkeypatch) -> ModuleType:
    """A stand-in ``ppo_actor`` module whose ``ActorPPOTrainer`` runs the stock 0.11.2 methods."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    module = ModuleType(PPO_ACTOR)
    module.ActorPPOTrainer = stock_methods(
        "trainer/ray/ppo_actor.py", "ActorPPOTrainer", {"ppo_train", "training_step"}
    )
    monkeypatch.setitem(sys.modules, PPO_ACTOR, module)
    return module  # a class of its own per test: installing here changes no other test


def _expected(cfg: LossConfig, batches: list[Experience], actor: TokenTableActor) -> dict:
    """The metrics by hand from the tensors (shaped mode), and OpenRLHF's own over policy tokens."""
    coefs, agent_clipped, logp_all, old_all, adv_all, policy_all = [], 0, [], [], [], []
    for b in batches:
        with torch.no_grad():
            logp = actor(b.sequences, b.action_mask)
        trained = b.action_mask.bool()
        agent = trained & (b.rollout_log_probs >= 0.5)
        mu = 1.0 - b.rollout_log_probs
        w = (logp - mu).exp()
        f = w / (w + cfg.shaped_gamma)
        c = f.clamp(cfg.agent_w_min, cfg.agent_w_max)
        coefs.append(c[agent])
        agent_clipped += int(((c != f) & agent).sum())
        logp_all.append(logp.flatten())
        old_all.append(b.action_log_probs.flatten())
        adv_all.append(b.advantages.flatten())
        policy_all.append((trained & ~agent).flatten())
    coef = torch.cat(coefs)
    _, clip, kl, _, _ = PolicyLoss()(
        torch.cat(logp_all)[None],
        torch.cat(old_all)[None],
        torch.cat(adv_all)[None],
        action_mask=torch.cat(policy_all)[None].float(),
    )
    n_policy = int(torch.cat(policy_all).sum())
    return {
        "agent/coef_mean": coef.mean().item(),
        "agent/coef_min": coef.min().item(),
        "agent/coef_max": coef.max().item(),
        "agent/clip_frac": agent_clipped / len(coef),
        "agent/token_frac": len(coef) / (len(coef) + n_policy),
        "tokens/agent_trained": float(len(coef)),
        "tokens/policy": float(n_policy),
        "policy/clip_frac": clip.item(),
        "policy/approx_kl": kl.item(),
    }


def test_stock_ppo_train_status_carries_the_aipo_metrics(stock_trainer_module, caplog):
    # agent_positive_only off: the hand computation (_expected) counts every agent token.
    cfg = LossConfig(
        agent_mode="shaped", agent_w_min=0.7, agent_w_max=0.95, agent_positive_only=False
    )
    with caplog.at_level(logging.WARNING):
        # Built as ActorPPOTrainer.__init__ builds it: this also wraps ppo_train.
        loss_fn = make_aipo_policy_loss_class()(agent_loss=cfg)
    assert "AIPO policy loss built in this worker: agent_mode=shaped" in caplog.text
    assert "ActorPPOTrainer.ppo_train" in caplog.text
    actor = TokenTableActor()
    batches = [_micro_batch(0, actor), _micro_batch(1, actor)]
    trainer = _trainer(stock_trainer_module.ActorPPOTrainer, loss_fn, batches)

    status = trainer.ppo_train(0.01)

    # OpenRLHF's own status is all still there.
    for key in ("policy_loss", "ppo_clip_ratio", "ppo_kl", "kl", "actor_lr", "reward"):
        assert key in status
    expected = _expected(cfg, batches, actor)
    assert set(METRIC_KEYS) <= set(status)
    for key, value in expected.items():
        assert status[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # The batch exercises what the metrics are for: clipped agent coefficients and clipped
    # policy tokens. Under agent_normalization 'separate' (the default) OpenRLHF's own ratio
    # is over the policy tokens as well ('shared' dilutes it with the never-clipped agent tokens).
    assert 0 < status["agent/clip_frac"] < 1
    assert status["policy/clip_frac"] > 0
    assert status["ppo_clip_ratio"] == pytest.approx(status["policy/clip_frac"], rel=1e-6)


def test_counts_are_per_epoch_and_ratios_unchanged_over_epochs(stock_trainer_module):
    cfg = LossConfig(agent_mode="ratio", ratio_cap=1.5, agent_positive_only=False)
    actor = TokenTableActor()
    cls = stock_trainer_module.ActorPPOTrainer
    one = _trainer(cls, make_aipo_policy_loss_class()(agent_loss=cfg), [_micro_batch(2, actor)])
    two = _trainer(
        cls, make_aipo_policy_loss_class()(agent_loss=cfg), [_micro_batch(2, actor)], epochs=2
    )
    s1, s2 = one.ppo_train(0.0), two.ppo_train(0.0)
    # The optimizer step is a no-op here, so the second epoch sees the same log-probs.
    for key in METRIC_KEYS:
        assert s2[key] == pytest.approx(s1[key]), key
    assert s1["tokens/agent_trained"] == 5.0


def test_mask_mode_reports_stock_policy_metrics_and_no_agent_tokens(stock_trainer_module):
    actor = TokenTableActor()
    batch = _micro_batch(3, actor)
    batch.rollout_log_probs = batch.action_log_probs.clone()  # mode mask: no flags
    trainer = _trainer(
        stock_trainer_module.ActorPPOTrainer,
        make_aipo_policy_loss_class()(agent_loss=LossConfig(agent_mode="mask")),
        [batch],
    )
    status = trainer.ppo_train(0.0)
    assert status["policy/clip_frac"] == pytest.approx(status["ppo_clip_ratio"])
    assert status["policy/approx_kl"] == pytest.approx(status["ppo_kl"])
    assert status["tokens/policy"] == float(batch.action_mask.sum())
    assert status["tokens/agent_trained"] == 0.0 and status["agent/coef_mean"] == 0.0


def test_reduction_over_ranks_is_exact_for_min_max_and_means():
    """Two ranks with different agent tokens: the reduced values are those of the union."""
    ranks = [LossStats(), LossStats()]
    coefs = [torch.tensor([[0.2, 0.9, 0.5]]), torch.tensor([[0.1, 0.4, 0.3]])]
    trained = [torch.tensor([[True, True, False]]), torch.tensor([[False, True, True]])]
    for stats, coef, mask in zip(ranks, coefs, trained, strict=True):
        stats.add_agent(coef, coef > 0.8, mask)
        stats.add_policy(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(0.2))

    def all_reduce(rank: int):
        def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
            other = ranks[1 - rank]
            peer = other.sums if tensor.shape[0] == len(other.sums) else other.extrema
            return tensor + peer if op == "sum" else torch.maximum(tensor, peer)

        return reduce

    metrics = status_metrics(ranks[0].reduce(all_reduce(0)))
    assert metrics == status_metrics(ranks[1].reduce(all_reduce(1)))
    union = torch.tensor([0.2, 0.9, 0.4, 0.3])
    assert metrics["agent/coef_mean"] == pytest.approx(union.mean().item())
    assert metrics["agent/coef_min"] == pytest.approx(0.2)
    assert metrics["agent/coef_max"] == pytest.approx(0.9)
    assert metrics["agent/clip_frac"] == pytest.approx(0.25)
    assert metrics["tokens/agent_trained"] == 4.0 and metrics["tokens/policy"] == 8.0
    assert metrics["policy/clip_frac"] == pytest.approx(0.25)
    assert metrics["policy/approx_kl"] == pytest.approx(0.05)


def test_a_rank_without_agent_tokens_reports_zeros_not_infinities():
    metrics = status_metrics(LossStats().reduce())
    assert all(math.isfinite(v) and v == 0.0 for v in metrics.values())


def test_install_is_idempotent(stock_trainer_module):
    cls = stock_trainer_module.ActorPPOTrainer
    stock = cls.ppo_train
    assert install_metrics(stock_trainer_module) and install_metrics(stock_trainer_module)
    assert cls.ppo_train.__aipo_wrapped__ is stock  # wrapped once, around the stock method
    assert not install_metrics(ModuleType("not_openrlhf"))


def test_stock_loss_in_a_wrapped_trainer_is_reported(stock_trainer_module, caplog):
    install_metrics(stock_trainer_module)
    actor = TokenTableActor()
    batch = _micro_batch(4, actor)
    trainer = _trainer(stock_trainer_module.ActorPPOTrainer, PolicyLoss(), [batch])
    with caplog.at_level(logging.WARNING):
        status = trainer.ppo_train(0.0)
    assert "not AIPO's" in caplog.text
    assert not set(METRIC_KEYS) & set(status)
