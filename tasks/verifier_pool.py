"""A small pool of killable worker processes for verifiers that can hang.

Symbolic verifiers (sympy under math-verify) can run for minutes on adversarial
answers, and their own ``signal.alarm`` timeouts only work on the main thread.
A thread pool cannot stop such a call and ``concurrent.futures.ProcessPoolExecutor``
cannot kill one hung worker without breaking the whole executor. This pool owns
plain :mod:`multiprocessing` processes, one pipe each: a call that runs past
``timeout_s`` gets its worker killed and replaced, and the caller gets
:class:`VerifierTimeout`.

Workers start with the ``spawn`` context (callers run threads, and forking a
threaded process is unsafe). Functions and arguments must be picklable:
module-level functions only.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

#: How long a fresh worker may take to start and import its warm-up modules.
_STARTUP_TIMEOUT_S = 120.0


class VerifierTimeout(TimeoutError):
    """A call ran past the pool's per-call timeout; its worker was killed."""


class VerifierCrash(RuntimeError):
    """A call raised in the worker, or the worker process died."""


def _worker_main(conn: Connection, warmup_modules: Sequence[str]) -> None:
    """Worker loop: import the warm-up modules, then run calls until told to stop."""
    for name in warmup_modules:
        importlib.import_module(name)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, args = message
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - report everything to the caller
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, warmup_modules: Sequence[str]) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, tuple(warmup_modules)), daemon=True
        )
        self.process.start()
        child_conn.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the worker has imported its modules; raise if it does not."""
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            self.kill()
            raise VerifierCrash(f"verifier worker did not start within {timeout_s:.0f} s")
        try:
            tag, _ = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise VerifierCrash(f"verifier worker died while starting: {exc!r}") from exc
        if tag != "ready":
            self.kill()
            raise VerifierCrash(f"verifier worker sent {tag!r} instead of 'ready'")
        self.ready = True

    def kill(self) -> None:
        """Stop the process now (idempotent)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Ask the process to exit, killing it if it does not."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=2)
        self.kill()


class VerifierPool:
    """Run module-level functions in killable worker processes with a hard timeout.

    Safe to call from many threads (:meth:`run_sync`) and many asyncio tasks
    (:meth:`run`) at once; at most ``max_workers`` calls run at a time, the rest
    wait. The timeout counts from the moment a worker takes the call, so waiting
    for a free worker never times a call out.

    Args:
        max_workers: number of worker processes (started lazily).
        timeout_s: wall-clock limit of one call.
        warmup_modules: modules each worker imports before taking calls (so the
            first call does not pay the import inside its timeout).
        context: ``"spawn"`` or ``"forkserver"``.
    """

    def __init__(
        self,
        max_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        warmup_modules: Sequence[str] = (),
        context: str = "spawn",
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if context not in ("spawn", "forkserver"):
            raise ValueError(f"context must be 'spawn' or 'forkserver', got {context!r}")
        self.max_workers = max_workers
        self.timeout_s = float(timeout_s)
        self._warmup = tuple(warmup_modules)
        self._ctx = multiprocessing.get_context(context)
        self._idle: list[_Worker] = []
        self._live = 0  # workers started and not killed (idle + busy)
        self._cond = threading.Condition()
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        #: Calls that timed out (their workers were killed and replaced).
        self.timeouts = 0

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("VerifierPool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._live < self.max_workers:
                    self._live += 1
                    break
                self._cond.wait()
        # Start outside the lock: spawning takes a while and others may proceed.
        try:
            worker = _Worker(self._ctx, self._warmup)
            worker.wait_ready(_STARTUP_TIMEOUT_S)
        except BaseException:
            self._discard()
            raise
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed:
                worker.stop()
                self._live -= 1
            else:
                self._idle.append(worker)
            self._cond.notify()

    def _discard(self) -> None:
        with self._cond:
            self._live -= 1
            self._cond.notify()

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a worker; block until it returns.

        Raises:
            VerifierTimeout: the call ran past ``timeout_s`` (the worker was killed).
            VerifierCrash: ``fn`` raised (message carries the worker traceback) or the
                worker process died.
        """
        worker = self._acquire()
        try:
            worker.conn.send((fn, args))
            if not worker.conn.poll(self.timeout_s):
                raise VerifierTimeout(
                    f"{getattr(fn, '__name__', fn)} ran past {self.timeout_s:g} s; worker killed"
                )
            tag, payload = worker.conn.recv()
        except VerifierTimeout:
            self.timeouts += 1
            worker.kill()
            self._discard()
            raise
        except (EOFError, OSError) as exc:
            worker.kill()
            self._discard()
            raise VerifierCrash(f"verifier worker died: {exc!r}") from exc
        except BaseException:
            worker.kill()
            self._discard()
            raise
        self._release(worker)
        if tag == "error":
            raise VerifierCrash(payload)
        return payload

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Like :meth:`run_sync`, awaited without blocking the event loop."""
        with self._cond:
            if self._executor is None:
                # Dedicated threads: waiting calls never starve asyncio's default executor.
                self._executor = ThreadPoolExecutor(
                    max_workers=self.max_workers, thread_name_prefix="verifier-pool"
                )
            executor = self._executor
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.run_sync, fn, *args)

    def close(self) -> None:
        """Stop every worker (idempotent); later calls raise ``RuntimeError``."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            executor, self._executor = self._executor, None
            self._cond.notify_all()
        for worker in idle:
            worker.stop()
        if executor is not None:
            executor.shutdown(wait=False)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort: daemon workers also die with the parent.
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
