"""The job lifecycle beyond one call (issue 3), end to end.

Real ``twistd -n dtsbridge`` processes (tests/harness.py) against a private
redis-server (the ``redis_proc`` fixture): the stager flow
(``/submitTransfer`` + ``/doneStaging``), staging timeouts (also across a
stopped service), ``/cancelTransfer`` of queued, staging and running jobs,
and the DTS-area watcher (also with two processes sharing one Redis).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.harness import (
    ALICE_TOKEN,
    DTS_TOKEN,
    NOROLE_TOKEN,
    DtsBridge,
    Response,
    leftovers,
    make_tree,
    tree_of,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

PREFIX = "dtsbridge"  # [redis] key_prefix default


# -- helpers ------------------------------------------------------------------


@pytest.fixture
def bridges(services) -> Callable[..., DtsBridge]:
    """dtsbridge processes on the test's private Redis (the shared ``services`` fixture)."""
    return services


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    return wait_until(cond, timeout, what, interval=interval)


def submit(b: DtsBridge, user: str, sub: str, form: bool = False, token: str = DTS_TOKEN,
           **extra: Any) -> Response:
    body = {"target_user": user, "subdirectory": sub, **extra}
    if form:
        return b.call("POST", "/submitTransfer", token=token, form={k: str(v) for k, v in body.items()})
    return b.call("POST", "/submitTransfer", token=token, json_body=body)


def done(b: DtsBridge, job_id: str, code: str | None, success: Any = True, form: bool = False,
         **extra: Any) -> Response:
    body: dict[str, Any] = {"job_id": job_id, **extra}
    if code is not None:
        body["authcode"] = code
    if success is not None:
        body["success"] = success
    if form:
        return b.call("POST", "/doneStaging",
                      form={k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in body.items()})
    return b.call("POST", "/doneStaging", json_body=body)


def cancel(b: DtsBridge, job_id: str, token: str | None = DTS_TOKEN) -> Response:
    return b.call("POST", "/cancelTransfer", token=token, json_body={"job_id": job_id})


def job(b: DtsBridge, job_id: str) -> dict[str, Any]:
    r = b.status(job_id)
    assert r.status == 200, r
    return r.json()


def jobs_for(b: DtsBridge, user: str, subdirectory: str) -> list[dict[str, Any]]:
    r = b.call("GET", "/jobs?" + urllib.parse.urlencode({"user": user, "limit": 1000}), token=DTS_TOKEN)
    assert r.status == 200, r
    return [j for j in r.json()["jobs"] if j.get("subdirectory") == subdirectory]


def redis_dump(redis_proc) -> str:
    """Every key and value in the private Redis, as text."""
    out = []
    for key in redis_proc.cli("--scan").splitlines():
        kind = redis_proc.cli("TYPE", key)
        if kind == "hash":
            out.append(redis_proc.cli("HGETALL", key))
        elif kind == "string":
            out.append(redis_proc.cli("GET", key))
        elif kind == "list":
            out.append(redis_proc.cli("LRANGE", key, "0", "-1"))
        elif kind == "zset":
            out.append(redis_proc.cli("ZRANGE", key, "0", "-1", "WITHSCORES"))
        elif kind == "set":
            out.append(redis_proc.cli("SMEMBERS", key))
        out.append(key)
    return "\n".join(out)


def assert_times(j: dict[str, Any], *statuses: str) -> None:
    for s in statuses:
        assert j.get(f"time_{s.lower()}"), f"job lacks time_{s.lower()}: {j}"
        assert j[f"time_{s.lower()}"].endswith("Z"), j


def payload(seed: str, n: int = 3) -> dict[str, Any]:
    return {f"f{i}.txt": f"{seed} file {i}\n".encode() * (i + 1) for i in range(n)} | {
        "sub": {"deep.bin": os.urandom(4096)}}


# -- the stager flow ------------------------------------------------------------


