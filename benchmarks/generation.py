"""Generation throughput of the embedded generator, forward path against forward path.

On SmolLM2-135M-Instruct (float32, as the trainer holds it) and the same chat prompts it
measures new tokens per second of ``model.generate`` (left-padded in one batch, and
one prompt at a time) and of ``TransformersGenerator`` in each ``--variants`` entry
(``path:dtype``: the transformers forward ``hf`` or the lean Llama forward ``lean``, in
float32 or bfloat16 matmuls), all requests concurrent (one decode batch), one at a
time, and as consult-like multi-turn trajectories with and without session prefix
reuse. The variants run interleaved, round after round (A, B, A, B, ...), so load
from other processes falls on all of them alike; each figure is the median of the
rounds, and every variant is also given as a ratio to the first one.

Every run ignores EOS, so all produce the same number of tokens; runs are greedy unless
``--temperature`` is set (the trainer's rollouts sample at 0.7, which adds the draw's cost;
each request then has its own seed).
``--logprob-diff`` also samples rollouts (temperature 1) from each variant that is not
float32 and compares their log-probs with the float32 model's teacher-forced ones
(what the trainer computes): the mismatch a rollout correction has to cover.

``--compare-generate`` measures the embedded generator against ``model.generate`` on a
randomly initialised model of the default's architecture instead (speed does not
depend on the weights; no model files, tokenizer or network needed), on ``--device``.

``--vs-vllm`` compares the embedded generator with vLLM's in-process engine
(:class:`policies.vllm_generator.VLLMGenerator`, the CPU build on CPUs; run from
``.venv-vllm``) on the same chat prompts in one run: new tokens per second with
``--rows`` requests at once (16 and 32 by default) of ``--max-new-tokens`` each, EOS
ignored, sampled at ``--temperature``, the two engines interleaved round after round;
the load time of each; and the peak resident memory of each (the embedded generator:
this process's growth over the run; vLLM: its engine process's peak, sampled every
0.1 s, plus this process's growth while it loads). Writes ``generation.vs_vllm.json``
and ``.png``.

Prints the figures and writes ``generation.json`` and ``generation.png`` (``--tag``
names them ``generation.<tag>.*``), with the load average before and after.

    python benchmarks/generation.py --prompts 8 --max-new-tokens 32 --turns 3
    # the trainer's rollout shape: 32 distinct ~240-token prompts at once
    python benchmarks/generation.py --prompts 32 --prompt-tokens 240 --turns 0 \\
        --no-sequential --rounds 3 --logprob-diff --tag batch32
    # the embedded generator against vLLM's CPU engine (from .venv-vllm)
    .venv-vllm/bin/python benchmarks/generation.py --vs-vllm --rows 16,32 \
        --max-new-tokens 64 --temperature 0.6 --rounds 2
    # on a GPU: embedded generator against model.generate, bfloat16
    python benchmarks/generation.py --compare-generate --device cuda --prompts 32 \\
        --prompt-tokens 240 --variants hf:bfloat16,lean:bfloat16 --tag gpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import torch

from policies.base import Generation, SamplingParams
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

# -- prompts and models -----------------------------------------------------------


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


class _IdsTokenizer:
    """Just enough of a tokenizer for the generator on a random model (no stop strings)."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, **_: object) -> str:
        return " ".join(map(str, ids))

    def encode(self, text: str, **_: object) -> list[int]:
        return [1 + (ord(c) % 200) for c in text]


def random_default_model(device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised model of the default's architecture (no weights downloaded)."""
    from policies.default_model import random_default_model as build

    return build(seed=0).to(device=device, dtype=dtype).eval()


def load_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, object, list[list[int]], str]:
    """The model, tokenizer, prompts and a model description for this run."""
    if args.compare_generate:
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        model = random_default_model(args.device, dtype)
        gen = torch.Generator().manual_seed(1)
        length = max(args.prompt_tokens, 16)
        prompts = [
            torch.randint(100, 40000, (length + i % 8,), generator=gen).tolist()
            for i in range(args.prompts)
        ]
        return model, _IdsTokenizer(), prompts, f"random SmolLM2-135M architecture ({dtype})"
    from policies.default_model import ensure_default_model
    from policies.loading import load_causal_lm, load_tokenizer

    path = ensure_default_model()
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), dtype=torch.float32).to(args.device).eval()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    if args.prompt_tokens:
        prompts = [
            long_chat_ids(tokenizer, q, i, args.prompt_tokens) for i, q in enumerate(questions)
        ]
    else:
        prompts = [chat_ids(tokenizer, q) for q in questions]
    return model, tokenizer, prompts, str(path)


