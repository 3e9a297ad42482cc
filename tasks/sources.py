"""Reading dataset rows from Hugging Face by name or from local JSONL/parquet files.

Every dataset-backed task goes through :func:`load_rows` and :func:`build_problems`,
so errors read the same everywhere: a missing file, split or column names itself
and lists what exists; an unreachable or gated Hugging Face dataset says how to
provide a local file instead; a malformed row is skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks.base import Problem

logger = logging.getLogger(__name__)


class DatasetUnavailable(RuntimeError):
    """A Hugging Face dataset could not be loaded (offline, gated, missing)."""


def local_file_hint(columns: Iterable[str]) -> str:
    """The sentence that tells a user how to provide a dataset as a local file."""
    cols = ", ".join(columns)
    return (
        f"provide a local file instead: path='data.jsonl' (one JSON object per line) or "
        f"path='data.parquet', with columns {cols} (rename them with columns={{...}})"
    )


def read_local(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl``/``.json`` or ``.parquet`` file.

    A JSONL line that is not a JSON object is kept as ``{}`` so that it is counted
    as a malformed row rather than aborting the load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return [row if isinstance(row, dict) else {} for row in json.loads(text)]
        rows: list[dict[str, Any]] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = {}
            rows.append(row if isinstance(row, dict) else {})
        return rows
    raise ValueError(
        f"dataset file '{path}' has suffix '{suffix}'; expected .jsonl, .json or .parquet"
    )


def read_hub(
    name: str,
    *,
    config: str | None,
    split: str,
    hint_columns: Iterable[str],
    data_files: str | list[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of one split of a Hugging Face dataset (downloads unless cached)."""
    import datasets

    hint = local_file_hint(hint_columns)
    try:
        data = datasets.load_dataset(name, config, data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all say the same
        raise DatasetUnavailable(
            f"could not load Hugging Face dataset '{name}'"
            + (f" (config '{config}')" if config else "")
            + f": {type(exc).__name__}: {exc}. If it is gated, accept its terms on the hub and "
            f"log in (huggingface-cli login); if offline, {hint}"
        ) from exc
    if split not in data:
        raise ValueError(
            f"dataset '{name}' has no split '{split}'; it has: {', '.join(data.keys())}"
        )
    return data[split].to_list()


def check_columns(rows: list[dict[str, Any]], required: Mapping[str, str], source: str) -> None:
    """Raise naming the missing column and listing those that exist.

    ``required`` maps our field name (``question``) to the dataset column (``problem``).
    """
    present: set[str] = set()
    for row in rows:
        present.update(row)
    for field, column in required.items():
        if column not in present:
            raise ValueError(
                f"{source} has no column '{column}' (needed for {field}); "
                f"it has: {', '.join(sorted(present)) or '(no columns)'}; "
                f"map another column with columns={{'{field}': ...}}"
            )


def build_problems(
    rows: Iterable[dict[str, Any]],
    make_problem: Callable[[int, dict[str, Any]], Problem],
    source: str,
) -> tuple[list[Problem], int]:
    """Turn rows into problems; rows that fail are skipped, counted and logged once.

    Returns the problems and the count of skipped rows, which the task keeps as
    :attr:`tasks.base.Task.skipped` (evaluation results report it).
    """
    problems: list[Problem] = []
    skipped = 0
    first_error = ""
    seen_ids: set[str] = set()
    for index, row in enumerate(rows):
        try:
            problem = make_problem(index, row)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            skipped += 1
            first_error = first_error or f"row {index}: {type(exc).__name__}: {exc}"
            continue
        if problem.id in seen_ids:  # ids must be unique for grouping and resuming
            problem = problem.model_copy(update={"id": f"{problem.id}#{index}"})
        seen_ids.add(problem.id)
        problems.append(problem)
    if skipped:
        logger.warning(
            "%s: skipped %d malformed row(s) of %d (first: %s)",
            source,
            skipped,
            skipped + len(problems),
            first_error,
        )
    return problems, skipped


def required_text(row: Mapping[str, Any], column: str) -> str:
    """A non-empty text cell (numbers are converted); raises ValueError otherwise."""
    value = row.get(column)
    if isinstance(value, bool) or value is None:
        raise ValueError(f"column '{column}' is {value!r}; expected text")
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column '{column}' is {value!r}; expected non-empty text")
    return value.strip()


def load_rows(
    *,
    source_name: str,
    path: str | Path | None,
    hf_name: str | None,
    hf_config: str | None,
    split: str,
    columns: Mapping[str, str],
    required: Iterable[str],
    data_files: str | list[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows from ``path`` when given, else from the hub; required columns checked.

    Args:
        source_name: the task name, used in messages.
        columns: our field name -> dataset column name.
        required: the fields whose columns must exist.
    """
    required_map = {field: columns[field] for field in required}
    if path is not None:
        rows = read_local(path)
        where = f"dataset file '{path}'"
    elif hf_name is not None:
        rows = read_hub(
            hf_name,
            config=hf_config,
            split=split,
            hint_columns=required_map.values(),
            data_files=data_files,
        )
        where = f"dataset '{hf_name}' split '{split}'"
    else:
        raise ValueError(f"task '{source_name}' needs path=... or a Hugging Face dataset name")
    check_columns(rows, required_map, where)
    return rows
