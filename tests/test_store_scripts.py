"""One test per Lua script of the store, against a real (private) redis-server.

Each test runs its script's success path and every refusal it can answer,
through the typed :class:`Store` API: the enums, results and exceptions that
callers see instead of reply strings. ``test_every_script_has_its_test`` keeps
the list complete; ``test_no_script_spells_a_status_or_reason`` keeps statuses
and reasons coming from the model.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, AsyncIterator, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from dtsbridge import errors, hooks, lua
from dtsbridge.model import FINAL, PUBLIC_FIELDS, Job, Status
from dtsbridge.openapi import spec
from dtsbridge.store import (StoreUnavailable, AlreadyEnded, BadCode, Created, Folder, JobGone, LeaseLost, NotStaging, Publishing,
                             Recovered, Release, Store, Trimmed, WatchMark, connect)
from tests.redis_fixture import RedisProcess, start_private_redis

pytestmark = pytest.mark.timeout(60)

T = "2026-01-01T00:00:00.000Z"

#: every script, and the test that runs it
COVERED = {
    "CREATE": "test_create_job_or_join_the_folder_owner",
    "WATCH_FAILED": "test_watch_failure_is_an_ended_job_and_its_mark_in_one_step",
    "CLAIM": "test_claim_oldest_first_skipping_stale_entries_and_users_at_their_limit",
    "HEARTBEAT": "test_renew_records_progress_while_copying_or_raises_lease_lost",
    "FENCE": "test_fence_lets_only_the_holder_of_a_copying_job_publish",
    "UNFENCE": "test_unfence_forgets_a_dead_attempts_publish_record",
    "ADD_TEMP": "test_temporary_folder_records",
    "DROP_TEMPS": "test_temporary_folder_records",
    "FINISH": "test_record_result_ends_the_job_once",
    "RELEASE": "test_release_answers_released_lost_or_publishing",
    "RECOVER": "test_recover_requeues_lapsed_leases_and_reports_ended_jobs",
    "GIVE_UP": "test_give_up_ends_a_stalled_copy_unless_refused",
    "CANCEL": "test_cancel_or_job_gone_already_ended_publishing",
    "STAGED": "test_finish_staging_or_job_gone_not_staging_bad_code",
    "SWEEP_DEADLINES": "test_sweep_deadlines_ends_late_jobs_in_error_timeout",
    "SWEEP_STAGING": "test_sweep_staging_ends_jobs_whose_stager_never_reported",
    "TRIM": "test_trim_drops_forgotten_jobs_from_the_index",
    "LIST": "test_list_jobs_newest_first_filtered",
    "WATCHED_DONE": "test_watch_marks",
    "WATCHED_KEEP": "test_watch_marks",
    "WATCHED_GONE": "test_watch_marks",
    "HOOK_ADD": "test_webhook_deliveries",
    "HOOK_TAKE": "test_webhook_deliveries",
    "HOOK_SETTLE": "test_webhook_deliveries",
    "PROBE_WRITE": "test_writable_is_refused_when_writes_are_and_leaves_nothing",
}


def scripts() -> dict[str, str]:
    """Every script: the upper-case string constants of lua.py and hooks.py that call Redis."""
    return {name: value for module in (lua, hooks) for name, value in vars(module).items()
            if name.isupper() and not name.startswith("_") and isinstance(value, str) and "redis.call" in value}


def test_every_script_has_its_test() -> None:
    assert set(scripts()) == set(COVERED)
    assert all(callable(globals().get(name)) for name in COVERED.values())


def test_no_script_spells_a_status_or_reason() -> None:
    """Statuses and reasons reach the scripts only through lua._CONSTANTS (from model.Status and errors)."""
    statuses = {s.value for s in Status}
    reasons = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}
    for name, text in scripts().items():
        body = re.sub(r"--[^\n]*", "", text.replace(lua._CONSTANTS, ""))  # (comments may name them)
        assert not set(re.findall(r"'([A-Z_]+)'", body)) & statuses, name
        assert not set(re.findall(r"'reason', '([a-z_]+)'", body)) & reasons, name
    # the "ended" test of the scripts is model.FINAL
    assert re.search(r"local ENDED = \{(.*)\}", lua._CONSTANTS).group(1) == \
        ", ".join(f"[{s.name}] = true" for s in Status if s in FINAL)


def test_public_fields_are_an_allow_list() -> None:
    """What a job shows is model.PUBLIC_FIELDS: a field the store keeps for itself is never shown,
    also one nobody thought to declare secret."""
    h = {"status": "TRANSFERRING", "target_user": "alice", "files_done": "3", "stager_success": "1",
         "timeout_seconds": "2.5", "time_transferring": T, "claim": "tok", "folder_key": "k", "retain_ms": "1",
         "source_rel": "alice/x", "dest_parts": "alice", "some_new_internal_field": "x"}
    assert Job.from_hash("j1", h).public() == {"job_id": "j1", "status": "TRANSFERRING", "target_user": "alice",
                                               "files_done": 3, "stager_success": True, "timeout_seconds": 2.5,
                                               "kind": "complete", "time_transferring": T}
    assert set(PUBLIC_FIELDS) == set(spec("t")["components"]["schemas"]["Job"]["properties"])


@pytest.fixture(scope="module")
def redis_mod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with start_private_redis(tmp_path_factory.mktemp("scripts")) as rp:
        yield rp


@pytest_twisted.async_yield_fixture
async def store(redis_mod: RedisProcess) -> AsyncIterator[Store]:
    s = Store(connect(redis_mod.url), reactor, prefix="s" + uuid.uuid4().hex[:8], timeout=5, retention_s=60)
    try:
        yield s
    finally:
        await s.close()


def new_id() -> str:
    return str(uuid.uuid4())


def fields(user: str = "alice", status: Status = Status.SUBMITTED, **extra: Any) -> dict[str, Any]:
    return {"status": status.value, "target_user": user, "time_" + status.value.lower(): T, **extra}


async def job(store: Store, job_id: str) -> dict[str, str]:
    h: dict[str, str] = await store.call(store.redis.hgetall(store.key("job", job_id)))
    return h


async def redis(store: Store, *args: Any) -> Any:
    return await store.call(store.redis.execute_command(*args))


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def claimed(store: Store, job_id: str, token: str, lease_s: float = 30) -> None:
    """``job_id`` made and claimed with ``token``."""
    await store.create_job(job_id, fields())
    assert await store.claim(token, "h:1", lease_s, T) == job_id


# -- creating jobs --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_job_or_join_the_folder_owner(store: Store) -> None:
    folder = Folder("alice", "alice/dts-1")
    first = new_id()
    assert await store.create_job(first, fields(timeout_seconds="30"), folder) == Created(True, first)
    h = await job(store, first)
    assert h["status"] == "SUBMITTED" and h["retain_ms"] == "60000" and h["folder_key"]
    assert await redis(store, "LRANGE", store.key("queue"), "0", "-1") == [first]
    assert await redis(store, "ZSCORE", store.key("deadlines"), first) is not None  # timeout_seconds
    assert [j.job_id for _, j in await store.events_after("0-0")] == [first]
    # an event holds the job's public fields only
    hidden = new_id()
    await store.create_job(hidden, fields(some_new_internal_field="x", claim="c"), enqueue=False)
    [entry] = [e for e in await store.event_entries("0-0") if hidden in e[1]]
    assert set(entry[1][::2]) == {"job_id", "status", "target_user", "time_submitted"}
    # a live job owns the folder: joined, nothing made or queued
    assert await store.create_job(new_id(), fields(), folder) == Created(False, first)
    assert (await store.counts())["queued"] == 1
    # one that succeeded still owns it; one that failed or was cancelled does not
    assert await store.claim("t1", "h:1", 30, T) == first
    await store.record_result(first, "t1", Status.SUCCESS, T, {})
    assert (await store.create_job(new_id(), fields(), folder)).created is False
    other = Folder("alice", "alice/dts-2")
    gone = new_id()
    await store.create_job(gone, fields(), other)
    await store.cancel_job(gone, T, "cancelled")
    again = new_id()
    assert await store.create_job(again, fields(), other) == Created(True, again)
    assert (await store.job_for_folder(other)).job_id == again
    # not queued, and a staging job with its deadline
    quiet = new_id()
    await store.create_job(quiet, fields(), enqueue=False)
    staging = new_id()
    await store.create_staging_job(staging, fields(status=Status.STAGING), 30)
    assert quiet not in await redis(store, "LRANGE", store.key("queue"), "0", "-1")
    assert await redis(store, "ZRANGE", store.key("staging"), "0", "-1") == [staging]
    assert (await store.get_job(staging)).status is Status.STAGING


@pytest_twisted.ensureDeferred
async def test_watch_failure_is_an_ended_job_and_its_mark_in_one_step(store: Store) -> None:
    j = new_id()
    assert await store.mark_watched("bob/dts-9", "h:1")
    await store.record_watch_failure(j, "bob/dts-9", "bob/dts-9", "bob", errors.USER_NOT_FOUND, "no such user", T)
    got = await store.get_job(j)
    assert got is not None and got.status is Status.ERROR and got.reason == errors.USER_NOT_FOUND
    assert got.public() == {"job_id": j, "status": "ERROR", "target_user": "bob", "subdirectory": "bob/dts-9",
                            "submitter": "watcher", "kind": "watch", "detailed_status": "no such user",
                            "reason": "user_not_found", "time_submitted": T, "time_error": T}
    assert await redis(store, "GET", store.key("watched", "bob/dts-9")) == j  # the mark names the job
    assert store.mark_ms - 5000 < await redis(store, "PTTL", store.key("watched", "bob/dts-9")) <= store.mark_ms
    assert await store.watch_mark("bob/dts-9") is WatchMark.DONE
    assert 0 < await redis(store, "PTTL", store.key("job", j)) <= 60_000  # ended: forgotten after the retention
    assert await redis(store, "ZRANGE", store.key("jobs"), "0", "-1") == [j]
    assert (await store.counts())["queued"] == 0
    [(_, event)] = await store.events_after("0-0")
    assert event.job_id == j and event.reason == errors.USER_NOT_FOUND


# -- a worker's claim -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_claim_oldest_first_skipping_stale_entries_and_users_at_their_limit(store: Store) -> None:
    a1, a2, b1, stale = new_id(), new_id(), new_id(), new_id()
    await store.create_job(stale, fields())
    await store.cancel_job(stale, T, "cancelled")  # leaves the queue
    await redis(store, "LPUSH", store.key("queue"), stale)  # a stale entry all the same
    for j, user in ((a1, "alice"), (a2, "alice"), (b1, "bob")):
        await store.create_job(j, fields(user))
    assert await store.claim("t1", "h:1", 30, T, per_user_limit=1) == a1
    assert await store.claim("t2", "h:1", 30, T, per_user_limit=1) == b1  # alice is at her limit
    assert await store.claim("t3", "h:1", 30, T, per_user_limit=1) is None
    h = await job(store, a1)
    assert (h["status"], h["claim"], h["lease_host"], h["attempts"], h["time_transferring"]) == \
        ("TRANSFERRING", "t1", "h:1", "1", T)
    assert await redis(store, "HGETALL", store.key("user_active")) == ["alice", "1", "bob", "1"]
    await store.record_result(a1, "t1", Status.SUCCESS, T, {})
    assert await store.claim("t4", "h:1", 30, T, per_user_limit=1) == a2
    assert await store.claim("t5", "h:1", 30, T) is None  # the queue is empty (the stale entry dropped)


@pytest_twisted.ensureDeferred
async def test_renew_records_progress_while_copying_or_raises_lease_lost(store: Store) -> None:
    j = new_id()
    await claimed(store, j, "tok", lease_s=1)
    before = await redis(store, "ZSCORE", store.key("active"), j)
    assert await store.renew(j, "tok", 30, {"files_done": 2, "detailed_status": "copying"}) is Status.TRANSFERRING
    assert float(await redis(store, "ZSCORE", store.key("active"), j)) > float(before) + 20_000
    assert (await job(store, j))["files_done"] == "2"
    with pytest.raises(LeaseLost):
        await store.renew(j, "other", 30, {"files_done": 3})
    await store.cancel_job(j, T, "cancelled on request")
    # ended meanwhile: its status, and what the cancel recorded stays
    assert await store.renew(j, "tok", 30, {"detailed_status": "still copying"}) is Status.CANCELLED
    assert (await job(store, j))["detailed_status"] == "cancelled on request"


@pytest_twisted.ensureDeferred
async def test_fence_lets_only_the_holder_of_a_copying_job_publish(store: Store) -> None:
    j, k = new_id(), new_id()
    await claimed(store, j, "tok")
    assert await store.fence(j, "other", {"publish_ino": 1}) is False
    assert "publishing" not in await job(store, j)
    assert await store.fence(j, "tok", {"publish_ino": 7, "publish_dev": 1}) is True
    h = await job(store, j)
    assert (h["publishing"], h["publish_ino"], h["publish_dev"]) == ("tok", "7", "1")
    await claimed(store, k, "tok2")
    await store.cancel_job(k, T, "cancelled")
    assert await store.fence(k, "tok2", {"publish_ino": 2}) is False  # no longer copying


@pytest_twisted.ensureDeferred
async def test_fence_ends_a_job_past_its_timeout_instead_of_letting_it_publish(store: Store) -> None:
    # The deadline sweep runs once a second and leaves a job that passed the fence alone, so a copy
    # that reached publishing between its deadline and the next sweep used to end SUCCESS, late.
    late, timely = new_id(), new_id()
    await store.create_job(late, fields(timeout_seconds="0.05"))
    assert await store.claim("tok", "h:1", 30, T) == late
    await store.create_job(timely, fields("bob", timeout_seconds="60"))
    assert await store.claim("tok2", "h:1", 30, T) == timely
    await sleep(0.1)
    assert await store.fence(late, "tok", {"publish_ino": 7}) is False
    h = await job(store, late)
    assert (h["status"], h["reason"]) == ("ERROR", "timeout"), h
    assert h["detailed_status"] == "not finished within its timeout of 0.05 seconds", h
    assert "publishing" not in h and "publish_ino" not in h and h["claim"] == "tok"  # its worker stops, then lets go
    assert await redis(store, "ZSCORE", store.key("deadlines"), late) is None
    assert await redis(store, "HGETALL", store.key("user_active")) == ["bob", "1"]
    assert await store.record_result(late, "tok", Status.CANCELLED, T, {}) == Status.ERROR  # the end stands
    assert await store.fence(timely, "tok2", {"publish_ino": 8}) is True  # within its time: publishes
    assert (await job(store, timely))["publishing"] == "tok2"


@pytest_twisted.ensureDeferred
async def test_unfence_forgets_a_dead_attempts_publish_record(store: Store) -> None:
    j = new_id()
    await claimed(store, j, "tok")
    await store.fence(j, "tok", {"publish_tmp": "x", "publish_dev": 1, "publish_ino": 2})
    assert await store.unfence(j, "other") is False
    assert "publishing" in await job(store, j)
    assert await store.unfence(j, "tok") is True
    assert not {"publishing", "publish_tmp", "publish_dev", "publish_ino"} & set(await job(store, j))


@pytest_twisted.ensureDeferred
async def test_temporary_folder_records(store: Store) -> None:
    j = new_id()
    await claimed(store, j, "tok")
    assert await store.add_temp(j, "tok", "a1")
    assert await store.add_temp(j, "tok", "a2:5:6")
    assert await store.add_temp(j, "tok", "a1:1:2")  # replaces its attempt's earlier record
    assert (await job(store, j))["temp_dirs"] == "a2:5:6 a1:1:2"
    assert await store.add_temp(j, "other", "b1") is False
    await store.drop_temps(j, ["a2"])
    assert (await job(store, j))["temp_dirs"] == "a1:1:2"
    await store.drop_temps(j, ["a1"])
    assert "temp_dirs" not in await job(store, j)
    gone = new_id()
    await store.drop_temps(gone, ["a1"])  # a forgotten job: nothing is made
    assert await job(store, gone) == {}


@pytest_twisted.ensureDeferred
async def test_record_result_ends_the_job_once(store: Store) -> None:
    j, k = new_id(), new_id()
    await claimed(store, j, "tok")
    await store.create_job(k, fields(timeout_seconds="60"))
    assert await store.claim("tok-k", "h:1", 30, T) == k
    with pytest.raises(LeaseLost):
        await store.record_result(j, "other", Status.ERROR, T, {"reason": "io_error"})
    assert await store.record_result(j, "tok", Status.SUCCESS, T, {"path": "/alice/x"}) is Status.SUCCESS
    h = await job(store, j)
    assert (h["status"], h["time_success"], h["path"]) == ("SUCCESS", T, "/alice/x")
    assert "claim" not in h and "active_user" not in h
    with pytest.raises(LeaseLost):  # its claim is gone with it
        await store.record_result(j, "tok", Status.ERROR, T, {})
    # ended meanwhile (cancelled): it keeps its own status, and the claim is dropped
    await store.cancel_job(k, T, "cancelled")
    assert await store.record_result(k, "tok-k", Status.ERROR, T, {"reason": "io_error"}) is Status.CANCELLED
    h = await job(store, k)
    assert h["status"] == "CANCELLED" and h.get("reason") == errors.CANCELLED and "claim" not in h
    assert await redis(store, "ZCARD", store.key("active")) == 0
    assert await redis(store, "ZCARD", store.key("deadlines")) == 0
    assert await redis(store, "HLEN", store.key("user_active")) == 0


@pytest_twisted.ensureDeferred
async def test_release_answers_released_lost_or_publishing(store: Store) -> None:
    j, later = new_id(), new_id()
    await claimed(store, j, "tok")
    await store.create_job(later, fields())
    assert await store.release(j, "other", "x") is Release.LOST
    assert await store.release(j, "tok", "handed back") is Release.RELEASED
    h = await job(store, j)
    assert (h["status"], h["detailed_status"]) == ("SUBMITTED", "handed back") and "claim" not in h
    assert await store.claim("tok2", "h:1", 30, T) == j  # first in line again
    assert await store.fence(j, "tok2", {"publish_ino": 3})
    assert await store.release(j, "tok2", "x") is Release.PUBLISHING
    assert (await job(store, j))["claim"] == "tok2"


@pytest_twisted.ensureDeferred
async def test_recover_requeues_lapsed_leases_and_reports_ended_jobs(store: Store) -> None:
    lapsed, ended, held = new_id(), new_id(), new_id()
    await claimed(store, lapsed, "t1", lease_s=0.2)
    await claimed(store, ended, "t2", lease_s=0.2)
    await claimed(store, held, "t3", lease_s=30)
    await store.cancel_job(ended, T, "cancelled")  # cancelled while its worker held it
    await sleep(0.4)
    assert await store.recover("worker lost") == Recovered([lapsed], [ended])
    assert (await job(store, lapsed))["status"] == "SUBMITTED"
    assert 0 < await redis(store, "PTTL", store.key("job", ended)) <= 60_000  # no claim: forgotten in time
    # one job whose holder is known dead: only with its claim token
    assert await store.recover("process died", held, "wrong") == Recovered([], [])
    assert await store.recover("process died", held, "t3") == Recovered([held], [])
    assert (await store.get_job(held)).detailed_status == "process died"


@pytest_twisted.ensureDeferred
async def test_give_up_ends_a_stalled_copy_unless_refused(store: Store) -> None:
    j, p = new_id(), new_id()
    await claimed(store, j, "tok")
    assert await store.give_up(j, "other", T, errors.STALLED, "stalled") is False
    assert await store.give_up(j, "tok", T, errors.STALLED, "stalled", {"files_done": 4}) is True
    h = await job(store, j)
    assert (h["status"], h["reason"], h["files_done"], h["claim"]) == ("ERROR", "stalled", "4", "tok")
    assert await store.give_up(j, "tok", T, errors.STALLED, "again") is False  # not copying any more
    await claimed(store, p, "tok-p")
    await store.fence(p, "tok-p", {"publish_ino": 1})
    assert await store.give_up(p, "tok-p", T, errors.STALLED, "stalled") is False  # may be publishing
    assert (await job(store, p))["status"] == "TRANSFERRING"


# -- requests on a job --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_or_job_gone_already_ended_publishing(store: Store) -> None:
    j = new_id()
    await store.create_job(j, fields())
    await store.cancel_job(j, T, "cancelled on request")
    h = await job(store, j)
    assert (h["status"], h["reason"], h["time_cancelled"]) == ("CANCELLED", errors.CANCELLED, T)
    assert await redis(store, "LLEN", store.key("queue")) == 0
    with pytest.raises(JobGone):
        await store.cancel_job(new_id(), T, "x")
    for final in FINAL:
        e = new_id()
        await claimed(store, e, "tok-" + e)
        await store.record_result(e, "tok-" + e, final, T, {})
        with pytest.raises(AlreadyEnded) as refused:
            await store.cancel_job(e, T, "x")
        assert refused.value.status is final
    p = new_id()
    await claimed(store, p, "tok-p")
    await store.fence(p, "tok-p", {"publish_ino": 1})
    with pytest.raises(Publishing):
        await store.cancel_job(p, T, "x")


@pytest_twisted.ensureDeferred
async def test_finish_staging_or_job_gone_not_staging_bad_code(store: Store) -> None:
    ok, bad = new_id(), new_id()
    await store.create_staging_job(ok, fields(status=Status.STAGING, authcode_hash="h1"), 30)
    await store.create_staging_job(bad, fields(status=Status.STAGING, authcode_hash="h2"), 30)
    with pytest.raises(BadCode):
        await store.finish_staging(ok, "wrong", True, T, {})
    assert await store.authcode_hash(ok) == "h1"  # a refusal uses nothing up
    with pytest.raises(JobGone):
        await store.finish_staging(new_id(), "h1", True, T, {})
    folder = Folder("alice", "alice/dts-s")
    await store.finish_staging(ok, "h1", True, T, {"source_rel": "alice/dts-s"}, folder)
    h = await job(store, ok)
    assert (h["status"], h["time_staged"], h["time_submitted"]) == ("SUBMITTED", T, T) and "authcode_hash" not in h
    assert await redis(store, "LRANGE", store.key("queue"), "0", "-1") == [ok]
    assert (await store.job_for_folder(folder)).job_id == ok
    assert await store.authcode_hash(ok) is None
    with pytest.raises(NotStaging):
        await store.finish_staging(ok, "h1", True, T, {})
    await store.finish_staging(bad, "h2", False, T, {"detailed_status": "tape lost"})
    h = await job(store, bad)
    assert (h["status"], h["reason"], h["detailed_status"]) == ("ERROR", errors.STAGING_FAILED, "tape lost")
    assert await redis(store, "ZCARD", store.key("staging")) == 0


# -- housekeeping ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sweep_deadlines_ends_late_jobs_in_error_timeout(store: Store) -> None:
    publishing, finished, cancelled = new_id(), new_id(), new_id()
    await store.create_job(publishing, fields(timeout_seconds="0.1"))
    assert await store.claim("tok-p", "h:1", 30, T) == publishing
    await store.fence(publishing, "tok-p", {"publish_ino": 1})
    await store.create_job(finished, fields(timeout_seconds="0.1"))
    assert await store.claim("tok-f", "h:1", 30, T) == finished
    await store.record_result(finished, "tok-f", Status.SUCCESS, T, {})  # ended in time: no deadline left
    await store.create_job(cancelled, fields(timeout_seconds="0.1"))
    await store.cancel_job(cancelled, T, "cancelled")
    await sleep(0.3)
    assert await store.sweep_deadlines(T) == []  # publishing: left to finish; ended ones: untouched
    assert (await job(store, publishing))["status"] == "TRANSFERRING"
    queued = new_id()
    await store.create_job(queued, fields(timeout_seconds="0.1"))
    await sleep(0.3)
    assert await store.sweep_deadlines(T) == [queued]
    h = await job(store, queued)
    assert (h["status"], h["reason"]) == ("ERROR", errors.TIMEOUT)
    assert "0.1 seconds" in h["detailed_status"]
    assert await redis(store, "LLEN", store.key("queue")) == 0
    assert await store.sweep_deadlines(T) == []


@pytest_twisted.ensureDeferred
async def test_sweep_staging_ends_jobs_whose_stager_never_reported(store: Store) -> None:
    slow, waiting = new_id(), new_id()
    await store.create_staging_job(slow, fields(status=Status.STAGING, staging_timeout="1", authcode_hash="h"), 0.1)
    await store.create_staging_job(waiting, fields(status=Status.STAGING, authcode_hash="h"), 30)
    await sleep(0.3)
    assert await store.sweep_staging(T) == [slow]
    h = await job(store, slow)
    assert (h["status"], h["reason"]) == ("ERROR", errors.STAGING_TIMEOUT) and "authcode_hash" not in h
    assert (await store.get_job(waiting)).status is Status.STAGING
    assert await store.sweep_staging(T) == []


@pytest_twisted.ensureDeferred
async def test_trim_drops_forgotten_jobs_from_the_index(redis_mod: RedisProcess) -> None:
    store = Store(connect(redis_mod.url), reactor, prefix="trim" + uuid.uuid4().hex[:6], timeout=5, retention_s=0.2)
    try:
        ended, live = new_id(), new_id()
        await store.create_job(ended, fields())
        await store.create_job(live, fields())
        await store.cancel_job(ended, T, "cancelled")
        assert await store.trim() == Trimmed(0, 0)
        await sleep(0.4)
        assert await store.trim() == Trimmed(1, 0)
        assert await redis(store, "ZRANGE", store.key("jobs"), "0", "-1") == [live]
        old = new_id()  # ended with no expiry (an older version's job): scheduled
        await redis(store, "HSET", store.key("job", old), "status", "SUCCESS")
        await redis(store, "ZADD", store.key("jobs"), "1", old)
        assert await store.trim() == Trimmed(0, 1)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_list_jobs_newest_first_filtered(store: Store) -> None:
    a, b, c = new_id(), new_id(), new_id()
    for i, (j, user) in enumerate(((a, "alice"), (b, "bob"), (c, "alice"))):
        await store.create_job(j, fields(user))
        await redis(store, "ZADD", store.key("jobs"), str(1000 + i), j)
    await store.cancel_job(c, T, "cancelled")
    assert [j.job_id for j in await store.list_jobs()] == [c, b, a]
    assert [j.job_id for j in await store.list_jobs(user="alice")] == [c, a]
    assert [j.job_id for j in await store.list_jobs(status=Status.CANCELLED)] == [c]
    assert [j.job_id for j in await store.list_jobs(limit=1)] == [c]
    assert await store.list_jobs(user="carol") == []


# -- the watcher's marks ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_watch_marks(store: Store) -> None:
    key = store.key("watched", "alice/dts-w")
    assert await store.watch_mark("alice/dts-w") is None
    assert await store.mark_watched("alice/dts-w", "h:1") is True
    assert await store.mark_watched("alice/dts-w", "h:2") is False
    assert await store.watch_mark("alice/dts-w") is WatchMark.TAKING
    await store.keep_watched("alice/dts-w")  # a taker's mark keeps its short expiry
    await store.watched_gone("alice/dts-w")
    assert await redis(store, "PTTL", key) <= 300_000
    await store.watched_done("alice/dts-w", "job-1")
    assert await redis(store, "GET", key) == "job-1" and await store.watch_mark("alice/dts-w") is WatchMark.DONE
    await redis(store, "PEXPIRE", key, "1000")
    await store.keep_watched("alice/dts-w")
    assert await redis(store, "PTTL", key) > store.mark_ms - 5000
    await store.watched_gone("alice/dts-w")
    assert 0 < await redis(store, "PTTL", key) <= 60_000
    await store.unmark_watched("alice/dts-w")
    await store.watched_gone("alice/dts-w")  # no mark: nothing made
    assert await redis(store, "EXISTS", key) == 0
    await store.keep_watched("alice/dts-w")  # lost with Redis's data: put back
    assert await redis(store, "GET", key) == "done"


# -- webhook deliveries -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_webhook_deliveries(store: Store) -> None:
    q = store.hooks
    await q.group("g", "0")
    await store.create_job(new_id(), fields())
    [(event_id, event)] = await q.read("g", "c1")
    assert event is not None and event.target_user == "alice"
    await q.add("g", event_id, "{}", ["http://a/", "http://b/"])
    assert await q.pending() == 2
    assert (await redis(store, "XPENDING", store.events_key, "g"))[0] == 0  # acknowledged with the add
    taken = await q.take("t1", 60_000, 10)
    assert sorted(d.url for d in taken) == ["http://a/", "http://b/"] and taken[0].attempts == 0
    assert await q.take("t2", 60_000, 10) == []  # leased to t1
    a, b = sorted(taken, key=lambda d: d.url)
    assert await q.done(a.member, "t2") is False
    assert await q.done(a.member, "t1") is True
    assert await q.retry(b.member, "t2", 0, "boom") is False
    assert await q.retry(b.member, "t1", 0, "boom") is True
    [again] = await q.take("t3", 60_000, 10)
    assert (again.member, again.attempts, again.first_ms) == (b.member, 1, b.first_ms)
    assert await q.retry(b.member, "t3", -1, "gave up") is True
    assert await q.pending() == 0
    assert await redis(store, "EXISTS", store.key("hook", b.member)) == 0


@pytest_twisted.ensureDeferred
async def test_writable_is_refused_when_writes_are_and_leaves_nothing(store: Store) -> None:
    before = await redis(store, "DBSIZE")
    await store.writable()
    assert await redis(store, "DBSIZE") == before
    assert await store.ping()
    await redis(store, "CONFIG", "SET", "maxmemory-policy", "noeviction")
    await redis(store, "CONFIG", "SET", "maxmemory", "1")
    try:
        assert await store.ping()  # a PING still answers ...
        with pytest.raises(StoreUnavailable, match="OOM"):
            await store.writable()  # ... but no write is taken
    finally:
        await redis(store, "CONFIG", "SET", "maxmemory", "0")
    await store.writable()
    assert await redis(store, "DBSIZE") == before
