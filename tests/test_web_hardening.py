"""End-to-end tests of issue 9, items 10-13: hostile bodies and slow clients, a client hanging up
while others share its auth2 call, blocking file calls, and ``/doneStaging`` ``path``.

Every test drives a real ``twistd dtsbridge`` (:mod:`tests.harness`) over real sockets, with a
private Redis and, for the ``kbase`` backend, the fake auth2 of :mod:`tests.fakeauth2`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted

from tests.fakeauth2 import FakeAuth2Process
from tests.harness import DTS_TOKEN, DtsBridge, leftovers, make_tree, tree_of, wait_until
from tests.redis_fixture import start_private_redis

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * 1024


# -- raw HTTP helpers ---------------------------------------------------------------------


def connect(svc: DtsBridge, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _pending.pop(s.fileno(), None)
    return s


_pending: dict[int, bytes] = {}  # bytes read past one response, per socket (pipelined answers)


def read_response(s: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response (status, headers, body); the body by Content-Length or chunked."""
    s.settimeout(timeout)
    buf = _pending.pop(s.fileno(), b"")

    def more() -> bytes:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response: {buf[:200]!r}")
        return chunk

    while b"\r\n\r\n" not in buf:
        buf += more()
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more()
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            while len(rest) < n + 2:
                rest += more()
            body, rest = body + rest[:n], rest[n + 2:]
            if n == 0:
                break
    else:
        n = int(headers.get("content-length", "0"))
        while len(rest) < n:
            rest += more()
        body, rest = rest[:n], rest[n:]
    if rest:
        _pending[s.fileno()] = rest
    return status, headers, body


def json_error(status: int, headers: dict[str, str], body: bytes, code: int) -> dict[str, Any]:
    assert status == code, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = json.loads(body)
    assert doc["error"]["httpcode"] == code, doc
    assert doc["error"]["message"], doc
    return doc["error"]


