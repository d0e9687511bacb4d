"""The store's job-lifecycle scripts against a private redis-server (issue 9).

Retention (every key that names an ended job expires with it, the index is
trimmed), a staging job and its deadline made in one step, and release /
recovery sharing one requeue that keeps a job's publish record.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from dtsbridge.model import Status
from dtsbridge.store import WATCH_MARK_MS, AlreadyEnded, Folder, Publishing, Release, Store, WatchMark, connect
from tests.redis_fixture import RedisProcess

pytestmark = pytest.mark.timeout(60)

P = "t"
MARK = WATCH_MARK_MS  # a watcher's mark of a done folder lives this long unrenewed (retention is shorter here)
T = "2026-01-01T00:00:00.000Z"


def fields(user: str = "alice", status: str = "SUBMITTED", **extra: str) -> dict[str, str]:
    return {"status": status, "target_user": user, "time_" + status.lower(): T, **extra}


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def keys(redis_proc: RedisProcess) -> set[str]:
    return set(redis_proc.cli("--scan", "--pattern", f"{P}:*").split())


def pttl(redis_proc: RedisProcess, key: str) -> int:
    return int(redis_proc.cli("PTTL", key))


def hget(redis_proc: RedisProcess, job_id: str, field: str) -> str:
    return redis_proc.cli("HGET", f"{P}:job:{job_id}", field)


def index(redis_proc: RedisProcess, name: str = "jobs") -> list[str]:
    return redis_proc.cli("ZRANGE", f"{P}:{name}", "0", "-1").split()


def fkey(folder: Folder) -> str:
    return f"{P}:folder:{folder.user}:{folder.rel}"


def new_store(redis_proc: RedisProcess, retention_s: float) -> Store:
    return Store(connect(redis_proc.url), reactor, prefix=P, timeout=5, retention_s=retention_s)


@pytest_twisted.ensureDeferred
async def test_every_way_of_ending_forgets_the_job_and_what_names_it(redis_proc: RedisProcess) -> None:
    store = new_store(redis_proc, 1.5)
    try:
        ended: list[str] = []
        # (a) a copy that succeeds: job and folder key expire together; the watcher's mark
        # outlives them (the folder may stay in the DTS area: it must not be delivered again)
        a = str(uuid.uuid4())
        fa = Folder("alice", "alice/dts-a")
        assert await store.create_job(a, fields(), fa) == (True, a)
        await store.watched_done("alice/dts-a", a)
        assert pttl(redis_proc, f"{P}:job:{a}") == -1  # live: kept
        assert MARK - 5000 < pttl(redis_proc, f"{P}:watched:alice/dts-a") <= MARK
        assert await store.claim("tok-a", "h:1", 30, T) == a
        assert await store.record_result(a, "tok-a", Status.SUCCESS, T, {"path": "/alice/dts-a"}) == Status.SUCCESS
        for key in (f"{P}:job:{a}", fkey(fa)):
            assert 0 < pttl(redis_proc, key) <= 1500, key
        assert MARK - 5000 < pttl(redis_proc, f"{P}:watched:alice/dts-a") <= MARK
        ended.append(a)
        # (b) cancelled while queued
        b = str(uuid.uuid4())
        fb = Folder("alice", "alice/dts-b")
        await store.create_job(b, fields(), fb)
        await store.cancel_job(b, T, "cancelled on request")
        assert 0 < pttl(redis_proc, f"{P}:job:{b}") <= 1500 and 0 < pttl(redis_proc, fkey(fb)) <= 1500
        ended.append(b)
        # (c) a stager that reports failure, (d) a stager that never reports
        c, d = str(uuid.uuid4()), str(uuid.uuid4())
        await store.create_staging_job(c, fields(status="STAGING", authcode_hash="h"), 3600)
        await store.create_staging_job(d, fields(status="STAGING", authcode_hash="h2"), 0.2)
        await store.finish_staging(c, "h", False, T, {"detailed_status": "tape lost"})
        await sleep(0.3)
        assert await store.sweep_staging(T) == [d]
        for j in (c, d):
            assert 0 < pttl(redis_proc, f"{P}:job:{j}") <= 1500
            assert redis_proc.cli("HGET", f"{P}:job:{j}", "authcode_hash") == ""
        ended += [c, d]
        # (e) a job created already ended (a watched folder that is refused), then its mark
        e = str(uuid.uuid4())
        await store.create_job(e, fields(status="ERROR", reason="user_not_found"), enqueue=False)
        await store.watched_done("nobody/dts-e", e)
        assert 0 < pttl(redis_proc, f"{P}:job:{e}") <= 1500
        assert MARK - 5000 < pttl(redis_proc, f"{P}:watched:nobody/dts-e") <= MARK
        await store.watched_gone("nobody/dts-e")  # the folder left the DTS area: forgotten after the retention
        assert 0 < pttl(redis_proc, f"{P}:watched:nobody/dts-e") <= 1500
        ended.append(e)
        # (f) cancelled while a worker holds it: kept until the worker lets go
        f = str(uuid.uuid4())
        await store.create_job(f, fields())
        assert await store.claim("tok-f", "h:1", 30, T) == f
        await store.cancel_job(f, T, "cancelled on request")
        assert pttl(redis_proc, f"{P}:job:{f}") == -1
        assert await store.record_result(f, "tok-f", Status.CANCELLED, T, {}) == Status.CANCELLED
        assert 0 < pttl(redis_proc, f"{P}:job:{f}") <= 1500
        ended.append(f)
        # a live job and the folder key of a newer job for the same folder stay
        live = str(uuid.uuid4())
        assert await store.create_job(live, fields(), fb) == (True, live)  # b was cancelled
        assert pttl(redis_proc, fkey(fb)) == -1  # taken over by the live job: no expiry any more

        assert sorted(index(redis_proc, "expiring")) == sorted(ended)
        assert await store.trim() == (0, 0)  # nothing due yet
        await sleep(1.7)
        assert await store.trim() == (len(ended), 0)
        assert index(redis_proc) == [live]
        assert index(redis_proc, "expiring") == []
        left = keys(redis_proc)
        assert not any(j in k for j in ended for k in left), left
        assert f"{P}:folder:alice:alice/dts-a" not in left
        # the marks: of a folder gone from the DTS area, forgotten; of one still there, kept
        assert [k for k in left if k.startswith(f"{P}:watched:")] == [f"{P}:watched:alice/dts-a"], left
        assert f"{P}:job:{live}" in left and fkey(fb) in left
        for j in ended:
            assert await store.get_job(j) is None
        assert [j.job_id for j in await store.list_jobs()] == [live]
        # forgotten: the same folder is a new job
        again = str(uuid.uuid4())
        assert await store.create_job(again, fields(), fa) == (True, again)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_trim_drops_entries_of_lost_jobs_and_schedules_old_ended_ones(redis_proc: RedisProcess) -> None:
    store = new_store(redis_proc, 0.5)
    try:
        # jobs as an older version left them: ended, with no expiry; one whose record is gone
        old = [str(uuid.uuid4()) for _ in range(5)]
        for i, j in enumerate(old):
            redis_proc.cli("HSET", f"{P}:job:{j}", "status", "SUCCESS", "target_user", "alice")
            redis_proc.cli("ZADD", f"{P}:jobs", str(1000 + i), j)
        gone = str(uuid.uuid4())
        redis_proc.cli("ZADD", f"{P}:jobs", "999", gone)
        live = str(uuid.uuid4())
        await store.create_job(live, fields())
        # the walk looks at 2 entries per call and comes back to the start
        seen_dropped, seen_scheduled = 0, 0
        for _ in range(6):
            d, s = await store.trim(walk=2)
            seen_dropped += d
            seen_scheduled += s
        assert (seen_dropped, seen_scheduled) == (1, 5)
        assert sorted(index(redis_proc, "expiring")) == sorted(old)
        await sleep(0.7)
        await store.trim(walk=2)
        assert index(redis_proc) == [live]
        assert pttl(redis_proc, f"{P}:job:{live}") == -1

        # an idle trim (every second, in every process) writes nothing
        def dirty() -> int:
            return int(redis_proc.cli("INFO", "persistence").split("rdb_changes_since_last_save:")[1].split()[0])
        for _ in range(3):
            await store.trim(walk=2)
        before = dirty()
        for _ in range(5):
            assert await store.trim(walk=2) == (0, 0)
        assert dirty() == before
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_memory_stays_bounded_over_many_jobs(redis_proc: RedisProcess) -> None:
    store = new_store(redis_proc, 1.0)
    try:
        await store.create_job(str(uuid.uuid4()), fields())  # the queue exists throughout
        await store.trim()
        base_keys = len(keys(redis_proc))
        base_mem = int(redis_proc.cli("MEMORY", "USAGE", f"{P}:queue") or 0)

        async def round_of(n: int, tag: str) -> None:
            for i in range(n):
                j = str(uuid.uuid4())
                await store.create_job(j, fields(detailed_status="x" * 200),
                                       Folder("alice", f"alice/{tag}-{i}"), enqueue=False)
                await store.cancel_job(j, T, "cancelled")
                await store.watched_done(f"alice/{tag}-{i}", j)
                await store.watched_gone(f"alice/{tag}-{i}")  # (delete_source, or DTS's cleanup)

        await round_of(500, "r1")
        assert len(keys(redis_proc)) >= base_keys + 1500
        await sleep(1.2)
        await store.trim()
        assert len(keys(redis_proc)) <= base_keys + 1  # + the trim cursor
        assert int(redis_proc.cli("ZCARD", f"{P}:jobs")) == 1
        assert int(redis_proc.cli("ZCARD", f"{P}:expiring")) == 0
        assert int(redis_proc.cli("MEMORY", "USAGE", f"{P}:queue") or 0) == base_mem
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_staging_job_and_its_deadline_are_one_step(redis_proc: RedisProcess) -> None:
    store = new_store(redis_proc, 60)
    try:
        j = str(uuid.uuid4())
        await store.create_staging_job(j, fields(status="STAGING"), 0.3)
        assert index(redis_proc, "staging") == [j]
        assert (await store.counts())["queued"] == 0
        # the deadline cannot be missing: if the step fails, no job is left waiting
        redis_proc.cli("DEL", f"{P}:staging")
        redis_proc.cli("SET", f"{P}:staging", "not a sorted set")
        broken = str(uuid.uuid4())
        with pytest.raises(Exception, match="WRONGTYPE"):
            await store.create_staging_job(broken, fields(status="STAGING"), 10)
        assert await store.get_job(broken) is None
        assert broken not in index(redis_proc)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_release_and_recover_keep_the_publish_record(redis_proc: RedisProcess) -> None:
    store = new_store(redis_proc, 60)
    try:
        j = str(uuid.uuid4())
        await store.create_job(j, fields())
        assert await store.claim("tok1", "h:1", 30, T) == j
        assert await store.fence(j, "tok1", {"publish_ino": 7, "publish_dev": 1})
        # a stopping process may not hand back a job past its publish fence
        assert await store.release(j, "tok1", "handed back") is Release.PUBLISHING
        job = await store.get_job(j)
        assert job.status.value == "TRANSFERRING" and hget(redis_proc, j, "claim") == "tok1"
        with pytest.raises(Publishing):
            await store.cancel_job(j, T, "cancel")
        # its holder died: recovery requeues it, publish record kept, still not cancellable
        assert await store.recover("holder died", j, "tok1") == ([j], [])
        assert (await store.get_job(j)).status.value == "SUBMITTED"
        assert hget(redis_proc, j, "publishing") == "tok1"
        assert hget(redis_proc, j, "publish_ino") == "7"
        with pytest.raises(Publishing):
            await store.cancel_job(j, T, "cancel")
        # before the fence, a release hands the job back and it can be cancelled
        assert await store.claim("tok2", "h:1", 30, T) == j
        assert await store.unfence(j, "tok2")
        assert await store.release(j, "tok2", "handed back") is Release.RELEASED
        assert await store.release(j, "tok2", "again") is Release.LOST
        assert (await store.get_job(j)).status.value == "SUBMITTED"
        await store.cancel_job(j, T, "cancel")
        with pytest.raises(AlreadyEnded):
            await store.cancel_job(j, T, "cancel")
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_watcher_mark_outlives_its_job_and_is_renewed_while_the_folder_is_there(redis_proc: RedisProcess) -> None:
    store = new_store(redis_proc, 0.5)
    try:
        j = str(uuid.uuid4())
        await store.create_job(j, fields(status="ERROR", reason="bad_request"), enqueue=False)
        key = f"{P}:watched:alice/dts-k"
        assert await store.mark_watched("alice/dts-k", "h:1")
        assert await store.watch_mark("alice/dts-k") is WatchMark.TAKING
        assert 0 < pttl(redis_proc, key) <= 300_000  # a taker's mark: short
        await store.keep_watched("alice/dts-k")  # never lengthens a taker's mark
        assert 0 < pttl(redis_proc, key) <= 300_000
        await store.watched_gone("alice/dts-k")  # nor cuts it
        assert 300_000 - 5000 < pttl(redis_proc, key) <= 300_000
        await store.watched_done("alice/dts-k", j)
        await sleep(0.8)
        await store.trim()
        assert await store.get_job(j) is None  # the job is forgotten ...
        assert await store.watch_mark("alice/dts-k") is WatchMark.DONE  # ... its folder's mark is not
        assert redis_proc.cli("GET", key) == j
        redis_proc.cli("PEXPIRE", key, "60000")
        await store.keep_watched("alice/dts-k")  # renewed while the watcher sees the folder
        assert MARK - 5000 < pttl(redis_proc, key) <= MARK
        redis_proc.cli("DEL", key)
        await store.keep_watched("alice/dts-k")  # lost with Redis's data: put back (the watcher knows)
        assert redis_proc.cli("GET", key) == "done" and MARK - 5000 < pttl(redis_proc, key)
        await store.watched_gone("alice/dts-k")
        assert 0 < pttl(redis_proc, key) <= 500
        await sleep(0.6)
        assert await store.watch_mark("alice/dts-k") is None
    finally:
        await store.close()
