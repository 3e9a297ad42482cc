"""Token sampling for a whole decode batch, and per-row stop conditions, for the embedded generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from policies.base import SamplingParams


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int], list[float], list[list[float]]]:
    """Draw every row's next token from raw ``logits`` ([rows, vocab], float32) at once.

    Returns the token ids, their log-probs under the model's own distribution
    (``log_softmax`` of the raw logits, temperature 1), and per row the
    ``top_logprobs`` highest log-probs of that same distribution, highest first (an
    empty list for a row that asked for none; one ``topk`` serves every row that
    asked, at the largest k asked, each row then keeping its own k). Temperature 0 is greedy
    (argmax). Otherwise a row's logits are divided by its temperature, restricted to
    its ``top_k`` most likely tokens and to the smallest set holding ``top_p`` of the
    mass, then sampled with the row's own generator, so a seeded request draws the
    same tokens whatever else is in the batch. The filtering runs on all sampled rows
    together; only the draw itself is per row. One transfer brings the results back.
    """
    rows = logits.shape[0]
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    sampled = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if len(greedy) == rows:
        tokens = torch.argmax(logits, dim=-1)
    elif greedy:
        index = torch.tensor(greedy, device=logits.device)
        tokens[index] = torch.argmax(logits.index_select(0, index), dim=-1)
    if sampled:
        probs = _filtered_probs(logits, [params[i] for i in sampled], sampled)
        for j, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist(), _top_logprobs(logprobs, params)


def _top_logprobs(logprobs: torch.Tensor, params: Sequence[SamplingParams]) -> list[list[float]]:
    """Each row's ``top_logprobs`` highest log-probs, highest first; [] for rows that asked none."""
    asking = [i for i, p in enumerate(params) if p.top_logprobs > 0]
    out: list[list[float]] = [[] for _ in params]
    if not asking:
        return out
    k = min(max(params[i].top_logprobs for i in asking), logprobs.shape[-1])
    rows = logprobs if len(asking) == len(params) else logprobs[asking]
    top = torch.topk(rows, k, dim=-1).values.tolist()
    for values, i in zip(top, asking, strict=True):
        out[i] = values[: params[i].top_logprobs]
    return out


def _filtered_probs(
    logits: torch.Tensor, params: Sequence[SamplingParams], rows: Sequence[int]
) -> torch.Tensor:
    """Sampling probabilities of ``rows`` after temperature, top-k and top-p, per-row settings."""
    device = logits.device
    scores = logits if len(rows) == logits.shape[0] else logits[list(rows)]
    vocab = scores.shape[-1]
    scores = scores / torch.tensor([[p.temperature] for p in params], device=device)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        top = torch.topk(scores, max(ks), dim=-1).values
        k = torch.tensor(ks, device=device)
        kth = top.gather(1, (k.clamp(min=1) - 1)[:, None])
        kth = kth.masked_fill((k == 0)[:, None], float("-inf"))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([[p.top_p] for p in params], device=device)
        scores = _nucleus(scores, top_p)
    return torch.softmax(scores, dim=-1)


#: Candidates sorted first for top-p; a row whose nucleus is wider falls back to a full sort.
NUCLEUS_CANDIDATES = 256


def _nucleus(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``scores`` with every token outside each row's top-p nucleus set to -inf.

    A token is dropped when the mass of the tokens ranked before it already reaches
    ``top_p``; the first always stays. Sorting the whole vocabulary every step is the
    costly part, so only the best :data:`NUCLEUS_CANDIDATES` are sorted (``topk``) and
    the full sort runs only for rows whose nucleus is not inside them. The kept set
    is the same either way: the cumulative mass of the first k sorted tokens does not
    depend on how many more are sorted.
    """
    vocab = scores.shape[-1]
    k = min(NUCLEUS_CANDIDATES, vocab)
    top, order = torch.topk(scores, k, dim=-1)
    total = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(top - total)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    inside = (mass_before[:, -1:] + probs[:, -1:] >= top_p) | (top_p >= 1.0)
    out = torch.full_like(scores, float("-inf"))
    keep = top.masked_fill((mass_before >= top_p) & (top_p < 1.0), float("-inf"))
    out.scatter_(1, order, keep)
    wide = (~inside[:, 0]).nonzero()[:, 0].tolist()
    for row in wide:
        sorted_scores, full_order = torch.sort(scores[row], descending=True)
        row_probs = torch.softmax(sorted_scores, dim=-1)
        drop = torch.cumsum(row_probs, dim=-1) - row_probs >= top_p[row, 0]
        out[row] = scores[row].scatter(
            0, full_order, sorted_scores.masked_fill(drop, float("-inf"))
        )
    # Rows without top-p keep every score.
    return torch.where(top_p >= 1.0, scores, out)


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
