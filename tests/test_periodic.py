"""Periodic work never stops for good (issue 9, item 7).

:class:`dtsbridge.worker.Periodic` on a fake ``Clock``, then the worker's own
housekeeping driven by a fake ``Clock`` against a real redis-server whose keys
make every lease renewal fail with an error that is not "connection lost".
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.logger import LogLevel, capturedLogs

from dtsbridge import config as configmod
from dtsbridge.metrics import Metrics
from dtsbridge.users import Users
from dtsbridge.worker import Periodic, Running, Worker
from dtsbridge.store import Store, connect
from tests.redis_fixture import RedisProcess

pytestmark = pytest.mark.timeout(60)


def test_periodic_runs_at_every_tick_whatever_it_raises() -> None:
    clock = Clock()
    calls: list[float] = []

    async def coroutine_failure() -> None:
        raise KeyError("from a coroutine")

    def fn():
        calls.append(clock.seconds())
        n = len(calls)
        if n == 1:
            raise RuntimeError("raised")
        if n == 2:
            return defer.fail(ValueError("a failed Deferred"))
        if n == 3:
            return coroutine_failure()
        if n == 4:
            raise SystemError("any kind")
        return None

    p = Periodic("test task", 1.0, fn, clock)
    with capturedLogs() as events:
        p.startService()
        for _ in range(6):
            clock.advance(1.0)
    assert calls == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert p.running and p.failures == 0
    errors = [e for e in events if e.get("log_level") == LogLevel.critical or e.get("log_failure")]
    # one traceback for the streak of four failures, then one line when it works again
    assert len(errors) == 1 and errors[0]["log_failure"].check(RuntimeError), errors
    assert [e for e in events if "works again" in e.get("log_format", "")][0]["n"] == 4
    p.stopService()
    assert not p.running
    clock.advance(5)
    assert len(calls) == 7

    # what it replaces: a bare LoopingCall stops for good at the first failure
    bare: list[float] = []
    loop = LoopingCall(lambda: bare.append(1) or (_ for _ in ()).throw(RuntimeError("x")))
    loop.clock = clock
    loop.start(1.0).addErrback(lambda f: None)
    clock.advance(3)
    assert bare == [1] and not loop.running


def test_periodic_logs_a_long_streak_once_a_minute() -> None:
    clock = Clock()
    p = Periodic("failing task", 1.0, lambda: 1 / 0, clock)
    with capturedLogs() as events:
        p.startService()
        for _ in range(150):
            clock.advance(1.0)
    assert p.failures == 151 and p.running
    assert len([e for e in events if e.get("log_failure")]) == 1
    assert len([e for e in events if "still failing" in e.get("log_format", "")]) == 2


def test_periodic_first_run_one_interval_later_with_now_false() -> None:
    clock = Clock()
    calls: list[float] = []
    p = Periodic("later", 0.2, lambda: calls.append(clock.seconds()) or 1 / 0, clock, now=False)
    p.startService()
    assert calls == [] and p.running
    for _ in range(3):
        clock.advance(0.2)
    assert calls == pytest.approx([0.2, 0.4, 0.6]) and p.failures == 3  # failing runs: still ticking
    p.stopService()
    clock.advance(1)
    assert len(calls) == 3 and not p.running


async def real_sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_housekeeping_survives_any_redis_error(redis_proc: RedisProcess, tmp_path: Path) -> None:
    cfg = configmod.load(None, {"paths": {"dts_root": str(tmp_path / "dts"), "user_root": str(tmp_path / "users")},
                                "redis": {"url": redis_proc.url}, "copy": {"lease_seconds": "30"}}, environ={})
    store = Store(connect(redis_proc.url), reactor, prefix="pt", timeout=5, retention_s=60)
    clock = Clock()
    run = lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw)  # noqa: E731
    worker = Worker(cfg, store, Users(cfg, None, run), run, clock, Metrics(), on_ended=lambda job_id: None)
    try:
        # one job this process runs, one job waiting for a stager that will time out
        running = str(uuid.uuid4())
        await store.create_job(running, {"status": "SUBMITTED", "target_user": "alice"})
        assert await store.claim("tok", worker.holder, 30, "2026-01-01T00:00:00.000Z") == running
        worker.active[running] = Running(job_id=running, token="tok", started=0)
        staged = str(uuid.uuid4())
        await store.create_staging_job(staged, {"status": "STAGING", "target_user": "alice", "staging_timeout": "1"},
                                       0.5)
        # every lease renewal now fails with a Redis error that is not "unavailable"
        redis_proc.cli("DEL", "pt:active")
        redis_proc.cli("SET", "pt:active", "not a sorted set")

        with capturedLogs() as events:
            worker.startService()
            for _ in range(4):
                clock.advance(1.0)
                await real_sleep(0.3)
            assert worker.housekeeping.running and worker.housekeeping.runs >= 4, worker.housekeeping.runs
            assert worker.housekeeping.failures >= 3
            # the other steps ran even so: the staging timeout was applied
            assert (await store.get_job(staged)).status.value == "ERROR"
            # Redis fixed: renewals work again, nothing was lost
            redis_proc.cli("DEL", "pt:active")
            redis_proc.cli("ZADD", "pt:active", "1", running)
            for _ in range(3):
                clock.advance(1.0)
                await real_sleep(0.3)
        assert worker.housekeeping.failures == 0
        assert int(float(redis_proc.cli("ZSCORE", "pt:active", running))) > 1  # renewed
        failures = [e for e in events if e.get("log_failure") is not None
                    and "housekeeping" in e.get("task", "")]
        assert len(failures) == 1 and "WRONGTYPE" in str(failures[0]["log_failure"].value)
        assert any("works again" in e.get("log_format", "") for e in events)
    finally:
        worker.claims.stopService()
        worker.housekeeping.stopService()
        worker.active.clear()
        await store.close()
