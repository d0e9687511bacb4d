"""The request side (:class:`dtsbridge.jobs.Jobs`) on its own: real Redis, real folders, a ``Clock``.

Every refusal is a domain exception of :mod:`dtsbridge.errors` carrying its ``reason``
and no HTTP status; :mod:`dtsbridge.web` alone maps each class to a status.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable

import pytest
import pytest_twisted

from dtsbridge import errors
from dtsbridge.jobs import Caller
from dtsbridge.model import Status
from tests.harness import make_tree
from tests.inprocess import Parts, make_parts
from tests.redis_fixture import RedisProcess

pytestmark = pytest.mark.timeout(60)

ALICE = Caller("alice", transfer=False)
DTS = Caller("dts", transfer=True)


@pytest_twisted.async_yield_fixture
async def parts(tmp_path: Path, redis_proc: RedisProcess) -> AsyncIterator[Parts]:
    p = make_parts(tmp_path, redis_proc.url)
    yield p
    await p.close()


async def refused(call: Awaitable[Any], kind: type[Exception]) -> Any:
    """The refusal ``call`` raises: of ``kind`` and, for a domain refusal, with no HTTP status in it."""
    with pytest.raises(kind) as info:
        await call
    assert not hasattr(info.value, "code") and not hasattr(info.value, "http_status")
    return info.value


@pytest_twisted.ensureDeferred
async def test_each_refusal_is_a_domain_exception_with_its_reason(parts: Parts) -> None:
    jobs, dts = parts.jobs, parts.dts
    make_tree(dts / "one", {"f.txt": b"one"})
    os.symlink(dts, parts.user_root / "mallory")

    e = await refused(jobs.submit("Alice", "one", "dts"), errors.Invalid)
    assert e.reason == errors.BAD_REQUEST and "valid KBase username" in e.message
    e = await refused(jobs.submit("mallory", "one", "dts"), errors.Forbidden)
    assert e.reason == errors.UNSAFE_DESTINATION
    e = await refused(jobs.submit("carol", "one", "dts"), errors.Invalid)
    assert e.reason == errors.USER_NOT_FOUND
    e = await refused(jobs.submit("alice", "missing", "dts"), errors.NotFound)
    assert e.reason == errors.SOURCE_NOT_FOUND
    e = await refused(jobs.submit("alice", "/etc", "dts"), errors.Forbidden)
    assert e.reason == errors.OUTSIDE_DTS_AREA
    e = await refused(jobs.submit_staging("alice", "one", "dts", -1), errors.Invalid)
    assert e.reason is None and "staging_timeout" in e.message
    e = await refused(jobs.submit_staging("alice", str(dts), "dts", None), errors.Invalid)
    assert "DTS area itself" in e.message
    e = await refused(jobs.done_staging("0" * 8 + "-0000-4000-8000-" + "0" * 12, "code", True, None, None, None),
                      errors.Forbidden)
    assert "authcode" in e.message
    e = await refused(jobs.cancel("6f1c1f5e-1111-4222-8333-444455556666"), errors.NotFound)
    e = await refused(jobs.read("6f1c1f5e-1111-4222-8333-444455556666", DTS), errors.NotFound)
    e = await refused(jobs.listing(ALICE, "bob", None, 10), errors.Forbidden)
    assert e.message == "you may list only your own jobs"
    e = await refused(jobs.listing(DTS, None, "DONE", 10), errors.Invalid)
    assert "SUBMITTED, STAGING, TRANSFERRING, SUCCESS, ERROR, CANCELLED" in e.message
    # nothing was queued by any of them
    assert await parts.store.list_jobs(limit=10) == []


@pytest_twisted.ensureDeferred
async def test_staging_cancel_read_and_the_states_that_refuse(parts: Parts) -> None:
    jobs, dts = parts.jobs, parts.dts
    make_tree(dts / "stage" / "inner", {"f.txt": b"staged"})
    job, code = await jobs.submit_staging("alice", "stage", "dts", 60)
    assert job.status == Status.STAGING and code

    # the stager's path must stay inside the submitted folder; a refusal keeps the code usable
    e = await refused(jobs.done_staging(job.job_id, code, True, str(dts / "elsewhere"), None, None), errors.Forbidden)
    assert e.reason == "outside_subdirectory"
    e = await refused(jobs.done_staging(job.job_id, code, True, "stage/nothere", None, None), errors.Invalid)
    assert e.reason == errors.SOURCE_NOT_FOUND and e.message.startswith("path: ")
    # a job of alice's: bob may not read it, alice and a transfer service may
    assert (await jobs.read(job.job_id, ALICE)).job_id == job.job_id
    await refused(jobs.read(job.job_id, Caller("bob", transfer=False)), errors.Forbidden)
    assert [j.job_id for j in await jobs.listing(ALICE, None, "STAGING", 10)] == [job.job_id]

    cancelled = await jobs.cancel(job.job_id)
    assert cancelled.status == Status.CANCELLED
    e = await refused(jobs.cancel(job.job_id), errors.Conflict)
    assert "already ended" in e.message
    # the code no longer works once the job ended
    await refused(jobs.done_staging(job.job_id, code, True, None, None, None), errors.Forbidden)


@pytest_twisted.ensureDeferred
async def test_a_draining_process_takes_no_new_job(parts: Parts) -> None:
    make_tree(parts.dts / "one", {"f.txt": b"one"})
    parts.worker.draining = True
    for call in (parts.jobs.submit("alice", "one", "dts"), parts.jobs.submit_staging("alice", "one", "dts", 60)):
        with pytest.raises(errors.Draining):
            await call
    assert await parts.store.list_jobs(limit=10) == []


def test_web_maps_every_refusal_to_one_status() -> None:
    """The one table of :mod:`dtsbridge.web`: every kind of refusal has its status, and a failed job's
    reason answers the status of the refusal it is (the synchronous ``/complete_transfer``)."""
    from dtsbridge.web import STATUS_FOR, status_for

    kinds = errors.Refused.__subclasses__()
    assert kinds and set(kinds) == set(STATUS_FOR)
    assert {status_for(k) for k in kinds} == {400, 403, 404, 409, 413, 500}
    assert [status_for(errors.refusal_for(r)) for r in (errors.BAD_REQUEST, errors.USER_NOT_FOUND,
                                                       errors.UNSAFE_ENTRY, errors.SOURCE_NOT_FOUND,
                                                       errors.PAYLOAD_TOO_LARGE, errors.CANCELLED,
                                                       errors.CHECKSUM_MISMATCH, None)] == \
        [400, 400, 403, 404, 413, 409, 500, 500]
