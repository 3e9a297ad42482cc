"""Per-row token sampling and stop conditions for the embedded generator's decode loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from policies.base import SamplingParams


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Draw one token id from a row's raw next-token ``logits`` ([vocab], float32).

    Temperature 0 is greedy (argmax). Otherwise the logits are divided by the
    temperature, restricted to the ``top_k`` most likely tokens and to the smallest
    set holding ``top_p`` of the mass, then sampled with the row's own generator so a
    seeded request draws the same tokens whatever else is in the batch.
    """
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= params.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def row_generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch generator for one request, on the device its logits live on."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class StopChecker:
    """Decides after each sampled token whether a row is done, and why.

    EOS and ``stop_token_ids`` are checked on the token itself (it stays in the
    output). Stop strings are searched in the decoded tail of the output only, so a
    long output costs the same per step as a short one; the tail holds enough tokens
    to contain the longest stop string even when every token decodes to one byte.
    """

    def __init__(
        self, params: SamplingParams, eos_token_ids: Sequence[int], tokenizer: object
    ) -> None:
        self.stop_ids = set(params.stop_token_ids)
        self.eos_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_strings = list(params.stop)
        self.window = max((len(s.encode("utf-8")) for s in self.stop_strings), default=0) + 2
        self.tokenizer = tokenizer

    def check(self, output_ids: Sequence[int]) -> str | int | None:
        """The stop token id or stop string the output now ends on, else None."""
        token = output_ids[-1]
        if token in self.stop_ids or token in self.eos_ids:
            return token
        if self.stop_strings:
            tail = self.tokenizer.decode(  # type: ignore[attr-defined]
                list(output_ids[-self.window :]), skip_special_tokens=False
            )
            for stop in self.stop_strings:
                if stop in tail:
                    return stop
        return None
