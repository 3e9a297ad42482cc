"""OpenRLHF's vLLM engine as our :class:`Generator`, and a :class:`Trajectory` as OpenRLHF's result.

:class:`OpenRLHFEngineGenerator` wraps the ``llm_engine`` OpenRLHF hands to an agent
executor (``await llm_engine.generate(ids, vllm_sampling_params)`` returning a vLLM
``RequestOutput``). :func:`trajectory_to_openrlhf` maps a finished trajectory onto
the dict ``MultiTurnAgentExecutor.execute`` returns, with the ids untouched.

A failed episode (``error:<kind>``) still becomes a well-formed sample, since one
exception in an executor fails ``asyncio.gather`` in ``LLMRayActor.generate_responses``
and with it the run: reward 0, ``truncated`` True, no action range (nothing of it is
trained, as in the embedded trainer; its reward still counts in its group's baseline).
OpenRLHF 0.11.2 handles a sample without action tokens: its action mask is all zero,
``compute_reward`` and the returns mask its reward away, and the loss's token counts
skip it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from aipo_env import masks, sources
from aipo_env.masks import MaskRule
from aipo_env.trajectory import Trajectory
from policies.base import Generation, GenerationError, Generator, SamplingParams
from trainers.openrlhf.loss import encode_agent_logprob

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
#: A sampled token's log-prob above this is not a log-prob (a tiny positive is rounding).
_LOGPROB_TOLERANCE = 1e-4


class OpenRLHFEngineGenerator(Generator):
    """A :class:`Generator` over OpenRLHF's rollout engine (vLLM), token ids in and out.

    Temperature, top-p and top-k come from OpenRLHF's sampling params (the trainer's
    settings); stops, the token budget and the seed from the environment's request.
    """

    def __init__(self, llm_engine: Any, tokenizer: Any, base_params: Any, max_length: int) -> None:
        self.engine = llm_engine
        self._tokenizer = tokenizer
        self.base_params = base_params
        self._max_context = int(max_length)

    @property
    def tokenizer(self) -> Any:
        """The policy's tokenizer (OpenRLHF's ``hf_tokenizer``)."""
        return self._tokenizer

    @property
    def max_context(self) -> int:
        """OpenRLHF's ``max_length`` (``--data.max_len``)."""
        return self._max_context

    def vllm_params(self, params: SamplingParams, prompt_len: int) -> Any:
        """A fresh engine sampling-params object (built, not mutated, so vLLM derives its stop sets)."""
        base = self.base_params
        max_tokens = min(params.max_new_tokens, self._max_context - prompt_len)
        return type(base)(
            temperature=getattr(base, "temperature", params.temperature),
            top_p=getattr(base, "top_p", params.top_p),
            top_k=getattr(base, "top_k", params.top_k),
            max_tokens=max_tokens,
            min_tokens=min(getattr(base, "min_tokens", 0) or 0, max_tokens),
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=getattr(base, "skip_special_tokens", False),
            logprobs=1,
            seed=params.seed,
        )

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, *, session_id: str | None = None
    ) -> Generation:
        """One continuation from the engine; the sampled ids are returned verbatim."""
        self.check_context(input_ids)
        ids = list(input_ids)
        output = await self.engine.generate(ids, self.vllm_params(params, len(ids)))
        try:
            out = output.outputs[0]
            tokens = list(out.token_ids)
            logprobs = [
                float(step[tok].logprob) for step, tok in zip(out.logprobs, tokens, strict=True)
            ]
            finish = _FINISH[out.finish_reason]
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise GenerationError(
                f"engine returned an output this adapter cannot read: {exc!r}"
            ) from exc
        logprobs = _checked_sample(tokens, logprobs)
        stop_match = getattr(out, "stop_reason", None) if finish == "stop" else None
        return Generation(
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=finish,
            stop_match=stop_match if isinstance(stop_match, str | int) else None,
            prompt_tokens=len(ids),
            cached_tokens=int(getattr(output, "num_cached_tokens", 0) or 0),
        )


