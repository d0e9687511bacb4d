"""Stalled copies and per-request timeouts, end to end (SPEC "Months without a restart").

A hung disk is simulated honestly: ``strace -f -p <twistd> -P <source file>
-e inject=readv:delay_enter=…`` holds the copying thread inside its ``readv``
system call of that one file (as a hung NFS read would: the thread neither
returns nor looks at its stop flag), while every other thread and system call
of the service runs untouched. The decision to end the job must therefore come
from the reactor, and the job must end in Redis while the thread is still stuck.

Per-request ``timeout_seconds`` is driven with the engine's test-only pause
(``DTSBRIDGE_FAULT_PAUSE``), which keeps a copy busy without progress.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DTS_TOKEN, DtsBridge, Response, leftovers, make_tree, wait_until
from tests.redis_fixture import RedisProcess

STRACE = shutil.which("strace") or "/usr/bin/strace"
FAULT = "DTSBRIDGE_FAULT_PAUSE"


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class Strace:
    """``strace`` attached to every thread of a running process, delaying one system call
    (``readv`` by default) on the given files or folders."""

    def __init__(self, tmp_path: Path, pid: int, path: Path | list[Path], delay_us: int,
                 syscall: str = "readv") -> None:
        if not os.access(STRACE, os.X_OK):
            pytest.skip("strace is not installed")
        self.err = tmp_path / f"strace-{delay_us}.err"
        only = [a for p in (path if isinstance(path, list) else [path]) for a in ("-P", str(p.resolve()))]
        with open(self.err, "wb") as errf:
            self.proc = subprocess.Popen(
                [STRACE, "-f", "-p", str(pid), *only, "-e", f"trace={syscall}",
                 "-e", f"inject={syscall}:delay_enter={delay_us}", "-o", str(tmp_path / f"strace-{delay_us}.out")],
                stdout=subprocess.DEVNULL, stderr=errf)
        n = _threads(pid)
        try:
            wait_until(lambda: self.text().count("attached") >= n or self.proc.poll() is not None,
                       10, "strace to attach", self.text)
        except AssertionError:
            pass  # the thread count may have changed meanwhile; checked below
        if self.proc.poll() is not None:
            pytest.skip(f"strace cannot attach here (ptrace not permitted?): {self.text()}")
        assert "attached" in self.text()

    def text(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> None:
        """Detach: a delayed system call goes on at once."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # its tracee was killed mid-delay
                self.proc.kill()
                self.proc.wait(10)


def complete_traced(svc: DtsBridge, folder: str, tracer: Strace) -> tuple[Response, float]:
    """A synchronous /complete_transfer of ``folder`` for alice while ``tracer`` slows the service
    (detached afterwards, whatever happens): the answer and how long it took."""
    try:
        t = time.monotonic()
        r = svc.complete("alice", folder)
        return r, time.monotonic() - t
    finally:
        tracer.stop()


