"""How an embedded run stops before its last step, and says what it left on disk.

A run must not end looking like a success when it is not, nor lose what it finished:

- before the first step, :func:`check_backends` probes every remote backend (one greedy
  token with a fixed seed, so the run's sampling is unchanged) and raises
  :class:`BackendFailure` naming what is down;
- after each rollout, :func:`failure_reason` compares the step's failures with
  ``train.max_error_rate`` and ``train.max_agent_error_rate``;
- :class:`StopRequest` turns SIGINT and SIGTERM into :class:`TrainingInterrupted`.

On each stop the trainer checkpoints the last completed step unless it is on disk
already, and the message names the files (:func:`what_is_saved`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agents.llm_agent import probe_backend
from aipo_env.trajectory import Trajectory, read_jsonl
from trainers.summary import AGENT_FAILURES, consult_error_kind

if TYPE_CHECKING:
    from agents.pool import AgentPool
    from policies.base import Generator
    from trainers.config import TrainConfig, TrainSection

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a backend has to answer its one-token probe before the first step.
PROBE_TIMEOUT_S = 120.0


class StoppedRun(Protocol):
    """What a stop's message reads of a run (:class:`trainers.run_state.RunState` has it).

    A structural type: the run's state imports this module (its probes and errors).
    """

    @property
    def config(self) -> TrainConfig:
        """The run's training config."""

    @property
    def run_dir(self) -> Path:
        """Where the run writes."""

    @property
    def completed_step(self) -> int:
        """Steps whose update is applied and logged."""

    @property
    def saved_path(self) -> Path | None:
        """The newest checkpoint's directory, if any."""


