"""No request breaks dtsbridge, and no path string leaves the DTS area.

1. schemathesis fuzzes a real ``twistd dtsbridge`` (loopback only) from the
   service's own ``/openapi.json``: positive and negative examples for every
   operation, a bounded number of each. Every answer must be documented (status
   code, content type, body schema) and none may be a 5xx. Afterwards nothing
   was written outside ``user_root`` and the DTS area is unchanged.
2. hypothesis property tests call :func:`dtsbridge.engine.resolve_source` and
   :func:`dtsbridge.engine.normalize_relpath` directly with paths built from
   ``..``, ``.``, ``/``, ``//``, NUL, unicode, absolute prefixes and the names of
   symbolic links planted in the tree: the answer is a ``TransferError`` or a
   folder strictly inside ``dts_root`` reached without any link.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st

from dtsbridge import engine
from dtsbridge.errors import TransferError
from tests.harness import DTS_TOKEN, DtsBridge, make_tree
from tests.redis_fixture import start_private_redis

import schemathesis  # noqa: E402  (extras_require["test"]; never skipped: CI must fuzz)

MAX_EXAMPLES = 30  # per operation and generation mode
FUZZ_BUDGET_S = 150  # the whole fuzzing run must end well within 3 minutes


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below ``root`` (not following links): relative path -> kind and content hash."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            if stat.S_ISREG(st_.st_mode):
                out[str(p.relative_to(root))] = "f:" + hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st_.st_mode):
                out[str(p.relative_to(root))] = "l:" + os.readlink(p)
            else:
                out[str(p.relative_to(root))] = f"m:{stat.S_IFMT(st_.st_mode)}"
    return out


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    redis = start_private_redis(root / "redis")
    svc = DtsBridge(root / "svc", redis.url, settings={"copy": {"threads": "1", "max_jobs": "2"},
                                                       "staging": {"max_timeout_seconds": "3600"}})
    # Something real to find: folders, a file, links out of the area and to the user's home.
    make_tree(svc.dts_root / "alpha", {"a.txt": b"alpha", "sub": {"b.bin": b"\0" * 1000}})
    make_tree(svc.dts_root / "alice" / "dts-0001", {"x": b"x"})
    (svc.dts_root / "plain.txt").write_bytes(b"plain")
    outside = root / "outside"
    make_tree(outside, {"secret.txt": b"secret"})
    os.symlink(outside, svc.dts_root / "escape")
    os.symlink(svc.user_root / "bob", svc.dts_root / "into_bob")
    svc.start()
    try:
        yield svc, root, redis
    finally:
        svc.kill()
        redis.stop()


AREA_PATHS = st.one_of(
    st.sampled_from(["alpha", "alpha/sub", "alice", "alice/dts-0001", "plain.txt", "escape", "escape/secret.txt",
                     "into_bob", "..", "../outside", "alpha/../..", "/etc", "/", ".", "alpha/./sub/", "missing",
                     "alpha\x00", "//alpha"]),
    st.builds(lambda a, b: a + b, st.sampled_from(["", "/", "../", "alpha/", "escape/"]), st.text(max_size=8)))
USERS = st.one_of(st.sampled_from(["alice", "bob"]),
                  st.sampled_from(["carol", "root", "Alice", "a" * 101, "../alice", "alice\x00", ""]),
                  st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True))
TARGETED = {
    "POST /complete_transfer": st.fixed_dictionaries({"target_user": USERS, "subdirectory": AREA_PATHS}),
    "POST /submitTransfer": st.fixed_dictionaries({"target_user": USERS, "subdirectory": AREA_PATHS}),
}


def own_timeout(case, response) -> bool:
    """The one documented 5xx: a waiting caller whose own ``timeout_seconds`` ran out gets 500 with
    reason ``timeout`` (README, "Answers"). With a timeout as small as ``5e-324`` the job either
    ends in time or not, by a race with the deadline sweep; both answers are right."""
    if response.status_code != 500 or not isinstance(case.body, dict) or "timeout_seconds" not in case.body:
        return False
    try:
        return response.json()["error"]["reason"] == "timeout"
    except (ValueError, KeyError, TypeError):
        return False


def test_schemathesis_fuzz_finds_no_5xx_and_no_undocumented_answer(fuzz_service):
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    svc, root, _ = fuzz_service
    base = f"http://127.0.0.1:{svc.port}"
    before_dts = snapshot(svc.dts_root)
    before_root = {p.name for p in root.iterdir()}
    before_svc = {p.name for p in (root / "svc").iterdir()}
    outside_before = snapshot(root / "outside")

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    doc = svc.call("GET", "/openapi.json").json()
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    headers = {"Authorization": DTS_TOKEN}
    seen: dict[str, set[int]] = {}
    timed_out: list[str] = []  # 500 "timeout" answers to a request's own timeout_seconds
    failures: list[str] = []
    started = time.monotonic()
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in operations}
    # (schemathesis leaves out the operation that serves the schema itself)
    assert labels >= {"POST /complete_transfer", "GET /transferStatus", "POST /submitTransfer", "POST /doneStaging",
                      "POST /cancelTransfer", "GET /jobs", "GET /healthz", "GET /metrics"}, labels

    for op in operations:
        if op.label == "GET /events":
            continue  # a stream that never ends by itself: tests/test_events.py covers it
        passes = [(GenerationMode.POSITIVE, False), (GenerationMode.NEGATIVE, False)]
        if op.label in TARGETED:
            passes.append((GenerationMode.POSITIVE, True))
        for mode, targeted in passes:
            codes = seen.setdefault(op.label, set())

            @given(case=op.as_strategy(generation_mode=mode), data=st.data())
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
            def run(case, data):
                assert time.monotonic() - started < FUZZ_BUDGET_S, "the fuzzing budget is spent"
                if targeted and isinstance(case.body, dict):
                    # Aim at real users and at the folders, links and escapes of the area (random names
                    # mostly stop at "no such user"), keeping the fuzzer's extra fields.
                    case.body = {**case.body, **data.draw(TARGETED[op.label], label="fields")}
                    if data.draw(st.booleans(), label="async"):
                        case.headers = {**(case.headers or {}), "Prefer": "respond-async"}
                case.headers = {**(case.headers or {}), **headers}
                response = case.call(base_url=base, timeout=60)
                if own_timeout(case, response):
                    timed_out.append(op.label)  # documented (and still checked against the schema)
                    case.validate_response(response, checks=[c for c in checks if c is not not_a_server_error],
                                           headers=headers)
                    return
                codes.add(response.status_code)
                case.validate_response(response, checks=checks, headers=headers)

            try:
                run()
            except Unsatisfiable:
                # no negative example exists for an operation without parameters or body (/healthz, /metrics)
                raw = doc["paths"][op.path][op.method.lower()]
                if mode is GenerationMode.POSITIVE or raw.get("parameters") or raw.get("requestBody"):
                    failures.append(f"{op.label} [{mode.value}]: no example could be generated")
            except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report them all
                kind = "targeted" if targeted else mode.value
                failures.append(f"{op.label} [{kind}]: {type(e).__name__}: {str(e)[:1500]}")

    print("status codes seen:", {k: sorted(v) for k, v in seen.items()}, "; own timeouts:", len(timed_out))
    assert set(timed_out) <= {"POST /complete_transfer"}, timed_out  # only a waiting caller gets one
    assert not failures, "\n\n".join(failures)
    elapsed = time.monotonic() - started
    assert elapsed < FUZZ_BUDGET_S
    # the fuzzing got past the front door: more than 401/400 for the main operations
    assert {201, 403} <= seen["POST /complete_transfer"], seen
    assert 202 in seen["POST /submitTransfer"], seen
    assert seen["GET /transferStatus"] & {400, 404}, seen
    assert all(code < 500 for codes in seen.values() for code in codes), seen

    # Nothing outside user_root was written: the DTS area, the folder outside it and the test root are as before.
    assert snapshot(svc.dts_root) == before_dts
    assert snapshot(root / "outside") == outside_before
    assert {p.name for p in root.iterdir()} == before_root
    assert {p.name for p in (root / "svc").iterdir()} == before_svc
    # nothing the fuzzer did published anything but folders of the DTS area, and only into users' folders
    for user_dir in (svc.user_root).iterdir():
        for entry in user_dir.iterdir():
            assert not entry.name.startswith(".dtsbridge-"), f"temporary folder left: {entry}"
            assert entry.is_dir() and not entry.is_symlink(), entry
    assert not (svc.user_root / "alice" / "secret.txt").exists()
    assert all("secret" not in name for name in snapshot(svc.user_root))
    # the service logged no unexpected error, and is still well
    assert "Traceback" not in svc.log_text() and "unexpected error" not in svc.log_text(), svc.log_tail(100)
    r = svc.call("GET", "/healthz")
    assert r.status == 200, r


# ---------------------------------------------------------------------------
# property tests: resolve_source / normalize_relpath


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A DTS area with folders, files and every kind of link an attacker could plant; and a link to the area."""
    base = tmp_path_factory.mktemp("paths")
    dts = base / "area" / "dts"
    outside = base / "area" / "outside"
    make_tree(outside, {"secret": {"s.txt": b"s"}})
    make_tree(dts, {"a": {"b": {"c": {}}, "f.txt": b"f"}, "d": {}, "é": {"ü": {}}, " sp ace": {}})
    os.symlink("..", dts / "up")  # the area's parent
    os.symlink("../outside", dts / "out")
    os.symlink(str(outside / "secret"), dts / "abs")
    os.symlink("/", dts / "root")
    os.symlink("a", dts / "alias")  # inside, but a link all the same
    os.symlink(".", dts / "a" / "self")
    os.symlink("../..", dts / "a" / "b" / "back")
    os.symlink("missing", dts / "dangling")
    os.mkfifo(dts / "d" / "fifo")
    via = base / "via"
    os.symlink(dts, via)  # dts_root given through a link: its realpath is the area
    return {"dts": dts, "outside": outside, "via": via, "real": os.path.realpath(dts)}


