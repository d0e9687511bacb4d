"""``redis+sentinel://`` with real processes: a primary, a replica, three sentinels (issue 9, item 17).

The primary is killed (SIGKILL) while copies run and requests arrive. Every job
whose 201/202 was answered must finish exactly once (one published folder, no
``-1`` twin, nothing temporary left), and while Sentinel switches the service
answers 503 — never 500 or another error. A job's creation waits for one
replica (``WAIT 1``), so an answered job cannot be lost by the switch.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.harness import DTS_TOKEN, DtsBridge, leftovers, make_tree, wait_until
from tests.sentinel_fixture import sentinel_set  # noqa: F401  (fixture)

FAULT = "DTSBRIDGE_FAULT_PAUSE"


def _svc(tmp_path: Path, url: str, **env: str) -> DtsBridge:
    svc = DtsBridge(tmp_path, url, settings={"copy": {"max_jobs": "2", "processes": "0", "lease_seconds": "4"},
                                             "redis": {"timeout_seconds": "2"}})
    svc.extra_env.update(env)
    return svc


@pytest.mark.timeout(120)
def test_creation_waits_for_a_replica(tmp_path: Path, sentinel_set) -> None:  # noqa: F811
    ss = sentinel_set
    svc = _svc(tmp_path, ss.url)
    try:
        make_tree(svc.dts_root / "one", {"a.txt": b"one"})
        svc.start()
        # A replica that does not acknowledge (stopped, its connection still up): no answer claims the job.
        os.kill(ss.replica_proc.proc.pid, signal.SIGSTOP)
        try:
            r = svc.complete("alice", "one", asynchronous=True, timeout=30)
            assert r.status == 503, r
            assert "replica" in r.json()["error"]["message"], r
        finally:
            os.kill(ss.replica_proc.proc.pid, signal.SIGCONT)
        # Once it is back, the repeat answers with the job made then (it stood on the primary
        # and ran meanwhile: 200, or 202 if still running) — one job, now on the replica too.
        r = svc.complete("alice", "one", asynchronous=True)
        assert r.status in (200, 202), r
        job_id = r.json()["job_id"]
        assert ss.replica_proc.cli("HEXISTS", f"dtsbridge:job:{job_id}", "status") == "1"
        assert svc.wait_status(job_id, "SUCCESS")["path"] == "/alice/one"
        jobs = svc.call("GET", "/jobs", token=DTS_TOKEN).json()["jobs"]
        assert [j["job_id"] for j in jobs] == [job_id]
    finally:
        svc.kill()


@pytest.mark.timeout(300)
def test_primary_killed_while_copies_run(tmp_path: Path, sentinel_set) -> None:  # noqa: F811
    ss = sentinel_set
    # Each copy pauses 1 s after its first chunk: copies are in flight when the primary dies.
    svc = _svc(tmp_path, ss.url, **{FAULT: "copy:1"})
    n = 24
    contents = {}
    for i in range(n):
        contents[f"t{i:02d}"] = os.urandom(300_000 + i)
        make_tree(svc.dts_root / f"t{i:02d}", {"data.bin": contents[f"t{i:02d}"], "small.txt": b"%d" % i})
    svc.start()
    old_primary = ss.primary()
    assert old_primary == ss.primary_proc.port

    answered: dict[str, str] = {}  # folder -> job id, for every 200/201/202
    codes: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def submitter() -> None:
        pending = [f"t{i:02d}" for i in range(n)]
        while pending and not stop.is_set():
            folder = pending[0]
            try:
                r = svc.complete("alice", folder, asynchronous=True, timeout=30)
            except OSError as e:
                codes.append((folder, -1, repr(e)))
                time.sleep(0.2)
                continue
            codes.append((folder, r.status, r.body[:200].decode(errors="replace")))
            if r.status in (200, 201, 202):
                answered[folder] = r.json()["job_id"]
                pending.pop(0)
            time.sleep(0.15)

    status_codes: list[int] = []

    def poller() -> None:
        while not stop.is_set():
            for job_id in list(answered.values()):
                try:
                    status_codes.append(svc.status(job_id).status)
                except OSError:
                    status_codes.append(-1)
            time.sleep(0.1)

    threads = [threading.Thread(target=submitter, daemon=True), threading.Thread(target=poller, daemon=True)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answered) >= 6, 60, "the first jobs", svc.log_tail)
        wait_until(lambda: "fault point copy reached" in svc.log_text(), 30, "a copy in flight", svc.log_tail)
        ss.primary_proc.kill()  # SIGKILL: no goodbye
        killed_at = time.monotonic()
        wait_until(lambda: ss.primary() == ss.replica_proc.port, 60, "Sentinel to promote the replica",
                   lambda: "\n".join(s.log_tail() for s in ss.sentinels))
        promoted_after = time.monotonic() - killed_at
        wait_until(lambda: len(answered) == n, 120, "every folder to be accepted",
                   lambda: f"{codes[-5:]}\n{svc.log_tail()}")
        final = {}
        for folder, job_id in answered.items():
            final[folder] = svc.wait_status(job_id, {"SUCCESS", "ERROR", "CANCELLED"}, timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        svc.kill()

    print(f"promoted after {promoted_after:.1f} s; request answers {sorted(c[1] for c in codes)}; "
          f"status answers {sorted(set(status_codes))}")
    bad = [c for c in codes if c[1] not in (200, 201, 202, 503)]
    assert not bad, bad
    assert set(status_codes) <= {200, 503}, sorted(set(status_codes))
    assert any(c[1] == 503 for c in codes) or 503 in status_codes or promoted_after < 1, \
        "the switch was never visible: was the primary really in use?"
    for folder, job in final.items():
        assert job["status"] == "SUCCESS", job
        assert job["path"] == f"/alice/{folder}", job
    # Exactly once: one folder per transfer, no "-1" twin, nothing temporary, every byte right.
    assert sorted(os.listdir(svc.user_root / "alice")) == sorted(contents), os.listdir(svc.user_root / "alice")
    assert leftovers(svc.user_root) == []
    for folder, data in contents.items():
        assert (svc.user_root / "alice" / folder / "data.bin").read_bytes() == data
    # Each folder has one job: the folder key held through the switch.
    assert len(set(answered.values())) == n
