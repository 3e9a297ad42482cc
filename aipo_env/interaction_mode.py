"""ILR's dynamic interaction: whether a peer cooperates or competes on a question.

ILR (Lin et al., arXiv 2509.26306) puts a model's ability ``gamma_i`` and a question's
difficulty ``D_q`` on one item-response scale and takes the chance that the model
solves the question as the two-parameter logistic with the usual 1.7 scaling:

    P(q, i) = 1 / (1 + exp(-1.7 (gamma_i - D_q)))

A question that is hard for the model (``P < 0.5``) calls for cooperation, one it
probably solves (``P >= 0.5``) for competition.

The scale here is anchored on solve rates. An ability is read off an accuracy ``a`` on a
validation split as ``gamma = logit(a) / 1.7`` (the ability whose chance on a question of
difficulty 0 is ``a``); a difficulty off a solve rate ``s`` as ``D = -logit(s) / 1.7``
(the question an ability-0 model solves at rate ``s``). Both are clamped away from 0
and 1, where the logit is infinite.

:class:`DifficultyTracker` estimates ``D_q`` before a question is played from the
solve rates seen so far: the question's own (its earlier episodes, every peer's
samples) shrunk towards the task-wide rate by ``prior_weight`` pseudo-episodes, so a
question never seen is of the task's average difficulty. ILR also ranks difficulty by
asking the model itself; that is not built here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

#: The logistic scaling constant of item response theory.
IRT_SCALE = 1.7
#: Rates are clamped to [EPS, 1 - EPS] before the logit.
EPS = 0.02

Mode = Literal["cooperate", "compete"]
MODES: tuple[Mode, ...] = ("cooperate", "compete")


def _logit(p: float) -> float:
    p = min(max(p, EPS), 1.0 - EPS)
    return math.log(p / (1.0 - p))


def ability_from_accuracy(accuracy: float) -> float:
    """``gamma``: the ability whose chance on a question of difficulty 0 is ``accuracy``."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    return _logit(accuracy) / IRT_SCALE


def difficulty_from_solve_rate(rate: float) -> float:
    """``D``: the difficulty an ability-0 model solves at ``rate``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"solve rate must be in [0, 1], got {rate}")
    return -_logit(rate) / IRT_SCALE


def solve_probability(ability: float, difficulty: float) -> float:
    """``P(q, i) = 1 / (1 + exp(-1.7 (gamma_i - D_q)))``."""
    return 1.0 / (1.0 + math.exp(-IRT_SCALE * (ability - difficulty)))


def interaction_mode(ability: float, difficulty: float) -> Mode:
    """``cooperate`` when ``P(q, i) < 0.5`` (the question is hard for the model), else ``compete``."""
    return "cooperate" if solve_probability(ability, difficulty) < 0.5 else "compete"


@dataclass
class DifficultyTracker:
    """Per-question difficulty from the solve rates seen so far (module docstring).

    ``prior_weight`` pseudo-episodes at the task-wide rate are added to each question's
    own counts; with none seen anywhere, the task-wide rate is ``initial_rate``.
    """

    prior_weight: float = 2.0
    initial_rate: float = 0.5
    _solved: dict[str, int] = field(default_factory=dict)
    _seen: dict[str, int] = field(default_factory=dict)

    def record(self, question: str, correct: Iterable[bool]) -> None:
        """Add the outcomes of ``question``'s episodes (every peer's)."""
        outcomes = [bool(c) for c in correct]
        self._solved[question] = self._solved.get(question, 0) + sum(outcomes)
        self._seen[question] = self._seen.get(question, 0) + len(outcomes)

    @property
    def task_rate(self) -> float:
        """The solve rate over every recorded episode (``initial_rate`` before any)."""
        seen = sum(self._seen.values())
        return sum(self._solved.values()) / seen if seen else self.initial_rate

    def solve_rate(self, question: str) -> float:
        """``question``'s rate shrunk towards the task-wide rate."""
        prior = self.task_rate
        seen = self._seen.get(question, 0)
        solved = self._solved.get(question, 0)
        return (solved + self.prior_weight * prior) / (seen + self.prior_weight)

    def difficulty(self, question: str) -> float:
        """``D_q`` from :meth:`solve_rate`."""
        return difficulty_from_solve_rate(self.solve_rate(question))

    def state_dict(self) -> dict[str, dict[str, int]]:
        """The counts, for a checkpoint."""
        return {"solved": dict(self._solved), "seen": dict(self._seen)}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        """Restore :meth:`state_dict`'s counts."""
        self._solved = dict(state.get("solved", {}))
        self._seen = dict(state.get("seen", {}))