SEGMENTS = ["..", ".", "", "a", "b", "c", "d", "f.txt", "é", "ü", " sp ace", "up", "out", "abs", "root", "alias",
            "self", "back", "dangling", "fifo", "secret", "outside", "dts", "area", "\x00", "a\x00b", "\u202e",
            "..\u2215..", "%2e%2e", "...", " ..", ".. ", "\\..", "a/../..", "//", "/"]


def path_strings(t: dict) -> st.SearchStrategy[str]:
    names = st.sampled_from(["a", "b", "c", "d", "f.txt", "é", "ü", " sp ace"])  # real entries, to reach success
    segment = st.one_of(names, names, st.sampled_from(SEGMENTS), st.text(max_size=6))
    sep = st.sampled_from(["/", "/", "/", "/", "//", "/./", "/../"])
    body = st.tuples(segment, st.lists(st.tuples(sep, segment), max_size=6), st.sampled_from(["", "/", "//", "/."])).map(
        lambda x: x[0] + "".join(a + b for a, b in x[1]) + x[2])
    prefixes = st.sampled_from(["", "", "", "/", "//", "./", "../", str(t["dts"]) + "/", str(t["real"]) + "/",
                                str(t["via"]) + "/", str(t["outside"]) + "/", str(t["dts"].parent) + "/",
                                str(t["dts"]) + "/../", str(t["dts"]), "/etc/", "/proc/self/root/"])
    inside = st.tuples(st.sampled_from(["", "", str(t["dts"]) + "/", str(t["real"]) + "//", str(t["via"]) + "/"]),
                       st.lists(st.one_of(names, names, st.sampled_from(SEGMENTS)), min_size=1, max_size=4)).map(
        lambda x: x[0] + "/".join(x[1]))
    return st.one_of(inside, st.tuples(prefixes, body).map("".join), prefixes, st.text(max_size=40))


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_resolve_source_never_leaves_the_dts_area(tree, data):
    s = data.draw(path_strings(tree), label="subdirectory")
    root_arg = data.draw(st.sampled_from([str(tree["dts"]), str(tree["via"])]), label="dts_root")
    try:
        src = engine.resolve_source(root_arg, s)
    except TransferError as e:
        assert e.reason in ("outside_dts_area", "source_not_found", "bad_request", "unsafe_entry"), e
        return
    real = tree["real"]
    assert src.rel and not src.rel.startswith("/") and "\x00" not in src.rel
    parts = src.rel.split("/")
    assert all(p not in ("", ".", "..") for p in parts), src
    assert src.name == parts[-1]
    # every component is a real folder, none is a link, and the result is strictly inside the area
    cur = real
    for p in parts:
        cur = os.path.join(cur, p)
        assert not os.path.islink(cur), (s, src)
        assert os.path.isdir(cur), (s, src)
    resolved = os.path.realpath(os.path.join(real, src.rel))
    assert _inside(resolved, real), (s, src, resolved)
    assert resolved == os.path.normpath(os.path.join(real, src.rel))


