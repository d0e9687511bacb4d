"""Webhooks against a real local HTTP receiver and a real twistd: signed, retried, kept across restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import random
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from dtsbridge import config as configmod
from dtsbridge.notify import retry_delay, signature
from tests.harness import DTS_TOKEN, REPO, free_port, make_tree, wait_until

SECRET = "whsec-0123456789abcdef"


def readme_verifier() -> Callable[[bytes, str, str], bool]:
    """The README's five-line signature check, run as written."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"```python\n(# verify a dtsbridge webhook.*?)```", text, re.S)
    assert m, "README has no webhook verification snippet"
    code = m.group(1)
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("#")]) <= 5
    ns: dict[str, Any] = {}
    exec(code, ns)  # noqa: S102 - our own README
    return ns["verify"]


class Receiver:
    """A real HTTP server; ``policy(n)`` says what the n-th request (from 1) gets: ok, 500, drop or hang."""

    def __init__(self, policy: Callable[[int], str] = lambda n: "ok") -> None:
        self.policy = policy
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.lock:
                    n = len(outer.requests) + 1
                    action = outer.policy(n)
                    outer.requests.append({"t": time.monotonic(), "body": body, "action": action,
                                           "headers": {k.lower(): v for k, v in self.headers.items()}})
                if action == "hang":
                    time.sleep(13)
                    return
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                code = 200 if action == "ok" else 500
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> dict[str, dict[str, Any]]:
        """event_id -> body of every delivery answered 2xx."""
        with self.lock:
            return {json.loads(r["body"])["event_id"]: json.loads(r["body"]) for r in self.requests
                    if r["action"] == "ok"}

    def attempts(self, event_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if json.loads(r["body"])["event_id"] == event_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(policy=lambda n: "ok") -> Receiver:
        r = Receiver(policy)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_retry_delays_start_within_10_s_double_with_jitter_and_stop_at_10_minutes():
    rng = random.Random(7)
    for attempts in range(1, 30):
        d = retry_delay(attempts, 10, rng)
        base = min(600, 10 * 2 ** (attempts - 1))
        assert base / 2 <= d <= base
    assert retry_delay(1, 10, rng) <= 10 and retry_delay(40, 10, rng) <= 600
    assert len({round(retry_delay(3, 10, rng), 3) for _ in range(20)}) > 10  # jitter


def test_notify_config_is_checked():
    cfg = configmod.load(None, environ={"DTSBRIDGE_NOTIFY_WEBHOOK_URLS": "http://a.example/x https://b.example/y"})
    assert cfg.webhook_urls == ("http://a.example/x", "https://b.example/y")
    assert cfg.webhook_retry_hours == 24 and cfg.webhook_events == "end" and cfg.webhook_retry_first == 10
    for env, key in ({"DTSBRIDGE_NOTIFY_WEBHOOK_URLS": "ftp://x.example/"}, "webhook_urls"), \
                    ({"DTSBRIDGE_NOTIFY_EVENTS": "some"}, "events"), \
                    ({"DTSBRIDGE_NOTIFY_RETRY_HOURS": "soon"}, "retry_hours"):
        with pytest.raises(configmod.ConfigError, match=key):
            configmod.load(None, environ=env)


def test_webhooks_are_signed_retried_and_survive_restarts(services, receiver, redis_proc):
    verify = readme_verifier()
    # the first two attempts fail (a 500, then a dropped connection); later ones succeed
    hook = receiver(lambda n: {1: "500", 2: "drop"}.get(n, "ok"))
    settings = {"notify": {"webhook_urls": hook.url, "webhook_secret": SECRET, "retry_first_seconds": "1"}}
    b = services(settings)
    make_tree(b.dts_root / "one", {"f.txt": b"hello"})
    make_tree(b.dts_root / "bad", {"data.bin": b"x", "manifest.json": b"{not json"})
    r = b.complete("alice", "one")
    assert r.status == 201
    ok_job = r.json()["job_id"]
    wait_until(lambda: hook.delivered(), 30, "the first delivery", b.log_tail)
    attempts = hook.requests[:3]
    assert [a["action"] for a in attempts] == ["500", "drop", "ok"]
    # retried: first after at most retry_first_seconds, then about double
    gaps = [attempts[1]["t"] - attempts[0]["t"], attempts[2]["t"] - attempts[1]["t"]]
    assert 0.4 <= gaps[0] <= 1.8 and 0.9 <= gaps[1] <= 3.0, gaps
    # the same signed body each time, checkable with the README's five lines
    assert len({a["body"] for a in attempts}) == 1
    for a in attempts:
        assert a["headers"]["x-dtsbridge-signature"] == signature(SECRET, a["body"])
        assert verify(a["body"], a["headers"]["x-dtsbridge-signature"], SECRET)
        assert not verify(a["body"] + b" ", a["headers"]["x-dtsbridge-signature"], SECRET)
        assert not verify(a["body"], a["headers"]["x-dtsbridge-signature"], "another secret")
    (event_id, body), = hook.delivered().items()
    # events = end (the default): only the end, with the job's public record
    assert body["job"]["job_id"] == ok_job and body["job"]["status"] == "SUCCESS"
    assert body["job"] == b.status(ok_job).json()

    # the receiver goes down; jobs end meanwhile; the service restarts (once cleanly, once killed)
    hook.policy = lambda n: "500"
    r = b.complete("alice", "bad")
    assert r.status == 500
    bad_job = r.json()["error"]["job_id"]
    staged = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
                    json_body={"target_user": "bob", "subdirectory": "one"}).json()["job_id"]
    assert b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": staged}).status == 200
    wait_until(lambda: {json.loads(x["body"])["job"]["job_id"] for x in hook.requests if x["action"] == "500"}
               >= {bad_job, staged}, 30, "failed attempts for both ends", b.log_tail)
    assert int(redis_proc.cli("ZCARD", "dtsbridge:hooks")) == 2  # pending, in Redis
    b.stop()
    b.start()
    make_tree(b.dts_root / "two", {"f.txt": b"two"})
    r = b.complete("bob", "two")
    assert r.status == 201
    two_job = r.json()["job_id"]
    b.kill()
    b.start()
    hook.policy = lambda n: "ok"
    wait_until(lambda: {v["job"]["job_id"] for v in hook.delivered().values()} >= {ok_job, bad_job, staged, two_job},
               60, "every end delivered after the restarts", b.log_tail)
    ends = {v["job"]["job_id"]: v["job"] for v in hook.delivered().values()}
    assert ends[bad_job]["status"] == "ERROR" and ends[bad_job]["reason"] == "manifest_mismatch"
    assert ends[staged]["status"] == "CANCELLED" and ends[two_job]["status"] == "SUCCESS"
    # exactly one event per end (deliveries are deduplicable by event_id; here none was repeated after a 2xx)
    assert len(hook.delivered()) == 4
    wait_until(lambda: int(redis_proc.cli("ZCARD", "dtsbridge:hooks")) == 0, 10, "no pending delivery left")
    assert redis_proc.cli("KEYS", "dtsbridge:hook:*").strip() == ""
    for req in hook.requests:
        assert verify(req["body"], req["headers"]["x-dtsbridge-signature"], SECRET)


