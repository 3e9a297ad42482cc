"""ARPO's tree rollout (rollout.strategy arpo): leaves, boundaries, the entropy rule, seeds, prefixes."""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator

from aipo_env.branching import should_branch
from aipo_env.config import EnvConfig
from aipo_env.independent_rollout import IndependentRollout
from aipo_env.rollout import RolloutConfig, RolloutDriver
from aipo_env.strategies import STRATEGIES
from aipo_env.trajectory import ConsultRecord, Trajectory, Turn, read_jsonl
from aipo_env.tree_rollout import TreeRollout, TreeStats, generation_metrics
from policies.base import Generation, Generator, SamplingParams

EOS = "<|im_end|>"
TASK = AdditionTask(4)
CALLS = {
    "tools": "Let me compute. <python>print({n})</python>",
    "consult": 'Let me check. <consult agent="knowledge">Is it {n}?</consult>',
}


class Entropic(Generator):
    """A scripted policy that also reports top log-probs: ``top(session, turn)`` per token."""

    def __init__(self, inner: ScriptedGenerator, top: Callable[[str, int], list[float]]) -> None:
        self.inner = inner
        self.top = top
        self.forks: list[tuple[str, str]] = []

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, *, session_id: str | None = None
    ) -> Generation:
        turn = self.inner.turns[session_id or ""]
        generation = await self.inner.generate(input_ids, params, session_id=session_id)
        top = [self.top(session_id or "", turn)] * len(generation.token_ids)
        return generation.model_copy(update={"top_logprobs": top if params.top_logprobs else []})

    def fork_session(self, parent_session: str, child_session: str) -> None:
        self.forks.append((parent_session, child_session))


def uniform(k: int) -> list[float]:
    """``k`` equal log-probs: an entropy of log(k) per position."""
    return [math.log(1.0 / k)] * k


def calls_then_answer(protocol: str, calls: int) -> Callable[[str, int, list[int]], str]:
    """Every session makes ``calls`` requests, then answers (right) and stops."""

    def step(session: str, turn: int, ids: list[int]) -> str:
        if turn < calls:
            return CALLS[protocol].format(n=turn)
        return f"So \\boxed{{{TASK.problems[0].reference}}}.{EOS}"

    return step


def driver_for(
    tokenizer: Any,
    *,
    protocol: str = "tools",
    calls: int = 2,
    top: Callable[[str, int], list[float]] = lambda s, t: uniform(4),
    env: dict[str, Any] | None = None,
    **rollout: Any,
) -> tuple[RolloutDriver, Entropic]:
    names = ["python", "search"] if protocol == "tools" else ["verify", "knowledge", "reasoning"]
    generator = Entropic(ScriptedGenerator(tokenizer, calls_then_answer(protocol, calls)), top)
    config = EnvConfig(
        protocol=protocol,
        agent_names=names,
        max_consults=5,
        max_turns=8,
        max_new_tokens_per_turn=64,
        **(env or {}),
    )
    settings = {"n_samples": 8, "seed": 0, "strategy": "arpo", **rollout}
    driver = RolloutDriver(
        generator, TASK, ScriptedAgents(names=names), config, RolloutConfig(**settings)
    )
    return driver, generator


def tree_stats(driver: RolloutDriver) -> TreeStats:
    """What the trees of ``driver``'s last run cost and decided."""
    assert isinstance(driver.last_strategy, TreeRollout)
    return driver.last_strategy.stats


def parents(trajectories: list[Trajectory]) -> dict[str, Trajectory]:
    return {t.trajectory_id: t for t in trajectories}


