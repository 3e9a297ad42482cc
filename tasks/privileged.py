"""Privileged information of reasoning-gym problems: facts and reference steps, from the entry itself.

A reasoning-gym entry carries what generated it (``metadata``): the animals of a
leg-counting problem, the expression of a chain sum or a product, the worked solution
of a GSM-style problem. The providers here turn that into what an oracle agent hands
out (``agents/oracle.py``): facts for the Knowledge agent, ordered steps for the
Reasoning agent. Nothing is downloaded and no model runs.

| dataset | facts | steps |
|---|---|---|
| ``leg_counting`` | legs per animal of the problem ("A spider has 8 legs.") | legs per animal kind, then the total |
| ``chain_sum`` (and ``rg:chain_sum_easy``) | | left to right, one operation a step |
| ``products`` | | partial products by place value, then their sum |
| ``gsm_symbolic`` | | the worked solution's lines |

Add a dataset by adding a function to :data:`FACTS` or :data:`STEPS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tasks.base import SolutionStep

Entry = dict[str, Any]


def _legs_per_animal() -> dict[str, int]:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    return dict(ANIMALS)


def _article(noun: str) -> str:
    return "An" if noun[:1].lower() in "aeiou" else "A"


def leg_counting_facts(entry: Entry) -> list[str]:
    """How many legs each animal of the problem has, one sentence per animal."""
    legs = _legs_per_animal()
    facts = []
    for animal in entry["metadata"]["animals"]:
        count = legs[animal]
        has = "no legs" if count == 0 else f"{count} leg" + ("s" if count != 1 else "")
        facts.append(f"{_article(animal)} {animal} has {has}.")
    return facts


def leg_counting_steps(entry: Entry) -> list[SolutionStep]:
    """The legs of each animal kind (count times legs), then the total."""
    legs = _legs_per_animal()
    steps, totals = [], []
    for animal, count in entry["metadata"]["animals"].items():
        total = count * legs[animal]
        totals.append(total)
        steps.append(
            SolutionStep(
                action=f"legs of the {animal} kind: {count} * {legs[animal]}",
                result=str(total),
            )
        )
    steps.append(
        SolutionStep(
            action="add the legs of every kind: " + " + ".join(map(str, totals)),
            result=str(sum(totals)),
        )
    )
    return steps


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def chain_sum_steps(entry: Entry) -> list[SolutionStep]:
    """Left to right, one addition or subtraction a step."""
    parts = entry["metadata"]["expression"].split()
    if len(parts) < 3 or len(parts) % 2 == 0:
        return []
    running = _number(parts[0])
    steps = []
    for op, term in zip(parts[1::2], parts[2::2], strict=True):
        value = _number(term)
        result = running + value if op == "+" else running - value
        steps.append(SolutionStep(action=f"compute {running} {op} {term}", result=str(result)))
        running = result
    return steps


def products_steps(entry: Entry) -> list[SolutionStep]:
    """Two factors: the first times each place-value part of the second, then the sum of those.

    More factors: left to right, one multiplication a step.
    """
    factors = [int(f) for f in re.split(r"\s*\*\s*", entry["metadata"]["expression"].strip())]
    if len(factors) < 2:
        return []
    if len(factors) > 2:
        steps, running = [], factors[0]
        for factor in factors[1:]:
            steps.append(
                SolutionStep(action=f"compute {running} * {factor}", result=str(running * factor))
            )
            running *= factor
        return steps
    a, b = factors
    digits = str(abs(b))
    parts = [
        int(d) * 10 ** (len(digits) - 1 - i) * (1 if b >= 0 else -1)
        for i, d in enumerate(digits)
        if d != "0"
    ]
    if len(parts) <= 1:
        return [SolutionStep(action=f"compute {a} * {b}", result=str(a * b))]
    steps = [SolutionStep(action=f"compute {a} * {part}", result=str(a * part)) for part in parts]
    partials = " + ".join(str(a * part) for part in parts)
    steps.append(SolutionStep(action=f"add the partial products {partials}", result=str(a * b)))
    return steps


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm_symbolic_steps(entry: Entry) -> list[SolutionStep]:
    """The worked solution's lines (``answer_cot``), each split at its last '=' into action and result."""
    cot = str(entry["metadata"].get("answer_cot") or "")
    steps = []
    for line in cot.splitlines():
        line = line.strip()
        if not line or line.startswith("####"):
            continue
        action, _, outcome = line.rpartition("=")
        numbers = _LAST_NUMBER.findall(outcome if action else line)
        result = numbers[-1].replace(",", "") if numbers else ""
        steps.append(SolutionStep(action=(action or line).strip(), result=result))
    if steps:
        steps[-1] = steps[-1].model_copy(update={"result": str(entry["answer"])})
    return steps


#: reasoning-gym dataset -> the facts of one of its entries.
FACTS: dict[str, Callable[[Entry], list[str]]] = {"leg_counting": leg_counting_facts}
#: reasoning-gym dataset -> the reference steps of one of its entries.
STEPS: dict[str, Callable[[Entry], list[SolutionStep]]] = {
    "leg_counting": leg_counting_steps,
    "chain_sum": chain_sum_steps,
    "products": products_steps,
    "gsm_symbolic": gsm_symbolic_steps,
}


def privileged_kinds(dataset: str) -> frozenset[str]:
    """What a reasoning-gym dataset's problems carry: ``facts``, ``steps``, both or neither."""
    kinds = set()
    if dataset in FACTS:
        kinds.add("facts")
    if dataset in STEPS:
        kinds.add("steps")
    return frozenset(kinds)


def datasets_with(kind: str) -> list[str]:
    """The reasoning-gym datasets whose problems carry ``kind`` (``facts`` or ``steps``)."""
    table = {"facts": FACTS, "steps": STEPS}.get(kind, {})
    return sorted(table)
