"""The worker side (:class:`dtsbridge.worker.Worker`) on its own: real Redis, real copies, a ``Clock``.

Its timers are ``TimerService``s whose runs catch and log (:class:`dtsbridge.worker.Periodic`;
more in test_periodic.py); here: a job goes claim -> copy -> finish and wakes its waiter,
housekeeping ends a staging job on time and a run that raises does not stop it, and
stopping the service drains (a running copy is handed back, nothing left behind).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from dtsbridge import engine, errors
from dtsbridge.model import Status
from tests.harness import leftovers, make_tree, tree_of
from tests.inprocess import Parts, make_parts
from tests.redis_fixture import RedisProcess

pytestmark = pytest.mark.timeout(60)


@pytest_twisted.async_yield_fixture
async def parts(tmp_path: Path, redis_proc: RedisProcess) -> AsyncIterator[Parts]:
    p = make_parts(tmp_path, redis_proc.url, {"copy": {"lease_seconds": "30"}})
    yield p
    await p.close()


async def real_sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_claim_copy_finish_wakes_the_waiter(parts: Parts) -> None:
    tree = {"a.txt": b"alpha", "sub": {"b.bin": os.urandom(70_000)}}
    make_tree(parts.dts / "one", tree)
    # Not started: no timer runs. Submitting wakes the worker, which claims and copies at once.
    job, created = await parts.jobs.submit("alice", "one", "dts")
    assert created and job.status in (Status.SUBMITTED, Status.TRANSFERRING)  # claimed at once
    done = await parts.jobs.wait(job.job_id)  # woken by the worker's on_ended, not by a timeout
    assert parts.clock.seconds() == 0  # no time passed on the clock: nothing waited on a timer
    assert done.status == Status.SUCCESS, done.detailed_status
    assert done.public()["path"] == "/alice/one"
    assert tree_of(parts.user_root / "alice" / "one") == tree_of(parts.dts / "one")
    assert leftovers(parts.user_root) == []
    assert parts.worker.active == {}
    assert await parts.store.active_holders() == []
    assert parts.metrics.render().count(b"dtsbridge_jobs_finished") >= 1


@pytest_twisted.ensureDeferred
async def test_housekeeping_ends_a_staging_job_on_time_and_survives_a_failing_run(parts: Parts) -> None:
    worker = parts.worker
    make_tree(parts.dts / "stage", {"f.txt": b"x"})
    job, _ = await parts.jobs.submit_staging("alice", "stage", "dts", 1)
    waiter = ensureDeferred(parts.jobs.wait(job.job_id))

    # one housekeeping step raises something unexpected on every run for a while
    real_trim = parts.store.trim
    failing = [True]

    async def trim(*args: object, **kwargs: object) -> tuple[int, int]:
        if failing[0]:
            raise RuntimeError("a bug in a step")
        return await real_trim(*args, **kwargs)  # type: ignore[arg-type]

    parts.store.trim = trim  # type: ignore[method-assign]
    with capturedLogs() as events:
        assert not worker.recovered  # /healthz says "starting" until the start-up recovery ran
        worker.startService()
        assert worker.claims.running and worker.housekeeping.running
        await real_sleep(1.2)  # the staging deadline passes (Redis keeps real time)
        for _ in range(3):
            parts.clock.advance(1.0)
            await real_sleep(0.2)
        assert worker.housekeeping.running and worker.housekeeping.failures >= 2
        assert worker.recovered
        ended = await waiter  # the sweep ended it and woke the waiter
        assert ended.status == Status.ERROR and ended.reason == errors.STAGING_TIMEOUT
        failing[0] = False
        parts.clock.advance(1.0)
        await real_sleep(0.2)
        assert worker.housekeeping.failures == 0 and worker.housekeeping.running
    logged = [e for e in events if e.get("log_failure") is not None]
    assert len(logged) == 1 and logged[0]["log_failure"].check(RuntimeError)


@pytest_twisted.ensureDeferred
async def test_stopping_hands_a_running_copy_back(tmp_path: Path, redis_proc: RedisProcess) -> None:
    """``drain`` (what ``stopService`` runs): no more claims; a copy still running after the grace is
    handed back to the queue and leaves nothing behind. The copy is held by a fault pause handed in."""
    parts = make_parts(tmp_path, redis_proc.url, faults=engine.Faults.parse("copy:2"))
    worker = parts.worker
    try:
        worker.startService()
        make_tree(parts.dts / "big", {"f.bin": os.urandom(1 << 20)})
        job, _ = await parts.jobs.submit("alice", "big", "dts")
        await real_sleep(0.5)
        assert job.job_id in worker.active
        started = time.monotonic()
        drained = ensureDeferred(worker.drain(grace=0))
        while not drained.called and time.monotonic() - started < 10:  # the drain's pauses are on the clock
            parts.clock.advance(0.1)
            await real_sleep(0.05)
        assert drained.called
        await drained
        assert worker.draining and not worker.claims.running and not worker.housekeeping.running
        after = await parts.store.get_job(job.job_id)
        assert after is not None and after.status == Status.SUBMITTED, after
        assert "handed back" in after.detailed_status
        assert leftovers(parts.user_root) == [] and not (parts.user_root / "alice" / "big").exists()
        assert worker.active == {}
        with pytest.raises(errors.Draining):
            await parts.jobs.submit("alice", "big", "dts")
    finally:
        await parts.close()
