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
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DTS_TOKEN, DtsBridge, Response, leftovers, make_tree, tree_of, wait_until
from tests.redis_fixture import RedisProcess, start_private_redis

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
    for k in made:  # every key naming an ended job expires with it, but the watcher's marks (see below)
        if k.startswith(f"{P}:watched:"):
            assert int(redis_proc.cli("PTTL", k)) > 29 * 86400 * 1000, k
        else:
            assert 0 < int(redis_proc.cli("PTTL", k)) <= 4000, k

    # four seconds later: forgotten, and nothing is left of them in Redis
    def forgotten() -> bool:
        return all(b.status(j).status == 404 for j in ids)
    wait_until(forgotten, 20, "the ended jobs to be forgotten", b.log_tail, interval=0.3)
    assert not jobs_listed(b)
    # the index entries go at the next housekeeping tick (every second)
    wait_until(lambda: redis_proc.cli("EXISTS", f"{P}:jobs", f"{P}:expiring") == "0", 5, "the index to be trimmed")
    left = redis_keys(redis_proc)
    # the watcher's marks of the folders still in the DTS area stay (they are never delivered twice)
    assert job_keys(left) == {f"{P}:watched:alice/dts-w1", f"{P}:watched:nobody/dts-w2"}, left
    left -= job_keys(left)
    # what remains is the service's own bookkeeping (the trim cursor, the events stream, which
    # is trimmed by age): no key is about one of the forgotten jobs
    assert not [k for k in left for j in ids if j in k], left
    assert left - fixed <= {f"{P}:trim_cursor", f"{P}:events"}, left - fixed

    # a forgotten job is forgotten: the same request is a new job (the first copy is still there)
    again = b.complete("alice", "kept")
    assert again.status == 201, again
    assert again.json()["job_id"] != first.json()["job_id"] and again.json()["path"] == "/alice/kept-1"
    # while the watcher that took a folder still runs, it does not take it again
    assert not [j for j in jobs_listed(b) if j.get("submitter") == "watcher"]
    # once the folders leave the DTS area, their marks are forgotten after the retention too
    shutil.rmtree(b.dts_root / "alice" / "dts-w1")
    shutil.rmtree(b.dts_root / "nobody" / "dts-w2")
    wait_until(lambda: not job_keys(redis_keys(redis_proc)) - {f"{P}:folder:alice:kept"}, 15,
               "the watcher's marks to be forgotten", b.log_tail, interval=0.3)


def test_watched_folder_is_not_delivered_again_after_retention_and_restart(services, redis_proc: RedisProcess) -> None:
    """Its job is forgotten after [state] retention_days, but the folder stays in the DTS area (delete_source
    false, the default): a restarted watcher (with no memory) must not deliver it again as <name>-1."""
    b = services({"state": {"retention_days": f"{3 / 86400:.10f}"}, "watch": WATCH})
    rel = "alice/dts-0b6c2f1e-0000-4000-8000-000000000001"
    make_tree(b.dts_root / rel, {"a.txt": b"hello"})
    (b.dts_root / rel / "manifest.json").write_text('{"username": "alice", "resources": []}')
    bad = b.dts_root / "nobody" / "dts-refused"  # and a refused folder keeps its one ERROR job
    make_tree(bad, {"a.txt": b"x"})
    (bad / "manifest.json").write_bytes(b"")

    def watched() -> list[dict[str, Any]]:
        js = [j for j in jobs_listed(b) if j.get("submitter") == "watcher" and j["status"] in ("SUCCESS", "ERROR")]
        return js if len(js) == 2 else []
    first = wait_until(watched, 30, "the watched folders' jobs", b.log_tail)
    assert {j["status"] for j in first} == {"SUCCESS", "ERROR"}, first
    wait_until(lambda: not jobs_listed(b), 20, "the jobs to be forgotten", b.log_tail, interval=0.3)
    for round_ in range(2):  # a restart after the retention, then another one
        b.stop()
        b.start()
        time.sleep(3)  # several passes (0.3 s) after the settle time (0.5 s)
        assert not jobs_listed(b), f"round {round_}: {jobs_listed(b)}"
        assert sorted(os.listdir(b.user_root / "alice")) == [rel.split("/")[1]]
        assert not (b.user_root / "nobody").exists()
    mark = f"{P}:watched:{rel}"
    assert int(redis_proc.cli("PTTL", mark)) > 29 * 86400 * 1000  # renewed by the restarted watcher


