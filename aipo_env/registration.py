"""Gymnasium ids for the consult environments, mapped to import paths.

Each id's entry point is the string ``"aipo_env.env:make_consult_env"`` with the task's
registry name in its kwargs, so ``gymnasium.make("aipo_env:aipo/Math500-v0")`` works in
any process. Registering imports only gymnasium: no torch, no datasets, no tokenizer.
"""

from __future__ import annotations

import re
from typing import Any

ENTRY_POINT = "aipo_env.env:make_consult_env"

#: id -> (task registry name, description)
BENCHMARK_ENVS: dict[str, tuple[str, str]] = {
    "aipo/Math500-v0": ("math500", "MATH-500 competition math, boxed answer, math-verify"),
    "aipo/AIME2024-v0": ("aime2024", "AIME 2024 integer answers"),
    "aipo/AIME2025-v0": ("aime2025", "AIME 2025 integer answers"),
    "aipo/GSM8K-v0": ("gsm8k", "GSM8K grade-school word problems"),
    "aipo/GPQADiamond-v0": ("gpqa_diamond", "GPQA-Diamond science multiple choice"),
    "aipo/LiveCodeBench-v0": ("livecodebench", "LiveCodeBench code generation with tests"),
}

#: reasoning-gym datasets registered up front; any other ``aipo/RG-<name>-v0`` is made on demand.
RG_NAMES: tuple[str, ...] = (
    "gsm_symbolic",
    "basic_arithmetic",
    "chain_sum",
    "chain_sum_easy",
    "leg_counting",
    "propositional_logic",
    "simple_equations",
    "fraction_simplification",
    "gcd",
    "lcm",
    "prime_factorization",
    "number_sequence",
)

_RG_ID = re.compile(r"^aipo/RG-(?P<name>[\w.]+)-v0$")


def rg_env_id(name: str) -> str:
    """The gymnasium id of reasoning-gym dataset ``name``."""
    return f"aipo/RG-{name}-v0"


def env_table() -> list[tuple[str, str, str]]:
    """(id, task name, description) of every id registered up front."""
    rows = [(env_id, task, text) for env_id, (task, text) in BENCHMARK_ENVS.items()]
    rows += [(rg_env_id(n), f"rg:{n}", f"reasoning-gym {n}, generated offline") for n in RG_NAMES]
    return rows


def _register(env_id: str, task: str) -> None:
    import gymnasium

    if env_id in gymnasium.registry:
        return
    gymnasium.register(
        id=env_id,
        entry_point=ENTRY_POINT,
        kwargs={"task": task},
        disable_env_checker=True,
        additional_wrappers=(),
    )


def register_envs() -> None:
    """Register every id of :func:`env_table` (idempotent)."""
    for env_id, task, _ in env_table():
        _register(env_id, task)


def ensure_registered(env_id: str) -> None:
    """Register ``env_id`` on demand when it is an ``aipo/RG-<name>-v0`` id."""
    register_envs()
    match = _RG_ID.match(env_id)
    if match is not None:
        _register(env_id, f"rg:{match['name']}")


def make(env_id: str, **overrides: Any) -> Any:
    """Make a :class:`~aipo_env.env.ConsultEnv` from a gymnasium id.

    ``overrides`` go to :func:`aipo_env.env.make_consult_env` (``agents``, ``tokenizer``,
    ``config``, ``task_kwargs`` or any :class:`~aipo_env.config.EnvConfig` field). Returns the
    unwrapped env, whose async ``areset``/``astep`` gymnasium's wrappers do not forward.
    """
    import gymnasium

    ensure_registered(env_id)
    if env_id not in gymnasium.registry:
        known = ", ".join(sorted(i for i in gymnasium.registry if i.startswith("aipo/")))
        raise ValueError(
            f"unknown environment id {env_id!r}; expected one of {known}, or aipo/RG-<name>-v0"
        )
    return gymnasium.make(env_id, **overrides).unwrapped
