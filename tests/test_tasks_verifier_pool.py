"""The killable verifier pool: timeouts kill and replace workers, results match calls."""

from __future__ import annotations

import asyncio

import pytest
import tasks_pool_fns as fns

from tasks.verifier_pool import VerifierCrash, VerifierPool, VerifierTimeout


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(max_workers=2, timeout_s=2.0) as p:
        yield p


def test_result_comes_back(pool: VerifierPool) -> None:
    assert pool.run_sync(fns.square, 7) == 49


def test_sleeping_call_is_killed_and_pool_keeps_working(pool: VerifierPool) -> None:
    before = pool.timeouts
    with pytest.raises(VerifierTimeout):
        pool.run_sync(fns.sleep_forever)
    assert pool.timeouts == before + 1
    assert pool.run_sync(fns.square, 3) == 9


def test_busy_loop_is_killed(pool: VerifierPool) -> None:
    with pytest.raises(VerifierTimeout):
        pool.run_sync(fns.busy_loop)
    assert pool.run_sync(fns.square, 5) == 25


def test_exception_in_worker_is_reported(pool: VerifierPool) -> None:
    with pytest.raises(VerifierCrash, match="ValueError: broken input"):
        pool.run_sync(fns.fail, "broken input")
    assert pool.run_sync(fns.square, 2) == 4


def test_dead_worker_is_replaced(pool: VerifierPool) -> None:
    with pytest.raises(VerifierCrash, match="died"):
        pool.run_sync(fns.die)
    assert pool.run_sync(fns.square, 6) == 36


async def test_concurrent_async_calls_get_their_own_results(pool: VerifierPool) -> None:
    results = await asyncio.gather(*(pool.run(fns.square, i) for i in range(20)))
    assert results == [i * i for i in range(20)]


async def test_timeout_among_concurrent_calls_hits_only_that_call(pool: VerifierPool) -> None:
    calls = [pool.run(fns.square, i) for i in range(6)] + [pool.run(fns.sleep_forever)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:6] == [i * i for i in range(6)]
    assert isinstance(results[6], VerifierTimeout)


def test_closed_pool_refuses_calls() -> None:
    p = VerifierPool(max_workers=1, timeout_s=1.0)
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.run_sync(fns.square, 1)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        VerifierPool(max_workers=0)
    with pytest.raises(ValueError, match="context"):
        VerifierPool(context="fork")