@pytest.mark.parametrize(
    ("n", "m", "beam", "p"),
    [(8, 4, 2, 1.0), (8, 4, 4, 1.0), (6, 1, 3, 0.5), (5, 2, 2, 0.0), (4, 4, 2, 1.0)],
)
async def test_a_tree_has_exactly_n_leaves_never_more(tokenizer, n, m, beam, p) -> None:
    driver, _ = driver_for(
        tokenizer,
        n_samples=n,
        initial_samples=m,
        beam_size=beam,
        branch_probability=p,
        entropy_weight=0.0,
    )
    trajectories = await driver.run([0, 1])
    stats = tree_stats(driver)
    assert len(trajectories) == 2 * n
    for group in ("s0-g0-0", "s0-g1-1"):
        leaves = [t for t in trajectories if t.group_id == group]
        assert [t.trajectory_id for t in leaves] == [f"{group}-n{k}" for k in range(n)]
        ids = {t.trajectory_id for t in leaves}
        assert all(t.parent_id in ids for t in leaves if t.parent_id is not None)
    roots = sum(t.parent_id is None for t in trajectories)
    assert roots == 2 * m + stats.fills
    assert stats.groups == 2
    assert 2 * m + stats.branches + stats.fills == 2 * n
    if p == 0.0:  # never branches: the M initial samples, then fresh ones
        assert stats.branches == 0 and stats.fills == 2 * (n - m)
    if p == 1.0 and m < n:  # always branches: the budget runs out, and says so
        assert stats.branches == 2 * (n - m) and stats.fills == 0
        assert stats.refused_budget > 0


@pytest.mark.parametrize("protocol", ["tools", "consult"])
async def test_branches_fork_at_reply_boundaries_and_share_the_prefix_verbatim(
    tokenizer, protocol
) -> None:
    driver, generator = driver_for(
        tokenizer, protocol=protocol, calls=3, branch_probability=1.0, beam_size=2
    )
    trajectories = await driver.run([0])
    by_id = parents(trajectories)
    forks = [t for t in trajectories if t.parent_id is not None]
    assert forks, "branch_probability 1 must branch"
    for child in forks:
        parent = by_id[child.parent_id]
        point = child.branch_point
        boundaries = {t.feedback_end for t in parent.turns if t.feedback_end is not None}
        assert point in boundaries  # right after an injected result or reply
        assert parent.source[point - 1] != "policy"
        for name in ("token_ids", "source", "behavior_logprobs", "loss_mask"):
            assert getattr(child, name)[:point] == getattr(parent, name)[:point]
        own = [t for t in child.turns if t.policy_start >= point]
        assert own and own[0].policy_start == point  # its first own segment starts there
        assert (parent.trajectory_id, child.trajectory_id) in generator.forks


async def test_no_branch_without_a_boundary(tokenizer) -> None:
    # Answers at once: no request, no reply, so nothing to branch at, whatever the rule says.
    driver, generator = driver_for(tokenizer, calls=0, branch_probability=1.0)
    trajectories = await driver.run([0])
    assert all(t.parent_id is None for t in trajectories)
    assert tree_stats(driver).branches == 0 and tree_stats(driver).fills == 4
    assert generator.forks == []


async def test_the_strategy_named_runs_the_batch_and_only_the_tree_reports_counts(
    tokenizer,
) -> None:
    assert {name: cls.name for name, cls in STRATEGIES.items()} == {"grpo": "grpo", "arpo": "arpo"}
    tree, _ = driver_for(tokenizer, calls=0)
    await tree.run([0])
    assert isinstance(tree.last_strategy, TreeRollout)
    counts = {"groups": 1, "branches": 0, "refused_budget": 0, "refused_context": 0, "fills": 4}
    assert tree.last_strategy.metrics() == {f"arpo/{k}": float(v) for k, v in counts.items()}
    flat, _ = driver_for(tokenizer, calls=0, strategy="grpo")
    assert len(await flat.run([0])) == 8
    assert isinstance(flat.last_strategy, IndependentRollout)
    assert flat.last_strategy.metrics() == {}  # the step's metrics gain no arpo/ counts
    with pytest.raises(ValueError, match="unknown rollout strategy 'beam'; expected one of grpo"):
        RolloutConfig(strategy="beam")


def entropy_of(k: int, vocab: int) -> float:
    return math.log(k) / math.log(vocab)


