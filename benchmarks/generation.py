"""Generation throughput of the embedded generator against plain ``model.generate``.

On the real SmolLM2-135M-Instruct and the same chat prompts it measures new tokens
per second of: ``model.generate`` one prompt at a time and left-padded in one batch;
``TransformersGenerator`` one request at a time and with all requests concurrent
(gathered into one decode batch); and consult-like multi-turn trajectories (generate,
append an injected feedback segment, generate again) with and without session
prefix reuse. Every run is greedy with EOS ignored, so all produce the same number
of tokens. Prints the figures and writes ``generation.json`` and ``generation.png``
(``--tag`` names them ``generation.<tag>.*``), with the load average of the machine
before and after, since other processes sharing the CPU change every figure.

    python benchmarks/generation.py --prompts 8 --max-new-tokens 32 --turns 3
    # the trainer's rollout shape: 32 distinct ~240-token prompts at once
    python benchmarks/generation.py --prompts 32 --prompt-tokens 240 --turns 0 \
        --no-sequential --tag batch32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import torch

from policies.base import SamplingParams
from policies.default_model import ensure_default_model
from policies.transformers_generator import GeneratorStats, TransformersGenerator

QUESTIONS = [
    "What is 17 times 23?",
    "Name three prime numbers greater than 50.",
    "Explain why the sum of two odd numbers is even.",
    "What is the derivative of x^3 + 2x?",
    "How many edges does a cube have?",
    "Convert 0.375 to a fraction.",
    "What is the capital of Australia?",
    "Solve for x: 3x + 7 = 22.",
]
FEEDBACK = '\n<feedback agent="verify">Check the last step again; it may be wrong.</feedback>\n'


def chat_ids(tokenizer, question: str) -> list[int]:
    """The chat-templated prompt ids of one question."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    return list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)


def long_chat_ids(tokenizer, question: str, index: int, tokens: int) -> list[int]:
    """A distinct chat prompt of about ``tokens`` tokens: a numbered passage, then the question."""
    sentence = f"Note {index}: a rollout prompt carries context the policy reads before answering. "
    passage = ""
    while len(tokenizer.encode(passage, add_special_tokens=False)) < tokens:
        passage += sentence
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": passage}, {"role": "user", "content": question}],
        add_generation_prompt=True,
    )
    return list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, batch: bool) -> float:
    """Seconds ``model.generate`` takes for all prompts, one at a time or in one padded batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    start = time.perf_counter()
    with torch.inference_mode():
        if batch:
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            assert out.shape[1] == width + new_tokens
        else:
            for p in prompts:
                model.generate(input_ids=torch.tensor([p]), **kwargs)
    return time.perf_counter() - start


async def embedded(
    gen: TransformersGenerator, prompts: list[list[int]], new_tokens: int, concurrent: bool
) -> float:
    """Seconds the embedded generator takes for all prompts, sequential or concurrent."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    if concurrent:
        outs = await asyncio.gather(*(gen.generate(p, params) for p in prompts))
    else:
        outs = [await gen.generate(p, params) for p in prompts]
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return time.perf_counter() - start