class Call(threading.Thread):
    """A synchronous /complete_transfer in the background (a waiting DTS)."""

    def __init__(self, svc: DtsBridge, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.svc, self.body = svc, body
        self.response: Response | None = None
        self.took: float | None = None

    def run(self) -> None:
        t = time.monotonic()
        self.response = self.svc.call("POST", "/complete_transfer", token=DTS_TOKEN, json_body=self.body,
                                      timeout=120)
        self.took = time.monotonic() - t


def only_job(svc: DtsBridge) -> dict[str, Any]:
    jobs = svc.call("GET", "/jobs", token=DTS_TOKEN).json()["jobs"]
    assert len(jobs) == 1, jobs
    return jobs[0]


@pytest.mark.timeout(150)
def test_a_read_stuck_in_the_kernel_ends_the_job_stalled_and_leaves_nothing(tmp_path: Path,
                                                                            redis_proc: RedisProcess,
                                                                            services) -> None:
    svc = services({"copy": {"stall_seconds": "2", "processes": "0"}}, start=False)
    src = make_tree(svc.dts_root / "hung", {"big.bin": os.urandom(3 * 1024 * 1024), "small.txt": b"x" * 100})
    svc.start()
    tracer = Strace(tmp_path, svc.proc.pid, src / "big.bin", delay_us=120_000_000)  # 2 minutes per read
    try:
        call = Call(svc, {"target_user": "alice", "subdirectory": "hung"})
        started = time.monotonic()
        call.start()
        # The copy's thread is stuck in readv: the temporary folder exists, nothing moves.
        wait_until(lambda: leftovers(svc.user_root), 20, "the copy's temporary folder", svc.log_tail)
        # Meanwhile the service answers, promptly.
        job_id = only_job(svc)["job_id"]
        for _ in range(5):
            t = time.monotonic()
            r = svc.status(job_id)
            assert r.status == 200 and time.monotonic() - t < 2, r
            time.sleep(0.2)
        # The waiting caller gets the job's error answer within a bound, while the thread is still stuck.
        call.join(30)
        assert not call.is_alive(), "the waiting /complete_transfer was not answered"
        assert call.response is not None and call.response.status == 500, call.response
        err = call.response.json()["error"]
        assert err["reason"] == "stalled" and err["job_id"] == job_id, err
        assert time.monotonic() - started < 20
        job = svc.status(job_id).json()
        assert job["status"] == "ERROR" and job["reason"] == "stalled", job
        assert "no bytes moved" in job["detailed_status"], job
        assert tracer.proc.poll() is None, "strace let go too early: the thread was not stuck throughout"
        assert leftovers(svc.user_root), "the stuck thread's folder went away although the thread never returned"
        # an operator sees the stuck thread: /healthz is 503 naming the job (5 s after it ended)
        r = wait_until(lambda: (lambda r: r if r.status == 503 else None)(svc.call("GET", "/healthz")), 15,
                       "/healthz to report the stuck copy thread", svc.log_tail)
        assert any("stuck" in p and job_id in p for p in r.json()["problems"]), r
    finally:
        tracer.stop()
    # The thread comes back, sees the job is over and removes its temporary folder.
    wait_until(lambda: not leftovers(svc.user_root), 20, "the temporary folder to be removed", svc.log_tail)
    wait_until(lambda: svc.call("GET", "/healthz").status == 200, 10, "/healthz to be 200 again", svc.log_tail)
    assert sorted(os.listdir(svc.user_root / "alice")) == []
    assert svc.status(job_id).json()["status"] == "ERROR"
    # And the service copies the same folder again once the disk is well.
    r = svc.complete("alice", "hung")
    assert r.status == 201, r
    assert (svc.user_root / "alice" / "hung" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


@pytest.mark.timeout(150)
def test_a_stalled_job_frees_its_slot_while_its_thread_stays_stuck(tmp_path: Path, redis_proc: RedisProcess,
                                                                  services) -> None:
    """max_jobs = 1: the job after a stalled one runs (and succeeds) while the stalled one's thread is still
    stuck in the kernel; /healthz reports the stuck thread meanwhile."""
    svc = services({"copy": {"stall_seconds": "2", "processes": "0", "max_jobs": "1", "threads": "1"}}, start=False)
    src = make_tree(svc.dts_root / "hung", {"big.bin": os.urandom(3 * 1024 * 1024)})
    nxt = make_tree(svc.dts_root / "next", {"a.bin": os.urandom(300_000), "b.txt": b"b" * 100})
    svc.start()
    tracer = Strace(tmp_path, svc.proc.pid, src / "big.bin", delay_us=120_000_000)
    try:
        j0 = svc.complete("alice", "hung", asynchronous=True).json()["job_id"]
        s0 = svc.wait_status(j0, {"ERROR", "SUCCESS"}, timeout=30)
        assert s0["status"] == "ERROR" and s0["reason"] == "stalled", s0
        t = time.monotonic()
        r = svc.complete("alice", "next", timeout=60)
        assert r.status == 201, r
        assert time.monotonic() - t < 15, "the next job waited for the stuck thread"
        assert (svc.user_root / "alice" / "next" / "a.bin").read_bytes() == (nxt / "a.bin").read_bytes()
        r = wait_until(lambda: (lambda r: r if r.status == 503 else None)(svc.call("GET", "/healthz")), 15,
                       "/healthz to report the stuck copy thread", svc.log_tail)
        assert any("stuck" in p and j0 in p for p in r.json()["problems"]), r
        assert tracer.proc.poll() is None, "strace let go too early: the thread was not stuck throughout"
    finally:
        tracer.stop()
    wait_until(lambda: svc.call("GET", "/healthz").status == 200, 20, "/healthz to be 200 again", svc.log_tail)
    assert sorted(os.listdir(svc.user_root / "alice")) == ["next"]
    assert not leftovers(svc.user_root)


@pytest.mark.timeout(150)
def test_a_process_killed_while_its_copy_is_stuck_is_cleaned_up_by_recovery(tmp_path: Path,
                                                                            redis_proc: RedisProcess,
                                                                            services) -> None:
    svc = services({"copy": {"stall_seconds": "2", "processes": "0"}}, start=False)
    src = make_tree(svc.dts_root / "hung", {"big.bin": os.urandom(2 * 1024 * 1024)})
    svc.start()
    tracer = Strace(tmp_path, svc.proc.pid, src / "big.bin", delay_us=120_000_000)
    try:
        r = svc.complete("alice", "hung", asynchronous=True)
        assert r.status == 202, r
        job_id = r.json()["job_id"]
        job = svc.wait_status(job_id, {"ERROR", "SUCCESS"}, timeout=30)
        assert job["reason"] == "stalled", job
        assert leftovers(svc.user_root)
        os.killpg(svc.proc.pid, signal.SIGKILL)  # the thread never returned
    finally:
        tracer.stop()  # a traced process is reaped only once its tracer lets go
    svc.proc.wait(10)
    assert leftovers(svc.user_root), "nothing was left to recover"
    svc.start()
    wait_until(lambda: not leftovers(svc.user_root), 30, "recovery to remove the temporary folder", svc.log_tail)
    job = svc.status(job_id).json()
    assert job["status"] == "ERROR" and job["reason"] == "stalled", job
    assert os.listdir(svc.user_root / "alice") == []


@pytest.mark.timeout(150)
def test_a_slow_copy_that_keeps_moving_is_not_stalled(tmp_path: Path, redis_proc: RedisProcess, services) -> None:
    """Every 256 KiB read waits 0.25 s: the copy takes ~4 s, longer than stall_seconds, but bytes move."""
    svc = services({"copy": {"stall_seconds": "2.5", "processes": "0"}}, start=False)
    src = make_tree(svc.dts_root / "slow", {"big.bin": os.urandom(4 * 1024 * 1024)})
    svc.start()
    r, took = complete_traced(svc, "slow", Strace(tmp_path, svc.proc.pid, src / "big.bin", delay_us=250_000))
    assert r.status == 201, r
    assert took > 3, f"the reads were not slowed ({took:.1f} s)"
    assert (svc.user_root / "alice" / "slow" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_a_long_scan_that_keeps_moving_is_not_stalled(tmp_path: Path, redis_proc: RedisProcess, services) -> None:
    """Listing each of 8 folders waits ~0.6 s (strace delays getdents64): the scan takes ~5 s, longer
    than stall_seconds, but it reports each folder, so it is no stall."""
    svc = services({"copy": {"stall_seconds": "2", "processes": "0"}}, start=False)
    src = make_tree(svc.dts_root / "wide", {f"d{i}": {"f.txt": b"x" * i} for i in range(8)})
    svc.start()
    r, took = complete_traced(svc, "wide", Strace(tmp_path, svc.proc.pid, [src / f"d{i}" for i in range(8)],
                                                  delay_us=300_000, syscall="getdents64"))
    assert r.status == 201, r
    assert took > 3, f"the listings were not slowed ({took:.1f} s)"
    assert sorted(os.listdir(svc.user_root / "alice" / "wide")) == [f"d{i}" for i in range(8)]


def test_a_cancel_stops_a_long_scan(tmp_path: Path, redis_proc: RedisProcess, services) -> None:
    """A cancel during a slow scan (each folder's listing delayed 0.5 s) ends it at the next folder:
    CANCELLED within about a folder's time, and nothing is left in the user's folder."""
    svc = services({"copy": {"processes": "0"}}, start=False)
    src = make_tree(svc.dts_root / "wide", {f"d{i}": {"f.txt": b"x"} for i in range(20)})
    svc.start()
    tracer = Strace(tmp_path, svc.proc.pid, [src / f"d{i}" for i in range(20)], delay_us=500_000,
                    syscall="getdents64")
    try:
        r = svc.complete("alice", "wide", asynchronous=True)
        assert r.status == 202, r
        job_id = r.json()["job_id"]
        wait_until(lambda: svc.status(job_id).json()["status"] == "TRANSFERRING", 10, "the copy to start")
        time.sleep(1)  # inside the scan (20 folders at ~1 s each)
        t = time.monotonic()
        assert svc.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": job_id}).status == 200
        wait_until(lambda: svc.status(job_id).json()["status"] == "CANCELLED", 10, "the cancel")
        assert time.monotonic() - t < 5
        wait_until(lambda: leftovers(svc.user_root) == [], 10, "nothing left")
        time.sleep(6)  # a scan that went on would list ~6 more folders meanwhile
        out = (tmp_path / "strace-500000.out").read_text(errors="replace")
        listed = out.count("getdents64(")  # two a folder (the second finds the end)
        assert 0 < listed <= 8, f"the scan went on after the cancel: {listed} listings\n{out[-2000:]}"
    finally:
        tracer.stop()
    assert not (svc.user_root / "alice" / "wide").exists()


@pytest.mark.timeout(120)
def test_timeout_seconds_ends_running_queued_and_staging_jobs(tmp_path: Path, redis_proc: RedisProcess,
                                                              services) -> None:
    # One copy at a time, paused 8 s after its first chunk (busy, no progress); stall detection off.
    svc = services({"copy": {"max_jobs": "1", "stall_seconds": "0", "processes": "0"}},
                   env={FAULT: "copy:8"}, start=False)
    make_tree(svc.dts_root / "first", {"big.bin": os.urandom(1024 * 1024)})
    make_tree(svc.dts_root / "second", {"a.txt": b"a"})
    svc.start()
    running = Call(svc, {"target_user": "alice", "subdirectory": "first", "timeout_seconds": 2})
    running.start()
    wait_until(lambda: "fault point copy reached" in svc.log_text(), 20, "the copy to start", svc.log_tail)
    queued = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, headers={"Prefer": "respond-async"},
                      json_body={"target_user": "alice", "subdirectory": "second", "timeout_seconds": "1.5"})
    assert queued.status == 202, queued
    staged = svc.call("POST", "/submitTransfer", token=DTS_TOKEN,
                      json_body={"target_user": "bob", "subdirectory": "third", "timeout_seconds": 1})
    assert staged.status == 202, staged
    running.join(20)
    assert running.response is not None and running.response.status == 500, running.response
    err = running.response.json()["error"]
    assert err["reason"] == "timeout", err
    assert running.took < 6, running.took  # not after the 8 s pause
    for job_id in (err["job_id"], queued.json()["job_id"], staged.json()["job_id"]):
        job = svc.wait_status(job_id, {"ERROR", "SUCCESS", "CANCELLED"}, timeout=10)
        assert job["status"] == "ERROR" and job["reason"] == "timeout", job
    # The queued job was never copied, even after the first one's thread let go.
    wait_until(lambda: not leftovers(svc.user_root), 20, "the paused copy to clean up", svc.log_tail)
    time.sleep(1.5)
    assert os.listdir(svc.user_root / "alice") == []
    assert svc.status(queued.json()["job_id"]).json()["status"] == "ERROR"
    # A later request for the same folder is a new job, and copies it.
    r = svc.complete("alice", "second")
    assert r.status == 201 and r.json()["job_id"] != queued.json()["job_id"], r


@pytest.mark.timeout(60)
def test_bad_timeout_seconds_is_400_and_creates_nothing(tmp_path: Path, redis_proc: RedisProcess,
                                                        services) -> None:
    svc = services()
    make_tree(svc.dts_root / "f", {"a.txt": b"a"})
    big = "1" + "0" * 400  # a JSON integer beyond any float: float() overflows
    for bad in ('0', '-1', '"abc"', 'true', '"nan"', '"inf"', '[]', '{"s": 1}', '1e400', '"0"', big):
        for path in ("/complete_transfer", "/submitTransfer"):
            raw = b'{"target_user": "alice", "subdirectory": "f", "timeout_seconds": %s}' % bad.encode()
            r = svc.call("POST", path, token=DTS_TOKEN, raw=raw, headers={"Content-Type": "application/json"})
            assert r.status == 400, (path, bad, r)
            assert "timeout_seconds" in r.json()["error"]["message"]
    raw = b'{"target_user": "alice", "subdirectory": "f", "staging_timeout": %s}' % big.encode()
    r = svc.call("POST", "/submitTransfer", token=DTS_TOKEN, raw=raw, headers={"Content-Type": "application/json"})
    assert r.status == 400 and "staging_timeout" in r.json()["error"]["message"], r
    assert svc.call("GET", "/jobs", token=DTS_TOKEN).json()["jobs"] == []
    assert "Traceback" not in svc.log_text() and "unexpected error" not in svc.log_text(), svc.log_tail(40)
    # Numbers are kept exactly as given (they were cut to 6 digits: 1234567 became 1234570).
    for job_s, staging_s in ((1234567, 123456.7), (123456.7, 0.1234567), (0.1234567, 604800)):
        r = svc.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={
            "target_user": "alice", "subdirectory": "later", "timeout_seconds": job_s, "staging_timeout": staging_s})
        assert r.status == 202, r
        shown = svc.status(r.json()["job_id"]).json()
        assert (shown["timeout_seconds"], shown["staging_timeout"]) == (job_s, staging_s), shown
        assert svc.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": r.json()["job_id"]}).status == 200
    # A good one is accepted, recorded and shown.
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, form={
        "target_user": "alice", "subdirectory": "f", "timeout_seconds": "30"})
    assert r.status == 201, r
    assert svc.status(r.json()["job_id"]).json()["timeout_seconds"] == 30


def test_openapi_names_timeout_seconds() -> None:
    from dtsbridge.openapi import spec
    schemas = spec("test")["components"]["schemas"]
    for name in ("TransferRequest", "SubmitRequest"):
        assert schemas[name]["properties"]["timeout_seconds"]["type"] == "number"
