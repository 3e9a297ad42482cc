"""Log-probs of a finished generation that do not depend on the decode batch it shared.

The embedded generator decodes every admitted row in one forward. The numbers one row
gets depend on the others: the matmuls' blocking follows the number of rows, and the
attention runs over keys padded to the longest row. In float32 that moves a log-prob by
about 1e-5; in bfloat16 by up to about 0.1 (docs/reliability.md, "Exact resume"). The
rows that share a step follow thread timing, so two runs of one seed, or a run and its
resumed copy, record different log-probs for the same tokens.

:func:`score_alone` scores a finished sequence again as a batch of one: a prefill of the
prompt on its own, then one forward per generated token with the sequence's own keys
and values, in the generator's own forward and dtype. Every shape depends on the
sequence alone, so the numbers are a function of the weights and the token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from policies.prefix_cache import KV

#: ``(ids [1, S], positions [1, S], past, mask) -> (last logits [1, vocab] float32, keys/values)``
PrefillForward = Callable[
    [torch.Tensor, torch.Tensor, KV, torch.Tensor | None], tuple[torch.Tensor, KV]
]


@torch.inference_mode()
def score_alone(
    prefill: PrefillForward, prompt: Sequence[int], output: Sequence[int], device: torch.device
) -> list[float]:
    """Log-prob of each token of ``output`` after ``prompt``, computed with no other row.

    Under the model's own distribution (``log_softmax`` of the raw logits, temperature
    1), as :func:`policies.sampling.sample_batch` reports them.
    """
    if not prompt:
        raise ValueError("prompt is empty; expected at least one token to condition on")
    ids = torch.tensor([list(prompt)], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    logits, past = prefill(ids, positions, [], None)
    out: list[float] = []
    for j, token in enumerate(output):
        out.append(float(torch.log_softmax(logits[0], dim=-1)[int(token)]))
        if j + 1 == len(output):
            break  # the last token's successor is never needed
        step = torch.tensor([[int(token)]], device=device)
        position = torch.tensor([[len(prompt) + j]], device=device)
        logits, past = prefill(step, position, past, None)
    return out