def test_redis_stays_flat_over_many_jobs(services, redis_proc: RedisProcess) -> None:
    b = services({"state": {"retention_days": f"{3 / 86400:.10f}"}})
    n = 80
    for i in range(5 + 2 * n):
        make_tree(b.dts_root / f"f{i}", {"x.txt": b"%d\n" % i})

    def run_round(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            r = b.complete("alice", f"f{i}")
            assert r.status == 201, r

    def clean() -> bool:
        return (not job_keys(redis_keys(redis_proc)) and not jobs_listed(b)
                and redis_proc.cli("EXISTS", f"{P}:jobs", f"{P}:expiring") == "0")

    def memory() -> int:
        """Bytes held by the service's keys, but the events stream (trimmed by age, 24 h).

        (``used_memory`` as a whole moves by ±60 KB between identical rounds here: the
        Lua heap is collected lazily and client buffers come and go.)
        """
        return sum(int(redis_proc.cli("MEMORY", "USAGE", k, "SAMPLES", "0") or 0)
                   for k in redis_keys(redis_proc) if k != f"{P}:events")

    run_round(0, 5)  # warm up
    wait_until(clean, 20, "a clean start", b.log_tail, interval=0.3)
    base_keys = len(redis_keys(redis_proc))
    run_round(5, 5 + n)
    assert len(redis_keys(redis_proc)) >= base_keys + 10  # (the first ones may be forgotten already)
    wait_until(clean, 20, "the first round to be forgotten", b.log_tail, interval=0.3)
    after_first = memory()
    assert len(redis_keys(redis_proc)) == base_keys
    run_round(5 + n, 5 + 2 * n)
    wait_until(clean, 20, "the second round to be forgotten", b.log_tail, interval=0.3)
    assert len(redis_keys(redis_proc)) == base_keys
    # 80 more jobs (about 2.3 KB each while kept) leave nothing behind
    assert memory() == after_first < 1024, (after_first, memory())


def test_retention_days_must_be_positive(tmp_path: Path) -> None:
    for bad in ("0", "-1", "soon", "nan"):
        s = DtsBridge(tmp_path / bad, "redis://127.0.0.1:1", settings={"state": {"retention_days": bad}})
        s.start(wait=False)
        assert s.proc.wait(30) == 2
        assert "[state] retention_days" in s.log_text(), s.log_text()


# -- 4-6. answers that must not make callers do the wrong thing -----------------------


def test_repeat_after_delete_source_answers_200_with_the_same_body(services) -> None:
    b = services({"paths": {"delete_source": "true"}})
    src = make_tree(b.dts_root / "gone-after", small("g"))
    first = b.complete("alice", "gone-after")
    assert first.status == 201, first
    assert not src.exists()
    for sub in ("gone-after", "./gone-after/", str(b.dts_root / "gone-after")):
        again = b.complete("alice", sub)
        assert again.status == 200, (sub, again)
        assert again.json() == first.json()
    # another user, or a folder that never was, is still a 404
    error_of(b.complete("bob", "gone-after"), 404)
    error_of(b.complete("alice", "never-was"), 404)


def run_in_background(fn, *args: Any, **kw: Any) -> dict[str, Any]:
    import threading

    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["r"] = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001
            out["e"] = e
    t = threading.Thread(target=go, daemon=True)
    t.start()
    out["thread"] = t
    return out


def running_job(b: DtsBridge, sub: str) -> str:
    def find() -> str | None:
        for j in jobs_listed(b):
            if j.get("subdirectory") == sub and j["status"] == "TRANSFERRING":
                return j["job_id"]
        return None
    return wait_until(find, 30, f"a running job for {sub}", b.log_tail)


def test_cancelled_job_answers_its_waiting_request_409(services) -> None:
    b = services(env={FAULT: "copy:3"})
    make_tree(b.dts_root / "to-cancel", {"big.bin": os.urandom(3 * 1024 * 1024)})
    waiting = run_in_background(b.complete, "alice", "to-cancel", timeout=60)
    jid = running_job(b, "to-cancel")
    r = b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": jid})
    assert r.status == 200, r
    waiting["thread"].join(30)
    err = error_of(waiting["r"], 409)
    assert err["reason"] == "cancelled" and err["job_id"] == jid, err
    assert b.wait_status(jid, "CANCELLED")["reason"] == "cancelled"
    # a later request for the same folder is a new job
    again = b.complete("alice", "to-cancel")
    assert again.status == 201, again
    assert again.json()["job_id"] != jid and again.json()["path"] == "/alice/to-cancel"
    assert leftovers(b.user_root) == []


def test_waiting_request_answers_when_the_job_record_vanishes(services, redis_proc: RedisProcess) -> None:
    b = services(env={FAULT: "copy:4"})
    make_tree(b.dts_root / "vanishing", small("v"))
    waiting = run_in_background(b.complete, "alice", "vanishing", timeout=20)
    jid = running_job(b, "vanishing")
    assert redis_proc.cli("DEL", f"{P}:job:{jid}") == "1"
    waiting["thread"].join(15)
    assert "r" in waiting, f"the waiting request did not answer: {waiting.get('e')}"
    err = error_of(waiting["r"], 500)
    assert "vanished" in err["message"] and err["job_id"] == jid, err


def test_staging_job_is_never_left_without_its_deadline(services, redis_proc: RedisProcess) -> None:
    b = services()
    # make registering the deadline fail: the job must not be made either
    redis_proc.cli("SET", f"{P}:staging", "not a sorted set")
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "alice", "subdirectory": "st"})
    assert r.status >= 500, r
    assert [j for j in jobs_listed(b) if j["status"] == "STAGING"] == []
    redis_proc.cli("DEL", f"{P}:staging")
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
               json_body={"target_user": "alice", "subdirectory": "st", "staging_timeout": 1})
    assert r.status == 202, r
    assert b.wait_status(r.json()["job_id"], "ERROR", timeout=20)["reason"] == "staging_timeout"


