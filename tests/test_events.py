"""Job events: the Redis Stream written by the store's scripts, and ``GET /events`` on a real twistd."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from dtsbridge.model import Status
from dtsbridge.store import EVENT_KEEP_MS, Store, connect
from tests.harness import ALICE_TOKEN, BOB_TOKEN, DTS_TOKEN, NOROLE_TOKEN, REPO, make_tree, wait_until
from tests.redis_fixture import RedisProcess
from tests.sse import SseStream

T = "2026-01-01T00:00:00.000Z"


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor
    await task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_every_change_is_one_event_in_the_same_script(redis_proc: RedisProcess) -> None:
    store = Store(connect(redis_proc.url), reactor, prefix="t", timeout=5)
    try:
        job_id = str(uuid.uuid4())
        await store.create_job(job_id, {"status": "SUBMITTED", "target_user": "alice", "time_submitted": T,
                                        "authcode_hash": "secret-hash", "source_rel": "x"})
        token = "claim-token"
        assert await store.claim(token, "h:1", 10, T) == job_id
        progress = {"files_done": 1, "bytes_done": 10, "files_total": 3, "bytes_total": 30,
                    "detailed_status": "copying"}
        assert await store.renew(job_id, token, 10, progress) == Status.TRANSFERRING
        # at most one progress event a second: an immediate second one is recorded but not sent
        assert await store.renew(job_id, token, 10, {**progress, "bytes_done": 20}) == Status.TRANSFERRING
        # nothing changed: no event, whatever the time
        await _sleep(1.05)
        assert await store.renew(job_id, token, 10, {**progress, "bytes_done": 20}) == Status.TRANSFERRING
        assert await store.renew(job_id, token, 10, {**progress, "bytes_done": 25}) == Status.TRANSFERRING
        assert await store.record_result(job_id, token, Status.SUCCESS, T, {"bytes_done": 30, "files_done": 3}) \
            == Status.SUCCESS
        # a job of another user, cancelled while queued
        other = str(uuid.uuid4())
        await store.create_job(other, {"status": "SUBMITTED", "target_user": "bob", "time_submitted": T})
        await store.cancel_job(other, T, "cancelled on request")

        events = await store.events_after("0-0")
        seen = [(j.job_id, j.status.value, j.bytes_done) for _, j in events]
        assert seen == [(job_id, "SUBMITTED", None), (job_id, "TRANSFERRING", None),
                        (job_id, "TRANSFERRING", 10), (job_id, "TRANSFERRING", 25),
                        (job_id, "SUCCESS", 30), (other, "SUBMITTED", None), (other, "CANCELLED", None)]
        ids = [i for i, _ in events]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)
        # the stream never holds a secret field
        raw = redis_proc.cli("XRANGE", "t:events", "-", "+")
        assert "secret-hash" not in raw and "claim-token" not in raw and "event_ms" not in raw
        assert events[-1][1].public()["status"] == "CANCELLED"
        # paging and resuming after an id
        assert [i for i, _ in await store.events_after(ids[2], count=2)] == ids[3:5]
        assert await store.last_event_id() == ids[-1]
        assert await store.events_after(ids[-1]) == []
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_the_stream_is_trimmed_by_age_not_by_count(redis_proc: RedisProcess) -> None:
    store = Store(connect(redis_proc.url), reactor, prefix="t", timeout=5)
    try:
        now_ms = int(time.time() * 1000)
        old = now_ms - EVENT_KEEP_MS - 3600_000
        for i in range(500):  # events older than the window (written with explicit ids)
            redis_proc.cli("XADD", "t:events", f"{old + i}-0", "job_id", "x", "status", "SUCCESS")
        recent = now_ms - 23 * 3600_000
        for i in range(500):  # 23 hours old: kept, however many there are
            redis_proc.cli("XADD", "t:events", f"{recent + i}-0", "job_id", "x", "status", "SUCCESS")
        job_id = str(uuid.uuid4())
        await store.create_job(job_id, {"status": "SUBMITTED", "target_user": "alice", "time_submitted": T})
        oldest = redis_proc.cli("XRANGE", "t:events", "-", "+", "COUNT", "1").split()[0]
        n = int(redis_proc.cli("XLEN", "t:events"))
        # MINID ~ trims whole nodes: most of the old ones are gone, every recent one is there
        assert n <= 500 + 1 + 100, n
        assert n >= 501
        got = [i for i, _ in await store.events_after(f"{recent - 1}-0", count=1000)]
        assert len(got) == 501
        assert int(oldest.split("-")[0]) >= old
    finally:
        await store.close()


# ---------------------------------------------------------------------------
# GET /events on a real twistd


def _metric(b, name: str) -> float:
    for line in b.call("GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _statuses(events) -> list[str]:
    return [e["job"]["status"] for e in events]


def test_events_follow_jobs_live_per_caller_and_resume_after_a_restart(services):
    b = services()
    make_tree(b.dts_root / "one", {"f.txt": b"hello", "d": {"g": b"x" * 10}})
    make_tree(b.dts_root / "two", {"f.txt": b"two"})
    everyone = SseStream(b.port, token=DTS_TOKEN)
    assert everyone.status == 200 and everyone.headers["content-type"].startswith("text/event-stream")
    alice = SseStream(b.port, token=ALICE_TOKEN)
    bob = SseStream(b.port, token=BOB_TOKEN)
    only_bob = SseStream(b.port, "/events?user=bob", token=DTS_TOKEN)
    for s in (everyone, alice, bob, only_bob):
        s.wait_comment("live")
    assert _metric(b, "dtsbridge_event_streams") == 4

    r = b.complete("alice", "one")
    assert r.status == 201, r
    job_id = r.json()["job_id"]
    only_job = SseStream(b.port, f"/events?job_id={job_id}", token=DTS_TOKEN)
    only_job.wait_comment("live")
    evs = everyone.wait(lambda ev: [e for e in ev if e["job"]["status"] == "SUCCESS"], what="SUCCESS")
    mine = everyone.of(job_id)
    assert _statuses(mine)[0] == "SUBMITTED" and "TRANSFERRING" in _statuses(mine)
    assert _statuses(mine)[-1] == "SUCCESS" and len(evs) == 1
    last = mine[-1]
    assert last["event"] == "job"
    # data is the public record, as /transferStatus gives it
    assert last["job"] == b.status(job_id).json()
    assert "claim" not in last["job"] and "authcode_hash" not in last["job"]
    keys = [tuple(map(int, e["id"].split("-"))) for e in everyone.events]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)

    r2 = b.complete("alice", "two")
    job2 = r2.json()["job_id"]
    everyone.wait(lambda ev: [e for e in ev if e["job"]["job_id"] == job2 and e["job"]["status"] == "SUCCESS"])
    # a user sees their own jobs, the same events; another user sees none
    alice.wait(lambda ev: len(ev) == len(everyone.events))
    assert [e["id"] for e in alice.events] == [e["id"] for e in everyone.events]
    time.sleep(0.5)
    assert bob.events == [] and only_bob.events == []
    assert {e["job"]["job_id"] for e in only_job.events} == {job_id} or only_job.events == []

    # resume after an id: exactly the events after it, also across a restart of the service
    all_ids = [e["id"] for e in everyone.events]
    for s in (everyone, alice, bob, only_bob, only_job):
        s.close()
    wait_until(lambda: _metric(b, "dtsbridge_event_streams") == 0, 10, "closed streams to be dropped")
    b.stop()
    b.start()
    resumed = SseStream(b.port, token=DTS_TOKEN, headers={"Last-Event-ID": all_ids[1]})
    resumed.wait(lambda ev: len(ev) >= len(all_ids) - 2)
    resumed.wait_comment("live")
    assert [e["id"] for e in resumed.events] == all_ids[2:]
    by_query = SseStream(b.port, f"/events?last_event_id={all_ids[0]}&job_id={job2}", token=ALICE_TOKEN)
    by_query.wait_comment("live")
    assert [e["id"] for e in by_query.events] == [e["id"] for e in everyone.events if e["job"]["job_id"] == job2]
    # without Last-Event-ID a stream starts with the next change
    fresh = SseStream(b.port, token=DTS_TOKEN)
    fresh.wait_comment("live")
    time.sleep(0.3)
    assert fresh.events == []
    cancelled = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
                       json_body={"target_user": "bob", "subdirectory": "two"}).json()["job_id"]
    assert b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": cancelled}).status == 200
    fresh.wait(lambda ev: _statuses(ev) == ["STAGING", "CANCELLED"])
    assert {e["job"]["job_id"] for e in fresh.events} == {cancelled}
    for s in (resumed, by_query, fresh):
        s.close()


def test_events_refuse_bad_requests(services):
    b = services()
    assert SseStream(b.port).status == 401
    assert SseStream(b.port, token="not-a-token").status == 401
    assert SseStream(b.port, "/events?user=bob", token=ALICE_TOKEN).status == 403
    bad = SseStream(b.port, token=DTS_TOKEN, headers={"Last-Event-ID": "yesterday"})
    assert bad.status == 400 and b"Last-Event-ID" in bad.body
    # Ids of the right shape that Redis refuses (a part over 2**64-1, or nothing can follow): 400, not a
    # 500 written into a stream already answered 200.
    for out_of_range in ("18446744073709551615-18446744073709551615", "99999999999999999999-0",
                         "0-99999999999999999999", "18446744073709551616"):
        for stream in (SseStream(b.port, token=DTS_TOKEN, headers={"Last-Event-ID": out_of_range}),
                       SseStream(b.port, f"/events?last_event_id={out_of_range}", token=DTS_TOKEN)):
            assert stream.status == 400 and b"Last-Event-ID" in stream.body, (out_of_range, stream.body)
    # The largest ids Redis takes are still fine to resume after.
    for edge in ("18446744073709551615", "18446744073709551614-18446744073709551615", "0-18446744073709551615"):
        ok = SseStream(b.port, token=DTS_TOKEN, headers={"Last-Event-ID": edge})
        assert ok.status == 200, (edge, ok.body)
        ok.close()
    assert "Traceback" not in b.log_text() and "unexpected error" not in b.log_text(), b.log_tail(50)
    ok = SseStream(b.port, "/events?user=alice", token=ALICE_TOKEN)
    assert ok.status == 200
    ok.close()


def test_streams_resuming_together_and_hanging_up_log_no_error(services):
    # A stream whose shared replay page came back short reads its own; a hang-up used to cancel
    # that Redis call, and the cancel was logged as "Redis did not answer" with a traceback.
    b = services()
    make_tree(b.dts_root / "s", {"a.bin": b"a"})
    for _ in range(3):
        assert b.complete("alice", "s", asynchronous=True).status == 202

    def resume_and_hang_up(last_id: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=5)
        conn.request("GET", "/events", headers={"Authorization": DTS_TOKEN, "Last-Event-ID": last_id})
        r = conn.getresponse()
        assert r.status == 200
        r.fp.read1(100)
        conn.close()

    for rnd in range(20):
        clients = [threading.Thread(target=resume_and_hang_up, args=(f"0-{rnd}",)) for _ in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(10)
    time.sleep(1)
    log = b.log_text()
    assert "Traceback" not in log and "Unhandled Error" not in log and "did not answer" not in log, b.log_tail(60)
    assert b.call("GET", "/healthz").status == 200


def test_events_keepalive_hangups_and_a_crowd_of_streams(services):
    b = services()
    make_tree(b.dts_root / "one", {"f.txt": b"hello"})
    crowd = [SseStream(b.port, token=DTS_TOKEN if i % 2 else ALICE_TOKEN) for i in range(200)]
    for s in crowd:
        s.wait_comment("live")
    assert _metric(b, "dtsbridge_event_streams") == 200
    started = time.monotonic()
    r = b.complete("alice", "one")
    assert r.status == 201
    job_id = r.json()["job_id"]
    for s in crowd:
        s.wait(lambda ev: "SUCCESS" in _statuses(ev), what="SUCCESS in every stream")
    fanned_out = time.monotonic() - started
    assert fanned_out < 10, fanned_out
    # half hang up: they are dropped, the others go on
    for s in crowd[:100]:
        s.close()
    wait_until(lambda: _metric(b, "dtsbridge_event_streams") == 100, 10, "hung-up streams to be dropped")
    # status calls stay prompt with 100 streams open
    t0 = time.monotonic()
    assert b.status(job_id).status == 200
    assert time.monotonic() - t0 < 1
    # a comment line every 15 s keeps proxies from closing an idle stream
    t = crowd[150].wait_comment("keepalive", timeout=20)
    assert t - started < 20
    for s in crowd[100:]:
        s.close()
    wait_until(lambda: _metric(b, "dtsbridge_event_streams") == 0, 10, "all streams to be dropped")


def _cli(b, *args: str, token: str | None = DTS_TOKEN, **kw) -> subprocess.Popen:
    import os
    argv = [sys.executable, "-m", "dtsbridge.cli", "--url", f"http://127.0.0.1:{b.port}"]
    if token is not None:
        argv += ["--token", token]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTSBRIDGE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(argv + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO), env=env, **kw)


def test_cli_events_prints_kept_events_and_follows_a_job_to_its_end(services):
    b = services(env={"DTSBRIDGE_FAULT_PAUSE": "copy:2"})
    make_tree(b.dts_root / "one", {"f.txt": b"hello" * 1000})
    make_tree(b.dts_root / "two", {"f.txt": b"two"})
    # follow, from the next change: prints the job's events as they come
    follow = _cli(b, "events", "--follow", "--user", "alice")
    wait_until(lambda: _metric(b, "dtsbridge_event_streams") == 1, 20, "the follower's stream")
    r = b.complete("alice", "one", asynchronous=True)
    job_id = r.json()["job_id"]
    following = _cli(b, "events", "--follow", "--job", job_id, "--since", "0", "--json")
    out, err = following.communicate(timeout=60)
    assert following.returncode == 0, err
    seen = [json.loads(line) for line in out.splitlines()]
    assert [e["job"]["status"] for e in seen][0] == "SUBMITTED"
    assert seen[-1]["job"]["status"] == "SUCCESS" and seen[-1]["job"]["job_id"] == job_id
    # without --follow: the kept events, then it exits
    p = _cli(b, "events", "--job", job_id)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == len(seen) and all(job_id in line for line in lines)
    assert "SUBMITTED" in lines[0] and "SUCCESS" in lines[-1] and "/alice/one" in lines[-1]
    # the follower (all of alice's jobs) printed the same events, and goes on
    r2 = b.complete("alice", "two")
    assert r2.status == 201
    time.sleep(1)
    follow.terminate()
    out, _ = follow.communicate(timeout=10)
    assert sum(job_id in line for line in out.splitlines()) == len(seen), out
    assert r2.json()["job_id"] in out
    # a bad token: a clear message and a non-zero exit
    p = _cli(b, "events", token="nope")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "401" in err


def test_events_with_the_embedded_redis_resume_after_a_restart(tmp_path):
    """The default setup (``[redis] url = embedded``): the reader waits for Redis, events outlive a restart."""
    from tests.harness import DtsBridge
    b = DtsBridge(tmp_path, "embedded")
    try:
        b.start()
        make_tree(b.dts_root / "one", {"f.txt": b"hello"})
        s = SseStream(b.port, token=DTS_TOKEN)
        s.wait_comment("live")
        job_id = b.complete("alice", "one").json()["job_id"]
        s.wait(lambda ev: "SUCCESS" in _statuses(ev))
        ids = [e["id"] for e in s.events]
        s.close()
        b.stop()
        b.start()
        again = SseStream(b.port, token=ALICE_TOKEN, headers={"Last-Event-ID": ids[0]})
        again.wait_comment("live")
        assert [e["id"] for e in again.events] == ids[1:]
        assert again.events[-1]["job"]["job_id"] == job_id
        again.close()
    finally:
        b.kill()


def test_a_client_that_stops_reading_is_dropped_and_the_others_go_on(services):
    import socket
    b = services()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    stuck.connect(("127.0.0.1", b.port))
    stuck.sendall(f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: {DTS_TOKEN}\r\n\r\n".encode())
    good = SseStream(b.port, token=DTS_TOKEN)
    good.wait_comment("live")
    wait_until(lambda: _metric(b, "dtsbridge_event_streams") == 2, 10, "two streams")
    made = []
    while _metric(b, "dtsbridge_event_streams") == 2 and len(made) < 2000:
        for _ in range(20):
            r = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
                       json_body={"target_user": "bob", "subdirectory": "x" * 200})
            job_id = r.json()["job_id"]
            assert b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": job_id}).status == 200
            made.append(job_id)
    assert _metric(b, "dtsbridge_event_streams") == 1, f"the stuck client was not dropped after {len(made)} jobs"
    assert "stopped reading" in b.log_text()
    # the reading client got every event, and the service answers as before
    good.wait(lambda ev: len(ev) == 2 * len(made), 30, "every event in the reading stream")
    assert b.call("GET", "/healthz").status == 200
    good.close()
    stuck.close()


def test_a_long_replay_reaches_a_slow_reader_whole(services):
    """Resuming from far back writes page by page as the client reads: a slow reader is not dropped."""
    b = services()
    made = []
    for _ in range(900):
        r = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
                   json_body={"target_user": "bob", "subdirectory": "y" * 300})
        made.append(r.json()["job_id"])
    # a reader that takes its time: 16 KiB every 50 ms, through a small receive buffer
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    s.connect(("127.0.0.1", b.port))
    s.sendall(f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: {DTS_TOKEN}\r\nLast-Event-ID: 0\r\n\r\n".encode())
    s.settimeout(10)
    got = b""
    deadline = time.monotonic() + 60
    while b": live" not in got and time.monotonic() < deadline:
        chunk = s.recv(16384)
        if not chunk:
            break
        got += chunk
        time.sleep(0.05)
    s.close()
    assert b": live" in got, (len(got), got[-300:])
    assert got.count(b"\nevent: job\n") == len(made)
    assert "stopped reading" not in b.log_text()


def test_a_crowd_of_replays_does_not_stall_the_reactor(services):
    """100 plain-user streams resuming from 0-0 at once (and a few reading theirs whole): /healthz stays
    prompt, and every reader still gets each of its events once, in order."""
    import socket
    b = services()
    made = []
    for i in range(700):
        user = "alice" if i % 7 else "bob"  # alice's streams skip bob's events without sending them
        r = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
                   json_body={"target_user": user, "subdirectory": "z" * 200})
        assert r.status in (200, 201, 202), r
        if user == "alice":
            made.append(r.json()["job_id"])

    def healthz_ms() -> float:
        t = time.monotonic()
        assert b.call("GET", "/healthz", timeout=60).status == 200
        return (time.monotonic() - t) * 1000

    base = max(healthz_ms() for _ in range(5))
    stuck = []
    for _ in range(100):  # never read: each replay writes what fits, then waits for its client
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", b.port))
        s.sendall(f"GET /events?last_event_id=0-0 HTTP/1.1\r\nHost: x\r\nAuthorization: {ALICE_TOKEN}\r\n\r\n"
                  .encode())
        stuck.append(s)
    readers = [SseStream(b.port, "/events?last_event_id=0-0", token=ALICE_TOKEN) for _ in range(8)]
    samples = []
    for _ in range(30):
        samples.append(healthz_ms())
        time.sleep(0.05)
    for s in readers:
        s.wait_comment("live", 60)
        keys = [tuple(int(x) for x in ev["id"].split("-")) for ev in s.events]
        assert keys == sorted(set(keys)), "events repeated or out of order"
        assert {ev["job"]["job_id"] for ev in s.events} == set(made)
        assert {ev["job"]["target_user"] for ev in s.events} == {"alice"}
        s.close()
    for s in stuck:
        s.close()
    assert max(samples) < 300, f"/healthz took up to {max(samples):.0f} ms during the replays (before: {base:.0f} ms)"