def test_submit_and_done_staging_success(bridges, redis_proc) -> None:
    b = bridges()
    src1 = make_tree(b.dts_root / "stage1", payload("one"))
    codes = []

    # JSON submit, form doneStaging, default path = the submitted subdirectory
    r = submit(b, "alice", "stage1")
    assert r.status == 202, r
    body = r.json()
    assert set(body) >= {"job_id", "authcode", "error", "msg"}
    assert body["error"] is False and body["authcode"] and body["msg"]
    j1, code1 = body["job_id"], body["authcode"]
    codes.append(code1)
    s = job(b, j1)
    assert s["status"] == "STAGING" and s["target_user"] == "alice" and s["subdirectory"] == "stage1"
    assert_times(s, "STAGING")
    assert s.get("detailed_status")
    assert code1 not in json.dumps(s) and "authcode_hash" not in s and "authcode" not in s
    time.sleep(0.05)  # the timestamps have millisecond resolution

    r = done(b, j1, code1, True, form=True, staged_to="tape-cache-7", msg="recalled from tape")
    assert r.status == 200, r
    assert r.json()["job_id"] == j1
    s = b.wait_status(j1, {"SUCCESS", "ERROR"}, timeout=60)
    assert s["status"] == "SUCCESS", s
    assert s["path"] == "/alice/stage1"
    assert tree_of(b.user_root / "alice" / "stage1") == tree_of(src1)
    assert s["staged_to"] == "tape-cache-7" and s["stager_msg"] == "recalled from tape"
    assert_times(s, "STAGING", "TRANSFERRING", "SUCCESS")
    assert s.get("time_staged") and s["time_staged"] != s["time_staging"] and s["time_staged"] > s["time_staging"]
    assert s["files_total"] == 4 and s["detailed_status"]

    # form submit (of a folder not there yet) with a staging_timeout, JSON doneStaging with an
    # absolute `path` to a folder inside the submitted one
    r = submit(b, "bob", "not-there-yet", form=True, staging_timeout=300)
    assert r.status == 202, r
    j2, code2 = r.json()["job_id"], r.json()["authcode"]
    codes.append(code2)
    assert job(b, j2)["status"] == "STAGING"
    src2 = make_tree(b.dts_root / "not-there-yet" / "staged2", payload("two"))
    r = done(b, j2, code2, True, path=str(src2), staged_to="/scratch/x", msg="unpacked")
    assert r.status == 200, r
    s = b.wait_status(j2, {"SUCCESS", "ERROR"}, timeout=60)
    assert s["status"] == "SUCCESS", s
    assert s["path"] == "/bob/staged2"
    assert tree_of(b.user_root / "bob" / "staged2") == tree_of(src2)
    assert s["stager_path"] == str(src2) and s["staged_to"] == "/scratch/x" and s["stager_msg"] == "unpacked"

    # a code works once
    for jid, code in ((j1, code1), (j2, code2)):
        r = done(b, jid, code, True)
        assert r.status == 403, r
        assert r.json()["error"]["httpcode"] == 403
    assert not (b.user_root / "alice" / "stage1-1").exists()
    assert leftovers(b.user_root) == []

    # only a hash of the code is kept: never in Redis in clear, never in the log
    dump = redis_dump(redis_proc)
    assert j1 in dump and j2 in dump  # the scan did see the jobs
    log = b.log_text()
    assert j1 in log
    for code in codes:
        assert code not in dump
        assert code not in log


def test_staged_job_owns_its_folder(bridges) -> None:
    """A folder completed through the stager is not copied again by a later /complete_transfer."""
    b = bridges()
    src = make_tree(b.dts_root / "staged-once", payload("once"))
    r = submit(b, "alice", "staged-once")
    assert r.status == 202, r
    jid, code = r.json()["job_id"], r.json()["authcode"]
    s = job(b, jid)
    assert "time_submitted" not in s, s  # a staging job has not entered SUBMITTED yet
    assert done(b, jid, code, True).status == 200
    s = b.wait_status(jid, {"SUCCESS", "ERROR"}, timeout=60)
    assert s["status"] == "SUCCESS", s
    assert_times(s, "STAGING", "SUBMITTED", "TRANSFERRING", "SUCCESS")
    again = b.complete("alice", "staged-once")
    assert again.status == 200, again
    assert again.json()["job_id"] == jid
    assert sorted(p.name for p in (b.user_root / "alice").iterdir()) == ["staged-once"]
    assert tree_of(b.user_root / "alice" / "staged-once") == tree_of(src)


