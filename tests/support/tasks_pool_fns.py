"""Module-level functions for verifier-pool tests (spawned workers import them by name)."""

from __future__ import annotations

import os
import time


def square(x: int) -> int:
    """Return x squared."""
    return x * x


def sleep_forever() -> None:
    """Never return (the pool must kill the worker)."""
    while True:
        time.sleep(3600)


def busy_loop() -> None:
    """Spin on the CPU without returning."""
    while True:
        pass


def fail(message: str) -> None:
    """Raise a ValueError carrying ``message``."""
    raise ValueError(message)


def die() -> None:
    """Exit the worker process abruptly."""
    os._exit(3)


def sleep_forever_2(gold: str, answer: str) -> None:
    """Stand-in for a verifier that hangs on (gold, answer)."""
    sleep_forever()