# -- measurements ----------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate(model, pad: int, prompts: list[list[int]], new_tokens: int, batch: bool) -> float:
    """Seconds ``model.generate`` takes for all prompts, one at a time or in one padded batch."""
    device = next(model.parameters()).device
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    start = time.perf_counter()
    with torch.inference_mode():
        if batch:
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
            )
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            assert out.shape[1] == width + new_tokens
        else:
            for p in prompts:
                model.generate(input_ids=torch.tensor([p], device=device), **kwargs)
    sync(str(device))
    return time.perf_counter() - start


def request(new_tokens: int, temperature: float, index: int) -> SamplingParams:
    """One benchmark request: EOS ignored (equal lengths everywhere), seeded when sampled."""
    seed = index if temperature > 0 else None
    return SamplingParams(
        temperature=temperature, max_new_tokens=new_tokens, ignore_eos=True, seed=seed
    )


async def embedded(
    gen: TransformersGenerator,
    prompts: list[list[int]],
    new_tokens: int,
    concurrent: bool,
    temperature: float = 0.0,
) -> tuple[float, list[Generation]]:
    """Seconds the embedded generator takes for all prompts, sequential or concurrent; outputs."""
    params = [request(new_tokens, temperature, i) for i in range(len(prompts))]
    start = time.perf_counter()
    if concurrent:
        outs = await asyncio.gather(
            *(gen.generate(p, s) for p, s in zip(prompts, params, strict=True))
        )
    else:
        outs = [await gen.generate(p, s) for p, s in zip(prompts, params, strict=True)]
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return time.perf_counter() - start, outs


def agreement(outs: list[Generation], reference: list[Generation]) -> dict[str, float]:
    """How far greedy outputs follow the reference's: identical rows, shared tokens, log-probs."""
    same_rows = 0
    shared = 0
    diffs = [0.0]
    for out, ref in zip(outs, reference, strict=True):
        n = next(
            (
                i
                for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids, strict=True))
                if a != b
            ),
            len(out.token_ids),
        )
        same_rows += n == len(out.token_ids)
        shared += n
        # Log-probs of the same tokens after the same prefix, before the first difference.
        diffs += [abs(a - b) for a, b in zip(out.logprobs[:n], ref.logprobs[:n], strict=True)]
    return {
        "identical_rows": round(same_rows / len(outs), 3),
        "tokens_before_first_difference": round(shared / sum(len(o.token_ids) for o in outs), 3),
        "max_abs_logprob_difference": round(max(diffs), 5),
    }


async def trajectories(
    gen: TransformersGenerator,
    prompts: list[list[int]],
    new_tokens: int,
    turns: int,
    reuse: bool,
    temperature: float = 0.0,
) -> float:
    """Seconds for consult-like multi-turn trajectories, run concurrently."""
    feedback = gen.tokenizer.encode(FEEDBACK, add_special_tokens=False)

    async def one(i: int, ids: list[int]) -> None:
        ids = list(ids)
        params = request(new_tokens, temperature, i)
        for _ in range(turns):
            out = await gen.generate(ids, params, session_id=f"traj-{i}" if reuse else None)
            ids = ids + out.token_ids + feedback

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - start


async def logprob_difference(
    gen: TransformersGenerator, model, prompts: list[list[int]], new_tokens: int
) -> dict[str, float]:
    """Sampled rollouts' log-probs against the float32 model's teacher-forced ones."""
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True, seed=i)
        for i in range(len(prompts))
    ]
    outs = await asyncio.gather(*(gen.generate(p, s) for p, s in zip(prompts, params, strict=True)))
    diffs = []
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt + out.token_ids], device=next(model.parameters()).device)
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        trainer = logp.gather(1, torch.tensor(out.token_ids, device=logp.device)[:, None])[:, 0]
        diffs.append(torch.tensor(out.logprobs) - trainer.cpu())
    d = torch.cat(diffs)
    ratio = torch.exp(-d)  # trainer / rollout probability: the rollout correction's weight
    return {
        "tokens": int(d.numel()),
        "max_abs": round(float(d.abs().max()), 4),
        "mean_abs": round(float(d.abs().mean()), 5),
        "p99_abs": round(float(d.abs().quantile(0.99)), 4),
        "mean_signed": round(float(d.mean()), 5),
        "ratio_outside_0.5_5": round(float(((ratio < 0.5) | (ratio > 5)).float().mean()), 5),
    }


