"""``ConsultEnv``: reasoning as a multi-turn, asynchronous, gym-style environment.

One episode is one problem. The observation at reset is the prompt's token ids; each
action is one generated policy segment (token ids and their log-probs); when the
segment ends with a request (a consult, a tool call: whatever the env's
:class:`~aipo_env.protocols.base.InteractionProtocol` defines), the step's observation
is the injected reply's ids. The episode ends on EOS, a budget, or an error, and the
final step's ``info`` carries the token-exact :class:`~aipo_env.trajectory.Trajectory`.

The env keeps ids, sources and budgets; the protocol owns every text; the loss mask it
stores comes from :mod:`aipo_env.masks`. A new kind of interaction is a new protocol
passed in, never a subclass.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from agents.base import AgentReply, ConsultRequest, ConsultService
from aipo_env import sources
from aipo_env.actions import normalize_action
from aipo_env.async_env import AsyncEnv
from aipo_env.config import EnvConfig
from aipo_env.episode_state import EpisodeState, ProblemPicker
from aipo_env.injection import call_service, full_render_drift, reply_pieces, short_error
from aipo_env.masks import MaskRule
from aipo_env.protocols import InteractionProtocol, make_protocol
from aipo_env.protocols.base import Piece, encode_injected
from aipo_env.trajectory import ConsultRecord, Trajectory, Turn
from tasks.base import Problem, RewardResult, Task


def cut_after_eos(
    ids: list[int], logprobs: list[float | None], eos: set[int]
) -> tuple[list[int], list[float | None], int]:
    """``(ids, log-probs, dropped)``: a segment cut after its first EOS; nothing after it is the policy's."""
    at = next((k for k, i in enumerate(ids) if i in eos), None)
    if at is None or at == len(ids) - 1:
        return ids, logprobs, 0
    return ids[: at + 1], logprobs[: at + 1], len(ids) - at - 1


