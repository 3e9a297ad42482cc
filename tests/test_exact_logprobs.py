"""Exact log-probs: a request's recorded log-probs do not depend on the rows that shared its decode steps."""

from __future__ import annotations

import asyncio

import pytest

from policies.base import Generation, SamplingParams
from policies.exact_logprobs import score_alone
from policies.transformers_generator import TransformersGenerator
from trainers.config import TrainConfig
from trainers.run_state import rollout_settings


def _generate(
    generator: TransformersGenerator, prompt: list[int], params: SamplingParams, companions: int
) -> Generation:
    """``prompt``'s generation, alone or admitted with ``companions`` other requests of other lengths."""

    async def run() -> Generation:
        other = SamplingParams(max_new_tokens=20, temperature=1.0, seed=3)
        jobs = [generator.generate(prompt, params)] + [
            generator.generate(list(range(100, 100 + 7 * (n + 1))), other)
            for n in range(companions)
        ]
        return (await asyncio.gather(*jobs))[0]

    return asyncio.run(run())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_exact_logprobs_do_not_depend_on_the_requests_sharing_the_decode_batch(
    tiny_model_dir: str, tokenizer, dtype: str
) -> None:
    generator = TransformersGenerator(
        tiny_model_dir, device="cpu", generator_dtype=dtype, max_batch_size=8
    )
    prompt = tokenizer.encode("What is 3 + 4? Answer:")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7, exact_logprobs=True)

    alone = _generate(generator, prompt, params, companions=0)
    shared = _generate(generator, prompt, params, companions=5)

    assert shared.token_ids == alone.token_ids  # one seed, the same draws
    assert shared.logprobs == alone.logprobs  # bit for bit, not approximately
    # They are the sequence's own scores: a function of the weights and the ids only.
    scored = score_alone(generator._prefill_forward, prompt, alone.token_ids, generator.device)
    assert alone.logprobs == scored
    assert generator.stats.rescored_requests == 2


def test_exact_logprobs_stay_close_to_the_decode_batchs_own(tiny_model_dir: str, tokenizer) -> None:
    # Rescoring changes which rows' rounding a log-prob carries, not what it measures.
    generator = TransformersGenerator(
        tiny_model_dir, device="cpu", generator_dtype="float32", max_batch_size=8
    )
    prompt = tokenizer.encode("What is 3 + 4? Answer:")
    plain = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    decoded = _generate(generator, prompt, plain, companions=3)
    exact = _generate(generator, prompt, plain.model_copy(update={"exact_logprobs": True}), 3)
    assert exact.token_ids == decoded.token_ids
    assert exact.logprobs == pytest.approx(decoded.logprobs, abs=1e-4)
    assert generator.stats.rescored_requests == 1


def test_policy_logprobs_are_exact_where_the_update_reads_them(tmp_path) -> None:
    def settings(**loss: object) -> bool:
        config = TrainConfig.model_validate({"run_dir": str(tmp_path), "loss": loss})
        return rollout_settings(config).exact_logprobs

    assert not settings()  # not read by the default loss: no rescoring paid for
    assert settings(rollout_correction="tis")
    assert settings(rollout_correction="icepop")
