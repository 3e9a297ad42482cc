"""Who produced each token: the source labels a trajectory records, and their integer codes.

Every token of a :class:`~aipo_env.trajectory.Trajectory` carries one source label:

| label | produced by |
|---|---|
| ``prompt`` | the task's prompt (chat template included) |
| ``policy`` | the policy, sampled |
| ``env`` | the environment: protocol markup, error texts, consults it wrote itself |
| ``agent:<name>`` | a collaborative agent or a tool answering a request |
| ``peer:<name>`` | another policy taking part in the episode |

Agents and peers are *injected* sources: text that entered the trajectory from outside
the policy. Whether the loss trains them is decided in one place,
:mod:`aipo_env.masks`; this module only names things.
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT = "prompt"
POLICY = "policy"
ENV = "env"
AGENT_PREFIX = "agent:"
PEER_PREFIX = "peer:"

#: Integer codes of the labels in tensors (``CODE_AGENT_BASE + i`` is agent ``i``).
CODE_PAD = -1
CODE_PROMPT = 0
CODE_POLICY = 1
CODE_ENV = 2
CODE_AGENT_BASE = 3


def agent(name: str) -> str:
    """The label of agent (or tool) ``name``'s tokens."""
    return f"{AGENT_PREFIX}{name}"


def peer(name: str) -> str:
    """The label of peer policy ``name``'s tokens."""
    return f"{PEER_PREFIX}{name}"


def is_injected(label: str) -> bool:
    """Whether ``label`` is text injected from outside the policy (an agent or a peer)."""
    return label.startswith(AGENT_PREFIX) or label.startswith(PEER_PREFIX)


def source_codes(labels: Sequence[str], agent_names: Sequence[str]) -> list[int]:
    """The integer code of each label; an agent missing from ``agent_names`` raises ``KeyError``."""
    codes = {PROMPT: CODE_PROMPT, POLICY: CODE_POLICY, ENV: CODE_ENV}
    for i, name in enumerate(agent_names):
        codes[agent(name)] = CODE_AGENT_BASE + i
    return [codes[label] for label in labels]
