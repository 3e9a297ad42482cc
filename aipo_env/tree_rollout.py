"""ARPO's tree rollout: one prompt's group grown as a tree that branches where the policy hesitates.

ARPO (arXiv 2507.19849) spends a prompt's ``N`` samples (``rollout.n_samples``) as a
tree. ``M`` global samples (``rollout.initial_samples``, half of ``N`` by default)
start from the prompt. Every time a path's request is answered (a tool result, an
agent's consult reply), the policy's uncertainty over the first ``k`` tokens it writes
next (``rollout.entropy_tokens``, 20; top ``rollout.entropy_top_k``, 10, log-probs
per position) is compared with the uncertainty of the path's first segment,
``dH = H_now - H_initial`` (:func:`aipo_env.branching.normalized_entropy`), and the
path may spawn up to ``beam_size - 1`` branches, each with probability
``clip(branch_probability + entropy_weight * dH, 0, 1)``
(:func:`aipo_env.branching.should_branch`), while the tree has leaves left
(:class:`~aipo_env.branching.BranchBudget`). When no path is left running and the
tree is short of ``N`` leaves, fresh samples from the prompt fill it: the group has
exactly ``N`` leaves, never more.

How a branch is made (the design, and why). The entropy after a boundary is known only
once the segment after it has been generated. So each round generates every running
path's next segment first (all paths of all groups batch together in the generator),
measures it, and only then decides, with the env still standing at the boundary
*before* that segment: a branch is :meth:`~aipo_env.env.ConsultEnv.fork` of the env
there and generates its own segment from the boundary (its own seed), while the parent
keeps the segment it measured and steps on. This is the paper's rule (the decision at
tool call ``t`` uses the tokens written after result ``t``); ARPO's code instead uses
the entropy of the segment that *led to* call ``t``, one round late. A branch makes no
decision at its own branch point (its parent already did there); it decides at every
later boundary, against the first segment of the trajectory it continues.

Boundaries are exactly the turns after which ``ConsultEnv.astep`` injected a reply:
tool results under ``env.protocol: tools``, agent replies under ``consult`` (AIPO),
error results too (a failed run, a malformed call, the call budget spent), since the
policy reads each as the answer to its request. An episode the env opens with a
request of its own (``env.auto_consult``) stands at a boundary before its first
segment; that segment is also the trajectory's reference, so the decision there has
``dH = 0`` and branches with probability ``branch_probability``, as ARPO's code does
at every path's first tool round. Its branches share the prompt, the opening request
and the agent's reply, and sample their own first segment. A
branch is refused, and counted, when the budget has no leaf left or when the boundary
leaves less room in the context than the branch's entropy window (``entropy_tokens``,
or a whole segment where the per-turn cap is shorter).

Prefix reuse. A branch's ids up to its branch point are its parent's, verbatim
(``Trajectory.parent_id``/``branch_point``). The generator is told
(:meth:`policies.base.Generator.fork_session`): the embedded generator serves the
branch's first prompt from the parent's cached keys/values, SGLang routes it to the
parent's server. :func:`generation_metrics` counts generated tokens once per tree and
the prefix tokens branches reused.

Reproducibility. Each segment samples with :func:`aipo_env.episode.turn_seed` of its
own trajectory id; branch decisions draw from one ``random.Random`` per group, seeded
with the run seed and the group id (which names the step and the group), in a fixed
order (paths by leaf index, rounds in turn): the same seed grows the same tree. Leaf
``k`` of a group is always trajectory ``<group>-n<k>``, so a resumed rollout knows a
group is complete when all ``N`` ids are written (a tree is written when it is done).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from aipo_env import sources
from aipo_env.branching import BranchBudget, normalized_entropy, should_branch
from aipo_env.env import ConsultEnv
from aipo_env.episode import (
    apply_segment,
    generate_segment,
    start_episode,
    turn_params,
    turn_seed,
)
from aipo_env.rollout_strategy import RolloutSettings, RolloutStrategy
from aipo_env.trajectory import Trajectory
from policies.base import Generation, Generator, SamplingParams


class TreeSettings(RolloutSettings, Protocol):
    """What the tree reads of :class:`~aipo_env.rollout.RolloutConfig`, besides the seed and turn cap."""

    @property
    def tree_initial_samples(self) -> int:
        """M: the global samples a tree starts with."""

    @property
    def beam_size(self) -> int:
        """A path spawns up to ``beam_size - 1`` branches at a boundary."""

    @property
    def branch_probability(self) -> float:
        """The branch chance at ``dH = 0``."""

    @property
    def entropy_weight(self) -> float:
        """How much a rise in entropy raises the branch chance."""

    @property
    def entropy_top_k(self) -> int:
        """Top log-probs per position the entropy is computed over."""

    @property
    def entropy_tokens(self) -> int:
        """The entropy is measured over a segment's first this many tokens."""