def test_webhooks_all_events_no_answer_and_two_processes(services, receiver, redis_proc):
    """events = all; a receiver that does not answer in 10 s is retried; two processes deliver each event once."""
    hook = receiver(lambda n: "hang" if n == 1 else "ok")
    refused_port = free_port()  # nothing listens here: every attempt is refused
    settings = {"notify": {"webhook_urls": f"{hook.url} http://127.0.0.1:{refused_port}/x",
                           "webhook_secret": SECRET, "events": "all", "retry_first_seconds": "2"}}
    a = services(settings, name="a")
    b2 = services(settings, name="b", shared_from=a)
    make_tree(a.dts_root / "one", {"f.txt": b"hello"})
    r = a.complete("alice", "one")
    assert r.status == 201
    job_id = r.json()["job_id"]
    events = [line for line in redis_proc.cli("XRANGE", "dtsbridge:events", "-", "+").splitlines()
              if re.fullmatch(r"\d+-\d+", line.strip())]
    assert len(events) >= 3  # created, claimed, ended (at least)
    wait_until(lambda: set(hook.delivered()) >= set(events), 40, "every event, after the hung attempt", a.log_tail)
    first = hook.requests[0]
    retried = [x for x in hook.requests[1:] if x["body"] == first["body"]]
    assert first["action"] == "hang" and retried and retried[0]["t"] - first["t"] >= 10
    statuses = [hook.delivered()[e]["job"]["status"] for e in events]
    assert statuses[0] == "SUBMITTED" and statuses[-1] == "SUCCESS"
    # each event reached the receiver once after success, though two processes share the queue
    oks = [json.loads(x["body"])["event_id"] for x in hook.requests if x["action"] == "ok"]
    assert sorted(oks) == sorted(set(oks))
    # the refused URL's deliveries stay pending in Redis, retried by either process
    pending = redis_proc.cli("ZRANGE", "dtsbridge:hooks", "0", "-1").split("\n")
    assert pending and all(str(refused_port) in p for p in pending if p.strip())
    attempts = int(redis_proc.cli("HGET", f"dtsbridge:hook:{events[0]} http://127.0.0.1:{refused_port}/x",
                                  "attempts"))
    assert attempts >= 2
    err = redis_proc.cli("HGET", f"dtsbridge:hook:{events[0]} http://127.0.0.1:{refused_port}/x", "last_error")
    assert "refused" in err.lower() or "connect" in err.lower(), err
    assert "dtsbridge_webhooks_failed_attempts_total" in a.call("GET", "/metrics").body.decode()