@pytest.fixture
def fake_kbase(tmp_path: Path):
    from tests.fakeauth2 import FakeAuth2Process

    (tmp_path / "auth2").mkdir()
    fake = FakeAuth2Process(workdir=str(tmp_path / "auth2"), state={
        "users": {u: {"customroles": []} for u in ("alice", "daemon", "svcacct")},
        "tokens": {"svc-token": "svcacct"},
    })
    fake.start()
    try:
        yield fake
    finally:
        fake.close()


@pytest.mark.parametrize("check", ["directory", "passwd", "kbase"])
def test_user_folder_link_or_file_403_and_missing_account_400(services, tmp_path: Path, check: str,
                                                              request) -> None:
    settings: dict[str, dict[str, str]] = {"users": {"check": check}, "ownership": {"mode": "passwd"}}
    if check == "kbase":
        fake = request.getfixturevalue("fake_kbase")
        settings["auth"] = {"kbase_url": fake.url, "service_token": "svc-token"}
    b = services(settings)
    make_tree(b.dts_root / "pay", small("p"))
    # alice has a datastore folder (and a KBase account) but no system account: 400, not 500
    err = error_of(b.complete("alice", "pay"), 400)
    assert err["reason"] == "user_not_found", err
    # daemon (a system account) whose datastore folder is a link, then a file: 403 whatever the check
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = b.user_root / "daemon"
    folder.symlink_to(elsewhere)
    err = error_of(b.complete("daemon", "pay"), 403)
    assert err["reason"] == "unsafe_destination", err
    folder.unlink()
    folder.write_text("not a folder")
    err = error_of(b.complete("daemon", "pay"), 403)
    assert err["reason"] == "unsafe_destination", err
    assert list(elsewhere.iterdir()) == [] and folder.read_text() == "not a folder"
    # a real folder: copied and given to the account
    folder.unlink()
    folder.mkdir()
    r = b.complete("daemon", "pay")
    assert r.status == 201, r
    assert (folder / "pay" / "a.txt").stat().st_uid == 1
    assert [j["status"] for j in jobs_listed(b)] == ["SUCCESS"]


# -- 7-9. periodic work and stopping ----------------------------------------------------


def test_housekeeping_survives_redis_refusing_writes(services, redis_proc: RedisProcess) -> None:
    b = services({"copy": {"lease_seconds": "10"}}, env={FAULT: "copy:6"})
    tree = tree_of(make_tree(b.dts_root / "during-oom", small("oom") | {"big.bin": os.urandom(1024 * 1024)}))
    r = b.complete("alice", "during-oom", asynchronous=True)
    assert r.status == 202, r
    copying = r.json()["job_id"]
    wait_until(lambda: "fault point copy reached" in b.log_text(), 30, "the copy to start", b.log_tail)
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
               json_body={"target_user": "alice", "subdirectory": "later", "staging_timeout": 2})
    staging = r.json()["job_id"]
    # Redis refuses every write (noeviction at its memory limit) for a few seconds
    assert redis_proc.cli("CONFIG", "GET", "maxmemory-policy").split()[-1] == "noeviction"
    redis_proc.cli("CONFIG", "SET", "maxmemory", "1")
    try:
        time.sleep(3.5)  # several ticks: lease renewals refused
        r = b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "bob", "subdirectory": "x"})
        assert r.status == 503, r  # a write refused for now: a 503 (retry later), not a 500
        message = r.json()["error"]["message"]  # Redis's refusal, not our script's SHA and line
        assert "OOM" in message and "script" not in message, message
        # a PING still answers, but no job can move: /healthz says so
        h = b.call("GET", "/healthz")
        assert h.status == 503 and any(p.startswith("redis") and "OOM" in p for p in h.json()["problems"]), h
    finally:
        redis_proc.cli("CONFIG", "SET", "maxmemory", "0")
    wait_until(lambda: b.call("GET", "/healthz").status == 200, 10, "healthy again once writes are taken")
    # the loop kept running: the staging timeout is applied, the copy's lease was renewed throughout
    s = b.wait_status(staging, "ERROR", timeout=10)
    assert s["reason"] == "staging_timeout", s
    s = b.wait_status(copying, {"SUCCESS", "ERROR"}, timeout=60)
    assert s["status"] == "SUCCESS" and s["attempts"] == 1, s
    assert tree_of(b.user_root / "alice" / "during-oom") == tree


