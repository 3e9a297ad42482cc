"""A run's training set and held-out set, built by one function for every trainer, and checked.

``task.held_out`` says how the two are kept apart (``trainers/config.py``
``TaskSection``):

- ``partition`` (the default): both are sides of one partition of the task's content
  (:mod:`tasks.splits`). Training is the task built with ``task.kwargs`` keeping the
  train side; the held-out set is the task built with ``task.kwargs`` and
  ``task.eval_kwargs`` keeping the held-out side (``task.held_out_fraction`` of the
  content space). No question can be on both.
- ``task``: the held-out set is another task (``task.eval_name``) or another split of
  the same one, unfiltered: a dataset trained on one file and evaluated on another.

Either way :func:`make_tasks` measures the overlap by content key before any model
loads and refuses a held-out set that overlaps training unless ``task.allow_overlap``,
and a held-out set with fewer distinct problems than asked (never a smaller or
overlapping one in silence). The consult warm-up draws its problems from the training
task, so it is covered by the same split. ILR's validation set is held out the same
way (:func:`validation_task`, ``trainers/peer_trainer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.base import Task
from tasks.splits import Overlap, SplitTask, measure_overlap
from trainers.config import TaskSection

#: Where a run writes its held-out report (read back by ``trainers.summary.summarize``).
HELD_OUT_FILE = "held_out.json"


class HeldOutError(ValueError):
    """The held-out set overlaps training, or has fewer distinct problems than asked."""


@dataclass
class TaskSplit:
    """The training task, the held-out task and what measuring them found."""

    task: Task  #: the training problems (a train-side :class:`~tasks.splits.SplitTask`)
    eval_task: Task | None  #: the held-out problems, exactly eval_size; None when it is 0
    overlap: Overlap | None  #: held-out against training; None without a held-out set

    def report(self, cfg: TaskSection) -> dict[str, Any]:
        """What the run's summary says about its held-out set (``held_out.json``)."""
        out: dict[str, Any] = {
            "mode": cfg.held_out,
            "fraction": cfg.held_out_fraction if cfg.held_out == "partition" else None,
            "allow_overlap": cfg.allow_overlap,
            "train_problems": len(self.task),
        }
        if self.overlap is not None:
            out.update(self.overlap.model_dump())
        return out


def _make(name: str, kwargs: dict[str, Any]) -> Task:
    from tasks.registry import make_task

    return make_task(name, **kwargs)


def make_train_task(cfg: TaskSection) -> Task:
    """The training task: the train side of the partition, or the whole task under ``held_out: task``.

    A dataset's repeated questions are dropped (and counted in ``duplicates``); a
    generated task keeps its repeated draws (training on a question twice is fine).
    """
    base = _make(cfg.name, cfg.kwargs)
    fraction = cfg.held_out_fraction if cfg.held_out == "partition" else None
    return SplitTask(base, "train", fraction, dedupe=not base.generated)


def _source(task: Task, kwargs: dict[str, Any]) -> str:
    """How a task's problems came about, for a message: 'generated with seed 10000'."""
    seed = getattr(task, "seed", None)
    if task.generated and seed is not None:
        return f"generated with seed {seed}"
    shown = ", ".join(f"{k}: {v}" for k, v in kwargs.items())
    return f"problems of the task built with {{{shown}}}"


def held_out_set(
    cfg: TaskSection,
    train: Task,
    *,
    overrides: dict[str, Any],
    size: int,
    fields: tuple[str, str] = ("task.eval_size", "task.eval_kwargs"),
) -> tuple[SplitTask, Overlap]:
    """``size`` distinct held-out problems and their overlap with ``train``; refused when they do not exist or overlap.

    ``overrides`` go over ``task.kwargs`` (``task.eval_kwargs``, or ILR's
    ``peers.validation_kwargs``); ``fields`` name the size and overrides in messages.

    Raises:
        HeldOutError: fewer than ``size`` distinct problems on the held-out side (both
            numbers and what to change), or an overlap with ``allow_overlap`` off (the
            count, two examples and the fix).
    """
    size_field, kwargs_field = fields
    if cfg.held_out == "partition":
        name, kwargs, fraction = cfg.name, {**cfg.kwargs, **overrides}, cfg.held_out_fraction
    else:
        name = cfg.eval_name or cfg.name
        # Another task gets only its own arguments; the same task, its training ones too.
        kwargs = {**cfg.kwargs, **overrides} if name == cfg.name else dict(overrides)
        fraction = None
    base = _make(name, kwargs)
    held = SplitTask(base, "held_out", fraction, limit=size)
    problems = held.problems
    if held.available < size:
        held.close()
        side = "the held-out side has" if fraction is not None else "the held-out task has"
        fix = (
            f"lower {size_field}, raise {kwargs_field}.size or task.held_out_fraction"
            if fraction is not None
            else f"lower {size_field}, or give the held-out task more problems ({kwargs_field})"
        )
        raise HeldOutError(
            f"task {name}: {size_field.rpartition('.')[2]} {size} but {side} only "
            f"{held.available} distinct problems (of {len(base.problems)} {_source(base, kwargs)}); "
            f"{fix}"
        )
    overlap = measure_overlap(
        train.problems, problems, held.content_key, train_key_fn=train.content_key
    )
    overlap = overlap.model_copy(
        update={
            "held_out_duplicates": held.duplicates,
            "train_duplicates": getattr(train, "duplicates", 0),
        }
    )
    if overlap.count and not cfg.allow_overlap:
        held.close()
        examples = "; ".join(repr(e) for e in overlap.examples[:2])
        raise HeldOutError(
            f"task {name}: {overlap.count} of {overlap.held_out} held-out problems "
            f"({size_field.rpartition('.')[2]}) also occur in training, e.g. {examples}; "
            "their accuracy would measure memory, not reasoning. Set task.held_out: partition "
            "to split the task's questions by content, or task.allow_overlap: true to proceed "
            "knowingly (the summary then reports the overlap)"
        )
    return held, overlap


def make_tasks(cfg: TaskSection) -> TaskSplit:
    """Both sides of a run, measured and checked (module docstring); call it before any model loads.

    Raises:
        HeldOutError: see :func:`held_out_set`.
    """
    task = make_train_task(cfg)
    if not task.problems:
        raise HeldOutError(
            f"task {cfg.name}: the training side has no problems (of "
            f"{len(task.base.problems) if isinstance(task, SplitTask) else 0}); raise "
            "task.kwargs.size or lower task.held_out_fraction"
        )
    if not cfg.eval_size:
        return TaskSplit(task=task, eval_task=None, overlap=None)
    try:
        eval_task, overlap = held_out_set(cfg, task, overrides=cfg.eval_kwargs, size=cfg.eval_size)
    except BaseException:
        task.close()
        raise
    return TaskSplit(task=task, eval_task=eval_task, overlap=overlap)


def validation_task(cfg: TaskSection, *, overrides: dict[str, Any], size: int) -> Task:
    """ILR's validation split (``peers.validation_kwargs``, ``peers.validation_size``), held out like the evaluation set.

    Checked against the training set and refused on overlap unless ``task.allow_overlap``.
    Under ``task.held_out: partition`` it lies on the held-out side, as the evaluation set
    does: the two may share questions, neither shares any with training.
    """
    train = make_train_task(cfg)
    try:
        task, _ = held_out_set(
            cfg,
            train,
            overrides=overrides,
            size=size,
            fields=("peers.validation_size", "peers.validation_kwargs"),
        )
    finally:
        train.close()
    return task