def send_in_background(s: socket.socket, data: bytes | Iterator[bytes]) -> threading.Thread:
    """Send ``data`` from a thread (ignoring the server hanging up), so the test can read meanwhile."""
    def run() -> None:
        try:
            if isinstance(data, bytes):
                s.sendall(data)
            else:
                for piece in data:
                    s.sendall(piece)
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def tmp_files_open(svc: DtsBridge) -> list[str]:
    """Regular files the service process holds open in its temporary folder (a spooled body)."""
    assert svc.proc is not None
    tmpdir = svc.extra_env["TMPDIR"]
    out = []
    for fd in os.listdir(f"/proc/{svc.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{svc.proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tmpdir):
            out.append(target)
    return out


@pytest.fixture
def svc(services, tmp_path: Path) -> DtsBridge:
    """A service whose temporary folder is private, so a spooled request body would show there."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    b = services({"server": {"read_timeout_seconds": "3"}}, env={"TMPDIR": str(tmpdir)})
    return b


def healthz_latency(svc: DtsBridge) -> float:
    t0 = time.monotonic()
    r = svc.call("GET", "/healthz", timeout=30)
    assert r.status == 200, r
    return time.monotonic() - t0


# -- item 12: request bodies -------------------------------------------------------------


def test_huge_content_length_413_at_once_nothing_spooled(svc: DtsBridge) -> None:
    """A 300 MiB Content-Length: 413 before the body is read; no temporary file is ever made."""
    s = connect(svc)
    try:
        s.sendall(b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                  b"Authorization: " + DTS_TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (300 * MIB))
        # some of the body, as a client that does not wait for an answer would send it
        sender = send_in_background(s, (b"a&" * (64 * KIB) for _ in range(8)))  # 1 MiB
        t0 = time.monotonic()
        status, headers, body = read_response(s, timeout=5)
        took = time.monotonic() - t0
        json_error(status, headers, body, 413)
        assert took < 2, took
        assert headers.get("connection", "").lower() == "close", headers
        assert tmp_files_open(svc) == []
        sender.join(10)
    finally:
        s.close()
    # the service goes on answering
    assert svc.call("GET", "/healthz").status == 200
    assert tmp_files_open(svc) == []
    metrics = svc.call("GET", "/metrics").body.decode()
    assert re.search(r'dtsbridge_http_requests_total\{[^}]*code="413"[^}]*\} 1', metrics), metrics[-2000:]


def test_20_mib_anonymous_form_413_quickly_and_healthz_stays_fast(svc: DtsBridge) -> None:
    """A 20 MiB ``a&a&…`` form without a token: 413 quickly, and other requests are not stalled."""
    body = b"a&" * (10 * MIB)
    results: dict[str, Any] = {}

    def attack() -> None:
        s = connect(svc)
        try:
            t0 = time.monotonic()
            s.sendall(b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body))
            send_in_background(s, body)
            results["answer"] = read_response(s, timeout=30)
            results["took"] = time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 - reported below
            results["error"] = e
        finally:
            s.close()

    healthz_latency(svc)  # warm up
    attackers = [threading.Thread(target=attack) for _ in range(3)]
    for t in attackers:
        t.start()
    latencies = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        latencies.append(healthz_latency(svc))
    for t in attackers:
        t.join(30)
    assert "error" not in results, results
    json_error(*results["answer"], 413)
    assert results["took"] < 2, results["took"]
    assert max(latencies) < 1.0, sorted(latencies)[-5:]  # before: stalled 6-10 s
    assert tmp_files_open(svc) == []


def chunked(payload: bytes, size: int = 8 * KIB) -> bytes:
    out = b""
    for i in range(0, len(payload), size):
        piece = payload[i:i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def test_chunked_body_cut_at_64_kib(svc: DtsBridge) -> None:
    head = (b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    s = connect(svc)
    try:
        s.sendall(head + chunked(b"a&" * (32 * KIB))[:-5])  # exactly 64 KiB, not finished: still allowed
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recv(1)
        s.sendall(b"10\r\n" + b"b" * 16 + b"\r\n")  # one more chunk tips it over
        json_error(*read_response(s, timeout=5), 413)
    finally:
        s.close()
    # an endless chunked stream is cut off at once, too
    s = connect(svc)
    try:
        t0 = time.monotonic()
        s.sendall(head)
        send_in_background(s, (chunked(b"a&" * (32 * KIB))[:-5] for _ in range(320)))  # 20 MiB
        json_error(*read_response(s, timeout=10), 413)
        assert time.monotonic() - t0 < 2
    finally:
        s.close()
    assert tmp_files_open(svc) == []
    assert svc.call("GET", "/healthz").status == 200


def test_chunked_small_body_is_read(svc: DtsBridge) -> None:
    name = f"chunk{uuid.uuid4().hex[:8]}"
    make_tree(svc.dts_root / name, {"a.txt": b"hello"})
    doc = json.dumps({"target_user": "alice", "subdirectory": name}).encode()
    s = connect(svc)
    try:
        s.sendall(b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/json\r\nAuthorization: " + DTS_TOKEN.encode() + b"\r\n\r\n"
                  + chunked(doc, 7))
        status, headers, body = read_response(s, timeout=30)
        assert status == 201, body
        assert json.loads(body)["path"] == f"/alice/{name}"
    finally:
        s.close()


def test_form_bodies_parsed_by_us_only(svc: DtsBridge) -> None:
    """Form and multipart bodies are not parsed before the handler: a bad one is a JSON 400/401, not Twisted's."""
    name = f"form{uuid.uuid4().hex[:8]}"
    make_tree(svc.dts_root / name, {"a.txt": b"x"})
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN,
                 raw=urllib.parse.urlencode({"target_user": "alice", "subdirectory": name}).encode(),
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 201, r
    # a broken multipart body made Twisted answer a bare 400 and hang up, before any route ran
    r = svc.call("POST", "/complete_transfer", raw=b"--xx\r\nbroken",
                 headers={"Content-Type": "multipart/form-data; boundary=xx"})
    assert r.status == 401 and r.json()["error"]["httpcode"] == 401, r


def test_slow_headers_cut_off(svc: DtsBridge) -> None:
    """One header line a second does not keep a connection open past ``[server] read_timeout_seconds``."""
    s = connect(svc)
    t0 = time.monotonic()
    closed_after = None
    answer = b""
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(0.2)
        for i in range(40):
            try:
                s.sendall(b"X-Slow-%d: y\r\n" % i)
            except OSError:
                closed_after = time.monotonic() - t0
                break
            try:
                chunk = s.recv(65536)
                answer += chunk
                if not chunk:
                    closed_after = time.monotonic() - t0
                    break
            except socket.timeout:
                pass
            time.sleep(0.8)
    finally:
        s.close()
    assert closed_after is not None, "the connection stayed open for 40 s of slow headers"
    assert closed_after < 3 + 2, closed_after
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # a slow body is cut off the same way
    s = connect(svc)
    try:
        s.sendall(b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        t0 = time.monotonic()
        status, headers, body = read_response(s, timeout=10)
        json_error(status, headers, body, 408)
        assert time.monotonic() - t0 < 5
    finally:
        s.close()


def test_keep_alive_and_slow_handlers_unaffected(svc: DtsBridge) -> None:
    """The read deadline covers reading a request, not answering it nor a quick next request."""
    s = connect(svc)
    try:
        for _ in range(3):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_response(s, timeout=5)
            assert status == 200, body
            time.sleep(1)
    finally:
        s.close()


# -- item 13: /doneStaging path ------------------------------------------------------------


def test_done_staging_path_must_be_inside_the_subdirectory(services) -> None:
    b = services()
    stage = make_tree(b.dts_root / "stage", {"inner": {"x.txt": b"inner"}, "top.txt": b"top"})
    other = make_tree(b.dts_root / "other", {"secret.txt": b"not for alice"})
    os.symlink("../other", stage / "sneaky")
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "alice", "subdirectory": "stage"})
    assert r.status == 202, r
    jid, code = r.json()["job_id"], r.json()["authcode"]

    def done(path: str) -> Any:
        return b.call("POST", "/doneStaging", json_body={"job_id": jid, "authcode": code, "success": True,
                                                         "path": path})

    for bad in ("other", str(other), "stage/../other", "stage/sneaky", "stage/sneaky/secret.txt", "/etc",
                "../users/alice", "/", ".", "stagex", str(b.dts_root / "stagex")):
        r = done(bad)
        assert r.status == 403, (bad, r)
        assert r.json()["error"]["httpcode"] == 403
        assert b.status(jid).json()["status"] == "STAGING"
    assert not (b.user_root / "alice" / "other").exists()
    # the code is still good: a folder inside the subdirectory is accepted
    r = done(str(stage / "inner"))
    assert r.status == 200, r
    s = b.wait_status(jid, {"SUCCESS", "ERROR"})
    assert s["status"] == "SUCCESS", s
    assert s["path"] == "/alice/inner"
    assert tree_of(b.user_root / "alice" / "inner") == {"x.txt": b"inner"}
    assert sorted(p.name for p in (b.user_root / "alice").iterdir()) == ["inner"]
    assert leftovers(b.user_root) == []


