"""The one episode loop: a policy generator drives one environment episode to its end.

Every caller runs episodes through :func:`run_episode`: the rollout driver (training
and evaluation), the OpenRLHF agent executor, and the tests. Its three steps
(:func:`start_episode`, :func:`generate_segment`, :func:`apply_segment`) are the same
loop for a caller that must act between turns: the tree rollout
(:mod:`aipo_env.tree_rollout`) measures each segment and forks at turn boundaries, and
ILR's Idea3 (:mod:`aipo_env.peer_episode`) steps every peer's episode in lockstep. One failing episode
never raises: a reset that fails, a generation that fails or an env bug ends the
episode with an ``error:<kind>`` trajectory; a context the generator refuses ends
it with ``context_overflow``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any

from aipo_env.env import ConsultEnv
from aipo_env.trajectory import Trajectory
from policies.base import ContextOverflowError, Generation, Generator, SamplingParams

logger = logging.getLogger(__name__)


def turn_seed(base_seed: int | None, trajectory_id: str, turn: int) -> int | None:
    """The sampling seed of one turn: a pure function of the run seed, the episode and the turn."""
    if base_seed is None:
        return None
    return zlib.crc32(f"{base_seed}:{trajectory_id}:{turn}".encode()) & 0x7FFFFFFF


def turn_params(
    env: ConsultEnv, sampling: SamplingParams, max_new_tokens: int | None, seed: int | None
) -> SamplingParams:
    """The sampling parameters of the env's next segment.

    The budget is the env's room for the segment, capped by ``max_new_tokens``; the stop
    strings are the protocol's; temperature, top-p and top-k come from ``sampling``.
    """
    budget = env.max_new_tokens()
    if max_new_tokens is not None:
        budget = min(budget, max_new_tokens)
    return sampling.model_copy(
        update={"max_new_tokens": max(1, budget), "stop": env.sampling_stop, "seed": seed}
    )


def _reset_failed(env: ConsultEnv, options: dict[str, Any], exc: Exception) -> Trajectory:
    return Trajectory(
        trajectory_id=options["trajectory_id"],
        problem_id=str(options.get("problem_id", options.get("problem_index"))),
        task=getattr(env.task, "name", ""),
        group_id=options.get("group_id") or options["trajectory_id"],
        sample_index=options.get("sample_index", 0),
        token_ids=[],
        prompt_len=0,
        source=[],
        loss_mask=[],
        behavior_logprobs=[],
        finish_reason=f"error:reset_{type(exc).__name__}",
        error=str(exc),
    )


async def start_episode(env: ConsultEnv, options: dict[str, Any]) -> dict[str, Any]:
    """Reset ``env`` with ``options``; the reset's ``info``, whose ``trajectory`` is set when it ended the episode.

    A reset that fails (a bad problem reference) ends the episode with
    ``error:reset_<kind>`` when ``options`` names a ``trajectory_id`` (else it raises);
    a prompt that fills the context ends it with ``context_overflow``. Without
    ``trajectory`` the episode is running and awaits its first segment; ``sources``
    labels the ids so far (an auto consult's reply after the prompt, say).
    """
    try:
        _, info = await env.areset(options=options)
    except Exception as exc:  # a bad problem reference ends this episode only
        if "trajectory_id" not in options:
            raise
        return {"trajectory": _reset_failed(env, options, exc), "sources": []}
    return info


async def generate_segment(
    env: ConsultEnv, generator: Generator, params: SamplingParams
) -> Generation | Trajectory:
    """The policy's next segment of ``env``'s episode, generated in the episode's session.

    A prompt the generator refuses ends the episode with ``context_overflow``, a failed
    generation with ``error:<kind>``: the ended episode's trajectory is returned instead.
    """
    try:
        return await generator.generate(env.token_ids, params, session_id=env.trajectory_id)
    except ContextOverflowError as exc:
        return env.abort("context_overflow", str(exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # one failing generation must not kill the batch
        return env.abort(type(exc).__name__, str(exc))


async def apply_segment(env: ConsultEnv, generation: Generation) -> Trajectory | None:
    """Step ``env`` with ``generation``; the trajectory when the episode ended, else None.

    Not ended means a request was answered: the reply is injected and the episode
    stands at a turn boundary (where a rollout tree may fork it).
    """
    try:
        _, _, terminated, truncated, info = await env.astep(generation)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # an env bug ends this episode, not the batch
        logger.exception("episode %s failed in the env", env.trajectory_id)
        return env.abort(f"env_{type(exc).__name__}", str(exc))
    return info["trajectory"] if terminated or truncated else None


async def run_episode(
    env: ConsultEnv,
    generator: Generator,
    options: dict[str, Any],
    *,
    sampling: SamplingParams | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> Trajectory:
    """Reset ``env`` with ``options``, then generate and step until the episode ends.

    ``sampling`` gives temperature, top-p and top-k (default: ``SamplingParams()``);
    ``max_new_tokens`` caps every segment below the env's own budget; with ``seed``
    each turn samples with :func:`turn_seed`. Returns the finished trajectory.
    """
    sampling = sampling or SamplingParams()
    ended: Trajectory | None = (await start_episode(env, options)).get("trajectory")
    turn = 0
    while ended is None:
        params = turn_params(
            env, sampling, max_new_tokens, turn_seed(seed, env.trajectory_id, turn)
        )
        generation = await generate_segment(env, generator, params)
        if isinstance(generation, Trajectory):
            return generation
        ended = await apply_segment(env, generation)
        turn += 1
    return ended
