"""Months without a restart (issue 9): job lifecycle and housekeeping, end to end.

Real ``twistd -n dtsbridge`` processes (tests/harness.py) on a private
redis-server: retention forgets ended jobs and every key naming them; answers
that must not make DTS retry (a repeat after ``delete_source``, a cancelled
job, a vanished record, bad user folders); housekeeping that survives Redis
refusing writes; a stopping process that neither cancels nor requeues a
published job, and that exits with Redis down.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DTS_TOKEN, DtsBridge, Response, leftovers, make_tree, tree_of, wait_until
from tests.redis_fixture import RedisProcess

pytestmark = pytest.mark.timeout(180)

P = "dtsbridge"  # [redis] key_prefix default
FAULT = "DTSBRIDGE_FAULT_PAUSE"
WATCH = {"enabled": "true", "interval_seconds": "0.3", "settle_seconds": "0.5"}


def small(seed: str) -> dict[str, Any]:
    return {"a.txt": f"{seed}\n".encode() * 10, "sub": {"b.bin": os.urandom(2048)}}


def redis_keys(redis_proc: RedisProcess) -> set[str]:
    return set(redis_proc.cli("--scan", "--pattern", f"{P}:*").split())


def job_keys(keys: set[str]) -> set[str]:
    """Keys that belong to one job or folder (as opposed to the service's fixed bookkeeping keys)."""
    return {k for k in keys if k.split(":")[1] in ("job", "folder", "watched")}


def jobs_listed(b: DtsBridge) -> list[dict[str, Any]]:
    r = b.call("GET", "/jobs?limit=1000", token=DTS_TOKEN)
    assert r.status == 200, r
    return r.json()["jobs"]


def error_of(r: Response, code: int) -> dict[str, Any]:
    assert r.status == code, r
    err = r.json()["error"]
    assert err["httpcode"] == code, err
    return err


# -- 2. retention ------------------------------------------------------------------


def test_retention_forgets_ended_jobs_and_everything_naming_them(services, redis_proc: RedisProcess) -> None:
    days = 4 / 86400  # four seconds
    b = services({"state": {"retention_days": f"{days:.10f}"}, "watch": WATCH})
    fixed = redis_keys(redis_proc)

    # every way a job ends: copied, stager failure, cancelled while staging, watched, refused watched
    make_tree(b.dts_root / "kept", small("kept"))
    first = b.complete("alice", "kept")
    assert first.status == 201, first
    assert b.complete("alice", "kept").json() == first.json()
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "alice", "subdirectory": "s1"})
    j_failed, code = r.json()["job_id"], r.json()["authcode"]
    assert b.call("POST", "/doneStaging", json_body={"job_id": j_failed, "authcode": code, "success": False,
                                                     "msg": "tape lost"}).status == 200
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "bob", "subdirectory": "s2"})
    j_cancelled = r.json()["job_id"]
    assert b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": j_cancelled}).status == 200
    make_tree(b.dts_root / "alice" / "dts-w1", small("w1"))
    (b.dts_root / "alice" / "dts-w1" / "manifest.json").write_bytes(b"")
    make_tree(b.dts_root / "nobody" / "dts-w2", small("w2"))
    (b.dts_root / "nobody" / "dts-w2" / "manifest.json").write_bytes(b"")

    def watched() -> list[dict[str, Any]]:
        js = [j for j in jobs_listed(b) if j.get("submitter") == "watcher"]
        return js if len(js) == 2 and all(j["status"] in ("SUCCESS", "ERROR") for j in js) else []
    wjobs = wait_until(watched, 30, "two watched folders' jobs", b.log_tail)
    ids = {first.json()["job_id"], j_failed, j_cancelled, *(j["job_id"] for j in wjobs)}
    listed = {j["job_id"] for j in jobs_listed(b)}
    assert ids <= listed
    made = job_keys(redis_keys(redis_proc))
    assert any(k.startswith(f"{P}:watched:") for k in made) and any(k.startswith(f"{P}:folder:") for k in made)
    for k in made:  # every key naming an ended job expires with it
        assert 0 < int(redis_proc.cli("PTTL", k)) <= 4000, k

    # four seconds later: forgotten, and nothing is left of them in Redis
    def forgotten() -> bool:
        return all(b.status(j).status == 404 for j in ids)
    wait_until(forgotten, 20, "the ended jobs to be forgotten", b.log_tail, interval=0.3)
    assert not jobs_listed(b)
    # the index entries go at the next housekeeping tick (every second)
    wait_until(lambda: redis_proc.cli("EXISTS", f"{P}:jobs", f"{P}:expiring") == "0", 5, "the index to be trimmed")
    left = redis_keys(redis_proc)
    assert job_keys(left) == set(), left
    assert left - fixed <= {f"{P}:trim_cursor"}, left - fixed

    # a forgotten job is forgotten: the same request is a new job (the first copy is still there)
    again = b.complete("alice", "kept")
    assert again.status == 201, again
    assert again.json()["job_id"] != first.json()["job_id"] and again.json()["path"] == "/alice/kept-1"
    # while the watcher that took a folder still runs, it does not take it again
    assert not [j for j in jobs_listed(b) if j.get("submitter") == "watcher"]


def test_redis_stays_flat_over_many_jobs(services, redis_proc: RedisProcess) -> None:
    b = services({"state": {"retention_days": f"{3 / 86400:.10f}"}})
    for i in range(60):
        make_tree(b.dts_root / f"f{i}", {"x.txt": b"%d\n" % i})

    def run_round(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            r = b.complete("alice", f"f{i}")
            assert r.status == 201, r

    def clean() -> bool:
        return (not job_keys(redis_keys(redis_proc)) and not jobs_listed(b)
                and redis_proc.cli("EXISTS", f"{P}:jobs", f"{P}:expiring") == "0")

    run_round(0, 5)
    wait_until(clean, 20, "a clean start", b.log_tail, interval=0.3)
    base_keys = len(redis_keys(redis_proc))
    base_mem = int(redis_proc.cli("INFO", "memory").split("used_memory:")[1].split()[0])
    run_round(5, 60)
    assert len(redis_keys(redis_proc)) >= base_keys + 100
    wait_until(clean, 20, "every job to be forgotten", b.log_tail, interval=0.3)
    assert len(redis_keys(redis_proc)) == base_keys
    mem = int(redis_proc.cli("INFO", "memory").split("used_memory:")[1].split()[0])
    assert mem < base_mem + 64 * 1024, (base_mem, mem)


def test_retention_days_must_be_positive(tmp_path: Path) -> None:
    for bad in ("0", "-1", "soon", "nan"):
        s = DtsBridge(tmp_path / bad, "redis://127.0.0.1:1", settings={"state": {"retention_days": bad}})
        s.start(wait=False)
        assert s.proc.wait(30) == 2
        assert "[state] retention_days" in s.log_text(), s.log_text()