async def run(args: argparse.Namespace) -> dict:
    """Every measurement, as one JSON-ready dict."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, prompts, description = load_setup(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    gens = {}
    for v in variants:
        path, _, dtype = v.partition(":")
        gens[v] = TransformersGenerator.from_model(
            model,
            tokenizer,
            max_batch_size=args.prompts,
            generator_dtype=dtype or "auto",
            forward_path=path,
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    load_before = os.getloadavg()
    total = args.prompts * args.max_new_tokens
    for gen in gens.values():  # warm up kernels and allocators once
        await embedded(gen, prompts[:2], 4, concurrent=True)
    greedy: dict[str, list[Generation]] = {}
    if args.hf_generate:
        hf_generate(model, pad, prompts[:1], 4, batch=False)

    runs: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}

    def record(name: str, seconds: float, tokens: int) -> None:
        runs.setdefault(name, []).append(tokens / seconds)
        print(f"{name:48s} {tokens:6d} tokens {seconds:8.2f} s {tokens / seconds:9.1f} tok/s")

    for rnd in range(args.rounds):
        print(f"-- round {rnd + 1} of {args.rounds}, load {os.getloadavg()[0]:.2f}")
        if args.hf_generate:
            record(
                "hf_generate_batched",
                hf_generate(model, pad, prompts, args.max_new_tokens, batch=True),
                total,
            )
            if args.sequential:
                record(
                    "hf_generate_sequential",
                    hf_generate(model, pad, prompts, args.max_new_tokens, batch=False),
                    total,
                )
        for v, gen in gens.items():
            gen.stats = GeneratorStats()
            seconds, greedy[v] = await embedded(
                gen, prompts, args.max_new_tokens, concurrent=True, temperature=args.temperature
            )
            record(f"embedded_concurrent[{v}]", seconds, total)
            extra[f"embedded_concurrent[{v}]"] = {
                "decode_forwards": gen.stats.decode_forwards,
                "max_batch_rows": gen.stats.max_batch_rows,
                "forward": f"{gen.forward.name}:{str(gen.forward.dtype).removeprefix('torch.')}",
            }
            if args.sequential:
                seconds, _ = await embedded(
                    gen, prompts, args.max_new_tokens, False, args.temperature
                )
                record(f"embedded_sequential[{v}]", seconds, total)
            for reuse in (False, True) if args.turns > 0 else ():
                gen.weights_updated()  # start each variant with empty caches
                seconds = await trajectories(
                    gen, prompts, args.max_new_tokens, args.turns, reuse, args.temperature
                )
                name = f"multi_turn_{'with' if reuse else 'without'}_prefix_reuse[{v}]"
                record(name, seconds, total * args.turns)
    same = {v: agreement(greedy[v], greedy[variants[0]]) for v in variants[1:]}
    for v, figures in same.items():
        print(f"greedy outputs [{v}] against [{variants[0]}]: {figures}")
    diffs = {}
    if args.logprob_diff:
        for v, gen in gens.items():
            if gen.forward.dtype != torch.float32:
                diffs[v] = await logprob_difference(gen, model, prompts, args.max_new_tokens)
                print(f"log-prob difference [{v}] against float32: {diffs[v]}")
    for gen in gens.values():
        await gen.aclose()
    results = {
        name: {
            "tokens_per_s": round(statistics.median(values), 1),
            "runs": [round(x, 1) for x in values],
            **extra.get(name, {}),
        }
        for name, values in runs.items()
    }
    return {
        "model": description,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "turns": args.turns,
        "rounds": args.rounds,
        "variants": variants,
        "prompt_tokens": [min(len(p) for p in prompts), max(len(p) for p in prompts)],
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
        "ratios_to_first_variant": ratios(runs, variants),
        "greedy_agreement_with_first_variant": same,
        "logprob_difference_vs_float32": diffs,
    }


def ratios(runs: dict[str, list[float]], variants: list[str]) -> dict[str, float]:
    """Each variant's median tokens/s over the first variant's, per measurement."""
    out = {}
    base = variants[0]
    for name, values in runs.items():
        if not name.endswith(f"[{base}]"):
            continue
        stem = name[: -len(f"[{base}]")]
        for v in variants[1:]:
            other = runs.get(f"{stem}[{v}]")
            if other:
                out[f"{stem}[{v}]"] = round(statistics.median(other) / statistics.median(values), 2)
    return out


# -- the embedded generator against vLLM's engine ----------------------------------


class PeakRSS:
    """The peak resident memory of some processes, sampled every ``interval`` seconds."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        import threading

        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self._thread.start()

    def _watch(self, interval: float) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for pid in self.pids:
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


