"""The leak guard: a reply that states the reference answer does not reach the policy as it is.

Agents that know more than the policy (oracles, an LLM shown the reference solution, a
larger model) can give the answer away, and a policy trained on such replies learns to
copy, not to reason. :func:`guard_reply` runs on every successful reply in
:class:`~agents.pool.AgentPool`, whatever the agent's kind, after the reply cap (it
checks what would be injected). The check is the task's own
(:meth:`tasks.base.Task.states_answer`): the reference is stated more often than the
problem statement or the policy's question states it, so a Verify agent may confirm
the candidate it was shown and a reply may quote the problem's numbers.

Modes (``AgentConfig.leak_guard``):

- ``block`` (default): the reply becomes an error reply (``leak="blocked"``); the env
  injects ``Error: ...`` as env tokens, never trained.
- ``rewrite``: the extra mentions, last first, become ``[withheld]`` (``leak="rewritten"``);
  the rewritten text has no token ids or log-probs. When the task's check still finds
  the answer, the reply is blocked.
- ``off``: nothing is checked.

The env records the guard's action on the consult (``ConsultRecord.leak``) and the
trainer logs the share of answered consults it acted on as ``agents/leak_rate``.
"""

from __future__ import annotations

import logging
from typing import Literal

from agents.base import AgentReply, ConsultRequest
from tasks.base import Problem, RewardResult, Task

logger = logging.getLogger(__name__)

LeakGuardMode = Literal["block", "rewrite", "off"]
#: What replaces each mention of the answer that a rewritten reply had.
WITHHELD = "[withheld]"
#: The error of a blocked reply (``trainers.summary.consult_error_kind`` reads "withheld").
BLOCKED_ERROR = "its reply gave the answer away and was withheld; ask for a step or a fact instead"


class _ReferenceOnly(Task):
    """Stands in for a pool built without a task: the default checks of :class:`Task` on the problem's reference."""

    name = "reference"

    def load(self) -> list[Problem]:
        return []

    def extract_answer(self, response: str) -> str | None:
        return None

    def score(self, problem: Problem, response: str) -> RewardResult:
        return RewardResult(score=0.0, correct=False)


_FALLBACK = _ReferenceOnly()


def rewrite_leaks(task: Task, problem: Problem, text: str, shown: str = "") -> str | None:
    """``text`` with the mentions of the answer beyond the allowed ones withheld, last first.

    None when withholding every mention still leaves the answer stated.
    """
    if not task.states_answer(problem, text, shown=shown):
        return text
    taken_from = len(text) + 1
    for start, end in reversed(task.answer_spans(problem, text)):
        if end > taken_from:  # overlaps a span already withheld
            continue
        text = text[:start] + WITHHELD + text[end:]
        taken_from = start
        if not task.states_answer(problem, text, shown=shown):
            return text
    return None


def guard_reply(
    reply: AgentReply, request: ConsultRequest, mode: LeakGuardMode, task: Task | None = None
) -> AgentReply:
    """``reply`` as the guard in ``mode`` lets it through (module docstring); never raises.

    ``task`` supplies the answer check; without one, the reference as a token (the
    default of :meth:`Task.states_answer`). Error replies, requests without a problem and
    mode ``off`` pass unchanged.
    """
    problem = request.problem
    if mode == "off" or not reply.ok or problem is None:
        return reply
    judge = task if task is not None else _FALLBACK

    def blocked() -> AgentReply:
        return reply.model_copy(
            update={
                "text": "",
                "token_ids": None,
                "logprobs": None,
                "error": BLOCKED_ERROR,
                "leak": "blocked",
            }
        )

    try:
        if not judge.states_answer(problem, reply.text, shown=request.question):
            return reply
        if mode == "block":
            return blocked()
        text = rewrite_leaks(judge, problem, reply.text, shown=request.question)
    except Exception:  # a broken check must not let an answer through
        logger.exception("leak guard failed on a reply of %r; blocking it", request.agent)
        return blocked()
    if text is None:
        return blocked()
    return reply.model_copy(
        update={"text": text, "token_ids": None, "logprobs": None, "leak": "rewritten"}
    )
