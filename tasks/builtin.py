"""Registration of the built-in tasks (imported by :mod:`tasks`).

Factories import their modules lazily, so registering costs nothing: no dataset
library, no math-verify, no reasoning-gym until a task is made.
"""

from __future__ import annotations

from typing import Any

from tasks.base import Task
from tasks.registry import register_prefix, register_task


def _math(factory_name: str):
    def factory(**kwargs: Any) -> Task:
        from tasks import math as math_tasks

        return getattr(math_tasks, factory_name)(**kwargs)

    return factory


def _gpqa(**kwargs: Any) -> Task:
    from tasks.multiple_choice import make_gpqa_diamond

    return make_gpqa_diamond(**kwargs)


def _livecodebench(**kwargs: Any) -> Task:
    from tasks.code import make_livecodebench

    return make_livecodebench(**kwargs)


def _codebook(**kwargs: Any) -> Task:
    from tasks.codebook import make_codebook

    return make_codebook(**kwargs)


def _procedural(dataset: str, **kwargs: Any) -> Task:
    from tasks.procedural import make_procedural

    return make_procedural(dataset, **kwargs)


def _reasoning_gym_names() -> list[str]:
    from tasks.procedural import reasoning_gym_names

    return reasoning_gym_names()


def _rg_entry(dataset: str, **defaults: Any):
    def factory(**kwargs: Any) -> Task:
        return _procedural(dataset, **{**defaults, **kwargs})

    return factory


register_task(
    "math500",
    _math("make_math500"),
    description="MATH-500 competition math, boxed answer, math-verify",
    source="HuggingFaceH4/MATH-500 (test)",
    size=500,
)
register_task(
    "aime2024",
    _math("make_aime2024"),
    description="AIME 2024 integer answers, boxed, math-verify",
    source="HuggingFaceH4/aime_2024 (train)",
    size=30,
)
register_task(
    "aime2025",
    _math("make_aime2025"),
    description="AIME 2025 integer answers, boxed, math-verify",
    source="MathArena/aime_2025 (train)",
    size=30,
)
register_task(
    "gsm8k",
    _math("make_gsm8k"),
    description="GSM8K grade-school word problems, answer after ####, math-verify",
    source="openai/gsm8k main (test)",
    size=1319,
)
register_task(
    "deepmath",
    _math("make_deepmath"),
    description="DeepMath-103K hard math with difficulty levels, math-verify",
    source="zwhe99/DeepMath-103K (train)",
    size=103022,
)
register_task(
    "gpqa_diamond",
    _gpqa,
    description="GPQA-Diamond science multiple choice, seeded option shuffle, letter match",
    source="Idavidrein/gpqa gpqa_diamond (train, gated)",
    size=198,
)
register_task(
    "livecodebench",
    _livecodebench,
    description="LiveCodeBench code generation, sandboxed stdin/call tests, all must pass",
    source="livecodebench/code_generation_lite (test.jsonl)",
    size=None,
)
register_task(
    "codebook",
    _codebook,
    description="nonce words that each stand for a seeded digit; facts only an agent can give",
    source="generated (tasks/codebook.py)",
    size=None,
)
register_prefix("rg:", _procedural, names=_reasoning_gym_names)
for _name, _defaults, _text in [
    ("gsm_symbolic", {}, "GSM8K-style symbolic word problems"),
    ("basic_arithmetic", {}, "arithmetic expressions"),
    ("chain_sum", {}, "sums and differences of a chain of integers"),
]:
    register_task(
        f"rg:{_name}",
        _rg_entry(_name, **_defaults),
        description=f"reasoning-gym {_text}, generated offline, its own scorer",
        source="reasoning-gym (generated)",
        size=500,
    )
register_task(
    "rg:chain_sum_easy",
    _rg_entry("chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    description="reasoning-gym chain_sum with two one-digit terms (a tiny model can learn it)",
    source="reasoning-gym (generated)",
    size=500,
)