async def timed_batch(generator, prompts: list[list[int]], new_tokens: int, temperature: float):
    """New tokens per second of ``prompts`` all submitted at once (each its own seed)."""
    params = [
        SamplingParams(
            max_new_tokens=new_tokens,
            temperature=temperature,
            top_p=1.0,
            ignore_eos=True,
            seed=1000 + i if temperature > 0 else None,
        )
        for i in range(len(prompts))
    ]
    start = time.perf_counter()
    outs = await asyncio.gather(
        *(generator.generate(p, sp) for p, sp in zip(prompts, params, strict=True))
    )
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed


async def run_vs_vllm(args: argparse.Namespace) -> dict:
    """Embedded generator and vLLM engine on the same prompts, interleaved round after round."""
    import vllm

    from policies.default_model import ensure_default_model
    from policies.loading import load_causal_lm, load_tokenizer
    from policies.vllm_generator import VLLMGenerator

    rows = [int(r) for r in args.rows.split(",")]
    path = ensure_default_model()
    load_before = os.getloadavg()[0]
    base = rss()
    start = time.perf_counter()
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), dtype=torch.float32).eval()
    embedded = TransformersGenerator.from_model(
        model, tokenizer, max_batch_size=max(rows), max_context=1024, seed=0
    )
    embedded_load = time.perf_counter() - start
    prompts = [chat_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(max(rows))]
    # Prompts differ in their first user tokens only through the question; give every
    # row a distinct prompt so prefix caching shares only the chat template's start.
    prompts = [
        p[:-3] + tokenizer.encode(f" ({i})", add_special_tokens=False) + p[-3:]
        for i, p in enumerate(prompts)
    ]
    await timed_batch(embedded, prompts[:2], 4, args.temperature)  # warm-up
    embedded_rss_loaded = rss() - base

    import psutil

    before_children = {c.pid for c in psutil.Process().children(recursive=True)}
    vllm_base = rss()
    start = time.perf_counter()
    engine = VLLMGenerator(
        str(path),
        tokenizer=tokenizer,
        max_context=1024,
        kv_cache_gib=args.kv_cache_gib,
        dtype=args.vllm_dtype,
        seed=0,
        max_batch_size=max(rows),
        engine_options={"enforce_eager": True} if args.vllm_eager else None,
    )
    await timed_batch(engine, prompts[:2], 4, args.temperature)  # warm-up (first compile)
    vllm_load = time.perf_counter() - start
    vllm_client_rss = rss() - vllm_base
    engine_pids = [
        c.pid for c in psutil.Process().children(recursive=True) if c.pid not in before_children
    ]
    watch = PeakRSS(engine_pids)

    results: dict[str, list[float]] = {}
    embedded_peak = embedded_rss_loaded
    for _ in range(args.rounds):
        for n in rows:
            for name, gen in (("embedded", embedded), ("vllm", engine)):
                rate = await timed_batch(gen, prompts[:n], args.max_new_tokens, args.temperature)
                results.setdefault(f"{name} {n} rows", []).append(rate)
                if name == "embedded":
                    embedded_peak = max(embedded_peak, rss() - base)
                print(f"{name:9s} {n:3d} rows: {rate:7.1f} new tokens/s", flush=True)
    engine_peak = watch.stop()
    await engine.aclose()
    await embedded.aclose()
    medians = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "mode": "vs_vllm",
        "command": " ".join(["python", *__import__("sys").argv]),
        "model": str(path),
        "device": "cpu",
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "rows": rows,
        "prompts": max(rows),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "rounds": args.rounds,
        "embedded": {
            "forward": f"{getattr(embedded.forward, 'name', '?')}:"
            f"{str(getattr(embedded.forward, 'dtype', '?')).replace('torch.', '')}",
            "load_s": round(embedded_load, 2),
            "peak_rss_growth_mib": round(embedded_peak / 2**20),
        },
        "vllm": {
            "dtype": args.vllm_dtype,
            "enforce_eager": args.vllm_eager,
            "kv_cache_gib": args.kv_cache_gib,
            "load_s": round(vllm_load, 2),
            "engine_peak_rss_mib": round(engine_peak / 2**20),
            "client_rss_growth_mib": round(vllm_client_rss / 2**20),
            "prefix_caching": True,
        },
        "results": {
            k: {"tokens_per_s": round(v, 1), "rounds": results[k]} for k, v in medians.items()
        },
        "vllm_over_embedded": {
            str(n): round(medians[f"vllm {n} rows"] / medians[f"embedded {n} rows"], 2)
            for n in rows
        },
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    return report


