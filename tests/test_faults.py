"""Fault injection against real processes: no job is ever lost (issue 4).

Every test here drives real ``twistd -n dtsbridge`` processes (tests/harness.py)
on a private ``redis-server`` and real files, and breaks them the honest way:
``kill -9`` of the process group, a Redis stopped and started again, a full
tmpfs (ENOSPC), and ``strace -e inject`` (EIO) attached to the running
service.  The moments to break are made deterministic by the engine's
test-only hook ``DTSBRIDGE_FAULT_PAUSE=point:seconds`` (see
:mod:`dtsbridge.engine`), which writes ``fault point <point> reached`` to the
service's log and pauses there.

Each crash test ends with exactly one correct published folder (byte
identical, no ``-1`` twin), the job in ``SUCCESS`` and no ``.dtsbridge-*``
temporary folder anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from dtsbridge.model import Status
from dtsbridge.store import LeaseLost, Store, connect
from tests.harness import DtsBridge, leftovers, make_tree, tree_of, wait_until
from tests.redis_fixture import RedisProcess, start_private_redis

STRACE = shutil.which("strace") or "/usr/bin/strace"
FAULT = "DTSBRIDGE_FAULT_PAUSE"
PREFIX = "dtsbridge"  # [redis] key_prefix default


# -- helpers -----------------------------------------------------------------


@pytest.fixture
def services() -> Iterator[list[DtsBridge]]:
    """Services a test starts; all killed at teardown whatever happened."""
    started: list[DtsBridge] = []
    yield started
    for svc in started:
        svc.kill()


def payload(seed: int, big: int = 3 * 1024 * 1024 + 123) -> dict[str, Any]:
    """A folder with a multi-chunk file first (the engine copies the largest first), small files, a subfolder."""
    rnd = os.urandom
    return {
        "big.bin": rnd(big),
        "notes.txt": f"run {seed}\n".encode() * 50,
        "empty.dat": b"",
        "sub": {"a.csv": rnd(70_000), "deeper": {"b.json": b'{"seed": %d}' % seed}},
    }


def wait_log(svc: DtsBridge, text: str, since: int = 0, count: int = 1, timeout: float = 60) -> None:
    wait_until(lambda: svc.log_text()[since:].count(text) >= count, timeout,
               f"{count} x {text!r} in {svc.name}'s log", svc.log_tail)


def submit_async(svc: DtsBridge, folder: str, user: str = "alice") -> str:
    r = svc.complete(user, folder, asynchronous=True)
    assert r.status == 202, r
    return r.json()["job_id"]


def job_hash(redis: RedisProcess, job_id: str, field: str) -> str:
    return redis.cli("HGET", f"{PREFIX}:job:{job_id}", field, check=True)


def published(user_root: Path, user: str = "alice") -> list[str]:
    return sorted(os.listdir(user_root / user))


def assert_one_copy(svc: DtsBridge, job: dict[str, Any], folder: str, tree: dict[str, bytes],
                    user: str = "alice") -> None:
    """SUCCESS, published once under its own name, byte-identical, nothing temporary anywhere."""
    assert job["status"] == "SUCCESS", job
    assert job["path"] == f"/{user}/{folder}", job
    names = [n for n in published(svc.user_root, user) if n == folder or n.startswith(folder + "-")]
    assert names == [folder], f"expected exactly one published {folder!r}, found {names}"
    assert tree_of(svc.user_root / user / folder) == tree
    assert leftovers(svc.user_root) == []


def temp_folders(svc: DtsBridge, job_id: str, user: str = "alice") -> list[str]:
    return [n for n in os.listdir(svc.user_root / user) if n.startswith(f".dtsbridge-{job_id}-")]


# -- kill -9 at each stage, then restart ----------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("point", ["copy", "verify", "publish"])
def test_kill9_then_restart_finishes_the_job(tmp_path: Path, redis_proc: RedisProcess, services, point: str) -> None:
    # A long lease: only the restart's own recovery of "held by a dead pid on this host"
    # (recover_dead_local) can bring the job back within the wait below.
    svc = DtsBridge(tmp_path, redis_proc.url, settings={"copy": {"lease_seconds": "90"}})
    services.append(svc)
    src = make_tree(svc.dts_root / "run1", payload(1))
    tree = tree_of(src)
    svc.extra_env = {FAULT: f"{point}:300"}
    svc.start()
    job_id = submit_async(svc, "run1")
    wait_log(svc, f"fault point {point} reached")
    dead_pid = svc.proc.pid
    # Mid-flight: a temporary folder holds the partial copy, nothing is published.
    assert len(temp_folders(svc, job_id)) == 1
    assert "run1" not in published(svc.user_root)
    svc.kill()

    # The service is dead; Redis keeps the state.
    assert job_hash(redis_proc, job_id, "status") == "TRANSFERRING"
    assert job_hash(redis_proc, job_id, "lease_host").endswith(f":{dead_pid}")
    assert len(temp_folders(svc, job_id)) == 1  # the crash left it behind

    svc.extra_env = {}
    since = len(svc.log_text())
    svc.start()
    job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=60)  # well before the 90 s lease lapses
    assert "died; back in the queue" in svc.log_text()[since:], svc.log_tail()
    assert_one_copy(svc, job, "run1", tree)
    assert job["attempts"] == 2
    assert job["files_done"] == job["files_total"] == len(tree)
    assert job["bytes_done"] == job["bytes_total"] == sum(len(v) for v in tree.values())


def small_files(seed: int, n: int = 240) -> dict[str, Any]:
    """Files all below one chunk (256 KiB): every batch goes to the worker processes."""
    return {"sub": {f"s{i:03d}.dat": os.urandom(1000 + i) for i in range(n // 2)},
            **{f"t{i:03d}.txt": b"seed %d file %d\n" % (seed, i) for i in range(n // 2)}}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("point", ["copy", "verify"])
def test_kill9_while_a_worker_process_copies_then_restart_finishes(tmp_path: Path, redis_proc: RedisProcess,
                                                                  services, point: str) -> None:
    """The fault pauses also reach the worker processes: a kill -9 while one of them is mid-file."""
    svc = DtsBridge(tmp_path, redis_proc.url, settings={"copy": {"lease_seconds": "90", "processes": "2"}})
    services.append(svc)
    tree = tree_of(make_tree(svc.dts_root / "small", small_files(3)))
    svc.extra_env = {FAULT: f"{point}:300"}
    svc.start()
    job_id = submit_async(svc, "small")
    wait_log(svc, f"fault point {point} reached")
    pids = re.findall(rf"fault point {point} reached \(pid (\d+)\)", svc.log_text())
    assert len(pids) == 1 and int(pids[0]) != svc.proc.pid, (pids, svc.proc.pid)  # a worker process paused
    assert len(temp_folders(svc, job_id)) == 1
    assert "small" not in published(svc.user_root)
    svc.kill()
    assert job_hash(redis_proc, job_id, "status") == "TRANSFERRING"

    svc.extra_env = {}
    since = len(svc.log_text())
    svc.start()
    job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=60)
    assert "died; back in the queue" in svc.log_text()[since:], svc.log_tail()
    assert_one_copy(svc, job, "small", tree)
    assert job["attempts"] == 2
    assert job["files_done"] == job["files_total"] == len(tree)


@pytest.mark.timeout(150)
def test_kill9_after_publish_is_recognised_without_a_second_copy(tmp_path: Path, redis_proc: RedisProcess,
                                                                 services) -> None:
    svc = DtsBridge(tmp_path, redis_proc.url, settings={"copy": {"lease_seconds": "90"}})
    services.append(svc)
    tree = tree_of(make_tree(svc.dts_root / "run2", payload(2)))
    svc.extra_env = {FAULT: "published:300"}
    svc.start()
    job_id = submit_async(svc, "run2")
    wait_log(svc, "fault point published reached")
    svc.kill()
    # Renamed into place, but the job's final state was never recorded.
    assert published(svc.user_root) == ["run2"]
    ino = os.stat(svc.user_root / "alice" / "run2").st_ino
    assert job_hash(redis_proc, job_id, "status") == "TRANSFERRING"
    assert job_hash(redis_proc, job_id, "publish_ino") == str(ino)

    svc.extra_env = {}
    since = len(svc.log_text())
    svc.start()
    job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=60)
    assert_one_copy(svc, job, "run2", tree)
    assert published(svc.user_root) == ["run2"]  # no run2-1
    assert os.stat(svc.user_root / "alice" / "run2").st_ino == ino  # the same folder, not a new copy
    assert "recovered after a restart" in job["detailed_status"]
    log = svc.log_text()[since:]
    assert "published before a crash" in log and "died; back in the queue" in log
    # A repeat of the request finds the finished job: nothing is copied again.
    r = svc.complete("alice", "run2")
    assert r.status == 200 and r.json()["path"] == "/alice/run2", r
    assert published(svc.user_root) == ["run2"]


# -- two processes on one Redis --------------------------------------------------


@pytest.mark.timeout(180)
def test_two_processes_one_killed_mid_copy_the_other_finishes(tmp_path: Path, redis_proc: RedisProcess,
                                                              services) -> None:
    a = DtsBridge(tmp_path, redis_proc.url, name="a")  # max_jobs 2, lease 4 s (harness)
    services.append(a)
    folders = [f"multi{i}" for i in range(4)]
    trees = {f: tree_of(make_tree(a.dts_root / f, payload(10 + i, big=600_000))) for i, f in enumerate(folders)}
    a.extra_env = {FAULT: "copy:300"}
    a.start()
    jobs = {f: submit_async(a, f) for f in folders}
    wait_log(a, "fault point copy reached", count=2)  # A holds two jobs (max_jobs), both mid-copy
    held_by_a = {f for f, j in jobs.items() if job_hash(redis_proc, j, "lease_host").endswith(f":{a.proc.pid}")}
    assert len(held_by_a) == 2, held_by_a
    for f in set(folders) - held_by_a:
        assert a.status(jobs[f]).json()["status"] == "SUBMITTED"

    b = DtsBridge(tmp_path, redis_proc.url, name="b", shared_from=a)
    services.append(b)
    b.start()
    a.kill()
    b_pid = b.proc.pid
    done = {f: b.wait_status(j, {"SUCCESS", "ERROR"}, timeout=90) for f, j in jobs.items()}
    for f, job in done.items():
        assert_one_copy(b, job, f, trees[f])
        assert job_hash(redis_proc, jobs[f], "lease_host").endswith(f":{b_pid}")  # B finished every job
    for f in held_by_a:
        assert done[f]["attempts"] == 2, done[f]  # once by A (killed), once by B
    for f in set(folders) - held_by_a:
        assert done[f]["attempts"] == 1, done[f]
    assert b.log_text().count("lease lapsed; back in the queue") >= 2, b.log_tail()
    assert sorted(published(a.user_root)) == sorted(folders)
    assert b.proc.poll() is None


# -- max_jobs ----------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_max_jobs_one_runs_one_copy_at_a_time(tmp_path: Path, redis_proc: RedisProcess, services) -> None:
    svc = DtsBridge(tmp_path, redis_proc.url, settings={"copy": {"max_jobs": "1"}})
    services.append(svc)
    folders = ["one", "two", "three"]
    trees = {f: tree_of(make_tree(svc.dts_root / f, payload(20 + i, big=400_000))) for i, f in enumerate(folders)}
    svc.extra_env = {FAULT: "copy:2"}  # each copy lasts at least 2 s
    svc.start()
    jobs = [submit_async(svc, f) for f in folders]
    wait_log(svc, "fault point copy reached")
    first = [svc.status(j).json()["status"] for j in jobs]
    assert first == ["TRANSFERRING", "SUBMITTED", "SUBMITTED"], first

    # Jobs are claimed in submission order, so reading them newest first can never
    # see two TRANSFERRING that were not so at once.
    most_active = 0
    seen_waiting_behind = False
    deadline = time.monotonic() + 90
    while True:
        active = int(redis_proc.cli("ZCARD", f"{PREFIX}:active"))
        assert active <= 1, f"{active} jobs hold a lease at once"
        st = [svc.status(j).json()["status"] for j in reversed(jobs)][::-1]
        n = st.count("TRANSFERRING")
        most_active = max(most_active, n)
        assert n <= 1, st
        if n == 1 and "SUBMITTED" in st:
            seen_waiting_behind = True
        if all(s == "SUCCESS" for s in st):
            break
        assert "ERROR" not in st, st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    assert most_active == 1 and seen_waiting_behind
    finals = [svc.status(j).json() for j in jobs]
    for f, job in zip(folders, finals):
        assert_one_copy(svc, job, f, trees[f])
    # The copies did not overlap: each started after the previous one ended.
    spans = [(j["time_transferring"], j["time_success"]) for j in finals]
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert s1 <= e1 <= s2 <= e2, spans
    assert svc.log_text().count("fault point copy reached") == 3


# -- Redis away during a copy --------------------------------------------------------


@pytest.mark.timeout(180)
def test_redis_stopped_and_started_during_a_copy(tmp_path: Path, services) -> None:
    redis = start_private_redis(tmp_path / "aof", appendonly=True)
    try:
        svc = DtsBridge(tmp_path, redis.url, settings={"redis": {"timeout_seconds": "2"}})
        services.append(svc)
        tree = tree_of(make_tree(svc.dts_root / "outage", payload(30)))
        later = tree_of(make_tree(svc.dts_root / "later", payload(31, big=100_000)))
        svc.extra_env = {FAULT: "copy:3"}
        svc.start()
        pid = svc.proc.pid
        job_id = submit_async(svc, "outage")
        wait_log(svc, "fault point copy reached")
        assert redis.cli("CONFIG", "GET", "appendonly").split() == ["appendonly", "yes"]
        redis.stop()
        try:
            # Everything that needs Redis answers 503 (never 500, never a hang).
            r = svc.status(job_id)
            assert r.status == 503 and r.json()["error"]["httpcode"] == 503, r
            r = svc.complete("alice", "later")
            assert r.status == 503, r
            assert svc.call("GET", "/healthz").status == 503
            # The copy goes on meanwhile and reaches the publish fence, which waits for Redis.
            wait_log(svc, f"fencing the publish for {job_id} waits for Redis", timeout=60)
            assert "outage" not in published(svc.user_root)
            assert len(temp_folders(svc, job_id)) == 1
            time.sleep(5)  # stay away longer than the 4 s lease
        finally:
            redis.start()
        job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=60)
        assert_one_copy(svc, job, "outage", tree)
        assert job["attempts"] == 1, job  # the running copy's result was recorded, not redone
        assert svc.proc.poll() is None and svc.proc.pid == pid  # never restarted
        svc.wait_healthy(30)
        r = svc.complete("alice", "later")
        assert r.status == 201, r
        assert_one_copy(svc, svc.status(r.json()["job_id"]).json(), "later", later)
    finally:
        redis.stop()


# -- write errors ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_enospc_from_a_small_tmpfs_ends_in_error_with_nothing_left(tmp_path: Path, redis_proc: RedisProcess,
                                                                  services) -> None:
    svc = DtsBridge(tmp_path, redis_proc.url)
    services.append(svc)
    make_tree(svc.dts_root / "huge", payload(40, big=6 * 1024 * 1024))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(svc.user_root)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        (svc.user_root / "alice").mkdir()
        svc.start()
        job_id = submit_async(svc, "huge")
        job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=60)
        assert job["status"] == "ERROR" and job["reason"] == "no_space", job
        assert published(svc.user_root) == []  # nothing published, no temporary folder
        assert leftovers(svc.user_root) == []
        r = svc.complete("alice", "huge")  # a synchronous repeat fails the same way: 500
        assert r.status == 500, r
        assert published(svc.user_root) == []
        svc.stop()
    finally:
        svc.kill()
        subprocess.run(["umount", str(svc.user_root)], check=False)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.timeout(120)
def test_eio_injected_into_the_copy_ends_in_error_with_nothing_left(tmp_path: Path, redis_proc: RedisProcess,
                                                                   services) -> None:
    """EIO on the copy's writes, injected by ``strace -e inject`` into the running service.

    The destination file's path holds the claim token (``.dtsbridge-<job>-<token>.tmp``),
    which exists only once the job is claimed, so strace is attached to the running
    process (``-p PID -f``: every thread) at the ``copy`` fault point with ``-P`` that
    file: the injection hits exactly the copy's writes and nothing else (logging,
    the reactor's waker pipe and Redis sockets are untouched).
    """
    if not os.access(STRACE, os.X_OK):
        pytest.skip("strace is not installed")
    svc = DtsBridge(tmp_path, redis_proc.url)
    services.append(svc)
    make_tree(svc.dts_root / "eio", payload(50, big=2 * 1024 * 1024))
    svc.extra_env = {FAULT: "copy:6"}
    svc.start()
    job_id = submit_async(svc, "eio")
    wait_log(svc, "fault point copy reached")
    token = job_hash(redis_proc, job_id, "claim")
    target = svc.user_root / "alice" / f".dtsbridge-{job_id}-{token}.tmp" / "big.bin"
    assert target.is_file() and target.stat().st_size > 0  # the first chunk is written; the rest is pending
    err = tmp_path / "strace.err"
    with open(err, "wb") as errf:
        st = subprocess.Popen([STRACE, "-f", "-p", str(svc.proc.pid), "-P", str(target), "-e", "trace=write",
                               "-e", "inject=write:error=EIO", "-o", str(tmp_path / "strace.out")],
                              stdout=subprocess.DEVNULL, stderr=errf)
    try:
        n = _threads(svc.proc.pid)
        try:
            wait_until(lambda: err.read_text(errors="replace").count("attached") >= n or st.poll() is not None,
                       5, "strace to attach", lambda: err.read_text(errors="replace"))
        except AssertionError:
            pass  # thread count may have changed; the attach is checked below
        if st.poll() is not None:
            pytest.skip(f"strace cannot attach here (ptrace not permitted?): {err.read_text(errors='replace')}")
        assert "attached" in err.read_text(errors="replace")
        job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=60)
        assert job["status"] == "ERROR" and job["reason"] == "io_error", job
        assert "Input/output error" in job["detailed_status"], job
        out = (tmp_path / "strace.out").read_text(errors="replace")
        assert "EIO (Input/output error) (INJECTED)" in out, out[-2000:]
    finally:
        st.terminate()
        st.wait(10)
    assert published(svc.user_root) == []
    assert leftovers(svc.user_root) == []
    # The service itself is fine: the same folder copies once the fault is gone.
    svc.extra_env = {}
    svc.stop()
    svc.start()
    r = svc.complete("alice", "eio")
    assert r.status == 201, r
    assert leftovers(svc.user_root) == []


# -- fencing at the store level -------------------------------------------------------------


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_stale_worker_cannot_publish_or_overwrite(redis_proc: RedisProcess) -> None:
    store = Store(connect(redis_proc.url), reactor, prefix="fence", timeout=5)
    try:
        job_id = str(uuid.uuid4())
        created, _ = await store.create_job(job_id, {"status": "SUBMITTED", "target_user": "alice",
                                                     "time_submitted": "2026-01-01T00:00:00.000Z"})
        assert created
        old, new = "aaaa1111", "bbbb2222"
        assert await store.claim(old, "host:1", 0.3, "2026-01-01T00:00:01.000Z") == job_id
        assert await store.renew(job_id, old, 0.3, {"files_done": 1}) == Status.TRANSFERRING
        await _sleep(0.8)  # the old worker stops renewing: its lease lapses
        requeued, ended = await store.recover("resumed after its worker was lost")
        assert (requeued, ended) == ([job_id], [])
        assert await store.claim(new, "host:2", 30, "2026-01-01T00:00:02.000Z") == job_id

        def field(name: str) -> str:
            return redis_proc.cli("HGET", f"fence:job:{job_id}", name)

        # The old worker wakes up: every write it tries is refused.
        with pytest.raises(LeaseLost):
            await store.renew(job_id, old, 30, {"files_done": 99})
        assert await store.fence(job_id, old, {"publish_ino": 1234}) is False
        with pytest.raises(LeaseLost):
            await store.record_result(job_id, old, Status.ERROR, "2026-01-01T00:00:03.000Z",
                                      {"reason": "io_error", "detailed_status": "stale"})
        job = await store.get_job(job_id)
        assert job.status.value == "TRANSFERRING"
        assert field("claim") == new
        assert field("publish_ino") == ""
        assert field("files_done") == "1"
        assert field("reason") == ""

        # The new worker holds it and finishes; the stale one still cannot touch the result.
        assert await store.renew(job_id, new, 30, {"files_done": 2}) == Status.TRANSFERRING
        assert await store.fence(job_id, new, {"publish_ino": 42}) is True
        assert await store.record_result(job_id, new, Status.SUCCESS, "2026-01-01T00:00:04.000Z",
                                         {"detailed_status": "done"}) == Status.SUCCESS
        with pytest.raises(LeaseLost):
            await store.record_result(job_id, old, Status.ERROR, "2026-01-01T00:00:05.000Z", {"reason": "io_error"})
        assert await store.fence(job_id, new, {}) is False  # nothing publishes after the end
        job = await store.get_job(job_id)
        assert job.status.value == "SUCCESS"
        assert field("detailed_status") == "done"
        assert field("reason") == ""
        assert await store.counts() == {"queued": 0, "active": 0, "staging": 0}
    finally:
        await store.close()