async def trajectories(
    gen: TransformersGenerator, prompts: list[list[int]], new_tokens: int, turns: int, reuse: bool
) -> dict[str, float]:
    """Run consult-like multi-turn trajectories concurrently; time and prompt tokens computed."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    feedback = gen.tokenizer.encode(FEEDBACK, add_special_tokens=False)
    computed = 0
    cached = 0

    async def one(i: int, ids: list[int]) -> None:
        nonlocal computed, cached
        ids = list(ids)
        for _ in range(turns):
            out = await gen.generate(ids, params, session_id=f"traj-{i}" if reuse else None)
            computed += out.prompt_tokens - out.cached_tokens
            cached += out.cached_tokens
            ids = ids + out.token_ids + feedback

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return {
        "seconds": time.perf_counter() - start,
        "prompt_tokens_computed": computed,
        "prompt_tokens_cached": cached,
    }


async def run(args: argparse.Namespace) -> dict:
    """Every measurement, as one JSON-ready dict."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = ensure_default_model()
    gen = TransformersGenerator(str(path), device="cpu", max_batch_size=args.prompts)
    model, tokenizer = gen.model, gen.tokenizer
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    if args.prompt_tokens:
        prompts = [
            long_chat_ids(tokenizer, q, i, args.prompt_tokens) for i, q in enumerate(questions)
        ]
    else:
        prompts = [chat_ids(tokenizer, q) for q in questions]
    load_before = os.getloadavg()
    total = args.prompts * args.max_new_tokens
    # Warm up kernels and allocators once so the first measurement is not penalised.
    await embedded(gen, prompts[:1], 4, concurrent=False)
    hf_generate(model, tokenizer, prompts[:1], 4, batch=False)

    results: dict[str, dict] = {}

    def record(name: str, seconds: float, tokens: int, **extra: float) -> None:
        results[name] = {
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            **extra,
        }
        print(f"{name:38s} {tokens:6d} tokens {seconds:8.2f} s {tokens / seconds:9.1f} tok/s")

    if args.sequential:
        record(
            "hf_generate_sequential",
            hf_generate(model, tokenizer, prompts, args.max_new_tokens, batch=False),
            total,
        )
    record(
        "hf_generate_batched",
        hf_generate(model, tokenizer, prompts, args.max_new_tokens, batch=True),
        total,
    )
    if args.sequential:
        record(
            "embedded_sequential",
            await embedded(gen, prompts, args.max_new_tokens, concurrent=False),
            total,
        )
    gen.stats = GeneratorStats()
    seconds = await embedded(gen, prompts, args.max_new_tokens, concurrent=True)
    record(
        "embedded_concurrent",
        seconds,
        total,
        decode_forwards=gen.stats.decode_forwards,
        max_batch_rows=gen.stats.max_batch_rows,
    )
    traj_tokens = total * args.turns
    for reuse in (False, True) if args.turns > 0 else ():
        gen.weights_updated()  # start each variant with empty caches
        r = await trajectories(gen, prompts, args.max_new_tokens, args.turns, reuse)
        record(
            f"multi_turn_{'with' if reuse else 'without'}_prefix_reuse",
            r["seconds"],
            traj_tokens,
            prompt_tokens_computed=r["prompt_tokens_computed"],
            prompt_tokens_cached=r["prompt_tokens_cached"],
        )
        print(
            f"{'':38s} prompt tokens computed {r['prompt_tokens_computed']}, served from cache {r['prompt_tokens_cached']}"
        )
    await gen.aclose()
    return {
        "model": str(path),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "turns": args.turns,
        "prompt_tokens": [min(len(p) for p in prompts), max(len(p) for p in prompts)],
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }


def plot(report: dict, out: Path) -> None:
    """A bar chart of tokens per second per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    values = [report["results"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    palette = ["#999999", "#666666", "#4c72b0", "#2b5aa0", "#dd8452", "#c44e52"]
    ax.barh(names, values, color=palette[: len(names)])
    ax.invert_yaxis()
    ax.set_xlabel("new tokens per second (greedy, CPU)")
    ax.set_title(
        f"SmolLM2-135M: {report['prompts']} prompts x {report['max_new_tokens']} tokens, "
        f"{report['turns']} turns for multi-turn"
    )
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    """Parse flags, run, print, save JSON and PNG."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompts", type=int, default=8, help="number of prompts (and concurrent requests)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens generated per request and turn"
    )
    parser.add_argument(
        "--turns", type=int, default=3, help="turns per multi-turn trajectory (0: skip them)"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="pad each prompt with a distinct system passage to about this many tokens (0: none)",
    )
    parser.add_argument(
        "--no-sequential",
        dest="sequential",
        action="store_false",
        help="skip the one-prompt-at-a-time runs (slow for many prompts)",
    )
    parser.add_argument("--tag", default="", help="suffix of the output names: generation.<tag>.*")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="output folder"
    )
    args = parser.parse_args()
    report = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"generation.{args.tag}" if args.tag else "generation"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / f"{stem}.png")
    print(f"load average (1 min) before and after: {report['load_average_1m']}")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
