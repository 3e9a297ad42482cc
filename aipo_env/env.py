"""``ConsultEnv``: reasoning as a multi-turn, asynchronous, gym-style environment.

One episode is one problem. The observation at reset is the prompt's token ids; each
action is one generated policy segment (token ids and their log-probs); when the
segment ends with a consult, the step's observation is the injected feedback ids. The
episode ends on EOS, a budget, or an error, and the final step's ``info`` carries the
token-exact :class:`~aipo_env.trajectory.Trajectory`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from agents.base import AgentReply, ConsultRequest, ConsultService
from aipo_env import protocol
from aipo_env.config import EnvConfig
from aipo_env.trajectory import (
    SOURCE_ENV_NAME,
    SOURCE_POLICY_NAME,
    SOURCE_PROMPT_NAME,
    ConsultRecord,
    Trajectory,
    Turn,
    agent_source,
)
from aipo_env.trajectory import render as render_trajectory
from tasks.base import Problem, RewardResult, Task


@dataclass
class _Episode:
    problem: Problem
    trajectory_id: str
    group_id: str
    sample_index: int
    allow_consult: bool
    max_consults: int
    prompt_len: int
    token_ids: list[int]
    source: list[str]
    loss_mask: list[int]
    logprobs: list[float | None]
    turns: list[Turn] = field(default_factory=list)
    calls: int = 0
    consults: int = 0
    consult_errors: int = 0
    attempts: int = 0
    drift: bool = False
    chat_contents: dict[int, str] = field(default_factory=dict)
    trajectory: Trajectory | None = None

    def extend(
        self, ids: Sequence[int], source: str, mask: int, lps: Sequence[float | None]
    ) -> None:
        self.token_ids.extend(int(i) for i in ids)
        self.source.extend([source] * len(ids))
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend(lps)


def _normalize_action(action: Any) -> tuple[list[int], list[float | None], str, int]:
    """(ids, logprobs, generation finish reason, cached tokens) from any accepted action."""
    cached = 0
    if hasattr(action, "token_ids") and hasattr(action, "logprobs"):
        ids, lps = list(action.token_ids), list(action.logprobs)
        finish, cached = (
            getattr(action, "finish_reason", "stop"),
            getattr(action, "cached_tokens", 0),
        )
    elif isinstance(action, dict):
        ids = list(action["token_ids"])
        lps = list(action.get("logprobs") or [None] * len(ids))
        finish, cached = action.get("finish_reason", "stop"), action.get("cached_tokens", 0)
    elif isinstance(action, tuple) and len(action) in (2, 3) and not np.isscalar(action[0]):
        ids, lps = (
            list(action[0]),
            list(action[1] if action[1] is not None else [None] * len(action[0])),
        )
        finish = action[2] if len(action) == 3 else "stop"
    else:  # a bare sequence of ids (gymnasium's action space): log-probs unknown
        ids = [int(i) for i in np.asarray(action).reshape(-1)]
        lps, finish = [None] * len(ids), "stop"
    if len(lps) != len(ids):
        raise ValueError(
            f"action has {len(lps)} log-probs for {len(ids)} token ids; they must align"
        )
    return (
        [int(i) for i in ids],
        [None if lp is None else float(lp) for lp in lps],
        str(finish),
        int(cached),
    )


class ConsultEnv(gymnasium.Env):
    """Multi-turn reasoning with consultable agents, token in and token out.

    Contract (async first; ``reset``/``step`` wrap the coroutines on a private loop):

    - ``await areset(seed=None, options=None) -> (obs, info)``: ``obs`` is the prompt's
      ids (int64 array). ``options``: ``problem_index`` or ``problem_id`` (else a seeded
      random problem), ``allow_consult`` (False: consults get an error feedback),
      ``max_consults``, ``trajectory_id``, ``group_id``, ``sample_index``. ``info`` has
      ``sources``, ``problem``, ``trajectory_id``; when the prompt alone fills the
      context, ``info["trajectory"]`` is already final (``context_overflow``).
    - ``await astep(action) -> (obs, reward, terminated, truncated, info)``: ``action``
      is a :class:`policies.base.Generation`, a dict or tuple with ``token_ids``,
      ``logprobs`` (and ``finish_reason``), or bare ids. ``obs`` is the injected ids
      (empty when the episode ends); ``info["sources"]`` labels them. ``terminated`` on
      EOS; ``truncated`` on ``length``, ``max_turns``, ``context_overflow``, ``error:*``.
      The final step's reward is the task's score of the policy's own text (feedback
      removed) and ``info["trajectory"]`` the finished record.

    Deviation from gymnasium forced by token spaces: observations and actions are
    variable-length id sequences (``spaces.Sequence(Discrete(vocab), stack=True)``), and
    the action may carry log-probs, which the space cannot describe.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        task: Task,
        agents: ConsultService | None,
        tokenizer: Any,
        config: EnvConfig | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.task = task
        self.agents = agents
        self.tokenizer = tokenizer
        self.config = config or EnvConfig()
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode {render_mode!r}; expected None or 'ansi'")
        self.render_mode = render_mode
        vocab = spaces.Discrete(len(tokenizer))
        self.observation_space = spaces.Sequence(vocab, stack=True)
        self.action_space = spaces.Sequence(vocab, stack=True)
        self._eos_ids = {tokenizer.eos_token_id} - {None}
        self._episode: _Episode | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_id: dict[str, int] | None = None

    # -- prompts ---------------------------------------------------------------

    @property
    def sampling_stop(self) -> list[str]:
        """Stop strings the policy must be sampled with (the stop text is kept)."""
        return [protocol.CONSULT_CLOSE] if self.config.mode == "train" else []

    def instructions(self, max_consults: int | None = None) -> str:
        """The consult instructions the prompt carries in train mode."""
        budget = self.config.max_consults if max_consults is None else max_consults
        if self.config.instructions is not None:
            return self.config.instructions.format(max_consults=budget)
        return protocol.consult_instructions(
            self.config.agent_names, budget, self.config.agent_roles
        )

    def prompt_messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat messages of a problem's prompt."""
        content = f"{problem.question}\n\n{self.task.answer_format}".strip()
        if self.config.mode == "train":
            content += "\n\n" + self.instructions()
        messages = []
        if self.config.system_prompt is not None:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages.append({"role": "user", "content": content})
        return messages

    def prompt_ids(self, problem: Problem) -> list[int]:
        """The prompt's ids: the chat template when the tokenizer has one, else plain text."""
        messages = self.prompt_messages(problem)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    # -- episode ---------------------------------------------------------------

    def max_new_tokens(self) -> int:
        """The next segment's budget: the per-turn cap within the room left in the context."""
        used = len(self._episode.token_ids) if self._episode else 0
        return max(0, min(self.config.max_new_tokens_per_turn, self.config.max_total_tokens - used))

    @property
    def token_ids(self) -> list[int]:
        """All ids of the current episode so far (what the policy continues)."""
        return list(self._require().token_ids)

    @property
    def trajectory_id(self) -> str:
        """The current episode's trajectory id (the generator's session id)."""
        return self._require().trajectory_id

    @property
    def done(self) -> bool:
        """Whether the current episode has ended."""
        return self._episode is not None and self._episode.trajectory is not None

    def _require(self) -> _Episode:
        if self._episode is None:
            raise RuntimeError("no episode: call reset/areset first")
        return self._episode

    def _pick_problem(self, options: dict[str, Any]) -> Problem:
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
        return problems[int(self.np_random.integers(len(problems)))]

    async def areset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; returns the prompt ids and info (see the class docstring)."""
        super().reset(seed=seed)
        options = dict(options or {})
        problem = self._pick_problem(options)
        ids = self.prompt_ids(problem)
        # Drawn from the seeded generator so a seeded reset is reproducible.
        tid = str(options.get("trajectory_id") or self.np_random.bytes(16).hex())
        max_consults = options.get("max_consults")
        episode = _Episode(
            problem=problem,
            trajectory_id=tid,
            group_id=str(options.get("group_id") or tid),
            sample_index=int(options.get("sample_index", 0)),
            allow_consult=bool(options.get("allow_consult", True)),
            max_consults=self.config.max_consults if max_consults is None else int(max_consults),
            prompt_len=len(ids),
            token_ids=[],
            source=[],
            loss_mask=[],
            logprobs=[],
        )
        episode.extend(ids, SOURCE_PROMPT_NAME, 0, [None] * len(ids))
        self._episode = episode
        info: dict[str, Any] = {
            "sources": [SOURCE_PROMPT_NAME] * len(ids),
            "problem": problem,
            "trajectory_id": tid,
            "allow_consult": episode.allow_consult,
        }
        if len(ids) >= self.config.max_total_tokens:
            info["trajectory"] = await self._finish(episode, "context_overflow", score=False)
        elif self._auto_consults(episode):
            injected = await self._auto_consult(episode)
            if injected is None:
                info["trajectory"] = await self._finish(episode, "context_overflow", score=False)
            else:
                ids = ids + injected[0]
                info["sources"] = info["sources"] + injected[1]
        return np.asarray(ids, dtype=np.int64), info

    def _auto_consults(self, episode: _Episode) -> bool:
        return (
            self.config.auto_consult is not None
            and self.config.mode == "train"
            and episode.allow_consult
            and episode.max_consults > 0
            and self.agents is not None
        )

    async def _auto_consult(self, episode: _Episode) -> tuple[list[int], list[str]] | None:
        """Write the opening consult as env tokens and inject its answer (None on overflow)."""
        question = self.config.auto_consult_question.replace("{question}", episode.problem.question)
        text = f'<consult agent="{self.config.auto_consult}">{question}</consult>'
        tag = self._encode(text)
        start = len(episode.token_ids)
        episode.extend(tag, SOURCE_ENV_NAME, 0, [None] * len(tag))
        # An empty policy segment: the env spoke for the policy this once.
        turn = Turn(index=0, policy_start=start, policy_end=start, generation_finish="auto_consult")
        episode.turns.append(turn)
        injected = await self._answer(episode, text, turn)
        if injected is None:
            return None
        return tag + injected[0], [SOURCE_ENV_NAME] * len(tag) + injected[1]

    async def astep(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Append one policy segment; answer its consult or end the episode."""
        episode = self._require()
        if episode.trajectory is not None:
            raise RuntimeError(
                f"episode {episode.trajectory_id} already ended ({episode.trajectory.finish_reason}); call reset"
            )
        ids, lps, gen_finish, cached = _normalize_action(action)
        start = len(episode.token_ids)
        episode.extend(ids, SOURCE_POLICY_NAME, 1, lps)
        turn = Turn(
            index=len(episode.turns),
            policy_start=start,
            policy_end=len(episode.token_ids),
            generation_finish=gen_finish,
            policy_cached_tokens=cached,
        )
        episode.turns.append(turn)
        ended_by_eos = bool(ids) and ids[-1] in self._eos_ids
        text = self._decode(ids)
        reason: str | None = None
        if gen_finish == "abort":
            reason = "error:abort"
        elif self.config.mode == "train" and not ended_by_eos and self._ends_with_request(text):
            episode.attempts += 1
            if len(episode.turns) >= self.config.max_turns:
                reason = "max_turns"
            else:
                injected = await self._answer(episode, text, turn)
                if injected is None:
                    reason = "context_overflow"
                else:
                    new_ids, sources = injected
                    return (
                        np.asarray(new_ids, dtype=np.int64),
                        0.0,
                        False,
                        False,
                        {"sources": sources, "turn": turn},
                    )
        elif ended_by_eos or (
            gen_finish == "stop" and len(episode.token_ids) < self.config.max_total_tokens
        ):
            reason = "eos"
        else:
            reason = "length"
        trajectory = await self._finish(episode, reason)
        terminated = reason == "eos"
        info = {"sources": [], "turn": turn, "trajectory": trajectory, "finish_reason": reason}
        return np.zeros(0, dtype=np.int64), trajectory.reward, terminated, not terminated, info

    # -- protocol hooks: override these to build another agentic environment ---

    def _ends_with_request(self, text: str) -> bool:
        """Whether a policy segment ends with a request the env must answer."""
        return protocol.ends_with_consult(text)

    def _parse_request(self, text: str) -> tuple[str | None, str, str | None]:
        """(agent, question, error) of the request ending ``text``."""
        parsed = protocol.parse_last_consult(text, self.config.agent_names)
        return parsed.agent, parsed.question, parsed.error

    def _feedback_texts(self, agent: str | None) -> tuple[str, str]:
        """The ``env`` markup around an agent's reply."""
        return protocol.feedback_open(agent or "env"), protocol.feedback_close()

    def _error_text(self, agent: str | None, message: str) -> str:
        """A whole error feedback segment."""
        return protocol.error_feedback(agent, message)

    async def _call_agent(
        self, request: ConsultRequest
    ) -> tuple[AgentReply | None, str | None, float]:
        """The agent's reply or an error message; never raises."""
        began = time.monotonic()
        try:
            reply = await asyncio.wait_for(
                self.agents.consult(request), timeout=self.config.agent_timeout_s
            )
        except asyncio.TimeoutError:
            return (
                None,
                f"agent '{request.agent}' timed out after {self.config.agent_timeout_s} s",
                time.monotonic() - began,
            )
        except Exception as exc:  # an agent must never crash the episode
            return (
                None,
                f"agent '{request.agent}' failed ({type(exc).__name__})",
                time.monotonic() - began,
            )
        if not isinstance(reply, AgentReply):
            return (
                None,
                f"agent '{request.agent}' returned {type(reply).__name__}, expected AgentReply",
                time.monotonic() - began,
            )
        if reply.error is not None:
            return (
                reply,
                f"agent '{request.agent}' could not answer: {reply.error}",
                time.monotonic() - began,
            )
        return reply, None, time.monotonic() - began

    async def _answer(
        self, episode: _Episode, text: str, turn: Turn
    ) -> tuple[list[int], list[str]] | None:
        """Inject the feedback for the consult ending ``text``; None when it would overflow."""
        agent, question, error = self._parse_request(text)
        record = ConsultRecord(agent=agent, question=question)
        reply: AgentReply | None = None
        if error is None and not episode.allow_consult:
            error = "consulting is not available in this episode; continue on your own"
        elif error is None and episode.calls >= episode.max_consults:
            error = f"consult budget of {episode.max_consults} exhausted; continue on your own"
        elif error is None and self.agents is None:
            error = "no agents are available; continue on your own"
        elif error is None:
            episode.calls += 1
            request = ConsultRequest(
                agent=agent,
                question=question,
                problem=episode.problem,
                transcript=self._decode(episode.token_ids[episode.prompt_len :]),
                episode_id=episode.trajectory_id,
            )
            reply, error, elapsed = await self._call_agent(request)
            record.latency_s = reply.latency_s if reply is not None and reply.latency_s else elapsed
            if reply is not None:
                record.cached_tokens, record.cache_hit = reply.cached_tokens, reply.cache_hit
        record.error = error
        pieces = self._feedback_pieces(agent, reply if error is None else None, error, record)
        new_ids = [i for ids, _, _ in pieces for i in ids]
        turn.consult = record
        # Room for the feedback and at least one more policy token.
        if len(episode.token_ids) + len(new_ids) + 1 > self.config.max_total_tokens:
            return None
        if error is None:
            episode.consults += 1
        else:
            episode.consult_errors += 1
        turn.feedback_start = len(episode.token_ids)
        sources: list[str] = []
        for ids, source, lps in pieces:
            mask = int(self.config.train_agent_tokens and source.startswith("agent:"))
            episode.extend(ids, source, mask, lps)
            sources += [source] * len(ids)
        turn.feedback_end = len(episode.token_ids)
        return new_ids, sources

    def _feedback_pieces(
        self, agent: str | None, reply: AgentReply | None, error: str | None, record: ConsultRecord
    ) -> list[tuple[list[int], str, list[float | None]]]:
        """The injected segment as (ids, source, behaviour log-probs) pieces."""

        def env(text: str) -> tuple[list[int], str, list[float | None]]:
            ids = self._encode(text)
            return ids, SOURCE_ENV_NAME, [None] * len(ids)

        if reply is None:
            body_piece = None
            open_text = self._error_text(agent, error or "no reply")
            close_text = ""
        else:
            if (
                reply.token_ids is not None
                and reply.logprobs is not None
                and len(reply.logprobs) == len(reply.token_ids)
            ):
                body, body_lps = list(reply.token_ids), list(reply.logprobs)
            else:
                body = self._encode(reply.text)
                body_lps = [None] * len(body)
            if len(body) > self.config.max_reply_tokens:
                body, body_lps = (
                    body[: self.config.max_reply_tokens],
                    body_lps[: self.config.max_reply_tokens],
                )
                record.reply_truncated = True
            record.reply_truncated = record.reply_truncated or reply.truncated
            body_piece = (body, agent_source(reply.agent or agent or "unknown"), body_lps)
            open_text, close_text = self._feedback_texts(agent)
        if self.config.format == "inline":
            pieces = [env(open_text)]
            if body_piece is not None:
                pieces += [body_piece, env(close_text)]
            return [p for p in pieces if p[0]]
        # chat: the feedback block becomes the content of its own message
        content_open, content_close = open_text.strip("\n"), close_text.strip("\n")
        body_text = self._decode(body_piece[0], skip_special=False) if body_piece else ""
        if body_piece is not None:
            content = f"{content_open}\n{body_text}\n{content_close}"
        else:
            content = content_open
        chat = protocol.chat_feedback_pieces(
            self.tokenizer, content, self.config.chat_feedback_role, self.config.system_prompt
        )
        episode = self._require()
        episode.chat_contents[len(episode.turns) - 1] = content
        if body_piece is None:
            pieces = [env(chat.before + content + chat.after)]
        else:
            pieces = [
                env(chat.before + content_open + "\n"),
                body_piece,
                env("\n" + content_close + chat.after),
            ]
        if self.config.check_drift:
            joined = [i for ids, _, _ in pieces for i in ids]
            if joined != self._encode(chat.before + content + chat.after):
                episode.drift = True
        return [p for p in pieces if p[0]]

    def _full_render_drift(self, episode: _Episode) -> bool:
        """Chat format: whether the incremental ids differ from a full render of the conversation."""
        messages = self.prompt_messages(episode.problem)
        eos_text = self.tokenizer.eos_token or ""
        for turn in episode.turns:
            ids = episode.token_ids[turn.policy_start : turn.policy_end]
            content = self._decode(ids, skip_special=False)
            if eos_text and content.endswith(eos_text):
                content = content[: -len(eos_text)]
            messages.append({"role": "assistant", "content": content})
            if turn.index in episode.chat_contents:
                role = self.config.chat_feedback_role
                messages.append({"role": role, "content": episode.chat_contents[turn.index]})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
        ids = self._encode(rendered)
        return ids[: len(episode.token_ids)] != episode.token_ids

    async def _finish(
        self, episode: _Episode, reason: str, score: bool = True, error: str | None = None
    ) -> Trajectory:
        """Score the policy's own text and freeze the trajectory."""
        policy_text = "".join(
            self._decode(episode.token_ids[t.policy_start : t.policy_end]) for t in episode.turns
        )
        verifier: RewardResult | None = None
        if score and not reason.startswith("error:"):
            try:
                verifier = await self.task.ascore(episode.problem, policy_text)
            except Exception as exc:  # a verifier bug must not lose the episode
                verifier = RewardResult(
                    score=0.0, correct=False, reason=f"scoring failed: {type(exc).__name__}: {exc}"
                )
        if self.config.mode == "independent":
            episode.attempts = protocol.count_consults(policy_text)
        drift = episode.drift
        if (
            self.config.format == "chat"
            and self.config.check_drift
            and reason == "eos"
            and getattr(self.tokenizer, "chat_template", None)
        ):
            drift = drift or self._full_render_drift(episode)
        mask = list(episode.loss_mask)
        if drift and self.config.mask_on_drift:
            mask = [0] * len(mask)
        reward = verifier.score if verifier is not None else 0.0
        episode.trajectory = Trajectory(
            trajectory_id=episode.trajectory_id,
            problem_id=episode.problem.id,
            task=episode.problem.task or self.task.name,
            group_id=episode.group_id,
            sample_index=episode.sample_index,
            token_ids=list(episode.token_ids),
            prompt_len=episode.prompt_len,
            source=list(episode.source),
            loss_mask=mask,
            behavior_logprobs=list(episode.logprobs),
            turns=[t.model_copy(deep=True) for t in episode.turns],
            reward=reward,
            turn_rewards=[0.0] * max(0, len(episode.turns) - 1)
            + ([reward] if episode.turns else []),
            verifier=verifier,
            finish_reason=reason,
            error=error,
            policy_version=self.config.policy_version,
            allow_consult=episode.allow_consult,
            mode=self.config.mode,
            consults=episode.consults,
            consult_errors=episode.consult_errors,
            consult_attempts=episode.attempts,
            tokenization_drift=drift,
        )
        return episode.trajectory

    def abort(self, kind: str, message: str = "") -> Trajectory:
        """End the current episode with ``error:<kind>`` (e.g. the generator failed); not scored.

        ``kind`` may also be a plain finish reason (``context_overflow`` when the
        generator refuses a full context).
        """
        episode = self._require()
        if episode.trajectory is not None:
            return episode.trajectory
        plain = ("length", "max_turns", "context_overflow")
        reason = kind if kind.startswith("error:") or kind in plain else f"error:{kind}"
        coro = self._finish(episode, reason, score=False, error=message or None)
        # _finish awaits nothing when score=False, so it completes in one send.
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("abort must not suspend")  # pragma: no cover

    # -- synchronous gymnasium API --------------------------------------------

    def _run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError(
                "ConsultEnv.reset/step called inside a running event loop; use 'await env.areset()' and 'await env.astep()'"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):  # type: ignore[override]
        """Synchronous :meth:`areset` (not inside a running event loop)."""
        return self._run(self.areset(seed=seed, options=options))

    def step(self, action: Any):  # type: ignore[override]
        """Synchronous :meth:`astep` (not inside a running event loop)."""
        return self._run(self.astep(action))

    def render(self) -> str | None:  # type: ignore[override]
        """The episode so far as labelled text (render_mode 'ansi')."""
        if self.render_mode != "ansi" or self._episode is None:
            return None
        episode = self._episode
        if episode.trajectory is not None:
            return render_trajectory(episode.trajectory, self.tokenizer)
        partial = Trajectory(
            trajectory_id=episode.trajectory_id,
            problem_id=episode.problem.id,
            task=self.task.name,
            group_id=episode.group_id,
            token_ids=list(episode.token_ids),
            prompt_len=episode.prompt_len,
            source=list(episode.source),
            loss_mask=list(episode.loss_mask),
            behavior_logprobs=list(episode.logprobs),
            finish_reason="running",
        )
        return render_trajectory(partial, self.tokenizer)

    def close(self) -> None:
        """Close the private event loop of the synchronous API."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
        self._loop = None


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object from itself, a model path, or ``"default"`` (SmolLM2)."""
    if not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    from policies.default_model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))


def make_consult_env(
    task: str | Task,
    agents: ConsultService | None = None,
    tokenizer: Any = "default",
    config: EnvConfig | dict[str, Any] | None = None,
    task_kwargs: dict[str, Any] | None = None,
    render_mode: str | None = None,
    **config_overrides: Any,
) -> ConsultEnv:
    """Build a :class:`ConsultEnv` from a task registry name (the gymnasium entry point).

    ``config`` is an :class:`EnvConfig` or a dict of its fields; keyword overrides win.
    """
    if isinstance(task, str):
        from tasks.registry import make_task

        task = make_task(task, **(task_kwargs or {}))
    base = config.model_dump() if isinstance(config, EnvConfig) else dict(config or {})
    cfg = EnvConfig(**{**base, **config_overrides})
    return ConsultEnv(task, agents, load_tokenizer(tokenizer), cfg, render_mode=render_mode)