def _checked_sample(tokens: list[Any], logprobs: list[float]) -> list[float]:
    """The log-probs with rounding above 0 clamped; raises on ids or log-probs that are garbage.

    A NaN or positive log-prob would otherwise reach the loss, where a value >= 0.5 on a
    policy token reads as an agent token's flag.
    """
    for i, tok in enumerate(tokens):
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise GenerationError(
                f"engine returned token {tok!r} at position {i}; expected an id >= 0"
            )
    for i, lp in enumerate(logprobs):
        if not math.isfinite(lp) or lp > _LOGPROB_TOLERANCE:
            raise GenerationError(
                f"engine returned log-prob {lp!r} for token {i}; expected a finite number <= 0"
            )
    return [min(lp, 0.0) for lp in logprobs]


def _agent_entry(logprob: float | None) -> float:
    """The channel entry of a trained agent token; an unknown, non-finite or rounded-up mu is read as 1."""
    if logprob is None or not math.isfinite(logprob):
        return encode_agent_logprob(None)
    return encode_agent_logprob(min(logprob, 0.0))


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            ranges.append((start, i))
            start = None
    return ranges


def is_failed(trajectory: Trajectory) -> bool:
    """Whether the episode failed (``error:<kind>``): it has no honest reward to learn from."""
    return trajectory.finish_reason.startswith("error:")


def trajectory_to_openrlhf(
    trajectory: Trajectory,
    *,
    prompt: str,
    label: Any,
    rule: MaskRule,
    placeholder_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The dict OpenRLHF expects from ``AgentExecutorBase.execute`` for one trajectory.

    ``action_ranges`` cover the tokens ``rule`` trains (:mod:`aipo_env.masks`): policy
    tokens, plus agent tokens when the loss trains them; none for a failed episode.
    ``rollout_log_probs`` holds the engine's log-prob on policy tokens, the encoded
    behaviour log-prob on trained agent tokens (see :mod:`trainers.openrlhf.loss`) and
    0.0 elsewhere. A trajectory without tokens (its reset failed) is given
    ``placeholder_ids`` (the prompt's ids), since OpenRLHF cannot batch an empty sample.
    """
    failed = is_failed(trajectory)
    trained = [
        bool(m) and not failed
        for m in masks.loss_mask(trajectory.source, rule, drift=trajectory.tokenization_drift)
    ]
    rollout: list[float] = []
    for src, keep, lp in zip(trajectory.source, trained, trajectory.behavior_logprobs, strict=True):
        if keep and sources.is_injected(src):
            rollout.append(_agent_entry(lp))
        elif src == sources.POLICY and lp is not None and math.isfinite(lp):
            rollout.append(min(float(lp), 0.0))
        else:
            rollout.append(0.0)
    ids = list(trajectory.token_ids)
    if not ids:
        ids = [int(t) for t in placeholder_ids]
        if not ids:
            raise ValueError(
                f"trajectory {trajectory.trajectory_id} ({trajectory.finish_reason}) has no tokens "
                "and no placeholder_ids were given; OpenRLHF cannot batch an empty sample"
            )
        rollout = [0.0] * len(ids)
    agent_tokens = sum(1 for s in trajectory.source if sources.is_injected(s))
    reward = 0.0 if failed or not math.isfinite(trajectory.reward) else float(trajectory.reward)
    return {
        "prompt": prompt,
        "label": label,
        "images": None,
        "mm_train_inputs": None,
        "reward": reward,
        "scores": reward,
        "observation_tokens": ids,
        "action_ranges": _runs(trained),
        "rollout_log_probs": rollout,
        "truncated": trajectory.finish_reason != "eos",
        "extra_logs": {
            "consults": float(trajectory.consults),
            "consult_errors": float(trajectory.consult_errors),
            "agent_tokens": float(agent_tokens),
            "tokenization_drift": float(trajectory.tokenization_drift),
            "finished_eos": float(trajectory.finish_reason == "eos"),
            "episode_error": float(failed),
        },
    }