@dataclass
class TreeStats:
    """What growing trees cost and decided, summed over the groups of a rollout."""

    groups: int = 0  #: trees grown
    branches: int = 0  #: branches made
    refused_budget: int = 0  #: branches the rule asked for when the tree had no leaf left
    refused_context: int = 0  #: branches refused: the boundary left too little room in the context
    fills: int = 0  #: fresh samples that completed trees to N leaves

    def add(self, other: TreeStats) -> None:
        """Add ``other``'s counts to these."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_metrics(self) -> dict[str, float]:
        """The counts as step metrics, ``arpo/<count>`` (totals over the step's trees)."""
        return {f"arpo/{f.name}": float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class _Path:
    """One growing leaf of a tree: its env and what the branching rule needs to know of it."""

    env: ConsultEnv
    leaf: int  #: index in the group; the trajectory is ``options[leaf]``'s id
    turn: int = 0  #: segments its episode has generated (seeds continue from here)
    h_initial: float | None = None  #: entropy of its trajectory's first segment
    at_own_branch_point: bool = False  #: its next segment starts where it was forked
    opened_by_reply: bool = False  #: the env answered an opening request before its first segment
    trajectory: Trajectory | None = None


class TreeRollout(RolloutStrategy):
    """``rollout.strategy: arpo``: one rollout tree per prompt group (module docstring).

    ``env_factory`` builds a fresh env per global sample (branches are forks);
    ``config`` is the driver's :class:`~aipo_env.rollout.RolloutConfig` (the fields of
    :class:`TreeSettings`); ``sampling`` the policy's temperature, top-p and top-k;
    ``semaphore`` bounds the segments in flight across groups. A group is grown,
    written and resumed whole; :attr:`stats` sums what its trees cost and decided.
    """

    name = "arpo"
    trees = True
    config: TreeSettings

    def __init__(
        self,
        generator: Generator,
        env_factory: Callable[[], ConsultEnv],
        config: TreeSettings,
        sampling: SamplingParams,
        semaphore: asyncio.Semaphore,
    ) -> None:
        sampling = sampling.model_copy(update={"top_logprobs": config.entropy_top_k})
        super().__init__(generator, env_factory, config, sampling, semaphore)
        self.vocab_size = len(generator.tokenizer)
        #: What the trees grown so far cost and decided.
        self.stats = TreeStats()

    def units(self, plan: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """One unit per group, its leaves in order: a tree is grown whole or not at all."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for option in plan:
            groups.setdefault(option["group_id"], []).append(option)
        return list(groups.values())

    async def run_unit(self, options: Sequence[dict[str, Any]]) -> list[Trajectory]:
        """The leaves of the group's tree (:meth:`run_group`); its counts go to :attr:`stats`."""
        leaves, stats = await self.run_group(options)
        self.stats.add(stats)
        return leaves

    def metrics(self) -> dict[str, float]:
        """The counts of :attr:`stats` as ``arpo/<count>``."""
        return self.stats.as_metrics()

    async def run_group(
        self, options: Sequence[dict[str, Any]]
    ) -> tuple[list[Trajectory], TreeStats]:
        """Grow the tree of one group; ``options`` are the reset options of its ``N`` leaves in order.

        Returns the ``N`` trajectories by leaf index and what the tree cost and decided.
        """
        cfg = self.config
        n = len(options)
        budget = BranchBudget(leaves=n, initial=min(cfg.tree_initial_samples, n))
        rng = random.Random(f"{cfg.seed}:{options[0].get('group_id')}")
        stats = TreeStats(groups=1)
        paths: list[_Path] = []
        active = await self._start(options, range(budget.initial), paths)
        while active or budget.room():
            if not active:  # every path ended short of N leaves: fill with fresh samples
                first = len(paths)
                stats.fills += budget.fill()
                active = await self._start(options, range(first, n), paths)
                continue
            generations = await asyncio.gather(*(self._generate(p) for p in active))
            stepping: list[tuple[_Path, Generation]] = []
            born: list[_Path] = []
            for path, generation in zip(active, generations, strict=True):
                if isinstance(generation, Trajectory):
                    path.trajectory = generation
                    continue
                born += self._decide(path, generation, options, paths, budget, rng, stats)
                path.turn += 1
                stepping.append((path, generation))
            ended = await asyncio.gather(*(self._step(p, g) for p, g in stepping))
            active = [p for (p, _), t in zip(stepping, ended, strict=True) if t is None] + born
        trajectories = [p.trajectory for p in paths]
        assert all(t is not None for t in trajectories) and len(trajectories) == n
        return trajectories, stats  # type: ignore[return-value]

    async def _start(
        self, options: Sequence[dict[str, Any]], leaves: range, paths: list[_Path]
    ) -> list[_Path]:
        """Reset a fresh env per leaf of ``leaves``; the paths still running after their reset."""
        new = [_Path(self.env_factory(), leaf) for leaf in leaves]
        paths += new
        infos = await asyncio.gather(*(start_episode(p.env, dict(options[p.leaf])) for p in new))
        for path, info in zip(new, infos, strict=True):
            path.trajectory = info.get("trajectory")
            path.opened_by_reply = any(s != sources.PROMPT for s in info.get("sources", []))
        return [p for p in new if p.trajectory is None]

    async def _generate(self, path: _Path) -> Generation | Trajectory:
        seed = turn_seed(self.config.seed, path.env.trajectory_id, path.turn)
        params = turn_params(path.env, self.sampling, self.config.max_new_tokens, seed)
        async with self.semaphore:
            generation = await generate_segment(path.env, self.generator, params)
        if (
            isinstance(generation, Generation)
            and generation.token_ids
            and not generation.top_logprobs
        ):
            raise ValueError(
                f"generator {type(self.generator).__name__} returned no top_logprobs; "
                "rollout.strategy 'arpo' needs a backend that returns them (embedded, sglang)"
            )
        return generation

    async def _step(self, path: _Path, generation: Generation) -> Trajectory | None:
        async with self.semaphore:
            path.trajectory = await apply_segment(path.env, generation)
        return path.trajectory

    def _window(self, env: ConsultEnv) -> int:
        """Tokens a branch needs room for: its entropy window, or a whole segment if shorter."""
        window = min(self.config.entropy_tokens, env.config.max_new_tokens_per_turn)
        if self.config.max_new_tokens is not None:
            window = min(window, self.config.max_new_tokens)
        return window

    def _decide(
        self,
        path: _Path,
        generation: Generation,
        options: Sequence[dict[str, Any]],
        paths: list[_Path],
        budget: BranchBudget,
        rng: random.Random,
        stats: TreeStats,
    ) -> list[_Path]:
        """Measure ``generation``; at a boundary, fork the branches the rule grants (env not yet stepped)."""
        cfg = self.config
        h = normalized_entropy(generation.top_logprobs, self.vocab_size, k=cfg.entropy_tokens)
        if path.h_initial is None:  # the trajectory's first segment: the reference
            path.h_initial = h
            if not path.opened_by_reply:  # no boundary before it (else decide at dH = 0)
                return []
        if path.at_own_branch_point:  # its parent decided at this boundary already
            path.at_own_branch_point = False
            return []
        dh = h - path.h_initial
        context = min(path.env.config.max_total_tokens, self.generator.max_context)
        room = context - len(path.env.token_ids)
        born = []
        for _ in range(cfg.beam_size - 1):
            if not should_branch(
                rng,
                dh,
                entropy_weight=cfg.entropy_weight,
                branch_probability=cfg.branch_probability,
            ):
                continue
            if budget.room() == 0:
                stats.refused_budget += 1
                continue
            if room < self._window(path.env):
                stats.refused_context += 1
                continue
            budget.take(1)
            leaf = len(paths)
            child_id = str(options[leaf]["trajectory_id"])
            child = path.env.fork(child_id)
            self.generator.fork_session(path.env.trajectory_id, child_id)
            branch = _Path(
                child, leaf, turn=path.turn, h_initial=path.h_initial, at_own_branch_point=True
            )
            paths.append(branch)
            born.append(branch)
            stats.branches += 1
        return born


def generation_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """What a rollout batch cost the generator and the tools, each counted once per tree.

    - ``generated_tokens``: policy tokens sampled; a branch's count starts at its branch
      point (before it, the tokens are its parent's);
    - ``prefix_reused_tokens``: tokens branches took from their parents instead of
      producing them (the sum of branch points);
    - ``cached_prompt_tokens``: prompt tokens the generator served from its prefix cache,
      over the segments each trajectory generated itself;
    - ``tool_calls``: requests answered (tool runs, searches, consults; error results
      included), each once: a branch's count starts at its branch point;
    - ``tool_calls_per_trajectory``: requests answered per trajectory, a shared prefix's
      counted in every leaf that holds it (what one trajectory shows).
    """
    generated = reused = cached = calls = answered = 0
    for t in trajectories:
        start = t.branch_point or 0
        generated += sum(1 for s in t.source[start:] if s == sources.POLICY)
        reused += start if t.parent_id is not None else 0
        cached += sum(turn.policy_cached_tokens for turn in t.turns if turn.policy_start >= start)
        requests = [turn for turn in t.turns if turn.consult is not None]
        answered += len(requests)
        calls += sum(1 for turn in requests if (turn.feedback_start or start) >= start)
    return {
        "generated_tokens": float(generated),
        "prefix_reused_tokens": float(reused),
        "cached_prompt_tokens": float(cached),
        "tool_calls": float(calls),
        "tool_calls_per_trajectory": answered / max(1, len(trajectories)),
    }
