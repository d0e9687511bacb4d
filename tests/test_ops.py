"""Operating dtsbridge: metrics, health, OpenAPI, logs, drain, SIGUSR2, per-user limits and the CLI.

Every test drives a real ``twistd -n dtsbridge`` (tests/harness.py) against a
private Redis (the ``redis_proc`` fixture). Slow copies use the engine's
test-only pause hook ``DTSBRIDGE_FAULT_PAUSE=copy:<seconds>`` (the copy
sleeps after writing the first chunk of its first file, then goes on; a stop
request is honoured right after), so a copy is reliably "running" for a known
time without gigabytes of data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (ALICE_TOKEN, BOB_TOKEN, DTS_TOKEN, NOROLE_TOKEN, REPO, DtsBridge, leftovers, make_tree,
                           tree_of)

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------
# helpers


def metrics(b: DtsBridge) -> dict[tuple[str, tuple], float]:
    r = b.call("GET", "/metrics")
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(r.body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(ms: dict, name: str, **labels: str) -> float:
    return ms.get((name, tuple(sorted(labels.items()))), 0.0)


def poll(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout} s (last: {last!r})")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def bad_manifest_tree(root: Path) -> Path:
    """A folder whose manifest lists the wrong MD5 for its one file: the job ends ERROR."""
    data = b"payload that does not match" * 10
    manifest = {"name": "manifest", "profile": "data-package", "username": "alice",
                "resources": [{"id": "f", "name": "f", "path": "data.bin", "format": "bin",
                               "media_type": "application/octet-stream", "bytes": len(data),
                               "hash": md5(b"something else")}]}
    return make_tree(root, {"data.bin": data, "manifest.json": json.dumps(manifest).encode()})


def redis_job(redis_proc, job_id: str, field: str) -> str:
    return redis_proc.cli("HGET", f"dtsbridge:job:{job_id}", field).strip()


def wait_fault(b: DtsBridge, count: int = 1, timeout: float = 30) -> None:
    poll(lambda: b.log_text().count("fault point copy reached") >= count, timeout,
         what=f"{count} copies paused at the fault point")


SLOW = "DTSBRIDGE_FAULT_PAUSE"
# twistd ends a SIGTERM shutdown by re-raising the signal, so a clean stop may show as -SIGTERM
CLEAN_EXIT = (0, -signal.SIGTERM)


# ---------------------------------------------------------------------------
# /metrics


def test_metrics_count_jobs_bytes_files_and_durations(services):
    b = services()
    ms0 = metrics(b)
    for name in ("dtsbridge_jobs_in_flight", "dtsbridge_jobs_queued", "dtsbridge_jobs_staging",
                 "dtsbridge_redis_errors_total"):
        assert (name, ()) in ms0, f"{name} missing from /metrics"
    assert metric(ms0, "dtsbridge_redis_errors_total") == 0

    make_tree(b.dts_root / "good", {"a.txt": b"a" * 100, "sub": {"b.bin": b"b" * 5000, "empty": b""}})
    r = b.complete("alice", "good")
    assert r.status == 201, r
    bad_manifest_tree(b.dts_root / "bad")
    r = b.complete("alice", "bad")
    assert r.status == 500, r
    reason = r.json()["error"]["reason"]
    assert reason in ("manifest_mismatch", "checksum_mismatch"), r

    ms = metrics(b)
    assert metric(ms, "dtsbridge_jobs_finished_total", status="SUCCESS", reason="") == 1
    assert metric(ms, "dtsbridge_jobs_finished_total", status="ERROR", reason=reason) == 1
    assert metric(ms, "dtsbridge_jobs_started_total") == 2
    assert metric(ms, "dtsbridge_bytes_copied_total") == 5100  # the failed job's bytes do not count
    assert metric(ms, "dtsbridge_files_copied_total") == 3
    assert metric(ms, "dtsbridge_job_duration_seconds_count", status="SUCCESS") == 1
    assert metric(ms, "dtsbridge_job_duration_seconds_count", status="ERROR") == 1
    assert metric(ms, "dtsbridge_job_duration_seconds_sum", status="SUCCESS") > 0
    assert metric(ms, "dtsbridge_job_duration_seconds_bucket", status="SUCCESS", le="+Inf") == 1
    assert metric(ms, "dtsbridge_phase_duration_seconds_count", phase="scan") == 2
    assert metric(ms, "dtsbridge_phase_duration_seconds_count", phase="publish") == 1
    assert metric(ms, "dtsbridge_phase_duration_seconds_count", phase="copy") >= 1
    assert metric(ms, "dtsbridge_jobs_in_flight") == 0
    assert metric(ms, "dtsbridge_http_requests_total", route="/complete_transfer", code="201") == 1
    assert metric(ms, "dtsbridge_http_requests_total", route="/complete_transfer", code="500") == 1

    # A job waiting for a stager shows in the staging gauge (refreshed by the 1 s tick), and leaves it.
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "alice", "subdirectory": "x"})
    assert r.status == 202, r
    staged_id = r.json()["job_id"]
    poll(lambda: metric(metrics(b), "dtsbridge_jobs_staging") == 1, 15, what="staging gauge = 1")
    assert b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": staged_id}).status == 200
    poll(lambda: metric(metrics(b), "dtsbridge_jobs_staging") == 0, 15, what="staging gauge = 0")
    ms = metrics(b)
    assert metric(ms, "dtsbridge_jobs_finished_total", status="CANCELLED", reason="cancelled") == 1
    assert metric(ms, "dtsbridge_jobs_queued") == 0


# ---------------------------------------------------------------------------
# /healthz


def test_healthz_reports_redis_and_roots(services, redis_proc):
    b = services({"redis": {"timeout_seconds": 1}})
    r = b.call("GET", "/healthz")
    assert (r.status, r.json()) == (200, {"status": "ok"})

    redis_proc.stop()
    r = poll(lambda: (lambda r: r if r.status == 503 else None)(b.call("GET", "/healthz")), 20,
             what="503 from /healthz with Redis stopped")
    body = r.json()
    assert body["status"] != "ok"
    assert any(p.startswith("redis") for p in body["problems"]), body
    # Requests that need Redis answer 503 too, never 500.
    r = b.status(str(uuid.uuid4()))
    assert r.status == 503, r

    redis_proc.restart()
    poll(lambda: b.call("GET", "/healthz").status == 200, 30, what="healthy again after Redis restart")
    assert metric(metrics(b), "dtsbridge_redis_errors_total") >= 1

    away = b.dts_root.with_name("dts-away")
    b.dts_root.rename(away)
    try:
        r = b.call("GET", "/healthz")
        assert r.status == 503, r
        problems = r.json()["problems"]
        assert any(p.startswith("dts_root") for p in problems), problems
        assert not any(p.startswith("redis") for p in problems), problems
    finally:
        away.rename(b.dts_root)
    r = b.call("GET", "/healthz")
    assert (r.status, r.json()) == (200, {"status": "ok"})

    away = b.user_root.with_name("users-away")
    b.user_root.rename(away)
    try:
        r = b.call("GET", "/healthz")
        assert r.status == 503 and any("user_root" in p for p in r.json()["problems"]), r
    finally:
        away.rename(b.user_root)
    assert b.call("GET", "/healthz").status == 200


# ---------------------------------------------------------------------------
# /openapi.json


def _resolve(node: Any, doc: dict) -> Any:
    """Inline every ``$ref`` (OpenAPI 3.0 schemas are JSON Schema draft 4 plus a few keywords)."""
    if isinstance(node, dict):
        if "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/"), ref
            target: Any = doc
            for part in ref[2:].split("/"):
                target = target[part]
            return _resolve(target, doc)
        out = {k: _resolve(v, doc) for k, v in node.items()}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_resolve(x, doc) for x in node]
    return node


class OpenApiChecker:
    def __init__(self, doc: dict) -> None:
        self.doc = doc
        self.checked: set[tuple[str, str, int]] = set()

    def check(self, method: str, path: str, resp) -> Any:
        """Assert that ``resp`` is a documented answer of ``method path`` and its body fits the schema."""
        route = path.split("?")[0]
        op = self.doc["paths"][route][method.lower()]
        code = str(resp.status)
        assert code in op["responses"], f"{method} {route} answered {code}, not documented: {resp}"
        spec = _resolve(op["responses"][code], self.doc)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip()
        assert ctype in spec.get("content", {}), f"{method} {route} {code}: content type {ctype!r} not documented"
        body: Any = resp.body.decode()
        if ctype == "application/json":
            body = resp.json()
            jsonschema.Draft4Validator(spec["content"][ctype]["schema"]).validate(body)
        for header in spec.get("headers", {}):
            assert header.lower() in resp.headers, f"{method} {route} {code}: header {header} missing"
        self.checked.add((method.upper(), route, resp.status))
        return body


def test_openapi_is_valid_complete_and_true(services):
    from openapi_spec_validator import validate

    from dtsbridge.web import Api

    b = services()
    r = b.call("GET", "/openapi.json")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    validate(doc)

    # Every route of the Klein app is documented, with the same methods, and nothing else is.
    routes: dict[str, set[str]] = {}
    for rule in Api.app.url_map.iter_rules():
        routes.setdefault(rule.rule, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {p: set(ops) - {"parameters", "summary", "description"} for p, ops in doc["paths"].items()}
    assert routes == documented
    # The connection layer's refusals (tests/test_web_hardening.py) may meet any request.
    for p, ops in doc["paths"].items():
        for method, op in ops.items():
            assert {"408", "431"} <= set(op["responses"]), (p, method)

    c = OpenApiChecker(doc)
    make_tree(b.dts_root / "one", {"f.txt": b"hello", "d": {"g": b"x" * 10}})
    make_tree(b.dts_root / "two", {"f.txt": b"two"})
    bad_manifest_tree(b.dts_root / "bad")
    (b.dts_root / "file.txt").write_bytes(b"not a folder")
    os.symlink("/etc", b.dts_root / "link")

    ct = "/complete_transfer"
    body = c.check("POST", ct, b.complete("alice", "one"))
    assert body["path"] == "/alice/one" and body["files"] == 2 and body["bytes"] == 15
    job_id = body["job_id"]
    assert c.check("POST", ct, b.complete("alice", "one"))["job_id"] == job_id  # 200 repeat
    # the same request form-encoded, as the MeerKAT examples send it
    c.check("POST", ct, b.call("POST", ct, token=DTS_TOKEN, form={"target_user": "alice", "subdirectory": "one"}))
    r = b.complete("alice", "two", asynchronous=True)
    assert r.status == 202
    async_id = c.check("POST", ct, r)["job_id"]
    c.check("POST", ct, b.call("POST", ct, token=DTS_TOKEN, json_body={"target_user": "alice"}))  # 400
    c.check("POST", ct, b.complete("nobody_here", "one"))  # 400 unknown user
    c.check("POST", ct, b.complete("Bad-Name", "one"))  # 400 bad username
    c.check("POST", ct, b.call("POST", ct, token=DTS_TOKEN, raw=b"{not json", headers={"Content-Type": "application/json"}))
    c.check("POST", ct, b.call("POST", ct, json_body={"target_user": "alice", "subdirectory": "one"}))  # 401
    r = b.complete("alice", "one", token="not-a-valid-token")
    assert r.status == 401 and "www-authenticate" in r.headers
    c.check("POST", ct, r)
    c.check("POST", ct, b.complete("alice", "one", token=NOROLE_TOKEN))  # 403 role
    for sub in ("../etc", "/etc", "link", "one/../../x"):
        r = b.complete("alice", sub)
        assert r.status == 403, (sub, r)
        c.check("POST", ct, r)
    for sub in ("missing", "file.txt"):
        r = b.complete("alice", sub)
        assert r.status == 404, (sub, r)
        c.check("POST", ct, r)
    r = b.call("POST", ct, token=DTS_TOKEN, raw=b"{" + b" " * 70000 + b"}", headers={"Content-Type": "application/json"})
    assert r.status == 413
    c.check("POST", ct, r)
    r = b.complete("alice", "bad")
    assert r.status == 500
    c.check("POST", ct, r)

    ts = "/transferStatus"
    done = b.wait_status(async_id, "SUCCESS")
    assert done["path"] == "/alice/two"
    job = c.check("GET", ts, b.status(async_id))
    assert job["status"] == "SUCCESS" and "time_success" in job
    c.check("GET", ts, b.status(job_id, token=ALICE_TOKEN))  # the target user reads their own job
    c.check("GET", ts, b.status(job_id, token=BOB_TOKEN))  # 403
    c.check("GET", ts, b.status(str(uuid.uuid4())))  # 404
    c.check("GET", ts, b.status("not-a-uuid"))  # 404
    c.check("GET", ts, b.call("GET", ts, token=DTS_TOKEN))  # 400
    c.check("GET", ts, b.status(job_id, token="nope"))  # 401

    st = "/submitTransfer"
    r = b.call("POST", st, token=DTS_TOKEN, json_body={"target_user": "alice", "subdirectory": "two",
                                                       "staging_timeout": 600})
    staged = c.check("POST", st, r)
    c.check("POST", st, b.call("POST", st, token=DTS_TOKEN, json_body={"target_user": "alice",
                                                                       "subdirectory": "two",
                                                                       "staging_timeout": "soon"}))  # 400
    c.check("POST", st, b.call("POST", st, token=DTS_TOKEN, json_body={"target_user": "alice",
                                                                       "subdirectory": "../up"}))  # 403
    c.check("POST", st, b.call("POST", st, token=NOROLE_TOKEN, json_body={"target_user": "alice",
                                                                         "subdirectory": "two"}))  # 403
    c.check("POST", st, b.call("POST", st, json_body={}))  # 401

    ds = "/doneStaging"
    c.check("POST", ds, b.call("POST", ds, json_body={"job_id": staged["job_id"], "authcode": "wrong",
                                                      "success": True}))  # 403
    c.check("POST", ds, b.call("POST", ds, json_body={"job_id": staged["job_id"]}))  # 400
    c.check("POST", ds, b.call("POST", ds, json_body={"job_id": staged["job_id"], "authcode": staged["authcode"],
                                                      "success": "maybe"}))  # 400
    r = b.call("POST", ds, json_body={"job_id": staged["job_id"], "authcode": staged["authcode"], "success": False,
                                      "msg": "tape unreadable"})
    assert r.status == 200
    c.check("POST", ds, r)
    job = c.check("GET", ts, b.status(staged["job_id"]))
    assert job["status"] == "ERROR" and job["reason"] == "staging_failed"

    cx = "/cancelTransfer"
    staged2 = b.call("POST", st, token=DTS_TOKEN, json_body={"target_user": "bob", "subdirectory": "two"}).json()
    job = c.check("POST", cx, b.call("POST", cx, token=DTS_TOKEN, json_body={"job_id": staged2["job_id"]}))
    assert job["status"] == "CANCELLED"
    c.check("POST", cx, b.call("POST", cx, token=DTS_TOKEN, json_body={"job_id": job_id}))  # 409
    c.check("POST", cx, b.call("POST", cx, token=DTS_TOKEN, json_body={"job_id": str(uuid.uuid4())}))  # 404
    c.check("POST", cx, b.call("POST", cx, token=DTS_TOKEN, json_body={}))  # 400
    c.check("POST", cx, b.call("POST", cx, token=NOROLE_TOKEN, json_body={"job_id": job_id}))  # 403
    c.check("POST", cx, b.call("POST", cx, json_body={"job_id": job_id}))  # 401

    jobs = c.check("GET", "/jobs", b.call("GET", "/jobs?user=alice&status=SUCCESS", token=DTS_TOKEN))["jobs"]
    assert {j["job_id"] for j in jobs} == {job_id, async_id}
    mine = c.check("GET", "/jobs", b.call("GET", "/jobs", token=BOB_TOKEN))["jobs"]
    assert [j["job_id"] for j in mine] == [staged2["job_id"]]
    c.check("GET", "/jobs", b.call("GET", "/jobs?user=alice", token=BOB_TOKEN))  # 403
    c.check("GET", "/jobs", b.call("GET", "/jobs?status=DONE", token=DTS_TOKEN))  # 400
    c.check("GET", "/jobs", b.call("GET", "/jobs?limit=many", token=DTS_TOKEN))  # 400
    c.check("GET", "/jobs", b.call("GET", "/jobs"))  # 401

    from tests.harness import Response
    from tests.sse import SseStream
    ev = "/events"
    s = SseStream(b.port, "/events?last_event_id=0", token=DTS_TOKEN)
    s.wait_comment("live")
    c.check("GET", ev, Response(s.status, s.headers, b""))
    s.close()
    job_schema = _resolve({"$ref": "#/components/schemas/Job"}, doc)
    assert s.events and {e["event"] for e in s.events} == {"job"}
    for e in s.events:  # every event's data is a job record as documented
        jsonschema.Draft4Validator(job_schema).validate(e["job"])
    c.check("GET", ev, b.call("GET", ev, headers={"Last-Event-ID": "yesterday"}, token=DTS_TOKEN))  # 400
    c.check("GET", ev, b.call("GET", ev + "?user=alice", token=BOB_TOKEN))  # 403
    c.check("GET", ev, b.call("GET", ev))  # 401
    r = b.call("GET", "/ui")
    assert r.headers["location"] == "ui/"
    c.check("GET", "/ui", r)
    for path in ("/ui/", "/ui/app.js", "/ui/app.css"):
        r = b.call("GET", path)
        assert r.status == 200 and "default-src 'none'" in r.headers["content-security-policy"]
        c.check("GET", path, r)

    assert c.check("GET", "/healthz", b.call("GET", "/healthz")) == {"status": "ok"}
    assert "dtsbridge_jobs_finished_total" in c.check("GET", "/metrics", b.call("GET", "/metrics"))
    c.check("GET", "/openapi.json", b.call("GET", "/openapi.json"))

    # Every documented operation was exercised, and all its 2xx answers were seen.
    for route, ops in documented.items():
        for method in ops:
            seen = {code for (m, r_, code) in c.checked if m == method.upper() and r_ == route}
            assert seen, f"{method} {route} never checked"
    assert {(m, r_) for (m, r_, code) in c.checked if code < 300} >= {
        ("POST", "/complete_transfer"), ("GET", "/transferStatus"), ("POST", "/submitTransfer"),
        ("POST", "/doneStaging"), ("POST", "/cancelTransfer"), ("GET", "/jobs"), ("GET", "/events")}
    assert not (b.user_root / "alice" / "link").exists() and not (b.user_root / "alice" / "bad").exists()


# ---------------------------------------------------------------------------
# logs


UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_carry_job_id_and_never_a_secret(services, log_format):
    b = services({"server": {"log_format": log_format}})
    make_tree(b.dts_root / "logged", {"a": b"aaa", "b": {"c": b"ccc"}})
    make_tree(b.dts_root / "staged", {"s": b"staged data"})
    bad_tokens = ["wrong-token-3f9a8b7c6d5e4f3a2b1c", "Bearer other-wrong-token-77aa88bb99cc"]

    # auth failures of every kind
    assert b.complete("alice", "logged", token=bad_tokens[0]).status == 401
    assert b.complete("alice", "logged", token=bad_tokens[1]).status == 401
    assert b.complete("alice", "logged", token=NOROLE_TOKEN).status == 403
    assert b.complete("alice", "logged", token=ALICE_TOKEN).status == 403
    assert b.call("GET", "/jobs?user=alice", token=BOB_TOKEN).status == 403
    # a job, and a staged job with a wrong, the right and a reused authcode
    r = b.complete("alice", "logged")
    assert r.status == 201, r
    job_id = r.json()["job_id"]
    r = b.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "bob", "subdirectory": "staged"})
    staged_id, code = r.json()["job_id"], r.json()["authcode"]
    wrong_code = code[::-1] + "x"
    assert b.call("POST", "/doneStaging", json_body={"job_id": staged_id, "authcode": wrong_code,
                                                     "success": True}).status == 403
    assert b.call("POST", "/doneStaging", form={"job_id": staged_id, "authcode": code, "success": "true"}).status == 200
    assert b.call("POST", "/doneStaging", json_body={"job_id": staged_id, "authcode": code,
                                                     "success": True}).status == 403
    b.wait_status(staged_id, "SUCCESS")
    assert b.status(staged_id, token=BOB_TOKEN).status == 200
    assert b.stop() in CLEAN_EXIT

    log = b.log_text()
    assert job_id in log and staged_id in log  # the log is not empty of jobs
    for secret in [DTS_TOKEN, NOROLE_TOKEN, ALICE_TOKEN, BOB_TOKEN, code, wrong_code,
                   "wrong-token-3f9a8b7c6d5e4f3a2b1c", "other-wrong-token-77aa88bb99cc"]:
        assert secret not in log, f"a secret ({secret[:6]}…) appears in the {log_format} log"

    if log_format == "text":
        assert re.search(rf"\[dtsbridge\.worker\.Worker#info\] job {job_id} ended SUCCESS", log), b.log_tail()
        return
    events = []
    for line in log.splitlines():
        if line.strip():
            events.append(json.loads(line))  # every line on stdout is one JSON object
    for e in events:
        assert {"time", "level", "namespace", "text"} <= set(e), e
    for jid in (job_id, staged_id):
        mine = [e for e in events if e.get("job_id") == jid]
        texts = " | ".join(e["text"] for e in mine)
        assert "queued" in texts or "staged" in texts, texts
        assert "copying" in texts and "ended SUCCESS" in texts, texts
        # every event that names the job (except the web access log, which quotes the URL) carries job_id
        for e in events:
            if jid in e["text"] and e["namespace"] != "twisted.python.log":
                assert e.get("job_id") == jid, e
    assert any(e["namespace"] == "twisted.python.log" and "POST /complete_transfer" in e["text"] for e in events)


# ---------------------------------------------------------------------------
# drain on SIGTERM, SIGUSR2


@pytest.mark.timeout(120)
def test_sigterm_drains_running_copy_and_refuses_new_jobs(services, redis_proc):
    b = services({"copy": {"threads": 1, "max_jobs": 2}, "drain": {"grace_seconds": 60}}, env={SLOW: "copy:4"})
    make_tree(b.dts_root / "running", {"big.bin": os.urandom(3 * 1024 * 1024), "small": b"s"})
    make_tree(b.dts_root / "late", {"f": b"late"})
    r = b.complete("alice", "running", asynchronous=True)
    assert r.status == 202
    job_id = r.json()["job_id"]
    b.wait_status(job_id, "TRANSFERRING")
    wait_fault(b)
    t0 = time.monotonic()
    b.signal(signal.SIGTERM)

    # While draining the web server still answers: health says so, new jobs get 503.
    r = poll(lambda: (lambda r: r if r.status == 503 else None)(b.call("GET", "/healthz")), 10,
             what="/healthz 503 while draining")
    assert any("draining" in p for p in r.json()["problems"])
    r = b.complete("alice", "late")
    assert r.status == 503, r
    assert r.json()["error"]["httpcode"] == 503 and "retry-after" in r.headers
    assert b.status(job_id).json()["status"] == "TRANSFERRING"  # status calls still work

    assert b.proc.wait(60) in CLEAN_EXIT
    assert time.monotonic() - t0 < 30  # it left when the copy was done, not at the end of the grace
    assert redis_job(redis_proc, job_id, "status") == "SUCCESS"
    assert tree_of(b.user_root / "alice" / "running") == tree_of(b.dts_root / "running")
    assert not (b.user_root / "alice" / "late").exists()
    assert redis_proc.cli("ZCARD", "dtsbridge:jobs").strip() == "1"  # no job was made for "late"
    assert leftovers(b.user_root) == []


@pytest.mark.timeout(120)
def test_sigterm_short_grace_hands_the_copy_back_and_next_start_finishes(services, redis_proc):
    b = services({"copy": {"threads": 1, "max_jobs": 2}, "drain": {"grace_seconds": 1}}, env={SLOW: "copy:6"})
    make_tree(b.dts_root / "long", {"big.bin": os.urandom(2 * 1024 * 1024), "x": {"y": b"yy"}})
    r = b.complete("alice", "long", asynchronous=True)
    job_id = r.json()["job_id"]
    b.wait_status(job_id, "TRANSFERRING")
    wait_fault(b)
    b.signal(signal.SIGTERM)
    assert b.proc.wait(60) in CLEAN_EXIT

    assert redis_job(redis_proc, job_id, "status") == "SUBMITTED"
    assert "handed back" in redis_job(redis_proc, job_id, "detailed_status")
    assert redis_job(redis_proc, job_id, "claim") == ""
    assert job_id in redis_proc.cli("LRANGE", "dtsbridge:queue", "0", "-1")
    assert leftovers(b.user_root) == []
    assert not (b.user_root / "alice" / "long").exists()
    assert "handing " + job_id + " back to the queue" in b.log_text()

    b.extra_env.pop(SLOW)
    b.start()
    done = b.wait_status(job_id, "SUCCESS", timeout=60)
    assert done["path"] == "/alice/long"
    assert tree_of(b.user_root / "alice" / "long") == tree_of(b.dts_root / "long")
    assert leftovers(b.user_root) == []


@pytest.mark.timeout(120)
def test_sigusr2_finishes_current_jobs_then_halts(services, redis_proc):
    b = services({"copy": {"threads": 1, "max_jobs": 1}, "drain": {"grace_seconds": 60}}, env={SLOW: "copy:3"})
    make_tree(b.dts_root / "first", {"f": os.urandom(200_000)})
    make_tree(b.dts_root / "second", {"g": b"second"})
    first = b.complete("alice", "first", asynchronous=True).json()["job_id"]
    b.wait_status(first, "TRANSFERRING")
    wait_fault(b)
    second = b.complete("bob", "second", asynchronous=True).json()["job_id"]
    assert b.status(second).json()["status"] == "SUBMITTED"

    b.signal(signal.SIGUSR2)
    assert b.proc.wait(60) == 0  # it halts by itself once the running copy is done
    assert "halt when idle is now on" in b.log_text()
    assert redis_job(redis_proc, first, "status") == "SUCCESS"
    assert redis_job(redis_proc, second, "status") == "SUBMITTED"  # queued jobs were not started
    assert redis_job(redis_proc, second, "attempts") == ""
    assert not (b.user_root / "bob" / "second").exists()

    # The next process takes the queued job up.
    b.extra_env.pop(SLOW)
    b.start()
    b.wait_status(second, "SUCCESS")


@pytest.mark.timeout(60)
def test_sigusr2_twice_resumes_taking_jobs(services):
    b = services({"copy": {"max_jobs": 1}}, env={SLOW: "copy:3"})
    make_tree(b.dts_root / "one", {"f": b"1"})
    make_tree(b.dts_root / "two", {"f": b"2"})
    one = b.complete("alice", "one", asynchronous=True).json()["job_id"]
    b.wait_status(one, "TRANSFERRING")
    b.signal(signal.SIGUSR2)
    poll(lambda: "halt when idle is now on" in b.log_text(), 10, what="SIGUSR2 on")
    b.signal(signal.SIGUSR2)
    poll(lambda: "halt when idle is now off" in b.log_text(), 10, what="SIGUSR2 off")
    two = b.complete("alice", "two", asynchronous=True).json()["job_id"]
    b.wait_status(one, "SUCCESS")
    b.wait_status(two, "SUCCESS")
    assert b.proc.poll() is None  # still running
    assert b.call("GET", "/healthz").status == 200


# ---------------------------------------------------------------------------
# per-user limits


@pytest.mark.timeout(120)
def test_max_jobs_per_user_across_processes(services, redis_proc):
    settings = {"copy": {"threads": 1, "max_jobs": 4, "max_jobs_per_user": 1}}
    a = services(settings, name="a", env={SLOW: "copy:2"})
    b = services(settings, name="b", env={SLOW: "copy:2"}, shared_from=a)
    for i in range(3):
        make_tree(a.dts_root / f"al{i}", {"f": os.urandom(100_000), "g": b"g"})
    make_tree(a.dts_root / "bo", {"f": os.urandom(100_000)})
    alice = [a.complete("alice", f"al{i}", asynchronous=True).json()["job_id"] for i in range(3)]
    bob = b.complete("bob", "bo", asynchronous=True).json()["job_id"]

    max_alice = 0
    bob_done_while_alice_pending = False
    max_queued = 0.0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        jobs = {j["job_id"]: j for j in a.call("GET", "/jobs?limit=50", token=DTS_TOKEN).json()["jobs"]}
        running = [j for j in alice if jobs[j]["status"] == "TRANSFERRING"]
        max_alice = max(max_alice, len(running))
        if jobs[bob]["status"] == "SUCCESS" and any(jobs[j]["status"] != "SUCCESS" for j in alice[1:]):
            bob_done_while_alice_pending = True
        max_queued = max(max_queued, metric(metrics(a), "dtsbridge_jobs_queued"))
        if all(jobs[j]["status"] in ("SUCCESS", "ERROR") for j in alice + [bob]):
            break
        time.sleep(0.1)
    final = {j: a.status(j).json() for j in alice + [bob]}
    assert all(v["status"] == "SUCCESS" for v in final.values()), final
    assert max_alice == 1, "more than one of alice's jobs ran at once"
    assert bob_done_while_alice_pending, "bob's job waited behind alice's"
    assert max_queued >= 1
    # alice's jobs ran in the order they were submitted
    starts = [final[j]["time_transferring"] for j in alice]
    assert starts == sorted(starts)
    for j in alice:  # each ran once: skipping a job at the limit is not an attempt
        assert final[j].get("attempts") == 1, final[j]
    assert redis_proc.cli("HGETALL", "dtsbridge:user_active").strip() == ""
    assert redis_proc.cli("LLEN", "dtsbridge:queue").strip() == "0"
    assert "active_user" not in final[alice[0]]


@pytest.mark.timeout(90)
def test_per_user_count_released_by_cancel_and_handback(services, redis_proc):
    """The per-user count follows the claim: a cancelled running job and a handed-back job free the slot."""
    settings = {"copy": {"threads": 1, "max_jobs": 4, "max_jobs_per_user": 1}, "drain": {"grace_seconds": 0}}
    b = services(settings, env={SLOW: "copy:3"})
    for n in ("c1", "c2", "c3"):
        make_tree(b.dts_root / n, {"f": os.urandom(50_000)})
    c1 = b.complete("alice", "c1", asynchronous=True).json()["job_id"]
    c2 = b.complete("alice", "c2", asynchronous=True).json()["job_id"]
    b.wait_status(c1, "TRANSFERRING")
    assert redis_proc.cli("HGET", "dtsbridge:user_active", "alice").strip() == "1"
    assert b.status(c2).json()["status"] == "SUBMITTED"
    assert b.call("POST", "/cancelTransfer", token=DTS_TOKEN, json_body={"job_id": c1}).status == 200
    b.wait_status(c1, "CANCELLED")
    b.wait_status(c2, "TRANSFERRING", timeout=30)  # the slot was freed
    c3 = b.complete("alice", "c3", asynchronous=True).json()["job_id"]
    b.stop()  # grace 0: c2 is handed back
    assert redis_job(redis_proc, c2, "status") == "SUBMITTED"
    assert redis_proc.cli("HGETALL", "dtsbridge:user_active").strip() == ""
    b.extra_env.pop(SLOW)
    b.start()
    b.wait_status(c2, "SUCCESS")
    b.wait_status(c3, "SUCCESS")
    assert redis_proc.cli("HGETALL", "dtsbridge:user_active").strip() == ""
    assert leftovers(b.user_root) == []


# ---------------------------------------------------------------------------
# the operator's CLI


def cli(b: DtsBridge | None, *args: str, token: str | None = DTS_TOKEN, timeout: float = 90) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "dtsbridge.cli"]
    if b is not None:
        argv += ["--url", f"http://127.0.0.1:{b.port}"]
    if token is not None:
        argv += ["--token", token]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTSBRIDGE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)


def test_cli_token_new_round_trips(services):
    b = services({"auth": {"tokens_file": "tokens.ini"}})
    p = cli(None, "token", "new", "opsbot", "--user", "opsbot", "--roles", "DTS_TRANSFER", token=None)
    assert p.returncode == 0, p.stderr
    section = p.stdout
    assert section.lstrip().startswith("[opsbot]") and "sha256" in section
    m = re.search(r"^# (\S+)\s*$", p.stderr, re.M)
    assert m, p.stderr
    token = m.group(1)
    assert token not in section  # only the hash is in the section
    assert hashlib.sha256(token.encode()).hexdigest() in section
    unknown = str(uuid.uuid4())
    assert b.call("POST", "/cancelTransfer", token=token, json_body={"job_id": unknown}).status == 401
    with open(b.etc / "tokens.ini", "a") as f:
        f.write("\n" + section)
    # the service reloads the file; the new token then holds the role (404: past the 401 and 403 checks)
    poll(lambda: b.call("POST", "/cancelTransfer", token=token, json_body={"job_id": unknown}).status == 404, 30,
         what="new token accepted")

    # --append writes the section itself and prints just the token
    p = cli(None, "token", "new", "carol", "--roles", "", "--append", str(b.etc / "tokens.ini"), token=None)
    assert p.returncode == 0, p.stderr
    carol = p.stdout.strip().splitlines()[-1]
    assert carol not in (b.etc / "tokens.ini").read_text()
    r = poll(lambda: (lambda r: r if r.status == 200 else None)(b.call("GET", "/jobs", token=carol)), 30,
             what="appended token accepted")
    assert r.json() == {"jobs": []}
    assert b.call("POST", "/cancelTransfer", token=carol, json_body={"job_id": unknown}).status == 403  # no role


@pytest.mark.timeout(120)
def test_cli_status_follow_list_cancel(services):
    b = services({"copy": {"threads": 1, "max_jobs": 2}})
    make_tree(b.dts_root / "done", {"f": b"done"})
    make_tree(b.dts_root / "bobs", {"f": b"bob"})
    bad_manifest_tree(b.dts_root / "broken")
    ok_id = b.complete("alice", "done").json()["job_id"]
    bob_id = b.complete("bob", "bobs").json()["job_id"]
    err_id = b.complete("alice", "broken").json()["error"]["job_id"]

    p = cli(b, "status", ok_id)
    assert p.returncode == 0, p.stderr
    fields = dict(re.findall(r"^\s*(\w+): (.*)$", p.stdout, re.M))
    assert fields["status"] == "SUCCESS" and fields["job_id"] == ok_id and fields["path"] == "/alice/done"
    assert fields["files_total"] == "1" and fields["target_user"] == "alice"
    p = cli(b, "status", err_id)
    assert p.returncode != 0 and re.search(r"status: ERROR", p.stdout)
    p = cli(b, "status", ok_id, "--json")
    assert json.loads(p.stdout)["status"] == "SUCCESS"
    p = cli(b, "status", str(uuid.uuid4()))
    assert p.returncode != 0 and "HTTP 404" in p.stderr
    p = cli(b, "status", ok_id, token="wrong-token")
    assert p.returncode != 0 and "HTTP 401" in p.stderr

    p = cli(b, "list", "--user", "alice", "--status", "SUCCESS")
    assert p.returncode == 0, p.stderr
    assert ok_id in p.stdout and err_id not in p.stdout and bob_id not in p.stdout
    assert "/alice/done" in p.stdout
    p = cli(b, "list", "--user", "alice")
    assert ok_id in p.stdout and err_id in p.stdout and bob_id not in p.stdout
    p = cli(b, "list", "--json", "--status", "ERROR")
    assert [j["job_id"] for j in json.loads(p.stdout)["jobs"]] == [err_id]
    p = cli(b, "list", "--status", "DONE")
    assert p.returncode != 0 and "HTTP 400" in p.stderr

    p = cli(b, "cancel", ok_id)
    assert p.returncode != 0 and "HTTP 409" in p.stderr and "already ended" in p.stderr
    staged = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
                    json_body={"target_user": "alice", "subdirectory": "done"}).json()["job_id"]
    p = cli(b, "cancel", staged)
    assert p.returncode == 0 and f"{staged}: CANCELLED" in p.stdout
    assert b.status(staged).json()["status"] == "CANCELLED"
    p = cli(b, "cancel", str(uuid.uuid4()))
    assert p.returncode != 0 and "HTTP 404" in p.stderr

    # --follow on a running copy: progress lines, then the final state, and it exits by itself
    b.stop()
    b.extra_env[SLOW] = "copy:3"
    b.start()
    make_tree(b.dts_root / "slow", {"big": os.urandom(1_000_000), "small": b"s"})
    slow_id = b.complete("alice", "slow", asynchronous=True).json()["job_id"]
    b.wait_status(slow_id, "TRANSFERRING")
    t0 = time.monotonic()
    p = cli(b, "status", slow_id, "--follow", "--interval", "0.3")
    assert p.returncode == 0, p.stderr
    bar = [line for line in p.stdout.splitlines() if "TRANSFERRING" in line]
    assert bar and re.search(r"\[[#. ]{30}\]\s+[\d?.]+%", bar[0]), p.stdout
    assert re.search(r"^\s*status: SUCCESS$", p.stdout, re.M), p.stdout
    assert time.monotonic() - t0 < 60
    assert b.status(slow_id).json()["status"] == "SUCCESS"


def test_openapi_job_schema_fits_every_stored_field_kind():
    """A job hash as the scripts and the bridge write it (every typed field) reads back as the documented Job."""
    from dtsbridge.model import Job
    from dtsbridge.openapi import spec

    doc = spec("test")
    h = {"status": "SUCCESS", "target_user": "alice", "subdirectory": "x", "submitter": "dts", "kind": "staged",
         "source_rel": "x", "dest_parts": "alice", "path": "/alice/x", "detailed_status": "done", "reason": "",
         "files_total": "3", "files_done": "3", "bytes_total": "10", "bytes_done": "10", "attempts": "2",
         "staging_timeout": "60", "manifest_resources": "1", "manifest_size_only": "0", "stager_success": "1",
         "source_deleted": "1", "staged_to": "/tape", "stager_msg": "ok", "stager_path": "x",
         "time_submitted": "2026-01-01T00:00:00.000Z", "time_staging": "2026-01-01T00:00:00.000Z",
         "time_staged": "2026-01-01T00:00:01.000Z", "time_transferring": "2026-01-01T00:00:02.000Z",
         "time_success": "2026-01-01T00:00:03.000Z", "claim": "c", "lease_host": "h:1", "authcode_hash": "x",
         "publish_tmp": "t", "publish_dev": "1", "publish_ino": "2", "active_user": "alice"}
    body = Job.from_hash(str(uuid.uuid4()), h).public()
    jsonschema.Draft4Validator(_resolve({"$ref": "#/components/schemas/Job"}, doc)).validate(body)
    assert body["source_deleted"] is True and body["stager_success"] is True and body["attempts"] == 2
    documented = set(doc["components"]["schemas"]["Job"]["properties"])
    assert set(body) <= documented, set(body) - documented  # every public field is documented
    for secret in ("claim", "lease_host", "authcode_hash", "publish_tmp", "active_user", "source_rel", "dest_parts"):
        assert secret not in body


@pytest.mark.parametrize("listen", ["nonsense:1", "tcp:notaport", "tcp:8080:bogus=1"])
def test_a_bad_listen_endpoint_is_one_configuration_line(tmp_path, redis_proc, listen) -> None:
    b = DtsBridge(tmp_path, redis_proc.url, settings={"server": {"listen": listen}})
    b.write_config()
    p = subprocess.run(b.command(), cwd=str(b.root), env=b.env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    out = (p.stdout + p.stderr).strip()
    assert out.startswith("dtsbridge: configuration error: [server] listen:"), out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
