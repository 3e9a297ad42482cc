"""Oracle agents: answers drawn from the task's privileged information, no language model.

An agent of ``kind: oracle`` knows more than the policy because the task tells it, and
its name says what it draws on (:data:`ORACLE_SOURCES`):

- ``verify``: the task's verifier. The candidate is the answer found in the policy's
  question (a ``\\boxed{}``, what the task's answer extractor finds, or else the last
  number or expression); the reply says whether it is right and, where the task can tell
  (:meth:`~tasks.base.Task.answer_direction`: numbers), whether it is too large or too small.
- ``knowledge``: the task's facts (:meth:`~tasks.base.Task.facts`), those about what the
  question mentions (all of them when it mentions none in particular).
- ``reasoning``: the task's reference steps (:meth:`~tasks.base.Task.solution_steps`):
  the first step whose result the episode has not shown yet, with its result, except
  for the last step (or any whose result is the answer), which is given without it.

None of them states the reference answer; the pool's leak guard checks every reply
anyway. :func:`check_oracle_agents` refuses, before anything loads, an oracle whose
task lacks what it draws on.
"""

from __future__ import annotations

import re
import time
from typing import Any

from agents.base import Agent, AgentReply, ConsultRequest
from tasks.answers import reference_spans
from tasks.base import Problem, SolutionStep, Task

