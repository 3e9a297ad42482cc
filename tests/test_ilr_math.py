"""ILR's decision rule and perception calibration against hand computations."""

from __future__ import annotations

import math

import pytest

from aipo_env.interaction_mode import (
    DifficultyTracker,
    ability_from_accuracy,
    difficulty_from_solve_rate,
    interaction_mode,
    solve_probability,
)
from trainers.peer_rewards import perception_calibration


@pytest.mark.parametrize(
    ("gamma", "difficulty", "mode"),
    [
        (0.0, 0.5, "cooperate"),
        (0.5, 0.0, "compete"),
        (0.3, 0.3, "compete"),
        (-1.0, -0.9, "cooperate"),
    ],
)
def test_the_mode_follows_p_against_one_half(gamma, difficulty, mode) -> None:
    p = 1 / (1 + math.exp(-1.7 * (gamma - difficulty)))
    assert solve_probability(gamma, difficulty) == pytest.approx(p)
    assert interaction_mode(gamma, difficulty) == mode


def test_abilities_and_difficulties_read_off_rates_on_one_scale() -> None:
    # A model of validation accuracy 0.8 on a question solved at rate 0.5: P = 0.8.
    gamma = ability_from_accuracy(0.8)
    assert gamma == pytest.approx(math.log(4) / 1.7)
    assert solve_probability(gamma, difficulty_from_solve_rate(0.5)) == pytest.approx(0.8)
    # Accuracy 0.3 meets a question solved at 0.6: logit(0.3) + logit(0.6) < 0, cooperate.
    d = difficulty_from_solve_rate(0.6)
    assert interaction_mode(ability_from_accuracy(0.3), d) == "cooperate"
    assert interaction_mode(ability_from_accuracy(0.5), d) == "compete"
    assert math.isfinite(ability_from_accuracy(0.0)) and math.isfinite(ability_from_accuracy(1.0))
    with pytest.raises(ValueError, match="accuracy"):
        ability_from_accuracy(1.5)


def test_difficulty_shrinks_a_questions_rate_towards_the_task_rate() -> None:
    tracker = DifficultyTracker(prior_weight=2.0)
    assert tracker.solve_rate("q") == 0.5 and tracker.difficulty("q") == pytest.approx(0.0)
    tracker.record("a", [True, True, True, False])  # 3 of 4
    tracker.record("b", [False, False, False, False])  # 0 of 4
    assert tracker.task_rate == pytest.approx(3 / 8)
    assert tracker.solve_rate("a") == pytest.approx((3 + 2 * 3 / 8) / (4 + 2))
    assert tracker.solve_rate("never seen") == pytest.approx(3 / 8)
    assert tracker.difficulty("b") > tracker.difficulty("never seen") > tracker.difficulty("a")
    restored = DifficultyTracker(prior_weight=2.0)
    restored.load_state_dict(tracker.state_dict())
    assert restored.solve_rate("a") == tracker.solve_rate("a")


def test_perception_calibration_on_a_hand_computed_group() -> None:
    # Two peers: bound 1. A = [1, 0, 1, 0], B = [1, 1, 1, 0] (mean 0.75, range 1).
    out = perception_calibration({"A": [1, 0, 1, 0], "B": [1, 1, 1, 0]})
    # A's k: R + clip(R - 0.75, -1, 1); B's k: R + clip((R - 0.5) / 1, -1, 1).
    assert out["A"] == pytest.approx([1.25, -0.75, 1.25, -0.75])
    assert out["B"] == pytest.approx([1.5, 1.5, 1.5, -0.5])


def test_three_peers_clip_each_term_at_one_half_and_a_flat_peer_gives_the_sign() -> None:
    out = perception_calibration({"A": [1.0, 0.0], "B": [0.0, 0.0], "C": [0.0, 0.5]})
    # A1 against B (flat at 0): sign(+1) / 2 = 0.5; against C (mean .25, range .5): clip(1.5) = 0.5.
    # A0 against B: sign(0) = 0; against C: clip(-0.5) = -0.5.
    assert out["A"] == pytest.approx([2.0, -0.5])
    # B (both 0) against A (mean .5, range 1): -0.5; against C (mean .25, range .5): -0.5.
    assert out["B"] == pytest.approx([-1.0, -1.0])
    # C0 vs A: -0.5; vs B flat 0: 0 -> -0.5. C.5 vs A: 0; vs B: +0.5 -> 1.0.
    assert out["C"] == pytest.approx([-0.5, 1.0])


def test_calibration_refuses_one_peer_or_an_empty_one() -> None:
    with pytest.raises(ValueError, match="two peers"):
        perception_calibration({"A": [1.0]})
    with pytest.raises(ValueError, match=r"\['B'\]"):
        perception_calibration({"A": [1.0], "B": []})