def test_done_staging_path_default_and_same_folder(services) -> None:
    b = services()
    make_tree(b.dts_root / "st2", {"a.txt": b"a"})
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
               json_body={"target_user": "bob", "subdirectory": str(b.dts_root / "st2")})
    jid, code = r.json()["job_id"], r.json()["authcode"]
    r = b.call("POST", "/doneStaging", json_body={"job_id": jid, "authcode": code, "success": True,
                                                  "path": "st2/"})
    assert r.status == 200, r
    assert b.wait_status(jid, {"SUCCESS", "ERROR"})["status"] == "SUCCESS"


# -- item 11: one client hanging up ---------------------------------------------------------


KB_DTS = "kb-dts-token-web-hardening"
KB_SERVICE = "kb-service-token-web-hardening"


@pytest.fixture
def slow_auth(tmp_path: Path) -> Iterator[FakeAuth2Process]:
    (tmp_path / "auth2").mkdir()
    fake = FakeAuth2Process(workdir=str(tmp_path / "auth2"), state={
        "users": {"kdts": {"customroles": ["DTS_TRANSFER"]}, "alice": {"customroles": []},
                  "svcacct": {"customroles": []}},
        "tokens": {KB_DTS: "kdts", KB_SERVICE: "svcacct"},
    })
    fake.start()
    try:
        yield fake
    finally:
        fake.close()


def test_client_hanging_up_does_not_fail_others_sharing_its_auth_call(services, slow_auth) -> None:
    b = services({"auth": {"backend": "kbase", "kbase_url": slow_auth.url, "service_token": KB_SERVICE,
                           "timeout_seconds": "10"}, "users": {"check": "kbase"}})
    for round_ in range(2):
        token = f"kb-fresh-{uuid.uuid4().hex}"  # not cached yet: its check goes to auth2
        slow_auth.add_token(token, "kdts")
        slow_auth.control(delay_seconds=1.5)
        slow_auth.reset_counts()
        req = (b"GET /jobs?limit=1 HTTP/1.1\r\nHost: x\r\nAuthorization: " + token.encode() + b"\r\n\r\n")
        first = connect(b)
        first.sendall(req)  # starts the shared auth2 call
        wait_until(lambda: slow_auth.counts()["/api/V2/token"] >= 1, 5, "the auth2 call")
        second = connect(b)
        second.sendall(req)  # joins it
        time.sleep(0.3)
        if round_ == 0:
            first.close()  # the client that started the call hangs up
        else:
            first.shutdown(socket.SHUT_RDWR)
            first.close()
        try:
            status, _, body = read_response(second, timeout=10)
        finally:
            second.close()
        assert status == 200, body
        assert "jobs" in json.loads(body)
        assert slow_auth.counts()["/api/V2/token"] == 1  # still one shared call
        slow_auth.control(delay_seconds=0)


# -- item 10: no blocking file calls on the reactor thread ------------------------------------