def test_done_staging_failure_and_refusals(bridges) -> None:
    b = bridges()
    make_tree(b.dts_root / "ok", payload("ok"))

    # the stager reports failure
    r = submit(b, "alice", "ok")
    jid, code = r.json()["job_id"], r.json()["authcode"]
    r = done(b, jid, code, False, form=True, msg="tape drive on fire")
    assert r.status == 200, r
    s = job(b, jid)
    assert s["status"] == "ERROR" and s["reason"] == "staging_failed", s
    assert "tape drive on fire" in s["detailed_status"]
    assert s["stager_msg"] == "tape drive on fire"
    assert_times(s, "STAGING", "ERROR")
    assert not (b.user_root / "alice" / "ok").exists()
    assert done(b, jid, code, True).status == 403  # used (and the job no longer waits)

    # refusals of a live job: 400 for bad parameters, 403 for a wrong code or job
    r = submit(b, "alice", "ok")
    jid, code = r.json()["job_id"], r.json()["authcode"]
    assert done(b, jid, None, True).status == 400  # no authcode
    assert done(b, jid, "", True, form=True).status == 400  # empty authcode
    assert done(b, jid, code, None).status == 400  # no success
    assert done(b, jid, code, "maybe").status == 400
    assert done(b, jid, code, "maybe", form=True).status == 400
    assert done(b, jid, code, 3).status == 400
    assert b.call("POST", "/doneStaging", raw=b"{not json", headers={"Content-Type": "application/json"}).status == 400
    assert done(b, jid, code + "x", True).status == 403  # wrong code
    assert done(b, jid, code[:-1], True).status == 403
    assert done(b, str(uuid.uuid4()), code, True).status == 403  # unknown job
    assert done(b, "not-a-job", code, True).status == 403
    # `path` outside the submitted folder: 403; inside it but missing: 400; the code is not used up
    for bad in ("/etc", "../users/alice", "ok/../../users", "/", "does-not-exist"):
        r = done(b, jid, code, True, path=bad)
        assert r.status == 403, (bad, r)
    r = done(b, jid, code, True, path="ok/does-not-exist")
    assert r.status == 400, r
    assert job(b, jid)["status"] == "STAGING"
    r = done(b, jid, code, "true", form=True)
    assert r.status == 200, r
    s = b.wait_status(jid, {"SUCCESS", "ERROR"})
    assert s["status"] == "SUCCESS", s
    assert s["path"] == "/alice/ok"

    # a job that is not waiting for staging
    make_tree(b.dts_root / "plain", payload("plain"))
    r = b.complete("alice", "plain")
    assert r.status == 201, r
    assert done(b, r.json()["job_id"], code, True).status == 403
    assert done(b, jid, code, True).status == 403  # SUCCESS now

    # /submitTransfer refusals
    assert submit(b, "nosuchuser", "ok").status == 400
    assert submit(b, "Alice", "ok").status == 400
    assert b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "alice"}).status == 400
    assert submit(b, "alice", "ok", token=NOROLE_TOKEN).status == 403
    r = b.call("POST", "/submitTransfer", json_body={"target_user": "alice", "subdirectory": "ok"})
    assert r.status == 401 and "www-authenticate" in r.headers
    assert code not in b.log_text()