@pytest.mark.parametrize(("weight", "p"), [(0.2, 0.5), (3.0, 0.3), (0.0, 0.7)])
async def test_branch_decisions_follow_the_rule_for_the_measured_dh(tokenizer, weight, p) -> None:
    # The root writes a first segment with entropy log(2)/log|V|, then two more with log(16):
    # dH = (log 16 - log 2) / log|V| at each of its two boundaries; branches answer at once.
    def top(session: str, turn: int) -> list[float]:
        return uniform(2 if turn == 0 else 16)

    def step(session: str, turn: int, ids: list[int]) -> str:
        root = session.endswith("-n0")
        if root and turn < 2:
            return CALLS["tools"].format(n=turn)
        return f"So \\boxed{{0}}.{EOS}"

    beam, n = 6, 12
    generator = Entropic(ScriptedGenerator(tokenizer, step), top)
    config = RolloutConfig(
        n_samples=n,
        initial_samples=1,
        beam_size=beam,
        branch_probability=p,
        entropy_weight=weight,
        seed=7,
        strategy="arpo",
    )
    env = EnvConfig(protocol="tools", agent_names=["python", "search"], max_new_tokens_per_turn=64)
    driver = RolloutDriver(generator, TASK, ScriptedAgents(names=["python", "search"]), env, config)
    trajectories = await driver.run([0])

    vocab = len(tokenizer)
    dh = entropy_of(16, vocab) - entropy_of(2, vocab)
    rng = random.Random("7:s0-g0-0")  # the run seed and the group id
    expected = [
        sum(
            should_branch(rng, dh, entropy_weight=weight, branch_probability=p)
            for _ in range(beam - 1)
        )
        for _ in range(2)  # the root's two boundaries, in turn
    ]
    forks = [t for t in trajectories if t.parent_id is not None]
    root = trajectories[0]
    points = [t.feedback_end for t in root.turns if t.feedback_end is not None]
    assert [sum(t.branch_point == point for t in forks) for point in points] == expected
    assert tree_stats(driver).fills == n - 1 - sum(expected)


@pytest.mark.parametrize(("dh_sign", "branches"), [(1, 2 * 3), (-1, 0)])
async def test_a_large_entropy_rise_always_branches_and_a_drop_never(
    tokenizer, dh_sign, branches
) -> None:
    # clip(p + w * dH) is 1 for a large rise and 0 for a large drop, whatever u is drawn.
    def top(session: str, turn: int) -> list[float]:
        wide, narrow = uniform(64), [0.0]
        first, later = (narrow, wide) if dh_sign > 0 else (wide, narrow)
        return first if turn == 0 else later

    driver, _ = driver_for(
        tokenizer,
        calls=2,
        top=top,
        n_samples=16,
        initial_samples=1,
        beam_size=4,
        entropy_weight=100.0,
    )
    trajectories = await driver.run([0])
    root_forks = [t for t in trajectories if t.parent_id == "s0-g0-0-n0"]
    assert len(root_forks) == branches


async def test_the_same_seed_grows_the_same_tree(tokenizer) -> None:
    def top(session: str, turn: int) -> list[float]:
        return uniform(2 + (zlib.crc32(session.encode()) % 7 if turn else 0))

    def shape(trajectories: list[Trajectory]) -> list[tuple]:
        return [(t.trajectory_id, t.parent_id, t.branch_point) for t in trajectories]

    runs = []
    for _ in range(2):
        driver, _ = driver_for(tokenizer, calls=3, top=top, n_samples=8, seed=3)
        runs.append(shape(await driver.run([0, 1, 2])))
    assert runs[0] == runs[1]
    assert any(parent is not None for _, parent, _ in runs[0])


async def test_a_branch_without_room_for_its_entropy_window_is_refused_and_counted(
    tokenizer,
) -> None:
    probe, _ = driver_for(tokenizer, calls=2, branch_probability=0.0)
    boundary = (await probe.run([0]))[0].turns[0].feedback_end
    # 10 tokens of room after the first result: less than the 20-token entropy window.
    driver, generator = driver_for(
        tokenizer, calls=2, branch_probability=1.0, env={"max_total_tokens": boundary + 10}
    )
    trajectories = await driver.run([0])
    stats = tree_stats(driver)
    assert all(t.parent_id is None for t in trajectories) and generator.forks == []
    assert stats.refused_context > 0 and stats.branches == 0 and stats.fills == 4
    # With room for the window, the same tree branches.
    roomy, _ = driver_for(
        tokenizer, calls=2, branch_probability=1.0, env={"max_total_tokens": boundary + 20}
    )
    await roomy.run([0])
    assert tree_stats(roomy).branches > 0


