"""One Idea3 episode between peer policies: each peer's token-exact trajectory.

:func:`run_idea3` plays one question through the stages of the peer protocol
(:mod:`aipo_env.protocols.peer`) with two or more peers, each a :class:`Peer` with its own
generator (its own weights). Each peer's side is a :class:`~aipo_env.env.ConsultEnv`
episode with an :class:`~aipo_env.protocols.peer.Idea3Protocol`, driven by the episode
loop's steps (:mod:`aipo_env.episode`) in lockstep: at every stage the peers generate
concurrently (:func:`~aipo_env.episode.generate_segment`), their outputs go on the
episode's :class:`~aipo_env.protocols.peer.Board`, then each env takes its peer's segment
(:func:`~aipo_env.episode.apply_segment`) and injects the next stage's message, which
carries what the *others* wrote. Each peer gets one
:class:`~aipo_env.trajectory.Trajectory`:

- ``prompt``: the problem with stage 1's instruction (``ConsultEnv.prompt_ids``);
- ``policy``: the peer's own sampled ids, verbatim, with their log-probs;
- ``env``: the protocol's text and the chat template's turn markers;
- ``peer:<name>``: another peer's words. When both peers use the same tokenizer these are
  that peer's own sampled ids, verbatim and with *its* log-probs as behaviour log-probs
  (so the AIPO coefficient can train them); otherwise its text re-encoded, log-probs unknown.

Whether peer tokens are trained is the mask rule's decision (:mod:`aipo_env.masks`;
masked by default). Only the last stage's text is scored, by the task's verifier; the
episode ends alike for every peer: ``length`` when any peer's last stage was cut off,
else ``stop``.

Faults: a peer whose stage output is empty, or cut off by the token limit, is recorded in
``metadata["stages"]`` (``empty``, ``length``) and the episode goes on: the others see a
placeholder for an empty stage and the words written before the cut for a cut-off one. A peer
whose generator raises ends the episode for everyone with ``finish_reason
"error:peer"`` (the message names the peer); the run goes on. When an injection
would pass ``max_total_tokens`` the episode ends with ``context_overflow`` for everyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv, cut_after_eos
from aipo_env.episode import apply_segment, generate_segment, start_episode, turn_params
from aipo_env.interaction_mode import Mode
from aipo_env.masks import MaskRule
from aipo_env.protocols.peer import STAGES, Board, Idea3Protocol, eos_ids
from aipo_env.trajectory import Trajectory
from policies.base import Generation, SamplingParams
from tasks.base import Task

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

    def env_config(self, policy_version: int | str | None = None) -> EnvConfig:
        """A peer's environment: Idea3's stages as turns, no consulting."""
        return EnvConfig(
            protocol=Idea3Protocol.name,
            max_consults=0,
            max_turns=len(STAGES),
            max_new_tokens_per_turn=self.max_new_tokens_per_stage,
            max_total_tokens=self.max_total_tokens,
            system_prompt=self.system_prompt,
            policy_version=policy_version,
        )


class _Guarded:
    """A peer's generator whose failure is recorded for the whole episode instead of ending its env.

    A failed generation comes back empty (``abort``); the driver then ends every peer's
    episode with ``error:peer``.
    """

    def __init__(self, peer: Peer, failures: dict[str, str]) -> None:
        self.peer, self.failures = peer, failures
        self.tokenizer = peer.generator.tokenizer

    async def generate(self, ids: list[int], params: SamplingParams, **kwargs: Any) -> Generation:
        try:
            return await self.peer.generator.generate(ids, params, **kwargs)
        except Exception as exc:  # the peer's failure, not the run's
            self.failures[self.peer.name] = (
                f"peer '{self.peer.name}' failed ({type(exc).__name__}: {exc})"
            )
            return Generation(token_ids=[], logprobs=[], finish_reason="abort")


async def run_idea3(
    problem_index: int,
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
    """Play ``task.problems[problem_index]`` through Idea3 with ``peers``; each peer's trajectory by name.

    ``modes``: each peer's interaction mode (:mod:`aipo_env.interaction_mode`). Stage
    ``s`` of the peer at ``position`` samples with seed
    ``(seed * 1_000_003 + s * 101 + position) % 2**31``.

    Raises:
        ValueError: fewer than two peers, repeated names, or a peer without a mode or id.
    """
    cfg = config or PeerEpisodeConfig()
    names = [p.name for p in peers]
    if len(peers) < 2 or len(set(names)) != len(names):
        raise ValueError(
            f"an Idea3 episode needs two or more peers with distinct names, got {names}"
        )
    missing = [n for n in names if n not in modes or n not in trajectory_ids or n not in group_ids]
    if missing:
        raise ValueError(f"peers {missing} have no interaction mode, trajectory id or group id")
    board = Board({p.name: p.generator.tokenizer for p in peers})
    versions = policy_versions or {}
    envs = {
        p.name: ConsultEnv(
            task,
            None,
            p.generator.tokenizer,
            cfg.env_config(versions.get(p.name)),
            protocol=Idea3Protocol(p.name, modes[p.name], board),
            mask_rule=mask_rule,
        )
        for p in peers
    }
    ended: dict[str, Trajectory] = {}
    for name, env in envs.items():
        options = {
            "problem_index": problem_index,
            "trajectory_id": trajectory_ids[name],
            "group_id": group_ids[name],
            "sample_index": sample_index,
            "allow_consult": False,
        }
        if (at_reset := (await start_episode(env, options)).get("trajectory")) is not None:
            ended[name] = at_reset
    stages: list[dict[str, Any]] = []
    if ended:  # a prompt that fills the context ends every peer's episode
        ended = {n: await env.end("context_overflow") for n, env in envs.items()}
    else:
        ended = await _play(envs, peers, board, cfg, seed, stages)
    for name, trajectory in ended.items():
        trajectory.metadata = {
            "protocol": Idea3Protocol.name,
            "peer": name,
            "peers": names,
            "interaction": modes[name],
            "stages": stages,
        }
    return ended


async def _play(
    envs: Mapping[str, ConsultEnv],
    peers: Sequence[Peer],
    board: Board,
    cfg: PeerEpisodeConfig,
    seed: int,
    stages: list[dict[str, Any]],
) -> dict[str, Trajectory]:
    """The stages, every peer's in lockstep; each peer's finished trajectory."""
    sampling = SamplingParams(temperature=cfg.temperature)
    failures: dict[str, str] = {}
    guarded = [_Guarded(p, failures) for p in peers]

    async def one(index: int, position: int, env: ConsultEnv) -> Generation | Trajectory:
        if env.max_new_tokens() <= 0:  # no room left: the stage is cut off before it starts
            return Generation(token_ids=[], logprobs=[], finish_reason="length")
        stage_seed = (seed * 1_000_003 + index * 101 + position) % 2**31
        params = turn_params(env, sampling, None, stage_seed)
        return await generate_segment(env, guarded[position], params)

    for index, stage in enumerate(STAGES):
        generated = await asyncio.gather(
            *(one(index, i, env) for i, env in enumerate(envs.values()))
        )
        outs: dict[str, Generation] = {}
        for name, out in zip(envs, generated, strict=True):
            assert isinstance(out, Generation)  # a failure comes back empty (_Guarded)
            outs[name] = out
            _post(board, stages, stage, name, envs[name].tokenizer, out, name in failures)
        if failures:
            message = next(failures[n] for n in envs if n in failures)
            return {
                n: await env.end("error:peer", message, segment=None if n in failures else outs[n])
                for n, env in envs.items()
            }
        if index == len(STAGES) - 1:
            cut = any(out.finish_reason == "length" for out in outs.values())
            finish = "length" if cut else "stop"
            return {n: await env.end(finish, segment=outs[n]) for n, env in envs.items()}
        if not all(env.fits(outs[n]) for n, env in envs.items()):
            return {
                n: await env.end("context_overflow", segment=outs[n]) for n, env in envs.items()
            }
        stopped = [t for n, env in envs.items() if (t := await apply_segment(env, outs[n]))]
        if stopped:  # an env refused a segment (an abort, an id outside the vocabulary)
            first = stopped[0]
            return {n: await env.end(first.finish_reason, first.error) for n, env in envs.items()}
    raise AssertionError("the last stage ends every episode")


def _post(
    board: Board,
    stages: list[dict[str, Any]],
    stage: str,
    name: str,
    tokenizer: Any,
    out: Generation,
    failed: bool,
) -> None:
    """Record ``name``'s stage output in the stage log and on the board."""
    ids, lps, _ = cut_after_eos(list(out.token_ids), list(out.logprobs), eos_ids(tokenizer))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if failed:
        status = "error"
    elif out.finish_reason == "length":
        status = "length"
    else:
        status = "ok" if text.strip() else "empty"
    stages.append(
        {"stage": stage, "peer": name, "status": status, "tokens": 0 if failed else len(ids)}
    )
    # A stage cut off by the token limit still passes on what it says (recorded as
    # "length"); an empty or failed one leaves a placeholder.
    board.post(name, ids, lps, text if status in ("ok", "length") and text.strip() else None)
