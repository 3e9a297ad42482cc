"""A new rollout strategy is one module plus one registry entry (the contributor test, issue 27).

The strategy of ``tests/support/group_rollout.py`` is registered as a contributor would
(one ``STRATEGIES`` entry); the config accepts its name and the driver runs it, writes
its units and resumes them, with no other change.
"""

from __future__ import annotations

import pytest
from group_rollout import GroupRollout
from scripted import AdditionTask, ScriptedAgents, ScriptedGenerator

from aipo_env.config import EnvConfig
from aipo_env.rollout import RolloutConfig, RolloutDriver
from aipo_env.strategies import STRATEGIES
from aipo_env.trajectory import read_jsonl

EOS = "<|im_end|>"


def script_for(task: AdditionTask):
    """Consult once, then answer the session's problem correctly (problem index in the id)."""

    def step(session: str, turn: int, ids: list[int]) -> str:
        problem = task.problems[int(session.split("-g")[1].split("-")[0]) % len(task)]
        if turn == 0:
            return f'Hmm. <consult agent="verify">Is it {problem.reference}?</consult>'
        return f"\\boxed{{{problem.reference}}}{EOS}"

    return step


async def test_a_registered_strategy_runs_through_the_driver(
    tokenizer, tmp_path, monkeypatch
) -> None:
    with pytest.raises(ValueError, match="unknown rollout strategy 'group'"):
        RolloutConfig(strategy="group")
    monkeypatch.setitem(STRATEGIES, GroupRollout.name, GroupRollout)
    task = AdditionTask(3)
    driver = RolloutDriver(
        ScriptedGenerator(tokenizer, script_for(task)),
        task,
        ScriptedAgents(),
        EnvConfig(),
        RolloutConfig(strategy="group", n_samples=2),
    )
    out = tmp_path / "roll.jsonl"
    trajectories = await driver.run(output=out)
    assert [(t.group_id, t.sample_index) for t in trajectories] == [
        (f"s0-g{p}-{p}", s) for p in range(3) for s in range(2)
    ]
    assert all(t.reward == 1.0 and t.consults == 1 for t in trajectories)
    assert driver.last_strategy is not None
    assert driver.last_strategy.metrics() == {"group/units": 3.0}
    assert len(read_jsonl(out)) == 6