@pytest_twisted.ensureDeferred
async def test_staging_path_checks_run_in_the_thread_pool(tmp_path: Path, monkeypatch) -> None:
    """``/submitTransfer`` and ``/doneStaging`` resolve the DTS root's real path in a pool thread only."""
    from twisted.internet import reactor, threads

    from dtsbridge import auth, config as configmod, errors
    from dtsbridge.jobs import Jobs, Waiters
    from dtsbridge.metrics import Metrics
    from dtsbridge.users import Users
    from dtsbridge.worker import Worker

    dts, users = tmp_path / "dts", tmp_path / "users"
    make_tree(dts / "stage" / "inner", {"a.txt": b"a"})
    (users / "alice").mkdir(parents=True)
    cfg = configmod.load(None, {"paths": {"dts_root": str(dts), "user_root": str(users)}}, environ={})

    def runner(f, *a, **k):
        return threads.deferToThread(f, *a, **k)

    main = threading.current_thread()
    on_reactor: list[str] = []
    in_threads: list[str] = []
    real = os.path.realpath

    def spy(p, *a, **k):
        (on_reactor if threading.current_thread() is main else in_threads).append(str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(os.path, "realpath", spy)
    policy = Users(cfg, auth.DirectoryUsers(str(users), runner), runner)
    waiters = Waiters()
    worker = Worker(cfg, None, policy, runner, reactor, Metrics(), on_ended=waiters.notify)
    jobs = Jobs(cfg, None, policy, runner, worker, waiters, reactor, Metrics())
    # a bad staging_timeout is refused after the folder check and before any Redis call
    with pytest.raises(errors.Invalid) as info:
        await jobs.submit_staging("alice", str(dts / "stage"), "dts", -1)
    assert "staging_timeout" in info.value.message
    assert on_reactor == [], on_reactor
    source = await jobs.resolve_for_staging(str(dts / "stage"), str(dts / "stage" / "inner"))
    assert source.rel == "stage/inner"
    with pytest.raises(errors.Forbidden):
        await jobs.resolve_for_staging("stage", str(dts / "elsewhere"))
    assert on_reactor == [], on_reactor
    assert in_threads


def test_malformed_requests_get_json_errors(svc: DtsBridge) -> None:
    """Twisted's bare 400 (or silent hang-up) for a broken request becomes a JSON error, then the connection closes."""
    cases = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /complete_transfer HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /complete_transfer HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        # both framings at once (request smuggling) is refused
        (b"POST /complete_transfer HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /complete_transfer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        # past 64 KiB the 413 comes first, and a broken chunk after it adds nothing
        (b"POST /complete_transfer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\n" + b"a" * 0xffff
         + b"\r\n2\r\nab\r\nzz\r\n", 413),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        # no "100 Continue" for a body that will be refused
        (b"POST /complete_transfer HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n", 413),
    ]
    for raw, code in cases:
        s = connect(svc)
        try:
            s.sendall(raw)
            status, headers, body = read_response(s, timeout=5)
            json_error(status, headers, body, code)
            s.settimeout(5)
            assert s.recv(65536) == b"", raw[:60]  # nothing more: one answer, then the end
        finally:
            s.close()
    assert svc.call("GET", "/healthz").status == 200


def test_pipelined_requests_and_a_refused_one(svc: DtsBridge) -> None:
    s = connect(svc)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n")
        for _ in range(2):
            status, _, body = read_response(s, timeout=5)
            assert status == 200, body
        json_error(*read_response(s, timeout=5), 413)
    finally:
        s.close()


def test_deeply_nested_json_body_is_400(svc: DtsBridge) -> None:
    """A 60 KB ``[[[[…`` body (Python's JSON parser recurses) is a bad body, not a 500."""
    for raw in (b"[" * 60000, b'{"a":' * 12000):
        r = svc.call("POST", "/doneStaging", raw=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400, r
        assert r.json()["error"]["httpcode"] == 400
    assert "Traceback" not in svc.log_text()


def test_blind_sender_still_reads_its_413(svc: DtsBridge) -> None:
    """A client that sends its whole big body before reading (``http.client``, ``requests``) gets the 413,
    not a reset connection: after refusing, the service drops what still comes for a few seconds."""
    import http.client

    size = 200 * MIB
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    try:
        t0 = time.monotonic()
        conn.request("POST", "/complete_transfer", body=(b"a&" * (512 * KIB) for _ in range(size // MIB)),
                     headers={"Content-Length": str(size), "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 413, body
        assert json.loads(body)["error"]["httpcode"] == 413
        assert time.monotonic() - t0 < 5
    finally:
        conn.close()
    assert tmp_files_open(svc) == []


def test_idle_kept_alive_connection_closed_quietly(svc: DtsBridge) -> None:
    s = connect(svc)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = read_response(s, timeout=5)
        assert status == 200
        t0 = time.monotonic()
        s.settimeout(10)
        assert s.recv(65536) == b""  # closed, with no answer to a request never begun
        assert 2 < time.monotonic() - t0 < 5  # [server] read_timeout_seconds = 3 here
    finally:
        s.close()