def test_webhooks_with_defaults_and_the_embedded_redis_across_a_restart(tmp_path, receiver):
    """As configured out of the box (embedded Redis, default retry timing): the first retry within 10 s."""
    from tests.harness import DtsBridge
    hook = receiver(lambda n: "500" if n == 1 else "ok")
    b = DtsBridge(tmp_path, "embedded", settings={"notify": {"webhook_urls": hook.url, "webhook_secret": SECRET}})
    try:
        b.start()
        make_tree(b.dts_root / "one", {"f.txt": b"hello"})
        first = b.complete("alice", "one").json()["job_id"]
        wait_until(lambda: len(hook.requests) >= 1, 20, "the first attempt", b.log_tail)
        b.stop()  # the failed delivery waits in the embedded Redis (append-only file)
        b.start()
        make_tree(b.dts_root / "two", {"f.txt": b"two"})
        second = b.complete("alice", "two").json()["job_id"]
        wait_until(lambda: {v["job"]["job_id"] for v in hook.delivered().values()} == {first, second}, 40,
                   "both ends delivered", b.log_tail)
        retried = [r for r in hook.requests if json.loads(r["body"])["job"]["job_id"] == first]
        assert [r["action"] for r in retried] == ["500", "ok"]
        assert retried[1]["t"] - retried[0]["t"] <= 10 + 5  # first retry within 10 s (+ the restart)
    finally:
        b.kill()


def test_webhook_answer_body_is_not_buffered(services):
    """A receiver that answers 200 and then streams an endless body: dtsbridge reads at most a little of it,
    drops the connection, counts the delivery by its status, and its memory stays flat."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(30)
    sent = [0]
    finished = threading.Event()

    def answer():
        try:
            c, _ = srv.accept()
        except OSError:
            return
        try:
            c.settimeout(2)
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Length: 4000000000\r\n\r\n")
            chunk = b"x" * (1 << 20)
            t = time.monotonic()
            while time.monotonic() - t < 8 and sent[0] < 512 * (1 << 20):
                c.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass  # dtsbridge hung up: what we want
        finally:
            c.close()
            finished.set()

    threading.Thread(target=answer, daemon=True).start()
    b = services({"notify": {"webhook_urls": f"http://127.0.0.1:{srv.getsockname()[1]}/hook",
                             "webhook_secret": SECRET}})

    def rss_mib() -> int:
        with open(f"/proc/{b.proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) // 1024

    try:
        base = peak = rss_mib()
        make_tree(b.dts_root / "t", {"a": b"1"})
        assert b.complete("alice", "t").status == 201
        t = time.monotonic()
        while not finished.is_set() and time.monotonic() - t < 20:
            peak = max(peak, rss_mib())
            time.sleep(0.05)
        assert finished.is_set()
        assert sent[0] < 32 * (1 << 20), f"dtsbridge read {sent[0] >> 20} MiB of a webhook answer"
        assert peak - base < 64, f"RSS {base} MiB -> {peak} MiB"

        def delivered() -> bool:
            m = re.search(r"^dtsbridge_webhooks_delivered_total (\S+)", b.call("GET", "/metrics").body.decode(), re.M)
            return bool(m) and float(m.group(1)) >= 1
        wait_until(delivered, 10, "the 200 answer counted as delivered", b.log_tail)
    finally:
        srv.close()