#: What an agent of kind ``oracle`` draws on, by its name: the privileged information the
#: task must provide (``tasks.base.PRIVILEGED_KINDS``), or None for the task's verifier,
#: which every task has. (Re-exported by :mod:`agents.config`, which checks the names.)
ORACLE_SOURCES: dict[str, str | None] = {"verify": None, "knowledge": "facts", "reasoning": "steps"}

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:\s*/\s*\d+)?")
_ANSWER_IS = re.compile(r"answer\s+(?:is|=|:)\s*([^\n]+?)\s*[.?!]?\s*$", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


def find_candidate(text: str) -> str | None:
    """The candidate answer a consult question shows, or None when it shows none.

    In order: the last ``\\boxed{}``; what follows "answer is"; the right-hand side
    of the last ``=``; the last number.
    """
    boxed = last_boxed(text)
    if boxed:
        return boxed
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = _ANSWER_IS.search(line)
        if match:
            return match.group(1).strip()
    for line in reversed(lines):
        if "=" in line:
            rhs = line.rsplit("=", 1)[1].strip().rstrip(".?!").strip()
            if rhs:
                return rhs
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(" ", "") if numbers else None


class OracleVerifyAgent(Agent):
    """A Verify Agent that asks the task's verifier whether the candidate answer is right.

    Replies ``"Correct: ..."`` or ``"Incorrect: ..."``; never states the reference.
    Carries no token ids (no model produced the reply), so its tokens have no
    behaviour log-probs.
    """

    def __init__(self, task: Task, name: str = "verify") -> None:
        self.name = name
        self.task = task

    def _response_text(self, question: str) -> tuple[str, str] | None:
        """``(candidate, text to score)`` for ``question``, or None without a candidate."""
        try:
            extracted = self.task.extract_answer(question)
        except Exception:  # a task extractor that chokes on free text falls back to ours
            extracted = None
        if extracted:
            return extracted, question
        candidate = find_candidate(question)
        if candidate is None:
            return None
        return candidate, f"\\boxed{{{candidate}}}"

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """Check the candidate answer in ``request.question``; never raises."""
        start = time.perf_counter()

        def reply(text: str = "", error: str | None = None) -> AgentReply:
            return AgentReply(
                agent=self.name, text=text, error=error, latency_s=time.perf_counter() - start
            )

        if request.problem is None:
            return reply(error="oracle verify needs the problem and its reference; got none")
        try:
            found = self._response_text(request.question)
            if found is None:
                return reply(
                    "I found no candidate answer to check. Show it as \\boxed{...} and ask again."
                )
            candidate, response = found
            result = await self.task.ascore(request.problem, response)
        except Exception as exc:
            return reply(error=f"oracle verify failed: {type(exc).__name__}: {exc}")
        if result.correct:
            return reply(f"Correct: the answer {candidate} is right.")
        try:
            direction = self.task.answer_direction(request.problem, candidate)
        except Exception:  # a hint is optional; the verdict stands without it
            direction = None
        if direction:
            return reply(f"Incorrect: the answer {candidate} is {direction}. Recheck your work.")
        return reply(f"Incorrect: the answer {candidate} is not right. Recheck your work.")


def _timed_reply(name: str, start: float, text: str = "", error: str | None = None) -> AgentReply:
    return AgentReply(agent=name, text=text, error=error, latency_s=time.perf_counter() - start)


_WORD = re.compile(r"[a-z]{3,}")
_STOP_WORDS = frozenset(
    "the and has have had are was were with for how many what does each".split()
)


def _stems(text: str) -> set[str]:
    """Lower-case words of three letters or more, plural s and a final e dropped (spiders, spider -> spider)."""
    stems = set()
    for word in _WORD.findall(text.lower()):
        if word in _STOP_WORDS:
            continue
        stem = word.rstrip("s") if len(word) > 3 else word
        stems.add(stem[:-1] if len(stem) > 3 and stem.endswith("e") else stem)
    return stems


def select_facts(facts: list[str], question: str) -> list[str]:
    """The facts about what ``question`` mentions; all of them when it mentions none in particular.

    A fact is about the words only it has among ``facts`` (in "A spider has 8 legs." and
    "A crab has 10 legs.", spider and crab, not legs), compared without plural endings.
    """
    words = [_stems(fact) for fact in facts]
    shared = set.intersection(*words) if len(words) > 1 else set()
    asked = _stems(question)
    chosen = [fact for fact, own in zip(facts, words, strict=True) if (own - shared) & asked]
    return chosen or list(facts)


class OracleKnowledgeAgent(Agent):
    """A Knowledge Agent that states the task's facts about what the question mentions.

    Facts that would state the answer are left out. Carries no token ids.
    """

    def __init__(self, task: Task, name: str = "knowledge") -> None:
        self.name = name
        self.task = task

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """The facts ``request.question`` asks about; never raises."""
        start = time.perf_counter()
        problem = request.problem
        if problem is None:
            return _timed_reply(
                self.name, start, error="oracle knowledge needs the problem; got none"
            )
        try:
            facts = self.task.facts(problem)
            chosen = [
                fact
                for fact in select_facts(facts, request.question)
                if not self.task.states_answer(problem, fact, shown=request.question)
            ]
        except Exception as exc:
            return _timed_reply(
                self.name, start, error=f"oracle knowledge failed: {type(exc).__name__}: {exc}"
            )
        if not facts:
            return _timed_reply(self.name, start, "I have no facts about this problem.")
        if not chosen:
            return _timed_reply(
                self.name, start, "The fact you ask about would give the answer away; work it out."
            )
        return _timed_reply(self.name, start, " ".join(chosen))


def next_step_index(steps: list[SolutionStep], seen: str) -> int | None:
    """The first step whose result ``seen`` does not show yet; None when it shows them all."""
    for index, step in enumerate(steps):
        if not step.result or not reference_spans(step.result, seen):
            return index
    return None


class OracleReasoningAgent(Agent):
    """A Reasoning Agent that gives the next step of the task's reference solution.

    The next step is the first whose result neither the transcript nor the question shows
    (a step the policy, or an earlier reply, has done is skipped). It comes with its
    result, except the last step, or any whose result is the answer, which comes as the
    action alone. Carries no token ids.
    """

    #: The reply depends on the transcript (the steps done so far): the pool's cache keys on it.
    uses_transcript = True

    def __init__(self, task: Task, name: str = "reasoning") -> None:
        self.name = name
        self.task = task

    def advice(self, problem: Problem, question: str, transcript: str) -> str:
        """The reply to ``question`` after ``transcript``."""
        steps = self.task.solution_steps(problem)
        if not steps:
            return "I have no reference steps for this problem."
        index = next_step_index(steps[:-1], f"{transcript}\n{question}")
        index = len(steps) - 1 if index is None else index
        step = steps[index]
        if index == len(steps) - 1:
            return f"Last step: {step.action}. Work it out yourself: that is the final answer."
        if self.task.states_answer(problem, step.result, shown=question):
            return f"Next step: {step.action}. Work out its result yourself."
        return f"Next step ({index + 1} of {len(steps)}): {step.action} = {step.result}."

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """The next step of the reference solution; never raises."""
        start = time.perf_counter()
        if request.problem is None:
            return _timed_reply(
                self.name, start, error="oracle reasoning needs the problem; got none"
            )
        try:
            text = self.advice(request.problem, request.question, request.transcript)
        except Exception as exc:
            return _timed_reply(
                self.name, start, error=f"oracle reasoning failed: {type(exc).__name__}: {exc}"
            )
        return _timed_reply(self.name, start, text)


_ORACLE_CLASSES: dict[str, type[Agent]] = {
    "verify": OracleVerifyAgent,
    "knowledge": OracleKnowledgeAgent,
    "reasoning": OracleReasoningAgent,
}


def make_oracle(name: str, task: Task) -> Agent:
    """The oracle agent named ``name`` (verify, knowledge or reasoning) over ``task``."""
    if name not in _ORACLE_CLASSES:
        raise ValueError(
            f"no oracle agent is named {name!r}; expected one of {', '.join(_ORACLE_CLASSES)}"
        )
    return _ORACLE_CLASSES[name](task, name=name)  # type: ignore[call-arg]


def check_oracle_agents(config: Any, task: Task, task_name: str | None = None) -> None:
    """Refuse an oracle agent whose task does not provide what it draws on (cheap: nothing loads).

    ``config``: an :class:`~agents.config.AgentPoolConfig` (not imported: the config
    imports this module for :data:`ORACLE_SOURCES`).

    ``task_name``: the name the config gave the task, for the message (default ``task.name``).

    Raises:
        ValueError: naming the agent, the task, what is missing and the tasks that have it.
    """
    from tasks.privileged import datasets_with

    for name, settings in config.agents.items():
        needs = ORACLE_SOURCES.get(name) if settings.kind == "oracle" else None
        if needs is None or needs in task.privileged:
            continue
        has = ", ".join(sorted(task.privileged)) or "no privileged information"
        others = ", ".join(f"rg:{dataset}" for dataset in datasets_with(needs))
        raise ValueError(
            f"agent {name!r} has kind 'oracle', which answers from the task's {needs}, but task "
            f"{task_name or task.name!r} provides none (it has: {has}); tasks with {needs}: {others}. "
            f"Use kind 'llm' for agent {name!r} or one of those tasks"
        )


def check_oracle_task(config: Any, task_name: str, task_kwargs: dict[str, Any]) -> None:
    """:func:`check_oracle_agents` for the task registered as ``task_name``, at config time.

    The task is made (cheap: nothing loads) only when an oracle needs privileged
    information. Raises ValueError, also when the task refuses ``task_kwargs``.
    """
    if not any(
        settings.kind == "oracle" and ORACLE_SOURCES.get(name)
        for name, settings in config.agents.items()
    ):
        return
    from tasks.registry import make_task

    try:
        task = make_task(task_name, **task_kwargs)
    except TypeError as exc:
        raise ValueError(f"task {task_name!r} rejected its kwargs {task_kwargs}: {exc}") from None
    check_oracle_agents(config, task, task_name)
