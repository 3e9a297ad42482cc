"""One Idea3 episode between peer policies: each peer's token-exact trajectory.

:func:`run_idea3` plays one question through the stages of the peer protocol
(:mod:`aipo_env.protocols.peer`) with two or more peers, each a :class:`Peer` with its own
generator (its own weights). At every stage the peers generate concurrently; then each
peer's next user message carries what the *others* wrote. Each peer gets one
:class:`~aipo_env.trajectory.Trajectory`:

- ``prompt``: the chat-templated problem with stage 1's instruction;
- ``policy``: the peer's own sampled ids, verbatim, with their log-probs;
- ``env``: the protocol's text and the chat template's turn markers;
- ``peer:<name>``: another peer's words. When both peers use the same tokenizer these are
  that peer's own sampled ids, verbatim and with *its* log-probs as behaviour log-probs
  (so the AIPO coefficient can train them); otherwise its text re-encoded, log-probs unknown.

Whether peer tokens are trained is the mask rule's decision (:mod:`aipo_env.masks`;
masked by default). Only the last stage's text is scored, by the task's verifier.

Faults: a peer whose stage output is empty, or cut off by the token limit, is recorded in
``metadata["stages"]`` (``empty``, ``length``) and the episode goes on: the others see a
placeholder for an empty stage and the words written before the cut for a cut-off one. A peer
whose generator raises ends the episode for everyone with ``finish_reason
"error:peer"`` (the message names the peer); the run goes on. When an injection
would pass ``max_total_tokens`` the episode ends with ``context_overflow``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aipo_env import masks, sources
from aipo_env.injection import template_ids
from aipo_env.interaction_mode import Mode
from aipo_env.masks import MaskRule
from aipo_env.protocols.base import encode_injected
from aipo_env.protocols.chat import chat_feedback_pieces
from aipo_env.protocols.peer import STAGES, opening, stage_message
from aipo_env.trajectory import Trajectory, Turn
from policies.base import Generation, SamplingParams
from tasks.base import Problem, RewardResult, Task

__all__ = ["Peer", "PeerEpisodeConfig", "run_idea3"]


@dataclass(frozen=True)
class Peer:
    """A policy taking part in a peer episode: its name and its generator (with a tokenizer)."""

    name: str
    generator: Any  #: a :class:`policies.base.Generator`


@dataclass(frozen=True)
class PeerEpisodeConfig:
    """Budgets and sampling of a peer episode."""

    max_new_tokens_per_stage: int = 96
    max_total_tokens: int = 1024
    temperature: float = 0.7
    system_prompt: str | None = None


@dataclass
class _Track:
    """One peer's trajectory in progress."""

    peer: Peer
    trajectory_id: str
    mode: Mode
    tokenizer: Any
    eos_ids: set[int]
    token_ids: list[int] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    prompt_len: int = 0
    last: Generation | None = None  #: this stage's output, EOS cut

    def extend(
        self, ids: Sequence[int], source: str, lps: Sequence[float | None] | None = None
    ) -> None:
        self.token_ids.extend(int(i) for i in ids)
        self.source.extend([source] * len(ids))
        self.logprobs.extend(list(lps) if lps is not None else [None] * len(ids))


def _same_tokenizer(a: Any, b: Any) -> bool:
    return a is b or (
        getattr(a, "name_or_path", None) == getattr(b, "name_or_path", None) and len(a) == len(b)
    )


def _prompt_ids(tokenizer: Any, content: str, system_prompt: str | None) -> list[int]:
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": content})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return encode_injected(tokenizer, "\n\n".join(m["content"] for m in messages) + "\n")


