"""Scripted stand-ins for tests: a policy generator, a consult service and a tiny task.

They speak the real protocols (``policies.base.Generator``, ``agents.base.ConsultService``,
``tasks.base.Task``) with deterministic, inspectable behaviour, so tests can pin down
what the environment, the rollout driver or a trainer does with each token.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from agents.base import DEFAULT_AGENT_NAMES, AgentReply, ConsultRequest
from policies.base import (
    ContextOverflowError,
    Generation,
    GenerationError,
    Generator,
    SamplingParams,
)
from tasks.base import Problem, RewardResult, Task

#: What a script step may be: text (encoded), ids (kept verbatim), or a full Generation.
ScriptStep = str | list[int] | Generation
#: A script: a list of steps per session turn, or a function of (session, turn, input ids).
Script = Sequence[ScriptStep] | Callable[[str, int, list[int]], ScriptStep]


def scripted_logprob(token_id: int, position: int) -> float:
    """The deterministic log-prob the scripted generator reports for a token."""
    return -((token_id % 97) + 1) / 100.0 - position / 1000.0


class ScriptedGenerator(Generator):
    """A policy that replays a script per session, honouring stops and budgets like a real backend.

    Text steps are encoded; id steps are returned verbatim (so tests can use ids that do
    not survive decode + re-encode). Stop strings end a step after the token that
    completes them; EOS ends it; ``max_new_tokens`` cuts it (finish ``length``).
    ``fail`` (session, turn) -> True makes that call raise :class:`GenerationError`;
    ``delay`` adds a random scripted latency per call.
    """

    def __init__(
        self,
        tokenizer: Any,
        script: Script,
        *,
        max_context: int = 8192,
        fail: Callable[[str, int], bool] | None = None,
        delay: tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self.script = script
        self._max_context = max_context
        self.fail = fail
        self.delay = delay
        self._rng = random.Random(seed)
        self.turns: dict[str, int] = defaultdict(int)
        self.calls: list[tuple[str | None, list[int], SamplingParams]] = []

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the script's text is encoded with."""
        return self._tokenizer

    @property
    def max_context(self) -> int:
        """The context limit :meth:`check_context` enforces."""
        return self._max_context

    def _step(self, session: str, turn: int, ids: list[int]) -> ScriptStep:
        if callable(self.script):
            return self.script(session, turn, ids)
        if turn >= len(self.script):
            raise GenerationError(
                f"script has {len(self.script)} steps; session {session} asked for step {turn}"
            )
        return self.script[turn]

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, *, session_id: str | None = None
    ) -> Generation:
        """Return the session's next scripted step, cut by stops and budgets."""
        ids = list(input_ids)
        session = session_id or ""
        turn = self.turns[session]
        self.turns[session] += 1
        self.calls.append((session_id, ids, params))
        if self.delay is not None:
            await asyncio.sleep(self._rng.uniform(*self.delay))
        if self.fail is not None and self.fail(session, turn):
            raise GenerationError(f"scripted failure in session {session} turn {turn}")
        self.check_context(ids)
        step = self._step(session, turn, ids)
        if isinstance(step, Generation):
            return step
        out = (
            self._tokenizer.encode(step, add_special_tokens=False)
            if isinstance(step, str)
            else list(step)
        )
        budget = min(params.max_new_tokens, self._max_context - len(ids))
        eos = self._tokenizer.eos_token_id
        kept: list[int] = []
        finish, match = "length", None
        for token in out:
            if len(kept) >= budget:
                break
            kept.append(token)
            if token == eos and not params.ignore_eos:
                finish, match = "stop", token
                break
            if params.stop:
                text = self._tokenizer.decode(kept, skip_special_tokens=False)
                hit = next((s for s in params.stop if s in text), None)
                if hit is not None:
                    finish, match = "stop", hit
                    break
        else:
            if len(kept) == len(out) and len(kept) < budget:
                finish = "stop"  # the script ran out: treated as a natural stop
        return Generation(
            token_ids=kept,
            logprobs=[scripted_logprob(t, len(ids) + i) for i, t in enumerate(kept)],
            finish_reason=finish,
            stop_match=match,
            prompt_tokens=len(ids),
            cached_tokens=max(0, len(ids) - 1) if turn else 0,
        )


#: A scripted agent behaviour: text, a full reply, an exception to raise, or "hang".
AgentBehaviour = str | AgentReply | BaseException | Callable[[ConsultRequest], Any]


class ScriptedAgents:
    """A :class:`agents.base.ConsultService` with scripted replies, errors, hangs and delays.

    ``replies`` maps an agent name to a behaviour: a string (the reply text), an
    :class:`AgentReply`, an exception instance (raised), the string ``"hang"`` (never
    answers: exercises the env's timeout), or a callable of the request returning any
    of these. ``delay`` adds a random scripted latency per consult.
    """

    def __init__(
        self,
        replies: dict[str, AgentBehaviour] | None = None,
        names: Sequence[str] = DEFAULT_AGENT_NAMES,
        *,
        delay: tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        self._names = tuple(names)
        self.replies = replies or {}
        self.delay = delay
        self._rng = random.Random(seed)
        self.requests: list[ConsultRequest] = []

    @property
    def names(self) -> Sequence[str]:
        """The agent names this service answers for."""
        return self._names

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Answer (or fail, or hang) as scripted."""
        self.requests.append(request)
        if self.delay is not None:
            await asyncio.sleep(self._rng.uniform(*self.delay))
        behaviour = self.replies.get(request.agent, f"{request.agent} says: {request.question}")
        if callable(behaviour) and not isinstance(behaviour, BaseException):
            behaviour = behaviour(request)
        if isinstance(behaviour, BaseException):
            raise behaviour
        if behaviour == "hang":
            await asyncio.Event().wait()
        if isinstance(behaviour, AgentReply):
            return behaviour
        return AgentReply(agent=request.agent, text=str(behaviour), latency_s=0.01)


class AdditionTask(Task):
    """``n`` problems "What is a + b?" with a boxed-integer verifier (1.0 right, 0.0 wrong)."""

    name = "test:addition"

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.n, self.seed = n, seed

    def load(self) -> list[Problem]:
        """Deterministic problems from ``seed``."""
        rng = random.Random(self.seed)
        out = []
        for i in range(self.n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            out.append(
                Problem(
                    id=f"add-{i}",
                    task=self.name,
                    question=f"What is {a} + {b}?",
                    reference=str(a + b),
                )
            )
        return out

    def extract_answer(self, response: str) -> str | None:
        """The content of the last ``\\boxed{...}``."""
        found = re.findall(r"\\boxed\{([^{}]*)\}", response)
        return found[-1].strip() if found else None

    def score(self, problem: Problem, response: str) -> RewardResult:
        """1.0 when the boxed answer equals the reference."""
        answer = self.extract_answer(response)
        if answer is None:
            return RewardResult(score=0.0, correct=False, reason="no boxed answer")
        correct = answer == problem.reference
        return RewardResult(score=float(correct), correct=correct, extracted=answer)


__all__ = [
    "AdditionTask",
    "ContextOverflowError",
    "ScriptedAgents",
    "ScriptedGenerator",
    "scripted_logprob",
]