def plot_vs_vllm(report: dict, out: Path) -> None:
    """Tokens per second by rows, embedded against vLLM, with load time and memory in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for k, (name, color) in enumerate((("embedded", "#4c72b0"), ("vllm", "#dd8452"))):
        values = [report["results"][f"{name} {n} rows"]["tokens_per_s"] for n in rows]
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        ax.bar(xs, values, width, label=name, color=color)
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_xticks(range(len(rows)), [f"{n} rows" for n in rows])
    ax.set_ylabel(f"new tokens/s ({report['max_new_tokens']} per row, T={report['temperature']})")
    e, v = report["embedded"], report["vllm"]
    ax.set_title(
        f"load {e['load_s']:.0f} s vs {v['load_s']:.0f} s; peak RSS +{e['peak_rss_growth_mib']} MiB "
        f"vs {v['engine_peak_rss_mib']} MiB engine\nload average "
        f"{report['load_average_1m'][0]} -> {report['load_average_1m'][1]}",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot(report: dict, out: Path) -> None:
    """A bar chart of tokens per second per configuration (median over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    values = [report["results"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    colors = ["#999999" if n.startswith("hf_generate") else "#4c72b0" for n in names]
    colors = [
        "#dd8452" if "lean" in n and "bfloat16" in n else "#55a868" if "lean" in n else c
        for n, c in zip(names, colors, strict=True)
    ]
    ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel(
        f"new tokens per second (temperature {report.get('temperature', 0.0)}, "
        f"{report['device']}, median of rounds)"
    )
    ax.set_title(
        f"{report['prompts']} prompts x {report['max_new_tokens']} tokens, "
        f"load {report['load_average_1m'][0]} -> {report['load_average_1m'][1]}"
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
        "--variants",
        default="hf:float32,lean:float32,lean:bfloat16",
        help="comma-separated path:dtype generator variants (path hf|lean|auto, dtype "
        "float32|bfloat16|auto); ratios are given against the first",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: greedy (outputs comparable across variants); rollouts sample, e.g. 0.7",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every run")
    parser.add_argument(
        "--no-sequential",
        dest="sequential",
        action="store_false",
        help="skip the one-prompt-at-a-time runs (slow for many prompts)",
    )
    parser.add_argument(
        "--no-hf-generate",
        dest="hf_generate",
        action="store_false",
        help="skip model.generate (it runs once per round otherwise)",
    )
    parser.add_argument(
        "--logprob-diff",
        action="store_true",
        help="compare sampled rollouts' log-probs of non-float32 variants with float32's",
    )
    parser.add_argument(
        "--compare-generate",
        action="store_true",
        help="a random model of the default's architecture (no files needed), on --device",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--tag", default="", help="suffix of the output names: generation.<tag>.*")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="output folder"
    )
    parser.add_argument(
        "--vs-vllm",
        action="store_true",
        help="the embedded generator against vLLM's in-process engine (needs vLLM: .venv-vllm)",
    )
    parser.add_argument("--rows", default="16,32", help="--vs-vllm: requests at once, per run")
    parser.add_argument(
        "--kv-cache-gib", type=float, default=1.0, help="--vs-vllm: vLLM's KV cache"
    )
    parser.add_argument("--vllm-dtype", default="bfloat16", help="--vs-vllm: vLLM's dtype")
    parser.add_argument(
        "--vllm-eager",
        action="store_true",
        help="--vs-vllm: vLLM without torch.compile (loads faster, may decode slower)",
    )
    args = parser.parse_args()
    if args.vs_vllm:
        report = asyncio.run(run_vs_vllm(args))
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"generation.{args.tag}" if args.tag else "generation.vs_vllm"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_vs_vllm(report, args.out / f"{stem}.png")
        print(json.dumps({k: report[k] for k in ("embedded", "vllm", "vllm_over_embedded")}))
        print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
        return
    report = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"generation.{args.tag}" if args.tag else "generation"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / f"{stem}.png")
    print(f"ratios to {report['variants'][0]}: {report['ratios_to_first_variant']}")
    print(f"load average (1 min) before and after: {report['load_average_1m']}")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