class TrainingStopped(RuntimeError):
    """The run ended before ``train.steps``; the message says why and what is on disk.

    ``completed_step``: steps whose update was applied and logged; ``checkpoint``: the
    checkpoint of that step (None when no step completed).
    """

    def __init__(self, message: str, *, completed_step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.completed_step = completed_step
        self.checkpoint = checkpoint


class BackendFailure(TrainingStopped):
    """A backend failed its probe before the first step, or a step's failures passed
    ``train.max_error_rate`` or ``train.max_agent_error_rate``."""


class TrainingInterrupted(TrainingStopped):
    """SIGINT or SIGTERM stopped the run (``signal``); the exit status is 128 + its number."""

    signal: signal.Signals

    def __init__(
        self,
        message: str,
        *,
        stopped_by: signal.Signals,
        completed_step: int,
        checkpoint: Path | None,
    ) -> None:
        super().__init__(message, completed_step=completed_step, checkpoint=checkpoint)
        self.signal = stopped_by


class StopRequest:
    """SIGINT and SIGTERM during training: stop at the next safe point instead of dying.

    The first signal is remembered and cancels the work running under
    :meth:`abandonable` (a step's rollout, a held-out evaluation): the trajectories
    already finished are on disk, and the rest are replayed, with the same seeds, on
    ``--resume``. An update in progress runs to its end, so the weights are always
    those of a completed step. A second signal gets the default behaviour (Ctrl-C
    raises KeyboardInterrupt at once; SIGTERM ends the process).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abandonable: set[asyncio.Future[Any]] = set()

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signal is not None

    def install(self) -> None:
        """Handle the signals in the running event loop (main thread only; else a no-op)."""
        loop = asyncio.get_running_loop()
        try:
            for sig in self.SIGNALS:
                loop.add_signal_handler(sig, self._received, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, no Unix
            logger.debug("signals are not handled here; an interrupt stops the run at once")
            for sig in self.SIGNALS:
                loop.remove_signal_handler(sig)
            return
        self._loop = loop

    def uninstall(self) -> None:
        """Give the signals their default behaviour back (idempotent)."""
        if self._loop is not None:
            for sig in self.SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None

    def _received(self, sig: signal.Signals) -> None:
        self.signal = signal.Signals(sig)
        logger.warning(
            "received %s: stopping after saving what can be saved (send it again to stop at once)",
            self.signal.name,
        )
        self.uninstall()
        for task in self._abandonable:
            task.cancel()

    async def abandonable(self, work: Coroutine[Any, Any, T]) -> T | None:
        """Run ``work``; None, with ``work`` cancelled, when a stop signal arrives first."""
        if self.requested:
            work.close()
            return None
        task = asyncio.ensure_future(work)
        self._abandonable.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            if self.requested and task.cancelled():
                return None
            raise
        finally:
            self._abandonable.discard(task)


async def check_backends(
    config: TrainConfig, generator: Generator, agents: AgentPool | None
) -> None:
    """Fail before the first step when a remote policy backend or an agent's backend is down.

    Each answers a one-token greedy probe with a fixed seed (no random state drawn, no
    session cached). The embedded policy generator runs the trainer's own module in this
    process and is not probed: its failures end episodes as ``error:<kind>``, which
    ``train.max_error_rate`` catches after the first rollout.

    Raises:
        BackendFailure: naming the policy backend, or each agent that is down and why.
    """
    if config.policy.backend != "embedded":
        error = await probe_backend(generator, PROBE_TIMEOUT_S)
        if error is not None:
            raise BackendFailure(
                f"the policy backend {config.policy.backend} failed its health check before the "
                f"first step: {error}",
                completed_step=0,
                checkpoint=None,
            )
    down = await agents.probe(skip=(generator,)) if agents is not None else {}
    if down:
        backends = {
            name: agent.base_url if agent.kind == "openai" else agent.backend
            for name, agent in config.agents.agents.items()
        }
        detail = "; ".join(
            f"{name} (backend {backends.get(name, '?')}): {error}" for name, error in down.items()
        )
        raise BackendFailure(
            f"agents down before the first step: {detail}. Fix their backends "
            "(agents.agents.<name>.backend, or base_url and model for kind openai) or leave "
            "them out of the run",
            completed_step=0,
            checkpoint=None,
        )


def _shares(metrics: dict[str, float], prefix: str) -> str:
    """``kind 40%, kind 10%`` from the metrics named ``<prefix><kind>``."""
    return ", ".join(
        f"{key.removeprefix(prefix)} {value:.0%}"
        for key, value in metrics.items()
        if key.startswith(prefix)
    )


def failure_reason(
    trajectories: list[Trajectory], metrics: dict[str, float], cfg: TrainSection
) -> str | None:
    """Why this step's failures stop the run; None while they stay within the thresholds.

    ``train.max_error_rate`` bounds the share of trajectories that ended in
    ``error:<kind>``; ``train.max_agent_error_rate`` the share of consults that reached an
    agent and failed (:data:`trainers.summary.AGENT_FAILURES`).
    """
    error_rate = metrics.get("finish_error", 0.0)
    if error_rate > cfg.max_error_rate:
        kinds = _shares(metrics, "errors/")
        first = next(t for t in trajectories if t.finish_reason.startswith("error:"))
        return (
            f"{error_rate:.0%} of its trajectories ended in error ({kinds}), above "
            f"train.max_error_rate={cfg.max_error_rate:g}; the first: "
            f"{first.finish_reason}: {first.error}"
        )
    agent_rate = metrics.get("agent_error_rate", 0.0)
    if agent_rate > cfg.max_agent_error_rate:
        kinds = _shares(metrics, "consult_errors/")
        first = next(
            turn.consult.error
            for t in trajectories
            for turn in t.turns
            if turn.consult is not None
            and turn.consult.error is not None
            and consult_error_kind(turn.consult.error) in AGENT_FAILURES
        )
        return (
            f"{agent_rate:.0%} of the consults that reached an agent failed (of all consults: "
            f"{kinds}), above train.max_agent_error_rate={cfg.max_agent_error_rate:g}; the "
            f"first: {first}"
        )
    return None


def what_is_saved(run: StoppedRun, in_progress: int | None, saved_now: bool) -> str:
    """What a stopped run left on disk, one indented line per item.

    ``in_progress``: the index of the step whose rollout was running, if any;
    ``saved_now``: whether the last completed step was checkpointed on the way out.
    """
    lines = []
    if in_progress is not None:
        path = run.run_dir / "rollouts" / f"step_{in_progress:06d}.jsonl"
        finished = len(read_jsonl(path)) if path.is_file() else 0
        planned = run.config.train.prompts_per_step * run.config.rollout.n_samples
        lines.append(
            f"step {in_progress + 1}: {finished} of its {planned} trajectories had finished, "
            f"kept in {path}"
        )
    if run.completed_step == 0:
        lines.append("no step had completed: no checkpoint was saved")
    else:
        when = "checkpointed now in" if saved_now else "checkpointed in"
        lines.append(f"step {run.completed_step}, the last completed: {when} {run.saved_path}")
    return "".join(f"\n  {line}" for line in lines)


def interrupted(
    run: StoppedRun, stop: StopRequest, in_progress: int | None, *, saved_now: bool
) -> TrainingInterrupted:
    """The :class:`TrainingInterrupted` of the signal ``stop`` received."""
    assert stop.signal is not None
    steps = run.config.train.steps
    where = (
        f"during step {in_progress + 1} of {steps}"
        if in_progress is not None
        else f"after step {run.completed_step} of {steps}"
    )
    return TrainingInterrupted(
        f"stopped by {stop.signal.name} {where}.{what_is_saved(run, in_progress, saved_now)}",
        stopped_by=stop.signal,
        completed_step=run.completed_step,
        checkpoint=run.saved_path if run.completed_step else None,
    )


def backend_failure(run: StoppedRun, step: int, reason: str, *, saved_now: bool) -> BackendFailure:
    """The :class:`BackendFailure` of step index ``step``, whose failures passed a threshold."""
    return BackendFailure(
        f"step {step + 1} of {run.config.train.steps} stopped the run, untrained: {reason}."
        f"{what_is_saved(run, step, saved_now)}",
        completed_step=run.completed_step,
        checkpoint=run.saved_path if run.completed_step else None,
    )