@functools.lru_cache(maxsize=16)
def _turn_markup(tokenizer: Any, ended_by_eos: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ids that close the assistant turn and open a user message, and that open the next answer.

    The same for every message of a tokenizer, so rendered once (not per injection).
    """
    if not getattr(tokenizer, "chat_template", None):
        gap = tuple(encode_injected(tokenizer, "\n\n"))
        return gap, gap
    pieces = chat_feedback_pieces(tokenizer, "\x00")
    before = pieces.before
    eos_text = tokenizer.eos_token or ""
    if ended_by_eos and eos_text and before.startswith(eos_text):
        before = before[len(eos_text) :]  # the peer's own EOS already closed its turn
    return tuple(template_ids(tokenizer, before)), tuple(template_ids(tokenizer, pieces.after))


def _status(out: Generation | None, text: str) -> str:
    if out is None:
        return "error"
    if out.finish_reason == "length":
        return "length"
    return "ok" if text.strip() else "empty"


async def run_idea3(
    problem: Problem,
    task: Task,
    peers: Sequence[Peer],
    modes: Mapping[str, Mode],
    *,
    trajectory_ids: Mapping[str, str],
    group_ids: Mapping[str, str],
    sample_index: int = 0,
    config: PeerEpisodeConfig | None = None,
    mask_rule: MaskRule | None = None,
    seed: int = 0,
    policy_versions: Mapping[str, int | str | None] | None = None,
) -> dict[str, Trajectory]:
    """Play ``problem`` through Idea3 with ``peers``; each peer's trajectory by name (module docstring).

    ``modes``: each peer's interaction mode (:mod:`aipo_env.interaction_mode`).

    Raises:
        ValueError: fewer than two peers, repeated names, or a peer without a mode or id.
    """
    cfg = config or PeerEpisodeConfig()
    rule = mask_rule or MaskRule()
    names = [p.name for p in peers]
    if len(peers) < 2 or len(set(names)) != len(names):
        raise ValueError(
            f"an Idea3 episode needs two or more peers with distinct names, got {names}"
        )
    missing = [n for n in names if n not in modes or n not in trajectory_ids or n not in group_ids]
    if missing:
        raise ValueError(f"peers {missing} have no interaction mode, trajectory id or group id")
    tracks = {}
    for p in peers:
        tok = p.generator.tokenizer
        track = _Track(p, trajectory_ids[p.name], modes[p.name], tok, {tok.eos_token_id} - {None})
        content = opening(problem.question, task.answer_format, modes[p.name])
        track.extend(_prompt_ids(tok, content, cfg.system_prompt), sources.PROMPT)
        track.prompt_len = len(track.token_ids)
        tracks[p.name] = track
    stages: list[dict[str, Any]] = []
    finish, error = "stop", None
    for index, stage in enumerate(STAGES):
        outcome = await _generate_stage(tracks, cfg, seed, index)
        texts: dict[str, str | None] = {}
        for name, track in tracks.items():
            out = track.last
            text = (
                ""
                if out is None
                else track.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            )
            status = _status(out, text)
            stages.append(
                {
                    "stage": stage,
                    "peer": name,
                    "status": status,
                    "tokens": 0 if out is None else len(out.token_ids),
                }
            )
            # A stage cut off by the token limit still passes on what it says (recorded as
            # "length"); an empty or failed one leaves a placeholder.
            texts[name] = text if status in ("ok", "length") and text.strip() else None
        if outcome is not None:
            finish, error = "error:peer", outcome
            break
        if stage == STAGES[-1]:
            finish = (
                "length"
                if any(t.last.finish_reason == "length" for t in tracks.values())
                else "stop"
            )
            break
        if not _inject_all(tracks, STAGES[index + 1], texts, cfg):
            finish = "context_overflow"
            break
    return {
        name: _record(
            track,
            problem,
            task,
            rule,
            finish,
            error,
            stages,
            names,
            policy_versions,
            group_id=group_ids[name],
            sample_index=sample_index,
        )
        for name, track in tracks.items()
    }


async def _generate_stage(
    tracks: Mapping[str, _Track], cfg: PeerEpisodeConfig, seed: int, stage: int
) -> str | None:
    """Every peer's output of one stage, concurrently; the error of a peer that failed, if any."""

    async def one(position: int, track: _Track) -> None:
        budget = min(cfg.max_new_tokens_per_stage, cfg.max_total_tokens - len(track.token_ids))
        track.last = None
        if budget <= 0:
            track.last = Generation(token_ids=[], logprobs=[], finish_reason="length")
            return
        params = SamplingParams(
            max_new_tokens=budget,
            temperature=cfg.temperature,
            seed=(seed * 1_000_003 + stage * 101 + position) % 2**31,
        )
        out = await track.peer.generator.generate(
            track.token_ids, params, session_id=track.trajectory_id
        )
        eos_at = next((k for k, i in enumerate(out.token_ids) if i in track.eos_ids), None)
        if eos_at is not None and eos_at < len(out.token_ids) - 1:
            out = out.model_copy(
                update={
                    "token_ids": out.token_ids[: eos_at + 1],
                    "logprobs": out.logprobs[: eos_at + 1],
                }
            )
        start = len(track.token_ids)
        track.extend(out.token_ids, sources.POLICY, out.logprobs)
        track.turns.append(
            Turn(
                index=stage,
                policy_start=start,
                policy_end=len(track.token_ids),
                generation_finish=out.finish_reason,
                policy_cached_tokens=out.cached_tokens,
            )
        )
        track.last = out

    results = await asyncio.gather(
        *(one(i, t) for i, t in enumerate(tracks.values())), return_exceptions=True
    )
    for track, result in zip(tracks.values(), results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # a cancellation or an interrupt is not the peer's failure
            return f"peer '{track.peer.name}' failed ({type(result).__name__}: {result})"
    return None


def _inject_all(
    tracks: Mapping[str, _Track],
    stage: str,
    texts: Mapping[str, str | None],
    cfg: PeerEpisodeConfig,
) -> bool:
    """Append every peer's next user message; False when one would not fit the context."""
    planned = {}
    for name, track in tracks.items():
        others = {o: texts[o] for o in tracks if o != name}
        pieces = _message_pieces(track, tracks, stage, others)
        if len(track.token_ids) + sum(len(ids) for ids, _, _ in pieces) + 1 > cfg.max_total_tokens:
            return False
        planned[name] = pieces
    for name, pieces in planned.items():
        track = tracks[name]
        start = len(track.token_ids)
        for ids, source, lps in pieces:
            track.extend(ids, source, lps)
        track.turns[-1].feedback_start, track.turns[-1].feedback_end = start, len(track.token_ids)
    return True


def _message_pieces(
    track: _Track, tracks: Mapping[str, _Track], stage: str, others: Mapping[str, str | None]
) -> list[tuple[list[int], str, list[float | None] | None]]:
    """``track``'s next user message as ``(ids, source, log-probs)`` pieces."""
    tok = track.tokenizer
    ended = bool(track.last and track.last.token_ids) and track.last.token_ids[-1] in track.eos_ids
    before, after = (list(ids) for ids in _turn_markup(tok, ended))
    pieces: list[tuple[list[int], str, list[float | None] | None]] = [(before, sources.ENV, None)]
    for text, peer_name in stage_message(stage, track.mode, others):
        if peer_name is None:
            pieces.append((encode_injected(tok, text), sources.ENV, None))
            continue
        other = tracks[peer_name]
        out = other.last
        assert out is not None  # a peer with text produced an output
        if _same_tokenizer(other.tokenizer, tok):
            keep = [k for k, i in enumerate(out.token_ids) if i not in other.eos_ids]
            ids = [out.token_ids[k] for k in keep]
            lps: list[float | None] = [out.logprobs[k] for k in keep]
        else:
            ids, lps = encode_injected(tok, text), None
        pieces.append((ids, sources.peer(peer_name), lps))
    pieces.append((after, sources.ENV, None))
    return [p for p in pieces if p[0]]


def _record(
    track: _Track,
    problem: Problem,
    task: Task,
    rule: MaskRule,
    finish: str,
    error: str | None,
    stages: list[dict[str, Any]],
    names: list[str],
    versions: Mapping[str, int | str | None] | None,
    *,
    group_id: str,
    sample_index: int,
) -> Trajectory:
    """The peer's trajectory; the last stage's text scored unless the episode ended early."""
    verifier: RewardResult | None = None
    scored = finish in ("stop", "length") and len(track.turns) == len(STAGES)
    if scored:
        last = track.turns[-1]
        text = track.tokenizer.decode(
            track.token_ids[last.policy_start : last.policy_end], skip_special_tokens=True
        )
        verifier = task.score(problem, text)
    return Trajectory(
        trajectory_id=track.trajectory_id,
        problem_id=problem.id,
        task=problem.task or task.name,
        group_id=group_id,
        sample_index=sample_index,
        token_ids=list(track.token_ids),
        prompt_len=track.prompt_len,
        source=list(track.source),
        loss_mask=masks.loss_mask(track.source, rule),
        behavior_logprobs=list(track.logprobs),
        turns=[t.model_copy(deep=True) for t in track.turns],
        reward=verifier.score if verifier is not None else 0.0,
        verifier=verifier,
        finish_reason=finish,
        error=error,
        policy_version=None if versions is None else versions.get(track.peer.name),
        allow_consult=False,
        mode="train",
        metadata={
            "protocol": "idea3",
            "peer": track.peer.name,
            "peers": names,
            "interaction": track.mode,
            "stages": stages,
        },
    )
