"""What a :class:`~aipo_env.env.ConsultEnv` knows about the episode in progress.

The env records facts here as tokens arrive (ids, source labels, behaviour log-probs,
turns, consult counts, drift) and freezes them into a
:class:`~aipo_env.trajectory.Trajectory` when the episode ends.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aipo_env import masks
from aipo_env.masks import MaskRule
from aipo_env.trajectory import Trajectory, Turn
from tasks.base import Problem, RewardResult, Task


@dataclass
class EpisodeState:
    """The tokens and counts of one episode so far; all per-token lists align."""

    problem: Problem
    trajectory_id: str
    group_id: str
    sample_index: int
    allow_consult: bool
    max_consults: int
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    calls: int = 0
    consults: int = 0
    consult_errors: int = 0
    attempts: int = 0
    drift: bool = False
    chat_contents: dict[int, str] = field(default_factory=dict)
    trajectory: Trajectory | None = None
    parent_id: str | None = None  # set on a fork: the episode it was copied from
    branch_point: int | None = None  # set on a fork: its token count when copied

    def extend(self, ids: Sequence[int], source: str, lps: Sequence[float | None]) -> None:
        """Append ``ids`` produced by ``source`` with their behaviour log-probs."""
        self.token_ids.extend(int(i) for i in ids)
        self.source.extend([source] * len(ids))
        self.logprobs.extend(lps)

    def fork(self, trajectory_id: str) -> EpisodeState:
        """A deep copy that continues as ``trajectory_id``, recording this episode as its parent.

        Only between steps: an episode that has ended, or whose last turn is still being
        answered, cannot be forked (ValueError).
        """
        if self.trajectory is not None:
            raise ValueError(
                f"cannot fork episode {self.trajectory_id}: it has ended "
                f"({self.trajectory.finish_reason})"
            )
        # Between steps every turn of a running episode has had its request answered.
        if self.turns and self.turns[-1].consult is None:
            raise ValueError(
                f"cannot fork episode {self.trajectory_id} mid-step (turn "
                f"{self.turns[-1].index} is still being answered); fork between astep calls"
            )
        if trajectory_id == self.trajectory_id:
            raise ValueError(
                f"a fork needs a new trajectory id, not its parent's {trajectory_id!r}"
            )
        state = copy.deepcopy(self, memo={id(self.problem): self.problem})
        state.trajectory_id = trajectory_id
        state.parent_id, state.branch_point = self.trajectory_id, len(self.token_ids)
        return state

    def policy_text(self, decode: Callable[[list[int]], str]) -> str:
        """The policy's own text: its segments decoded and joined, replies left out."""
        return "".join(decode(self.token_ids[t.policy_start : t.policy_end]) for t in self.turns)

    def to_trajectory(
        self,
        *,
        task_name: str,
        mode: str,
        policy_version: int | str | None,
        mask_rule: MaskRule,
        finish_reason: str,
        verifier: RewardResult | None = None,
        error: str | None = None,
        consult_cost: float = 0.0,
    ) -> Trajectory:
        """The record of the episode as it stands (``finish_reason`` 'running' for a partial one).

        The reward is the verifier's score (0 unscored) less ``consult_cost`` per consult the
        policy wrote, except for an episode that ended in ``error:*`` (not the policy's doing).
        """
        score = verifier.score if verifier is not None else 0.0
        if not finish_reason.startswith("error:"):
            score -= consult_cost * self.attempts
        return Trajectory(
            trajectory_id=self.trajectory_id,
            problem_id=self.problem.id,
            task=self.problem.task or task_name,
            group_id=self.group_id,
            sample_index=self.sample_index,
            token_ids=list(self.token_ids),
            prompt_len=self.prompt_len,
            source=list(self.source),
            loss_mask=masks.loss_mask(self.source, mask_rule, drift=self.drift),
            behavior_logprobs=list(self.logprobs),
            turns=[t.model_copy(deep=True) for t in self.turns],
            reward=score,
            verifier=verifier,
            finish_reason=finish_reason,
            error=error,
            policy_version=policy_version,
            allow_consult=self.allow_consult,
            mode=mode,
            consults=self.consults,
            consult_errors=self.consult_errors,
            consult_attempts=self.attempts,
            tokenization_drift=self.drift,
            parent_id=self.parent_id,
            branch_point=self.branch_point,
        )


class ProblemPicker:
    """Finds the problem a reset asks for: by id, by index, or at random from the env's generator."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self._by_id: dict[str, int] | None = None

    def pick(self, options: dict[str, Any], rng: np.random.Generator) -> Problem:
        """``options["problem_id"]``, else ``options["problem_index"]``, else a draw from ``rng``."""
        problems = self.task.problems
        if not problems:
            raise ValueError(f"task {self.task.name!r} has no problems")
        if options.get("problem_id") is not None:
            if self._by_id is None:
                self._by_id = {p.id: i for i, p in enumerate(problems)}
            pid = str(options["problem_id"])
            if pid not in self._by_id:
                raise ValueError(f"unknown problem_id {pid!r} in task {self.task.name!r}")
            return problems[self._by_id[pid]]
        if options.get("problem_index") is not None:
            index = int(options["problem_index"])
            if not 0 <= index < len(problems):
                raise ValueError(
                    f"problem_index {index} out of range; expected 0..{len(problems) - 1}"
                )
            return problems[index]
        return problems[int(rng.integers(len(problems)))]