def test_done_staging_concurrent_use_of_one_code(bridges) -> None:
    b = bridges()
    for round_ in range(3):
        make_tree(b.dts_root / f"race{round_}", payload(f"race{round_}"))
        r = submit(b, "alice", f"race{round_}")
        jid, code = r.json()["job_id"], r.json()["authcode"]
        barrier = threading.Barrier(2)
        answers: list[int] = []

        def use(form: bool) -> None:
            barrier.wait()
            answers.append(done(b, jid, code, True, form=form).status)

        threads = [threading.Thread(target=use, args=(f,)) for f in (False, True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(answers) == [200, 403], answers
        s = b.wait_status(jid, {"SUCCESS", "ERROR"})
        assert s["status"] == "SUCCESS", s
        assert s["attempts"] == 1, s
    published = sorted(p.name for p in (b.user_root / "alice").iterdir())
    assert published == ["race0", "race1", "race2"]


# -- staging timeouts -----------------------------------------------------------------


def test_staging_timeout(bridges) -> None:
    b = bridges()
    r = submit(b, "alice", "never-staged", staging_timeout=1)
    assert r.status == 202, r
    jid, code = r.json()["job_id"], r.json()["authcode"]
    t0 = time.monotonic()
    s = b.wait_status(jid, {"ERROR", "SUCCESS", "CANCELLED", "SUBMITTED"}, timeout=15)
    assert time.monotonic() - t0 < 6, "the staging deadline was not kept"
    assert s["status"] == "ERROR" and s["reason"] == "staging_timeout", s
    assert s["detailed_status"]
    assert_times(s, "STAGING", "ERROR")
    assert done(b, jid, code, True).status == 403  # too late
    assert submit(b, "alice", "x", staging_timeout="soon").status == 400
    assert submit(b, "alice", "x", staging_timeout=-1).status == 400
    # A fraction of a second is kept as given, in the record and in the message (it was cut to 0).
    r = submit(b, "alice", "brief", staging_timeout=0.9)
    assert r.status == 202, r
    s = b.wait_status(r.json()["job_id"], {"ERROR", "SUCCESS", "CANCELLED", "SUBMITTED"}, timeout=15)
    assert s["reason"] == "staging_timeout" and s["staging_timeout"] == 0.9, s
    assert "within 0.9 seconds" in s["detailed_status"], s
    assert job(b, jid)["staging_timeout"] == 1 and isinstance(job(b, jid)["staging_timeout"], int)


@pytest.mark.timeout(180)
def test_staging_timeout_passes_while_stopped(bridges, redis_proc) -> None:
    b = bridges()
    r = submit(b, "alice", "never-staged", staging_timeout=2)
    jid = r.json()["job_id"]
    r2 = submit(b, "alice", "later", staging_timeout=600)  # a job whose deadline is far away
    jid2 = r2.json()["job_id"]
    assert b.stop() in (0, -15)  # twistd re-raises SIGTERM after a clean shutdown
    assert "Server Shut Down" in b.log_text()
    time.sleep(4)
    assert redis_proc.cli("HGET", f"{PREFIX}:job:{jid}", "status") == "STAGING"  # nobody was there to end it
    b.start()
    t0 = time.monotonic()
    s = b.wait_status(jid, {"ERROR", "SUCCESS", "CANCELLED", "SUBMITTED"}, timeout=15)
    assert time.monotonic() - t0 < 5, "the overdue staging job was not ended promptly after the start"
    assert s["status"] == "ERROR" and s["reason"] == "staging_timeout", s
    assert job(b, jid2)["status"] == "STAGING"


# -- cancel -------------------------------------------------------------------------------


def make_big(root: Path, files: int = 8, mib: int = 64) -> Path:
    """Incompressible, non-sparse files, written quickly (one random MiB repeated)."""
    root.mkdir(parents=True)
    for i in range(files):
        block = os.urandom(1 << 20)
        with open(root / f"big{i}.bin", "wb") as f:
            for _ in range(mib):
                f.write(block)
    return root


# A copy slow enough to cancel: md5 (the slowest checksum, ~2 passes per byte), one
# thread, and enough incompressible data for several seconds.
SLOW = {"copy": {"max_jobs": 1, "threads": 1, "fsync": "true", "checksum": "md5"}}


def start_big_copy(b: DtsBridge, name: str = "big", files: int = 12) -> str:
    make_big(b.dts_root / name, files=files)
    r = b.complete("alice", name, asynchronous=True)
    assert r.status == 202, r
    jid = r.json()["job_id"]
    wait_for(lambda: (lambda s: s["status"] == "TRANSFERRING" and s.get("bytes_done", 0) > 0)(job(b, jid)),
             60, "the big copy is under way", 0.05)
    return jid


def assert_cancelled_copy_stops(runner: DtsBridge, canceller: DtsBridge, jid: str, name: str = "big") -> None:
    """Cancel a running copy through ``canceller``; it stops in ``runner`` and leaves nothing behind."""
    s = job(canceller, jid)
    assert s["status"] == "TRANSFERRING", f"the copy ended before it could be cancelled; make it bigger: {s}"
    assert leftovers(runner.user_root), "no temporary folder while copying?"
    t0 = time.monotonic()
    r = cancel(canceller, jid)
    assert r.status == 200, r
    assert r.json()["status"] == "CANCELLED"
    wait_for(lambda: f"job {jid} ended CANCELLED" in runner.log_text(), 15, "the copy stopped", 0.05)
    stopped = time.monotonic() - t0
    assert stopped < 3, f"the running copy took {stopped:.1f} s to stop"
    assert leftovers(runner.user_root) == []
    assert not (runner.user_root / "alice" / name).exists()
    s = job(canceller, jid)
    assert s["status"] == "CANCELLED" and s["reason"] == "cancelled", s
    assert_times(s, "SUBMITTED", "TRANSFERRING", "CANCELLED")
    time.sleep(1.2)  # a heartbeat after the cancel must not overwrite what the job says
    s = job(canceller, jid)
    assert s["status"] == "CANCELLED" and "cancel" in s.get("detailed_status", ""), s


@pytest.mark.timeout(240)
def test_cancel_queued_staging_and_running(bridges) -> None:
    b = bridges(SLOW)
    make_tree(b.dts_root / "small", payload("small"))
    big = start_big_copy(b)  # holds the only slot

    # a /complete_transfer repeat waiting on the running job
    answer: list[Response] = []
    waiter = threading.Thread(target=lambda: answer.append(b.complete("alice", "big", timeout=120)))
    waiter.start()

    # a queued job
    r = b.complete("alice", "small", asynchronous=True)
    assert r.status == 202, r
    queued = r.json()["job_id"]
    assert job(b, queued)["status"] == "SUBMITTED"
    r = cancel(b, queued)
    assert r.status == 200, r
    assert r.json()["status"] == "CANCELLED"
    s = job(b, queued)
    assert s["status"] == "CANCELLED" and s["reason"] == "cancelled", s
    assert_times(s, "SUBMITTED", "CANCELLED")
    assert "time_transferring" not in s

    # a staging job
    r = submit(b, "alice", "small")
    staging, code = r.json()["job_id"], r.json()["authcode"]
    r = cancel(b, staging)
    assert r.status == 200, r
    s = job(b, staging)
    assert s["status"] == "CANCELLED" and s["reason"] == "cancelled", s
    assert_times(s, "STAGING", "CANCELLED")
    assert done(b, staging, code, True).status == 403

    # the running job
    assert not answer, f"the repeat did not wait for the running job: {answer}"
    assert_cancelled_copy_stops(b, b, big)
    waiter.join(30)
    assert answer and answer[0].status == 409, answer  # never a 5xx, which DTS would retry
    err = answer[0].json()["error"]
    assert err["reason"] == "cancelled" and err["job_id"] == big, err
    assert 0 < job(b, big).get("bytes_done", 0) < 12 * 64 << 20

    # ended jobs: 409; unknown: 404; no role: 403; no token: 401
    assert cancel(b, big).status == 409
    assert cancel(b, queued).status == 409
    assert cancel(b, str(uuid.uuid4())).status == 404
    assert cancel(b, "nope").status == 404
    assert cancel(b, queued, token=NOROLE_TOKEN).status == 403
    assert cancel(b, queued, token=ALICE_TOKEN).status == 403
    assert cancel(b, queued, token=None).status == 401

    # the slot is free again and the cancelled jobs left nothing behind
    r = b.complete("alice", "small")
    assert r.status == 201, r
    assert r.json()["job_id"] not in (queued, staging)
    assert sorted(p.name for p in (b.user_root / "alice").iterdir()) == ["small"]
    assert leftovers(b.user_root) == []
    time.sleep(1.5)  # a heartbeat after the end must not bring back progress or a state
    assert job(b, big)["status"] == "CANCELLED"


@pytest.mark.timeout(240)
def test_cancel_running_copy_from_another_process(bridges) -> None:
    a = bridges(SLOW, name="a")
    big = start_big_copy(a)
    b = bridges(SLOW, name="b", shared_from=a)  # shares Redis and folders; the copy runs in `a`
    assert_cancelled_copy_stops(a, b, big)
    assert f"job {big} ended" not in b.log_text()


def test_cancel_ended_job_409(bridges) -> None:
    b = bridges()
    make_tree(b.dts_root / "t", payload("t"))
    r = b.complete("alice", "t")
    assert r.status == 201, r
    assert cancel(b, r.json()["job_id"]).status == 409
    r = submit(b, "alice", "t", staging_timeout=1)
    jid = r.json()["job_id"]
    b.wait_status(jid, "ERROR", timeout=15)
    r = cancel(b, jid)
    assert r.status == 409, r
    assert job(b, jid)["reason"] == "staging_timeout"


# -- the watcher ---------------------------------------------------------------------------

WATCH = {"watch": {"enabled": "true", "interval_seconds": "0.5", "settle_seconds": "1"}}


def manifest_for(folder: Path, user: str, transfer: str) -> bytes:
    resources = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            data = p.read_bytes()
            rel = str(p.relative_to(folder))
            resources.append({"id": rel, "name": p.stem, "path": rel, "format": "txt", "media_type": "text/plain",
                              "bytes": len(data), "hash": hashlib.md5(data).hexdigest()})
    return json.dumps({
        "name": "manifest", "profile": "data-package", "created": "2026-01-01T00:00:00Z",
        "description": "a test transfer", "username": user,
        "contributors": [{"id": transfer, "title": "tester"}],
        "instructions": {"protocol": "KBase narrative import", "objects": []},
        "resources": resources}, indent=1).encode()


def dts_transfer(dts_root: Path, user: str = "alice", manifest: bool = True) -> tuple[str, Path]:
    transfer = str(uuid.uuid4())
    folder = make_tree(dts_root / user / f"dts-{transfer}", {
        "data": {"reads.fastq": os.urandom(20000), "notes.txt": b"hello\n"}, "top.csv": b"a,b\n1,2\n"})
    if manifest:
        (folder / "manifest.json").write_bytes(manifest_for(folder, user, transfer))
    return f"{user}/dts-{transfer}", folder


def watched_job(b: DtsBridge, rel: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        js = jobs_for(b, "alice", rel)
        return js[0] if js and js[0]["status"] in statuses else None
    return wait_for(find, timeout, f"a watcher job for {rel} in {statuses}", 0.2)


@pytest.mark.timeout(180)
def test_watch_two_processes_complete_once(bridges) -> None:
    b1 = bridges(WATCH, name="a", start=False)
    b2 = bridges(WATCH, name="b", shared_from=b1, start=False)
    b1.start()
    b2.start()
    folders = [dts_transfer(b1.dts_root) for _ in range(3)]
    found = {}
    for rel, src in folders:
        s = watched_job(b1, rel, {"SUCCESS", "ERROR"})
        assert s["status"] == "SUCCESS", s
        name = rel.split("/")[1]
        assert s["path"] == f"/alice/{name}" and s["target_user"] == "alice"
        assert s.get("manifest_resources") == 3, s
        assert_times(s, "SUBMITTED", "TRANSFERRING", "SUCCESS")
        assert tree_of(b1.user_root / "alice" / name) == tree_of(src)
        found[rel] = s["job_id"]
    time.sleep(3)  # several more passes of both watchers
    published = sorted(p.name for p in (b1.user_root / "alice").iterdir())
    assert published == sorted(rel.split("/")[1] for rel, _ in folders), published
    assert leftovers(b1.user_root) == []
    for rel, _ in folders:
        js = jobs_for(b2, "alice", rel)
        assert [j["job_id"] for j in js] == [found[rel]], js
        # a later /complete_transfer for the folder is a repeat of the watcher's job
        for b, sub in ((b1, rel), (b2, str(b1.dts_root / rel))):  # relative or as a full path
            r = b.complete("alice", sub)
            assert r.status == 200, r
            assert r.json()["job_id"] == found[rel]
            assert r.json()["path"] == f"/alice/{rel.split('/')[1]}"
    assert sorted(p.name for p in (b1.user_root / "alice").iterdir()) == published
    # no job ran twice, in either process
    for rel, _ in folders:
        assert job(b1, found[rel])["attempts"] == 1
    log = b1.log_text() + b2.log_text()
    for rel, _ in folders:
        assert log.count(f"job {found[rel]} ended SUCCESS") == 1, rel


@pytest.mark.timeout(180)
def test_watch_settling_and_bad_manifest(bridges) -> None:
    b = bridges(WATCH)

    # a manifest still growing is not taken
    transfer = str(uuid.uuid4())
    rel = f"alice/dts-{transfer}"
    folder = make_tree(b.dts_root / rel, {"x.txt": b"x" * 1000, "y": {"z.bin": os.urandom(3000)}})
    text = manifest_for(folder, "alice", transfer)
    cut = len(text) // 2
    with open(folder / "manifest.json", "wb") as f:
        f.write(text[:cut])
        f.flush()
        end = time.monotonic() + 4  # four settle periods
        pos = cut
        while time.monotonic() < end:
            time.sleep(0.1)
            step = max(1, (len(text) - cut) // 60)
            if pos + step < len(text) - 1:
                f.write(text[pos:pos + step])
                pos += step
            else:
                f.write(b" ")  # keep growing without finishing the JSON
            f.flush()
            assert jobs_for(b, "alice", rel) == [], "a growing manifest was taken"
    # finish it (the rest of the JSON after the padding spaces is still valid JSON? no: rewrite it whole)
    tmp = folder / ".manifest.tmp"
    tmp.write_bytes(text)
    os.rename(tmp, folder / "manifest.json")
    s = watched_job(b, rel, {"SUCCESS", "ERROR"})
    assert s["status"] == "SUCCESS", s
    assert tree_of(b.user_root / "alice" / f"dts-{transfer}") == tree_of(folder)

    # a manifest that is not JSON fails its job with a reason; the watcher goes on
    bad_rel, bad = dts_transfer(b.dts_root, manifest=False)
    (bad / "manifest.json").write_bytes(b'{"username": "alice", "resources": [')
    s = watched_job(b, bad_rel, {"SUCCESS", "ERROR"})
    assert s["status"] == "ERROR" and s["reason"] == "manifest_mismatch", s
    assert s["detailed_status"]
    assert_times(s, "ERROR")
    assert not (b.user_root / bad_rel.split("/")[1]).exists()
    assert not (b.user_root / "alice" / bad_rel.split("/")[1]).exists()
    # a manifest listing a file that is not there
    missing_rel, missing = dts_transfer(b.dts_root, manifest=False)
    m = json.loads(manifest_for(missing, "alice", "x"))
    m["resources"].append({"id": "gone", "name": "gone", "path": "gone.txt", "bytes": 3,
                           "hash": hashlib.md5(b"abc").hexdigest()})
    (missing / "manifest.json").write_text(json.dumps(m))
    s = watched_job(b, missing_rel, {"SUCCESS", "ERROR"})
    assert s["status"] == "ERROR" and s["reason"] == "manifest_mismatch", s

    # in alice's DTS folder, a manifest naming bob delivers nothing (issue 10)
    mixed_rel, mixed_src = dts_transfer(b.dts_root, manifest=False)
    (mixed_src / "manifest.json").write_bytes(manifest_for(mixed_src, "bob", "t-bob"))
    s = watched_job(b, mixed_rel, {"SUCCESS", "ERROR"})
    assert s["status"] == "ERROR" and s["reason"] == "manifest_mismatch", s
    assert not (b.user_root / "bob" / mixed_rel.split("/")[1]).exists()
    assert not (b.user_root / "alice" / mixed_rel.split("/")[1]).exists()
    # outside that layout (a folder right below dts_root) the manifest's username decides
    bob_rel = f"dts-{uuid.uuid4()}"
    bob_src = make_tree(b.dts_root / bob_rel, {"for-bob.txt": b"bob\n"})
    (bob_src / "manifest.json").write_bytes(manifest_for(bob_src, "bob", "t-bob"))
    s = wait_for(lambda: [j for j in json.loads(b.call("GET", "/jobs?user=bob", token=DTS_TOKEN).body)["jobs"]
                          if j["subdirectory"] == bob_rel and j["status"] in ("SUCCESS", "ERROR")],
                 60, "the job for bob")[0]
    assert s["status"] == "SUCCESS" and s["target_user"] == "bob", s
    assert tree_of(b.user_root / "bob" / bob_rel) == tree_of(bob_src)

    good_rel, good = dts_transfer(b.dts_root)
    s = watched_job(b, good_rel, {"SUCCESS", "ERROR"})
    assert s["status"] == "SUCCESS", s
    assert tree_of(b.user_root / "alice" / good_rel.split("/")[1]) == tree_of(good)
    assert leftovers(b.user_root) == []
    # a transfer folder right below dts_root, and a manifest of 0 bytes (a transfer with no
    # resources; the user comes from the manifest, else from the DTS layout)
    top_rel = f"dts-{uuid.uuid4()}"
    top = make_tree(b.dts_root / top_rel, {"only.txt": b"top level\n"})
    (top / "manifest.json").write_bytes(manifest_for(top, "alice", "top"))
    empty_rel, empty = dts_transfer(b.dts_root, manifest=False)
    (empty / "manifest.json").write_bytes(b"")
    for r_ in (top_rel, empty_rel):
        s = watched_job(b, r_, {"SUCCESS", "ERROR"})
        assert s["status"] == "SUCCESS", s
    assert tree_of(b.user_root / "alice" / top_rel) == tree_of(top)
    assert tree_of(b.user_root / "alice" / empty_rel.split("/")[1]) == tree_of(empty)

    # across a restart, nothing is taken again (and the failed folder is not retried)
    before = sorted(p.name for p in (b.user_root / "alice").iterdir())
    b.stop()
    b.start()
    time.sleep(3)  # several passes of the new watcher
    assert sorted(p.name for p in (b.user_root / "alice").iterdir()) == before
    for r_ in (rel, bad_rel, missing_rel, mixed_rel, good_rel, top_rel, empty_rel):
        assert len(jobs_for(b, "alice", r_)) == 1, r_
    assert leftovers(b.user_root) == []


def test_watch_records_refused_folders(bridges) -> None:
    """A manifest naming no user, or a user that does not exist, fails its own job; nothing is copied."""
    b = bridges(WATCH)
    nouser_rel = f"dts-{uuid.uuid4()}"
    nouser = make_tree(b.dts_root / nouser_rel, {"a.txt": b"a\n"})
    m = json.loads(manifest_for(nouser, "alice", "t"))
    del m["username"]
    (nouser / "manifest.json").write_text(json.dumps(m))
    ghost_rel = f"dts-{uuid.uuid4()}"
    ghost = make_tree(b.dts_root / ghost_rel, {"b.txt": b"b\n"})
    (ghost / "manifest.json").write_bytes(manifest_for(ghost, "nosuchuser", "t"))

    def failed() -> dict[str, dict[str, Any]]:
        r = b.call("GET", "/jobs?status=ERROR", token=DTS_TOKEN)
        assert r.status == 200, r
        return {j["subdirectory"]: j for j in r.json()["jobs"] if j["subdirectory"] in (nouser_rel, ghost_rel)}

    found = wait_for(lambda: (lambda f: f if len(f) == 2 else None)(failed()), 60, "two refused watcher jobs", 0.2)
    assert found[nouser_rel]["reason"] == "manifest_mismatch", found
    assert found[ghost_rel]["reason"] == "user_not_found", found
    assert found[ghost_rel]["target_user"] == "nosuchuser"
    for j in found.values():
        assert j["detailed_status"] and j["submitter"] == "watcher"
        assert_times(j, "ERROR")
    assert "watcher:" in b.log_text() and "cannot be completed" in b.log_text()
    assert not (b.user_root / "nosuchuser").exists()
    assert sorted(p.name for p in (b.user_root / "alice").iterdir()) == []
    # the watcher goes on with good folders
    good_rel, good = dts_transfer(b.dts_root)
    s = watched_job(b, good_rel, {"SUCCESS", "ERROR"})
    assert s["status"] == "SUCCESS", s


def test_watch_takes_a_folder_whose_taker_died(bridges, redis_proc) -> None:
    """A mark left by a process that died before queueing the job expires; the folder is then completed."""
    b = bridges(WATCH, start=False)
    rel, src = dts_transfer(b.dts_root)
    redis_proc.cli("SET", f"{PREFIX}:watched:{rel}", "taking:deadhost:1", "EX", "8")  # outlives a slow start + 2 s
    b.start()
    while int(redis_proc.cli("PTTL", f"{PREFIX}:watched:{rel}")) > 300:  # (however long the start took)
        assert jobs_for(b, "alice", rel) == [], "a folder being taken by another process was taken twice"
        time.sleep(0.2)
    s = watched_job(b, rel, {"SUCCESS", "ERROR"}, timeout=30)
    assert s["status"] == "SUCCESS", s
    assert redis_proc.cli("GET", f"{PREFIX}:watched:{rel}") == s["job_id"]
    # kept as long as its job is ([state] retention_days, 30 by default), then forgotten with it
    assert 29 * 86400 < int(redis_proc.cli("TTL", f"{PREFIX}:watched:{rel}")) <= 30 * 86400
    assert tree_of(b.user_root / "alice" / rel.split("/")[1]) == tree_of(src)


@pytest.mark.timeout(180)
def test_watch_non_utf8_folder_names_get_one_error_job_and_never_block_others(bridges, redis_proc) -> None:
    """A DTS folder named with bytes that are not UTF-8 (b'\\xff'): it cannot be a job's subdirectory nor a
    Redis key as such; it gets one ERROR job (its name spelt \\xff) and the good folders after it go through."""
    b = bridges(WATCH, start=False)
    area = os.fsencode(b.dts_root / "alice")
    os.makedirs(area)
    bad = [b"dts-%d-\xff" % i for i in range(4)] + [b"dts-4-\xc3("]  # a lone byte, a broken sequence
    for name in bad:
        os.makedirs(area + b"/" + name)
        open(area + b"/" + name + b"/a.txt", "wb").write(b"hello")
        open(area + b"/" + name + b"/manifest.json", "wb").write(b'{"username": "alice", "resources": []}')
    good = [dts_transfer(b.dts_root) for _ in range(4)]
    b.start()
    for rel, src in good:
        s = watched_job(b, rel, {"SUCCESS", "ERROR"})
        assert s["status"] == "SUCCESS", s
        assert tree_of(b.user_root / "alice" / rel.split("/")[1]) == tree_of(src)
    shown = {"alice/" + n.decode("utf-8", "backslashreplace") for n in bad}
    assert "alice/dts-4-\\xc3(" in shown

    def refused() -> dict[str, dict[str, Any]] | None:
        js = [j for j in b.call("GET", "/jobs?limit=1000", token=DTS_TOKEN).json()["jobs"]
              if j["subdirectory"] in shown]
        return {j["subdirectory"]: j for j in js} if len(js) >= len(bad) else None
    found = wait_for(refused, 30, "an ERROR job for each non-UTF-8 folder", 0.2)
    for j in found.values():
        assert j["status"] == "ERROR" and j["reason"] == "bad_request" and "not valid UTF-8" in j["detailed_status"], j
        assert j["submitter"] == "watcher" and j["target_user"] == "alice", j
    time.sleep(2)  # more passes, then a restart: still one job per folder
    b.stop()
    b.start()
    time.sleep(3)
    js = [j for j in b.call("GET", "/jobs?limit=1000", token=DTS_TOKEN).json()["jobs"]]
    assert sorted(j["subdirectory"] for j in js) == sorted(shown | {rel for rel, _ in good}), js
    assert sorted(os.listdir(b.user_root / "alice")) == sorted(rel.split("/")[1] for rel, _ in good)
    assert "InvalidData" not in b.log_text() and "Traceback" not in b.log_text(), b.log_tail()
    assert b.log_text().count("is not valid UTF-8") == len(bad), b.log_tail()
