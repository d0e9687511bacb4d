"""The request and worker sides assembled in the test process, as ``tap`` does, on a private Redis.

Time comes from a :class:`ClockReactor` (a ``Clock`` the test advances); blocking work
runs in real threads (``deferToThread``), and what the copy engine's threads hand
back to the reactor reaches the real one.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet import reactor, threads
from twisted.internet.task import Clock

from dtsbridge import auth, config as configmod, engine
from dtsbridge.jobs import Jobs, Waiters
from dtsbridge.metrics import Metrics
from dtsbridge.store import Store, connect
from dtsbridge.users import Users
from dtsbridge.worker import Worker


class ClockReactor(Clock):
    """Time from a ``Clock``; calls from other threads (the copy engine's) reach the real reactor."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        reactor.callFromThread(f, *args, **kwargs)


@attrs.define
class Parts:
    clock: ClockReactor
    store: Store
    users: Users
    worker: Worker
    jobs: Jobs
    dts: Path
    user_root: Path
    metrics: Metrics

    async def close(self) -> None:
        for p in (self.worker.claims, self.worker.housekeeping):
            if p.running:
                p.stopService()
        await self.store.close()


def make_parts(tmp_path: Path, redis_url: str, settings: dict[str, dict[str, str]] | None = None,
               faults: engine.Faults = engine.Faults()) -> Parts:
    dts, users = tmp_path / "dts", tmp_path / "users"
    dts.mkdir()
    (users / "alice").mkdir(parents=True)
    (users / "bob").mkdir()
    overrides: dict[str, dict[str, str]] = {"paths": {"dts_root": str(dts), "user_root": str(users)},
                                            "redis": {"url": redis_url}}
    for section, values in (settings or {}).items():
        overrides.setdefault(section, {}).update(values)
    cfg = configmod.load(None, overrides, environ={})
    clock = ClockReactor()
    store = Store(connect(redis_url), reactor, prefix=f"t{uuid.uuid4().hex[:6]}", timeout=5, retention_s=600)
    metrics = Metrics()
    policy = Users(cfg, auth.DirectoryUsers(str(users), threads.deferToThread), threads.deferToThread)
    waiters = Waiters()
    worker = Worker(cfg, store, policy, threads.deferToThread, clock, metrics, on_ended=waiters.notify,
                    faults=faults)
    jobs = Jobs(cfg, store, policy, threads.deferToThread, worker, waiters, clock, metrics)
    return Parts(clock, store, policy, worker, jobs, dts, users, metrics)
