"""The Redis store's scripts on their own, against a private redis-server (no service around them)."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor

from dtsbridge.model import Status
from dtsbridge.store import AlreadyEnded, Folder, JobGone, Release, Store, connect
from tests.redis_fixture import RedisProcess

T = "2026-01-01T00:00:00.000Z"


def fields(user: str = "alice", status: str = "SUBMITTED") -> dict[str, str]:
    return {"status": status, "target_user": user, "time_" + status.lower(): T}


@pytest_twisted.ensureDeferred
async def test_create_or_join_by_folder_key(redis_proc: RedisProcess) -> None:
    store = Store(connect(redis_proc.url), reactor, prefix="t", timeout=5)
    try:
        key = Folder("alice", "alice/dts-1")
        first = str(uuid.uuid4())
        assert await store.create_job(first, fields(), key) == (True, first)
        # a live job owns the folder: a repeat joins it, nothing new is queued
        assert await store.create_job(str(uuid.uuid4()), fields(), key) == (False, first)
        assert (await store.job_for_folder(key)).job_id == first
        assert (await store.counts())["queued"] == 1
        # another user, same folder: a job of its own
        other = str(uuid.uuid4())
        assert await store.create_job(other, fields("bob"), Folder("bob", "alice/dts-1")) == (True, other)
        # once the owner failed (or was cancelled), a new request makes a new job
        await store.cancel_job(first, T, "cancelled on request")
        with pytest.raises(AlreadyEnded) as ended:
            await store.cancel_job(first, T, "again")
        assert ended.value.status is Status.CANCELLED
        retry = str(uuid.uuid4())
        assert await store.create_job(retry, fields(), key) == (True, retry)
        assert (await store.job_for_folder(key)).job_id == retry
        with pytest.raises(JobGone):
            await store.cancel_job(str(uuid.uuid4()), T, "x")
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_list_jobs_newest_first_filtered_and_limited(redis_proc: RedisProcess) -> None:
    store = Store(connect(redis_proc.url), reactor, prefix="t", timeout=5)
    try:
        made = []
        for i in range(7):
            job_id = f"00000000-0000-0000-0000-00000000000{i}"
            user = "alice" if i % 2 == 0 else "bob"
            await store.create_job(job_id, fields(user, "SUBMITTED" if i < 5 else "STAGING"), enqueue=False)
            made.append((job_id, user))
            redis_proc.cli("ZADD", "t:jobs", str(1000 + i), job_id)  # a known order
        every = await store.list_jobs()
        assert [j.job_id for j in every] == [j for j, _ in reversed(made)]
        alice = await store.list_jobs(user="alice")
        assert [j.job_id for j in alice] == [j for j, u in reversed(made) if u == "alice"]
        assert all(j.target_user == "alice" for j in alice)
        staging = await store.list_jobs(status="STAGING")
        assert [j.job_id for j in staging] == [made[6][0], made[5][0]]
        assert [j.job_id for j in await store.list_jobs(user="bob", status="STAGING")] == [made[5][0]]
        assert len(await store.list_jobs(limit=3)) == 3
        assert await store.list_jobs(user="carol") == []
        # a job id in the index whose record is gone is skipped, not an error
        redis_proc.cli("ZADD", "t:jobs", "2000", "gone")
        assert [j.job_id for j in await store.list_jobs(limit=1)] == [made[6][0]]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_claim_is_fifo_and_skips_ended_jobs(redis_proc: RedisProcess) -> None:
    store = Store(connect(redis_proc.url), reactor, prefix="t", timeout=5)
    try:
        ids = [str(uuid.uuid4()) for _ in range(3)]
        for job_id in ids:
            await store.create_job(job_id, fields())
        await store.cancel_job(ids[0], T, "cancelled")  # also leaves the queue
        assert await store.claim("tok1", "h:1", 30, T) == ids[1]
        assert await store.claim("tok2", "h:1", 30, T) == ids[2]
        assert await store.claim("tok3", "h:1", 30, T) is None
        job = await store.get_job(ids[1])
        assert job.status.value == "TRANSFERRING" and job.extra["attempts"] == 1
        # handing a job back puts it first in line again
        assert await store.release(ids[1], "tok1", "handed back") is Release.RELEASED
        assert await store.claim("tok4", "h:2", 30, T) == ids[1]
        assert (await store.get_job(ids[1])).extra["attempts"] == 2
    finally:
        await store.close()


def test_redis_refusals_for_now_are_recognised_also_inside_a_script_error() -> None:
    """OOM under noeviction is a 503, whether Redis answers it bare or wrapped by a script
    (the second form, seen from Redis 7.0 in CI, used to give a 500)."""
    from dtsbridge.store import refused_for_now
    assert refused_for_now("OOM command not allowed when used memory > 'maxmemory'. script: 5c4d, on @user_script:1.")
    assert refused_for_now("ERR Error running script (call to f_69ed7a78ea3354d341342bf33f17d680fa167a0e): "
                           "@user_script:49: @user_script: 49: -OOM command not allowed when used memory > 'maxmemory'.")
    assert refused_for_now("LOADING Redis is loading the dataset in memory")
    assert refused_for_now("NOREPLICAS Not enough good replicas to write.")
    assert not refused_for_now("ERR Error running script (call to f_1): @user_script:3: WRONGTYPE Operation against a key")
    assert not refused_for_now("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert not refused_for_now("ERR unknown command 'BOOM'")


def test_a_refusal_is_told_without_the_script_that_met_it() -> None:
    """The 503's message names Redis's refusal, not our script's SHA and line."""
    from dtsbridge.store import refusal_text
    oom = "OOM command not allowed when used memory > 'maxmemory'."
    assert refusal_text(oom + " script: 5c4d0e9a, on @user_script:1.") == oom
    assert refusal_text("ERR Error running script (call to f_69ed7a78ea3354d341342bf33f17d680fa167a0e): "
                        "@user_script:49: @user_script: 49: -" + oom) == oom
    assert refusal_text("NOREPLICAS Not enough good replicas to write.") == "NOREPLICAS Not enough good replicas to write."