def test_stopping_process_neither_requeues_nor_cancels_a_published_job(services, redis_proc: RedisProcess) -> None:
    b = services({"drain": {"grace_seconds": "0.5"}}, env={FAULT: "published:4"})
    tree = tree_of(make_tree(b.dts_root / "pub", small("pub")))
    jid = b.complete("alice", "pub", asynchronous=True).json()["job_id"]
    wait_until(lambda: "fault point published reached" in b.log_text(), 30, "the publish", b.log_tail)
    assert (b.user_root / "alice" / "pub").is_dir()  # renamed into place; the result not yet recorded
    b.signal(15)
    time.sleep(1.5)  # past the drain grace: the stopping process deals with its running copies
    r = b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": jid})
    assert r.status == 409, r
    assert redis_proc.cli("HGET", f"{P}:job:{jid}", "status") in ("TRANSFERRING", "SUCCESS")
    assert b.proc.wait(30) is not None
    assert redis_proc.cli("HGET", f"{P}:job:{jid}", "status") == "SUCCESS"
    assert redis_proc.cli("HGET", f"{P}:job:{jid}", "attempts") == "1"
    assert redis_proc.cli("LRANGE", f"{P}:queue", "0", "-1") == ""
    assert sorted(os.listdir(b.user_root / "alice")) == ["pub"] and tree_of(b.user_root / "alice" / "pub") == tree
    assert leftovers(b.user_root) == []


@pytest.fixture
def durable_redis(tmp_path: Path):
    rp = start_private_redis(tmp_path / "durable", appendonly=True)
    try:
        yield rp
    finally:
        rp.stop()


def test_stopping_with_redis_down_exits_and_loses_no_job(tmp_path: Path, durable_redis: RedisProcess) -> None:
    redis_proc = durable_redis
    b = DtsBridge(tmp_path, redis_proc.url, settings={"drain": {"grace_seconds": "0.5"},
                                                      "redis": {"timeout_seconds": "1"}})
    b.extra_env = {FAULT: "publish:3"}
    try:
        _stop_with_redis_down(b, redis_proc)
    finally:
        b.kill()


def _stop_with_redis_down(b: DtsBridge, redis_proc: RedisProcess) -> None:
    b.start()
    tree = tree_of(make_tree(b.dts_root / "down", small("down")))
    jid = b.complete("alice", "down", asynchronous=True).json()["job_id"]
    wait_until(lambda: "fault point publish reached" in b.log_text(), 30, "the copy to reach its fence", b.log_tail)
    redis_proc.stop()
    wait_until(lambda: f"fencing the publish for {jid} waits for Redis" in b.log_text(), 20,
               "the fence to wait for Redis", b.log_tail)
    started = time.monotonic()
    b.signal(15)
    try:
        rc = b.proc.wait(40)
    except Exception:  # noqa: BLE001
        rc = None
    took = time.monotonic() - started
    assert rc is not None, f"dtsbridge did not exit with Redis down:\n{b.log_tail()}"
    assert took < 25, took
    assert not (b.user_root / "alice" / "down").exists() and leftovers(b.user_root) == []
    # Redis back, the service restarted: the job is taken up again and published once
    redis_proc.start()
    b.extra_env = {}
    b.start()
    s = b.wait_status(jid, {"SUCCESS", "ERROR"}, timeout=60)
    assert s["status"] == "SUCCESS", s
    assert sorted(os.listdir(b.user_root / "alice")) == ["down"] and tree_of(b.user_root / "alice" / "down") == tree
