"""Write a recipe's prompt dataset: the JSONL file OpenRLHF reads, from the Hub or a local file.

``aipo data --config grpo_1node`` (:mod:`aipo.commands.data`, the command line)

reads the recipe's task (``executor.task``, e.g. ``deepmath``: the Hub's
``zwhe99/DeepMath-103K``, whose answer column is ``final_answer``), turns every row into
the task's problem (its answer extraction applied, malformed rows skipped and counted)
and writes one JSON object per line with the recipe's own keys, ``data.input_key``
(the question) and ``data.label_key`` (the reference answer), to the recipe's
``data.prompt_dataset`` (resolved against the current directory, as the launcher
resolves it). Also written: ``id`` and the task's metadata columns (DeepMath:
``difficulty``, ``topic``).

Options: ``--source`` a Hub dataset id or a local ``.jsonl``/``.json``/``.parquet`` file
instead of the task's own; ``--question-field``/``--answer-field`` name its columns;
``--split``; ``--where difficulty>=7`` keeps rows whose metadata passes; ``--limit N``
draws N rows (seeded); ``--exclude FILE`` drops questions that occur in another file
(a held-out set); ``--target eval.dataset`` writes the recipe's evaluation file
instead; ``--out`` writes elsewhere.
"""

from __future__ import annotations

import json
import operator
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The comparisons ``--where`` understands.
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_WHERE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
#: The dataset flags this command can write.
TARGETS = ("data.prompt_dataset", "eval.dataset")


class PrepareError(ValueError):
    """The data cannot be prepared as asked; the message says what to change."""


def parse_where(text: str) -> tuple[str, str, Any]:
    """``difficulty>=7`` -> ``("difficulty", ">=", 7.0)``; numbers compare as numbers."""
    match = _WHERE.match(text)
    if not match:
        raise PrepareError(
            f"--where {text!r} is not FIELD OP VALUE; OP one of {', '.join(_OPS)} "
            "(e.g. --where 'difficulty>=7')"
        )
    field, op, raw = match.groups()
    try:
        value: Any = float(raw)
    except ValueError:
        value = raw.strip("'\"")
    return field, op, value


def _passes(metadata: dict[str, Any], where: tuple[str, str, Any]) -> bool:
    field, op, value = where
    cell = metadata.get(field)
    if cell is None:
        return False
    if isinstance(value, float):
        try:
            cell = float(cell)
        except (TypeError, ValueError):
            return False
    else:
        cell = str(cell)
    return _OPS[op](cell, value)


def recipe_target(recipe: Any, target: str, launch_dir: Path) -> Path:
    """The local file the recipe's ``target`` flag names, resolved as the launcher resolves it."""
    from trainers.openrlhf.launcher import dataset_entries, resolved_flags

    flags = resolved_flags(recipe, launch_dir)
    entries = [entry for flag, entry, local in dataset_entries(flags) if flag == target and local]
    if len(entries) != 1:
        raise PrepareError(
            f"the recipe's {target} is {flags.get(target)!r}: not one local file to write; "
            "pass --out PATH"
        )
    return Path(entries[0])


def recipe_keys(recipe: Any) -> tuple[str, str]:
    """``(input_key, label_key)`` the recipe reads rows with (OpenRLHF's default input key ``input``)."""
    flags = recipe.openrlhf
    label_key = flags.get("data.label_key")
    if not label_key:
        raise PrepareError(
            "the recipe sets no data.label_key: the executor's verifier needs the reference "
            "answer; set openrlhf.data.label_key (e.g. answer)"
        )
    return str(flags.get("data.input_key") or "input"), str(label_key)


def load_problems(
    task_name: str,
    *,
    source: str | None,
    split: str | None,
    question_field: str | None,
    answer_field: str | None,
) -> tuple[list[Any], int]:
    """The task's problems (its own dataset, or ``source``), and the count of skipped rows."""
    from tasks.registry import make_task

    options: dict[str, Any] = {}
    columns = {
        field: column
        for field, column in (("question", question_field), ("answer", answer_field))
        if column
    }
    if columns:
        options["columns"] = columns
    if source is not None:
        local = Path(source).expanduser()
        if local.suffix.lower() in (".jsonl", ".json", ".parquet") or local.exists():
            options["path"] = str(local)
        else:
            options["hf_name"] = source
    if split is not None:
        options["split"] = split
    try:
        task = make_task(task_name, **options)
    except TypeError as exc:
        raise PrepareError(
            f"task {task_name!r} does not read a dataset with {sorted(options)} ({exc}); "
            "use a dataset task (e.g. deepmath, math500) or leave those options out"
        ) from None
    problems = task.load()
    return problems, int(getattr(task, "skipped", 0))


def prepare(
    problems: Sequence[Any],
    *,
    input_key: str,
    label_key: str,
    where: Sequence[tuple[str, str, Any]] = (),
    limit: int | None = None,
    seed: int = 0,
    exclude: set[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows to write, and counts of what was left out (``filtered``, ``excluded``)."""
    from tasks.question_text import normalize_question

    known = sorted({key for p in problems for key in p.metadata})
    for field, _, _ in where:
        if field not in known:
            raise PrepareError(
                f"--where field {field!r} is not in the rows' metadata; they have: "
                f"{', '.join(known) or '(none)'}"
            )
    kept = [p for p in problems if all(_passes(p.metadata, w) for w in where)]
    filtered = len(problems) - len(kept)
    excluded = 0
    if exclude:
        before = len(kept)
        kept = [p for p in kept if normalize_question(p.question) not in exclude]
        excluded = before - len(kept)
    if limit is not None and limit < len(kept):
        kept = random.Random(seed).sample(kept, limit)
    rows = []
    for problem in kept:
        extra = {
            k: v
            for k, v in problem.metadata.items()
            if isinstance(v, str | int | float | bool) and k not in (input_key, label_key)
        }
        rows.append(
            {input_key: problem.question, label_key: problem.reference, "id": problem.id, **extra}
        )
    return rows, {"filtered": filtered, "excluded": excluded}


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` one JSON object per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def excluded_questions(paths: Sequence[str], key: str) -> set[str]:
    """Normalised questions (``key``, else ``question``/``problem``) of each file in ``paths``."""
    from tasks.question_text import normalize_question
    from tasks.sources import read_local

    found: set[str] = set()
    for path in paths:
        for row in read_local(path):
            text = next((row[k] for k in (key, "question", "problem") if row.get(k)), None)
            if isinstance(text, str):
                found.add(normalize_question(text))
    return found