@settings(max_examples=400, deadline=None, database=None)
@given(s=st.one_of(st.text(max_size=60),
                   st.lists(st.sampled_from(SEGMENTS), max_size=8).map("/".join),
                   st.lists(st.sampled_from(SEGMENTS), max_size=8).map(lambda p: "/" + "//".join(p))))
def test_normalize_relpath_is_canonical_and_never_climbs(s):
    try:
        rel = engine.normalize_relpath(s)
    except TransferError as e:
        assert e.reason in ("outside_dts_area", "bad_request"), e
        assert s.startswith("/") or "\x00" in s or ".." in s.split("/") or len(s) > 4096, (s, e)
        return
    assert not s.startswith("/") and "\x00" not in s
    assert not rel.startswith("/") and "\x00" not in rel
    if rel:
        assert all(p not in ("", ".", "..") for p in rel.split("/")), (s, rel)
        assert os.path.normpath(rel) == rel
        # joined to any root it stays below it
        assert _inside(os.path.normpath(os.path.join("/x/root", rel)), "/x/root")
    assert engine.normalize_relpath(rel) == rel  # idempotent


def test_planted_links_are_refused_explicitly(tree):
    """The links of the tree, named directly and as full paths: each one is refused as outside the area."""
    for name in ("up", "out", "abs", "root", "alias", "a/self", "a/b/back", "up/dts/a", "alias/b", "out/secret"):
        for s in (name, f"{tree['dts']}/{name}", f"{tree['real']}/{name}/"):
            with pytest.raises(TransferError) as ei:
                engine.resolve_source(str(tree["dts"]), s)
            assert ei.value.reason == "outside_dts_area", (s, ei.value)
    for s in ("..", "../outside", "a/../..", str(tree["outside"]), "/etc", "/", "a\x00", f"{tree['dts']}/../outside"):
        with pytest.raises(TransferError) as ei:
            engine.resolve_source(str(tree["dts"]), s)
        assert ei.value.reason in ("outside_dts_area", "bad_request"), (s, ei.value)
    assert engine.resolve_source(str(tree["dts"]), "a/b/").rel == "a/b"
    assert engine.resolve_source(str(tree["via"]), f"{tree['via']}/a//b/./c").rel == "a/b/c"
    with pytest.raises(TransferError) as ei:
        engine.resolve_source(str(tree["dts"]), "d/fifo")
    assert ei.value.reason in ("source_not_found", "unsafe_entry")