async def test_a_tree_is_written_whole_and_a_resume_skips_complete_trees(
    tokenizer, tmp_path
) -> None:
    out = tmp_path / "roll.jsonl"
    driver, generator = driver_for(tokenizer, calls=2, branch_probability=1.0)
    first = await driver.run([0, 1], output=out)
    assert [t.trajectory_id for t in read_jsonl(out)] == [t.trajectory_id for t in first]
    calls = len(generator.inner.calls)
    again = await driver.run([0, 1], output=out, resume=True)
    assert again == first and len(generator.inner.calls) == calls


async def test_a_generator_without_top_logprobs_is_refused(tokenizer) -> None:
    generator = ScriptedGenerator(tokenizer, calls_then_answer("tools", 1))
    names = ["python", "search"]
    driver = RolloutDriver(
        generator,
        TASK,
        ScriptedAgents(names=names),
        EnvConfig(protocol="tools", agent_names=names),
        RolloutConfig(strategy="arpo", seed=0),
    )
    with pytest.raises(ValueError, match="top_logprobs"):
        await driver.run([0])


def test_generation_metrics_count_a_shared_prefix_once() -> None:
    call = Turn(
        index=0,
        policy_start=2,
        policy_end=4,
        feedback_start=4,
        feedback_end=5,
        consult=ConsultRecord(agent="python"),
    )

    def trajectory(tid: str, ids: list[int], own: Turn, **fork: Any) -> Trajectory:
        src = ["prompt", "prompt", "policy", "policy", "agent:python", "policy", "policy"]
        src = src[: len(ids)]
        return Trajectory(
            trajectory_id=tid,
            problem_id="0",
            task="t",
            group_id="g",
            token_ids=ids,
            prompt_len=2,
            source=src,
            loss_mask=[int(s == "policy") for s in src],
            behavior_logprobs=[None] * len(ids),
            turns=[call, own],
            finish_reason="eos",
            **fork,
        )

    parent = trajectory(
        "a",
        [1, 2, 3, 4, 5, 6, 7],
        Turn(index=1, policy_start=5, policy_end=7, policy_cached_tokens=4),
    )
    child = trajectory(
        "b",
        [1, 2, 3, 4, 5, 8],
        Turn(index=1, policy_start=5, policy_end=6, policy_cached_tokens=4),
        parent_id="a",
        branch_point=5,
    )
    metrics = generation_metrics([parent, child])
    assert metrics["generated_tokens"] == 4 + 1  # the child's own token only
    assert metrics["prefix_reused_tokens"] == 5
    assert metrics["cached_prompt_tokens"] == 4 + 4
    assert metrics["tool_calls"] == 1  # the shared call ran once
    assert metrics["tool_calls_per_trajectory"] == 1.0  # but both trajectories show it


async def test_an_opening_reply_is_a_boundary_decided_at_dh_zero(tokenizer) -> None:
    # An auto consult answers before the first segment; its branches share the agent's reply.
    def step(session: str, turn: int, ids: list[int]) -> str:
        return f"So \\boxed{{0}}.{EOS}"

    for p, expect_forks in ((1.0, True), (0.0, False)):
        generator = Entropic(ScriptedGenerator(tokenizer, step), lambda s, t: uniform(4))
        agents = ScriptedAgents()
        driver = RolloutDriver(
            generator,
            TASK,
            agents,
            EnvConfig(auto_consult="reasoning", max_new_tokens_per_turn=64),
            RolloutConfig(n_samples=4, strategy="arpo", seed=0, branch_probability=p),
        )
        trajectories = await driver.run([0])
        forks = [t for t in trajectories if t.parent_id is not None]
        assert bool(forks) == expect_forks
        for fork in forks:
            parent = next(t for t in trajectories if t.trajectory_id == fork.parent_id)
            assert fork.branch_point == parent.turns[0].feedback_end  # right after the reply
        # A branch reuses the reply: one agent call per root, none per branch.
        assert len(agents.requests) == sum(t.parent_id is None for t in trajectories)
        assert generation_metrics(trajectories)["tool_calls"] == len(agents.requests)