class ConsultEnv(AsyncEnv):
    """Multi-turn reasoning with consultable agents, token in and token out.

    Contract (async first; ``reset``/``step`` wrap the coroutines on a private loop):

    - ``await areset(seed=None, options=None) -> (obs, info)``: ``obs`` is the prompt's
      ids (int64 array). ``options``: ``problem_index`` or ``problem_id`` (else a seeded
      random problem), ``allow_consult`` (False: consults get an error feedback),
      ``max_consults``, ``trajectory_id``, ``group_id``, ``sample_index``, ``auto_consult``
      (False: no opening request in this episode even when ``config.auto_consult`` is set). ``info`` has
      ``sources``, ``problem``, ``trajectory_id``; when the prompt alone fills the
      context, ``info["trajectory"]`` is already final (``context_overflow``).
    - ``await astep(action) -> (obs, reward, terminated, truncated, info)``: ``action``
      is a :class:`policies.base.Generation`, a dict or tuple with ``token_ids``,
      ``logprobs`` (and ``finish_reason``), or bare ids. ``obs`` is the injected ids
      (empty when the episode ends); ``info["sources"]`` labels them. ``terminated`` on
      EOS; ``truncated`` on ``length``, ``max_turns``, ``context_overflow``, ``error:*``.
      The final step's reward is the task's score of the policy's own text (replies
      removed), less ``config.consult_cost`` per consult it wrote (train mode), and
      ``info["trajectory"]`` the finished record.
    - ``protocol`` (default: the one ``config.protocol`` names) owns every text: stop
      strings, parsing, reply markup, instructions, the scored text, and, for a protocol
      whose env opens every turn (Idea3), the message after each segment
      (``next_message``, injected with a reply's room check). ``mask_rule`` decides the
      stored ``loss_mask`` (default: policy tokens only; :mod:`aipo_env.masks`).
    - ``await end(reason, message=None, segment=None)`` and ``fits(segment)``: for a caller
      that runs several episodes as one and ends them together (ILR's peers).

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
        *,
        protocol: InteractionProtocol | None = None,
        mask_rule: MaskRule | None = None,
    ) -> None:
        self.task = task
        self.agents = agents
        self.tokenizer = tokenizer
        self.config = config or EnvConfig()
        self.protocol = protocol or make_protocol(self.config)
        self.mask_rule = mask_rule or MaskRule(mask_on_drift=self.config.mask_on_drift)
        self.targets = self.protocol.targets(self.config.agent_names)
        if self.protocol.tools and agents is not None:
            missing = [tool for tool in self.protocol.tools if tool not in agents.names]
            if missing:
                raise ValueError(
                    f"protocol {self.protocol.name!r} calls the tools {list(self.protocol.tools)}, "
                    f"but the service given answers only {list(agents.names)}: no service for "
                    f"{missing} (a tool's service is registered in agents.tool_services.TOOL_SERVICES)"
                )
        if self.config.auto_consult is not None and self.config.auto_consult not in self.targets:
            raise ValueError(
                f"auto_consult target {self.config.auto_consult!r} is not one of the protocol's "
                f"targets {self.targets}"
            )
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode {render_mode!r}; expected None or 'ansi'")
        self.render_mode = render_mode
        vocab = spaces.Discrete(len(tokenizer))
        self.observation_space = spaces.Sequence(vocab, stack=True)
        self.action_space = spaces.Sequence(vocab, stack=True)
        self._eos_ids = {tokenizer.eos_token_id} - {None}
        self._vocab_size = len(tokenizer)
        self._episode: EpisodeState | None = None
        self._picker = ProblemPicker(task)

    # -- prompts ---------------------------------------------------------------

    @property
    def sampling_stop(self) -> list[str]:
        """Stop strings the policy must be sampled with (the stop text is kept)."""
        return self.protocol.stop_strings() if self.config.mode == "train" else []

    def instructions(self, max_consults: int | None = None) -> str:
        """The protocol's instructions the prompt carries in train mode."""
        budget = self.config.max_consults if max_consults is None else max_consults
        return self.protocol.instructions(self.targets, budget)

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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

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

    def _require(self) -> EpisodeState:
        if self._episode is None:
            raise RuntimeError("no episode: call reset/areset first")
        return self._episode

    async def areset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; returns the prompt ids and info (see the class docstring)."""
        gymnasium.Env.reset(self, seed=seed)  # seeds np_random; AsyncEnv.reset would recurse
        options = dict(options or {})
        problem = self._picker.pick(options, self.np_random)
        ids = self.prompt_ids(problem)
        # Drawn from the seeded generator so a seeded reset is reproducible.
        tid = str(options.get("trajectory_id") or self.np_random.bytes(16).hex())
        max_consults = options.get("max_consults")
        episode = EpisodeState(
            problem=problem,
            trajectory_id=tid,
            group_id=str(options.get("group_id") or tid),
            sample_index=int(options.get("sample_index", 0)),
            allow_consult=bool(options.get("allow_consult", True)),
            max_consults=self.config.max_consults if max_consults is None else int(max_consults),
            prompt_len=len(ids),
        )
        episode.extend(ids, sources.PROMPT, [None] * len(ids))
        self._episode = episode
        info: dict[str, Any] = {
            "sources": [sources.PROMPT] * len(ids),
            "problem": problem,
            "trajectory_id": tid,
            "allow_consult": episode.allow_consult,
        }
        if len(ids) >= self.config.max_total_tokens:
            info["trajectory"] = self._finish_unscored(episode, "context_overflow")
        elif self._auto_consults(episode) and options.get("auto_consult", True):
            injected = await self._auto_consult(episode)
            if injected is None:
                info["trajectory"] = self._finish_unscored(episode, "context_overflow")
            else:
                ids = ids + injected[0]
                info["sources"] = info["sources"] + injected[1]
        return np.asarray(ids, dtype=np.int64), info

    def _auto_consults(self, episode: EpisodeState) -> bool:
        return (
            self.config.auto_consult is not None
            and self.config.mode == "train"
            and episode.allow_consult
            and episode.max_consults > 0
            and self.agents is not None
        )

    async def _auto_consult(self, episode: EpisodeState) -> tuple[list[int], list[str]] | None:
        """Write the opening request as env tokens and inject its answer (None on overflow)."""
        question = self.config.auto_consult_question.replace("{question}", episode.problem.question)
        text = self.protocol.opening_request(self.config.auto_consult, question)
        tag = encode_injected(self.tokenizer, text)
        start = len(episode.token_ids)
        episode.extend(tag, sources.ENV, [None] * len(tag))
        # An empty policy segment: the env spoke for the policy this once.
        turn = Turn(index=0, policy_start=start, policy_end=start, generation_finish="auto_consult")
        episode.turns.append(turn)
        injected = await self._answer(episode, text, turn)
        if injected is None:
            return None
        return tag + injected[0], [sources.ENV] * len(tag) + injected[1]

    async def astep(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Append one policy segment; answer its request or end the episode."""
        episode = self._require()
        if episode.trajectory is not None:
            raise RuntimeError(
                f"episode {episode.trajectory_id} already ended ({episode.trajectory.finish_reason}); call reset"
            )
        appended = self._append_segment(episode, action)
        if isinstance(appended, Trajectory):  # an invalid action ended the episode
            info = {"sources": [], "trajectory": appended, "finish_reason": appended.finish_reason}
            return np.zeros(0, dtype=np.int64), 0.0, False, True, info
        turn = appended
        ids = episode.token_ids[turn.policy_start : turn.policy_end]
        gen_finish = turn.generation_finish
        ended_by_eos = bool(ids) and ids[-1] in self._eos_ids
        text = self._decode(ids)
        request_end = None
        message = None
        if self.config.mode == "train":
            message = self.protocol.next_message(turn.index, self.tokenizer, ended_by_eos)
            if message is None and not ended_by_eos and ids:
                request_end = self.protocol.find_request(text, len(self._decode(ids[:-1])))
        reason: str | None = None
        if gen_finish == "abort":
            reason = "error:abort"
        elif message is not None or request_end is not None:
            if request_end is not None:
                episode.attempts += 1
            if len(episode.turns) >= self.config.max_turns:
                reason = "max_turns"
            else:
                # The protocol's own message opens the next turn, or the request is answered.
                injected = (
                    self._inject(episode, turn, message)
                    if message is not None
                    else await self._answer(episode, text[:request_end], turn)
                )
                if injected is None:
                    reason = "context_overflow"
                else:
                    new_ids, labels = injected
                    return (
                        np.asarray(new_ids, dtype=np.int64),
                        0.0,
                        False,
                        False,
                        {"sources": labels, "turn": turn},
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

    def _append_segment(self, episode: EpisodeState, action: Any) -> Turn | Trajectory:
        """Append one policy segment (cut after its first EOS) as a new turn; an invalid one ends the episode."""
        ids, lps, gen_finish, cached = normalize_action(action)
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            return self.abort(
                "invalid_action",
                f"token id {bad[0]} is outside the vocabulary 0..{self._vocab_size - 1}",
            )
        # Nothing after an EOS is the policy's: a generator that ran past one is cut there.
        ids, lps, dropped = cut_after_eos(ids, lps, self._eos_ids)
        start = len(episode.token_ids)
        episode.extend(ids, sources.POLICY, lps)
        turn = Turn(
            index=len(episode.turns),
            policy_start=start,
            policy_end=len(episode.token_ids),
            generation_finish=gen_finish,
            policy_cached_tokens=cached,
            dropped_after_eos=dropped,
        )
        episode.turns.append(turn)
        return turn

    def fits(self, segment: Any) -> bool:
        """Whether ``segment`` and the protocol's message after it fit the context.

        For a caller that steps several episodes as one (ILR's Idea3 driver): when one of
        them would overflow, it ends them all before stepping any.
        """
        episode = self._require()
        ids, lps, _, _ = normalize_action(segment)
        ids, _, _ = cut_after_eos(ids, lps, self._eos_ids)
        ended_by_eos = bool(ids) and ids[-1] in self._eos_ids
        message = self.protocol.next_message(len(episode.turns), self.tokenizer, ended_by_eos)
        injected = sum(len(p[0]) for p in message or [])
        return len(episode.token_ids) + len(ids) + injected + 1 <= self.config.max_total_tokens

    async def _answer(
        self, episode: EpisodeState, text: str, turn: Turn
    ) -> tuple[list[int], list[str]] | None:
        """Inject the reply to the request ending ``text``; None when it would overflow."""
        request = self.protocol.parse_request(text, self.targets)
        agent, error = request.target, request.error
        record = ConsultRecord(agent=agent, question=request.content)
        reply: AgentReply | None = None
        if error is None and not episode.allow_consult:
            error = self.protocol.unavailable_text
        elif error is None and episode.calls >= episode.max_consults:
            error = self.protocol.budget_text.format(budget=episode.max_consults)
        elif error is None and self.agents is None:
            error = self.protocol.no_responder_text
        elif error is None:
            episode.calls += 1
            consult = ConsultRequest(
                agent=agent,
                question=request.content,
                problem=episode.problem,
                transcript=self._decode(episode.token_ids[episode.prompt_len :]),
                episode_id=episode.trajectory_id,
            )
            reply, error, elapsed = await call_service(
                self.agents, consult, self.config.agent_timeout_s
            )
            record.latency_s = reply.latency_s if reply is not None and reply.latency_s else elapsed
            if reply is not None:
                record.cached_tokens, record.cache_hit = reply.cached_tokens, reply.cache_hit
                record.leak = reply.leak
        if error is not None:
            error = short_error(self.tokenizer, error, self.config.max_reply_tokens)
        record.error = error
        injection = reply_pieces(
            self.protocol,
            self.tokenizer,
            self.config,
            agent if agent in self.targets else None,  # an unknown name is never echoed in markup
            reply if error is None else None,
            error,
            record,
        )
        if injection.chat_content is not None:
            episode.chat_contents[len(episode.turns) - 1] = injection.chat_content
        episode.drift = episode.drift or injection.drift
        turn.consult = record
        # Counted before the room check: a reply that does not fit was still asked for.
        if error is None:
            episode.consults += 1
        else:
            episode.consult_errors += 1
        return self._inject(episode, turn, injection.pieces)

    def _inject(
        self, episode: EpisodeState, turn: Turn, pieces: list[Piece]
    ) -> tuple[list[int], list[str]] | None:
        """Append ``pieces`` after ``turn``'s segment; None (nothing appended) when they would overflow."""
        ids = [i for piece_ids, _, _ in pieces for i in piece_ids]
        # Room for the injection and at least one more policy token.
        if len(episode.token_ids) + len(ids) + 1 > self.config.max_total_tokens:
            return None
        turn.feedback_start = len(episode.token_ids)
        labels: list[str] = []
        for piece_ids, label, lps in pieces:
            episode.extend(piece_ids, label, lps)
            labels += [label] * len(piece_ids)
        turn.feedback_end = len(episode.token_ids)
        return ids, labels

    def _chat_drift(self, episode: EpisodeState) -> bool:
        """Chat format: whether the incremental ids differ from a full render."""
        segments = [
            (t.policy_start, t.policy_end, episode.chat_contents.get(t.index))
            for t in episode.turns
        ]
        return full_render_drift(
            self.tokenizer,
            self.config,
            self.prompt_messages(episode.problem),
            episode.token_ids,
            segments,
        )

    async def _finish(self, episode: EpisodeState, reason: str) -> Trajectory:
        """Score the policy's own text and freeze the trajectory."""
        verifier: RewardResult | None = None
        if not reason.startswith("error:"):
            try:
                segments = [
                    self._decode(episode.token_ids[t.policy_start : t.policy_end])
                    for t in episode.turns
                ]
                answer = self.protocol.scored_text(segments)
                verifier = await self.task.ascore(episode.problem, answer)
            except Exception as exc:  # a verifier bug must not lose the episode
                verifier = RewardResult(
                    score=0.0, correct=False, reason=f"scoring failed: {type(exc).__name__}: {exc}"
                )
        if self.config.mode == "independent":
            episode.attempts = self.protocol.count_requests(episode.policy_text(self._decode))
        if (
            self.config.format == "chat"
            and self.config.check_drift
            and reason == "eos"
            and getattr(self.tokenizer, "chat_template", None)
        ):
            episode.drift = episode.drift or self._chat_drift(episode)
        return self._freeze(episode, reason, verifier)

    def _freeze(
        self,
        episode: EpisodeState,
        reason: str,
        verifier: RewardResult | None,
        error: str | None = None,
    ) -> Trajectory:
        episode.trajectory = self._record(episode, reason, verifier, error)
        return episode.trajectory

    def _record(
        self,
        episode: EpisodeState,
        reason: str,
        verifier: RewardResult | None = None,
        error: str | None = None,
    ) -> Trajectory:
        return episode.to_trajectory(
            task_name=self.task.name,
            mode=self.config.mode,
            policy_version=self.config.policy_version,
            mask_rule=self.mask_rule,
            finish_reason=reason,
            verifier=verifier,
            error=error,
            consult_cost=self.config.consult_cost if self.config.mode == "train" else 0.0,
        )

    def _finish_unscored(
        self, episode: EpisodeState, reason: str, error: str | None = None
    ) -> Trajectory:
        """Freeze the trajectory without scoring it (an overflow or an error)."""
        if self.config.mode == "independent":
            episode.attempts = self.protocol.count_requests(episode.policy_text(self._decode))
        return self._freeze(episode, reason, None, error)

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
        return self._finish_unscored(episode, reason, message or None)

    async def end(
        self, reason: str, message: str | None = None, *, segment: Any = None
    ) -> Trajectory:
        """End the episode with ``reason``, after appending ``segment`` (a generated one) when given.

        For a caller that runs several episodes as one and ends them together (ILR's Idea3:
        a peer's failure or a context overflow ends every peer's episode, and the last
        stage ends them all alike). ``error:<kind>`` and ``context_overflow`` are not
        scored (``message`` is recorded as the error); any other reason is scored like an
        ending the env decides. An episode that has ended keeps its trajectory.
        """
        episode = self._require()
        if episode.trajectory is not None:
            return episode.trajectory
        if segment is not None:
            appended = self._append_segment(episode, segment)
            if isinstance(appended, Trajectory):
                return appended
        if reason.startswith("error:") or reason == "context_overflow":
            return self._finish_unscored(episode, reason, message)
        return await self._finish(episode, reason)

    def fork(self, trajectory_id: str) -> ConsultEnv:
        """A new env continuing a deep copy of this episode as ``trajectory_id`` (a rollout tree).

        The copy shares the task, agents, tokenizer, config, protocol and mask rule, keeps the
        group id and every fact so far (ids, sources, log-probs, turns, consult counts and
        budget, drift), and its trajectory records ``parent_id`` (this episode's id) and
        ``branch_point`` (the token count now). The two episodes then evolve independently.

        Forking happens at a turn boundary only: between ``astep`` calls, where the last
        segment's reply is fully injected. Called from another task while ``astep`` or
        ``areset`` awaits an agent or the verifier, it raises, as it does for an episode that
        has not started or has ended (ValueError).
        """
        if self._episode is None:
            raise ValueError("cannot fork: no episode has started; call reset/areset first")
        state = self._episode.fork(trajectory_id)
        child = ConsultEnv(
            self.task,
            self.agents,
            self.tokenizer,
            self.config,
            self.render_mode,
            protocol=self.protocol,
            mask_rule=self.mask_rule,
        )
        child._episode = state
        return child

    # -- rendering ---------------------------------------------------------------

    def render(self) -> str | None:  # type: ignore[override]
        """The episode so far as labelled text (render_mode 'ansi')."""
        from aipo_env.show import render_trajectory

        if self.render_mode != "ansi" or self._episode is None:
            return None
        episode = self._episode
        if episode.trajectory is not None:
            return render_trajectory(episode.trajectory, self.tokenizer, color=False)
        partial = self._record(episode, "running")
        return render_trajectory(partial, self.tokenizer, color=False)


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
    from policies.loading import load_tokenizer

    if isinstance(task, str):
        from tasks.registry import make_task

        task = make_task(task, **(task_kwargs or {}))
    base = config.model_dump() if isinstance(config, EnvConfig) else dict(config or {})
    cfg = EnvConfig(**{**base, **config_overrides})
    return ConsultEnv(task, agents, load_tokenizer(tokenizer), cfg, render_mode=render_mode)
