"""An oracle Verify Agent: checks the candidate answer with the task's own verifier.

No language model is involved. The candidate is the answer found in the policy's
question (a ``\\boxed{}``, what the task's answer extractor finds, or else the
last number or expression); the task's verifier compares it with the problem's
reference, and the agent answers in words without revealing the reference.
"""

from __future__ import annotations

import re
import time

from agents.base import Agent, AgentReply, ConsultRequest
from tasks.base import Task

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
        return reply(f"Incorrect: the answer {candidate} is not right. Recheck your work.")
