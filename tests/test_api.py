"""End-to-end tests of issue 2: a real ``twistd dtsbridge`` called over HTTP as DTS would.

Every test drives a real process started by :mod:`tests.harness`, with a
private Redis (never one we did not start), real folders and, for the
``kbase`` backend, the fake auth2 of :mod:`tests.fakeauth2` in its own process.

Cheap checks share one service (the module-scoped ``svc``); each test uses its
own uniquely named source folder so that what it asserts does not depend on
any other test. Tests that need another configuration start their own service.
"""

from __future__ import annotations

import hashlib
import http
import json
import os
import pwd
import re
import signal
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.fakeauth2 import FakeAuth2Process
from tests.harness import (ALICE_TOKEN, BOB_TOKEN, DTS_TOKEN, NOROLE_TOKEN, DtsBridge, Response, free_port,
                           leftovers, make_tree, tree_of)
from tests.redis_fixture import RedisProcess, start_private_redis

pytestmark = pytest.mark.timeout(120)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")
SECRETS = ("authcode_hash", "claim", "publish_tmp", "publish_ino", "publish_dev", "folder_key", "source_rel")


# -- helpers ----------------------------------------------------------------


def uniq(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def payload(seed: str, n: int = 3) -> dict[str, Any]:
    """A small tree with nested folders, an empty file and binary content."""
    files: dict[str, Any] = {f"f{i}.bin": hashlib.sha256(f"{seed}{i}".encode()).digest() * (50 * (i + 1))
                             for i in range(n)}
    files["empty.txt"] = b""
    files["nested"] = {"deeper": {"note.txt": f"hello {seed}\n".encode()}, "x.dat": os.urandom(5000)}
    return files


def new_source(svc: DtsBridge, spec: dict[str, Any] | None = None, name: str | None = None,
               under: str | None = None) -> tuple[str, Path]:
    """Make a source folder in the DTS area; returns (its name, its path)."""
    name = name or uniq()
    base = svc.dts_root / under if under else svc.dts_root
    path = make_tree(base / name, payload(name) if spec is None else spec)
    return name, path


def assert_error(r: Response, code: int) -> dict[str, Any]:
    """The response has ``code`` and the JSON error shape of the spec."""
    assert r.status == code, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["httpcode"] == code, body
    assert err["httpstatus"] == http.HTTPStatus(code).phrase, body
    assert isinstance(err["message"], str) and err["message"], body
    return err


def assert_nothing_published(svc: DtsBridge, user: str, name: str) -> None:
    user_dir = svc.user_root / user
    made = [p.name for p in user_dir.iterdir() if p.name == name or p.name.startswith(name + "-")] \
        if user_dir.is_dir() else []
    assert made == [], made
    assert leftovers(svc.user_root) == []


def post(svc: DtsBridge, body: dict[str, Any], token: str | None = DTS_TOKEN, **kw: Any) -> Response:
    return svc.call("POST", "/complete_transfer", token=token, json_body=body, **kw)


def tree_owners(root: Path) -> set[tuple[int, int]]:
    owners = {(root.lstat().st_uid, root.lstat().st_gid)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            owners.add((st.st_uid, st.st_gid))
    return owners


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (CI runs as root); running as uid {os.geteuid()}")


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A private redis-server shared by the module's main service."""
    rp = start_private_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield rp
    finally:
        rp.stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, module_redis: RedisProcess) -> Iterator[DtsBridge]:
    """One service with the default settings, shared by the cheap checks."""
    s = DtsBridge(tmp_path_factory.mktemp("svc"), module_redis.url)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def service(tmp_path: Path, redis_proc: RedisProcess):
    """Start a service with extra settings for one test; stopped afterwards."""
    started: list[DtsBridge] = []

    def make(settings: dict[str, dict[str, Any]] | None = None, start: bool = True, root: Path | None = None,
             redis_url: str | None = None) -> DtsBridge:
        s = DtsBridge(root or tmp_path / f"svc{len(started)}", redis_url or redis_proc.url, settings=settings,
                      name=f"svc{len(started)}")
        started.append(s)
        if start:
            s.start()
        return s

    yield make
    for s in started:
        s.stop()
        s.kill()


# -- POST /complete_transfer: success -----------------------------------------


def test_201_copies_byte_identical(svc: DtsBridge) -> None:
    name, src = new_source(svc)
    r = svc.complete("alice", name)
    assert r.status == 201, r
    body = r.json()
    assert set(body) == {"path", "job_id", "files", "bytes"}, body
    assert body["path"] == f"/alice/{name}"
    expected = tree_of(src)
    assert body["files"] == len(expected)
    assert body["bytes"] == sum(len(v) for v in expected.values())
    dest = svc.user_root / "alice" / name
    assert tree_of(dest) == expected
    assert (dest / "nested" / "deeper").is_dir()
    assert leftovers(svc.user_root) == []
    # the source is left in place (delete_source = false)
    assert tree_of(src) == expected


def test_200_repeat_same_job_nothing_copied_again(svc: DtsBridge) -> None:
    name, src = new_source(svc)
    first = svc.complete("alice", name)
    assert first.status == 201, first
    dest = svc.user_root / "alice" / name
    ino = dest.stat().st_ino
    marker = dest / "f0.bin"
    mtime = marker.stat().st_mtime_ns
    second = svc.complete("alice", name)
    assert second.status == 200, second
    assert second.json() == first.json()
    assert not (svc.user_root / "alice" / f"{name}-1").exists()
    assert dest.stat().st_ino == ino
    assert marker.stat().st_mtime_ns == mtime
    # the same folder named by its absolute path is the same request
    third = svc.complete("alice", str(src))
    assert third.status == 200, third
    assert third.json()["job_id"] == first.json()["job_id"]
    assert sorted(p.name for p in (svc.user_root / "alice").iterdir() if p.name.startswith(name)) == [name]


def test_collision_takes_dash_1_then_dash_2(svc: DtsBridge) -> None:
    name = uniq()
    existing = make_tree(svc.user_root / "alice" / name, {"mine.txt": b"the user's own folder"})
    a_dir, b_dir = uniq("a"), uniq("b")
    _, src_a = new_source(svc, name=name, under=a_dir)
    _, src_b = new_source(svc, name=name, under=b_dir)
    ra = svc.complete("alice", f"{a_dir}/{name}")
    assert ra.status == 201, ra
    assert ra.json()["path"] == f"/alice/{name}-1"
    rb = svc.complete("alice", f"{b_dir}/{name}")
    assert rb.status == 201, rb
    assert rb.json()["path"] == f"/alice/{name}-2"
    assert ra.json()["job_id"] != rb.json()["job_id"]
    assert tree_of(existing) == {"mine.txt": b"the user's own folder"}
    # a link planted under the name (and under -1) is a taken name, never a way out
    elsewhere = make_tree(svc.root / uniq("elsewhere"), {})
    name3 = uniq()
    os.symlink(elsewhere, svc.user_root / "alice" / name3)
    os.symlink(elsewhere, svc.user_root / "alice" / f"{name3}-1")
    _, src3 = new_source(svc, name=name3)
    r3 = svc.complete("alice", name3)
    assert r3.status == 201, r3
    assert r3.json()["path"] == f"/alice/{name3}-2"
    assert list(elsewhere.iterdir()) == []
    assert tree_of(svc.user_root / "alice" / f"{name3}-2") == tree_of(src3)
    assert tree_of(svc.user_root / "alice" / f"{name}-1") == tree_of(src_a)
    assert tree_of(svc.user_root / "alice" / f"{name}-2") == tree_of(src_b)


def test_202_respond_async_then_status_success(svc: DtsBridge) -> None:
    name, src = new_source(svc)
    r = svc.complete("alice", name, asynchronous=True)
    assert r.status == 202, r
    body = r.json()
    assert set(body) >= {"job_id", "status"} and body["status"] in ("SUBMITTED", "TRANSFERRING"), body
    location = r.headers.get("location")
    assert location, r.headers
    loc = urllib.parse.urlsplit(location)
    assert loc.path == "/transferStatus"
    assert urllib.parse.parse_qs(loc.query)["job_id"] == [body["job_id"]]
    st = svc.wait_status(body["job_id"], {"SUCCESS", "ERROR"})
    assert st["status"] == "SUCCESS", st
    assert st["path"] == f"/alice/{name}"
    assert tree_of(svc.user_root / "alice" / name) == tree_of(src)
    # following the Location as given answers the same job
    follow = svc.call("GET", f"{loc.path}?{loc.query}", token=DTS_TOKEN)
    assert follow.status == 200 and follow.json()["job_id"] == body["job_id"], follow


def test_absolute_path_inside_dts_area_accepted(svc: DtsBridge) -> None:
    name, src = new_source(svc)
    r = svc.complete("alice", str(svc.dts_root / name))
    assert r.status == 201, r
    assert r.json()["path"] == f"/alice/{name}"
    assert tree_of(svc.user_root / "alice" / name) == tree_of(src)


def test_nested_subdirectory_published_under_its_own_name(svc: DtsBridge) -> None:
    outer = uniq("o")
    name, src = new_source(svc, under=f"{outer}/inner")
    r = svc.complete("bob", f"{outer}/inner/{name}")
    assert r.status == 201, r
    assert r.json()["path"] == f"/bob/{name}"
    assert tree_of(svc.user_root / "bob" / name) == tree_of(src)


def test_form_encoded_body(svc: DtsBridge) -> None:
    name, src = new_source(svc)
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, form={"target_user": "alice", "subdirectory": name})
    assert r.status == 201, r
    assert r.json()["path"] == f"/alice/{name}"
    assert tree_of(svc.user_root / "alice" / name) == tree_of(src)


def test_form_encoded_body_without_content_type(svc: DtsBridge) -> None:
    """``curl -d 'a=b&c=d'`` style: a form body, as the MeerKAT examples send it."""
    name, src = new_source(svc)
    raw = urllib.parse.urlencode({"target_user": "alice", "subdirectory": name}).encode()
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, raw=raw)  # no Content-Type at all
    assert r.status == 201, r
    assert tree_of(svc.user_root / "alice" / name) == tree_of(src)


def test_empty_folder_and_zero_byte_manifest(svc: DtsBridge) -> None:
    name, src = new_source(svc, spec={"manifest.json": b""})
    r = svc.complete("alice", name)
    assert r.status == 201, r
    assert r.json()["files"] == 1 and r.json()["bytes"] == 0
    assert tree_of(svc.user_root / "alice" / name) == {"manifest.json": b""}


def test_valid_manifest_is_checked_and_copied(svc: DtsBridge) -> None:
    data = b"payload bytes\n" * 100
    manifest = {"name": "manifest", "profile": "data-package", "username": "alice",
                "resources": [{"id": "r1", "name": "r1", "path": "data/r1.txt", "format": "text",
                               "bytes": len(data), "hash": hashlib.md5(data).hexdigest()},
                              {"id": "r2", "name": "r2", "path": "r2.txt", "bytes": 3,
                               "hash": "sha256:" + hashlib.sha256(b"abc").hexdigest()}]}
    name, src = new_source(svc, spec={"data": {"r1.txt": data}, "r2.txt": b"abc",
                                      "manifest.json": json.dumps(manifest).encode()})
    r = svc.complete("alice", name)
    assert r.status == 201, r
    assert tree_of(svc.user_root / "alice" / name) == tree_of(src)
    st = svc.status(r.json()["job_id"]).json()
    assert st.get("manifest_resources") == 2, st


@pytest.mark.timeout(180)
def test_concurrent_repeats_join_one_job(svc: DtsBridge) -> None:
    name, src = new_source(svc, spec={f"f{i:02d}.bin": os.urandom(256 * 1024) for i in range(24)})
    results: list[Response | BaseException] = []
    lock = threading.Lock()
    go = threading.Event()

    def call() -> None:
        go.wait(10)
        try:
            r = svc.complete("alice", name, timeout=150)
        except BaseException as e:  # noqa: BLE001 - reported below
            r = e
        with lock:
            results.append(r)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(160)
    assert len(results) == 6, results
    assert all(isinstance(r, Response) for r in results), results
    codes = sorted(r.status for r in results)  # type: ignore[union-attr]
    assert set(codes) <= {200, 201} and codes.count(201) == 1, results
    bodies = [r.json() for r in results]  # type: ignore[union-attr]
    assert len({b["job_id"] for b in bodies}) == 1, bodies
    assert len({b["path"] for b in bodies}) == 1, bodies
    published = sorted(p.name for p in (svc.user_root / "alice").iterdir() if p.name.startswith(name))
    assert published == [name]
    assert tree_of(svc.user_root / "alice" / name) == tree_of(src)
    assert leftovers(svc.user_root) == []


def test_target_subdir(service) -> None:
    s = service({"paths": {"target_subdir": "dts_transfers"}})
    name, src = new_source(s)
    r = s.complete("alice", name)
    assert r.status == 201, r
    assert r.json()["path"] == f"/alice/dts_transfers/{name}"
    assert tree_of(s.user_root / "alice" / "dts_transfers" / name) == tree_of(src)
    assert not (s.user_root / "alice" / name).exists()
    again = s.complete("alice", name)
    assert again.status == 200 and again.json() == r.json(), again
    assert leftovers(s.user_root) == []
    # bob planted a link where target_subdir goes: it is never followed
    elsewhere = s.root / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, s.user_root / "bob" / "dts_transfers")
    name2, _ = new_source(s)
    r = s.complete("bob", name2)
    assert r.status >= 400, r
    assert_error(r, r.status)
    assert list(elsewhere.iterdir()) == []
    assert leftovers(s.user_root) == [] and leftovers(elsewhere) == []


def test_delete_source_after_success_only(service) -> None:
    s = service({"paths": {"delete_source": "true"}})
    name, src = new_source(s)
    expected = tree_of(src)
    r = s.complete("alice", name)
    assert r.status == 201, r
    assert tree_of(s.user_root / "alice" / name) == expected
    assert not src.exists(), "the DTS folder should be gone after a verified copy"
    assert s.status(r.json()["job_id"]).json().get("source_deleted") is True
    # a failed copy (bad manifest) leaves the source where it was
    bad, bad_src = new_source(s)
    (bad_src / "manifest.json").write_bytes(b"{not json")
    r = s.complete("alice", bad)
    assert r.status == 500, r
    assert bad_src.is_dir() and (bad_src / "manifest.json").exists()
    assert leftovers(s.user_root) == []


# -- 400 -----------------------------------------------------------------------


@pytest.mark.parametrize("raw,ctype", [
    (b"{not json", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (b"\"just a string\"", "application/json"),
    (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded"),
    (b"target_user=alice&target_user=bob&subdirectory=x", "application/x-www-form-urlencoded"),
    (b"target_user=alice&subdirectory=x%ff", "application/x-www-form-urlencoded"),
    (b"a=%ff", "application/x-www-form-urlencoded"),
], ids=["bad-json", "json-list", "json-string", "bad-form-bytes", "repeated-form-field", "form-escape-not-utf8",
        "form-escape-not-utf8-alone"])
def test_400_unreadable_body(svc: DtsBridge, raw: bytes, ctype: str) -> None:
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, raw=raw, headers={"Content-Type": ctype})
    err = assert_error(r, 400)
    if b"%ff" in raw:  # said as such, not taken as U+FFFD (nor as a missing field)
        assert "valid form" in err["message"], err


@pytest.mark.parametrize("body", [
    {},
    {"subdirectory": "x"},
    {"target_user": "alice"},
    {"target_user": "", "subdirectory": "x"},
    {"target_user": "alice", "subdirectory": ""},
    {"target_user": "alice", "subdirectory": "   "},
    {"target_user": 5, "subdirectory": "x"},
    {"target_user": "alice", "subdirectory": 5},
    {"target_user": "alice", "subdirectory": ["x"]},
    {"target_user": ["alice"], "subdirectory": "x"},
    {"target_user": "alice", "subdirectory": None},
    {"target_user": "alice", "subdirectory": {"a": 1}},
    {"target_user": "alice", "subdirectory": True},
], ids=lambda b: json.dumps(b))
def test_400_missing_empty_or_non_string_field(svc: DtsBridge, body: dict[str, Any]) -> None:
    assert_error(post(svc, body), 400)


def test_400_lone_surrogate_in_a_text_field_of_every_route(svc: DtsBridge) -> None:
    """JSON may spell a lone surrogate ("\\ud800", or "n\\udcff5", the surrogate-escaped name of a
    folder whose name is not UTF-8): it can be neither stored nor a file name here: 400, nothing made."""
    bad = os.fsencode(svc.dts_root) + b"/n\xff5"
    os.makedirs(bad, exist_ok=True)
    open(bad + b"/a", "wb").write(b"x")
    js = {"Content-Type": "application/json"}
    for route in ("/complete_transfer", "/submitTransfer"):
        for sub in (b"x\\ud800", b"n\\udcff5", b"\\udfff"):
            raw = b'{"target_user":"alice","subdirectory":"' + sub + b'"}'
            err = assert_error(svc.call("POST", route, token=DTS_TOKEN, raw=raw, headers=js), 400)
            assert "subdirectory" in err["message"], err
    make_tree(svc.dts_root / "surrogate-staged", {"a": b"1"})
    j = svc.call("POST", "/submitTransfer", token=DTS_TOKEN,
                 json_body={"target_user": "alice", "subdirectory": "surrogate-staged"}).json()
    for field in ("msg", "staged_to", "path"):
        raw = ('{"job_id":"%s","authcode":"%s","success":false,"%s":"tape \\ud800"}'
               % (j["job_id"], j["authcode"], field)).encode()
        err = assert_error(svc.call("POST", "/doneStaging", raw=raw, headers=js), 400)
        assert field in err["message"], err
    assert svc.status(j["job_id"]).json()["status"] == "STAGING"  # the refusals changed nothing
    assert leftovers(svc.user_root) == [] and not (svc.user_root / "alice" / "n\udcff5").exists()
    assert "InvalidData" not in svc.log_text()


def test_400_subdirectory_naming_the_dts_area_itself(svc: DtsBridge) -> None:
    for sub in ("", ".", "./", "/", "//", str(svc.dts_root), str(svc.dts_root) + "/", str(svc.dts_root) + "/."):
        r = post(svc, {"target_user": "alice", "subdirectory": sub})
        assert_error(r, 400)
    # nothing of the DTS area was copied into alice's folder
    assert not (svc.user_root / "alice" / "dts").exists()
    assert leftovers(svc.user_root) == []


@pytest.mark.parametrize("user", ["Alice", "ALICE", "1alice", "_alice", "al-ice", "al ice", "a" * 101,
                                  "../alice", "alice/x", "", "élodie"],
                         ids=["upper", "allupper", "digit-first", "underscore-first", "dash", "space", "101-chars",
                              "dotdot", "slash", "empty", "non-ascii"])
def test_400_bad_username(svc: DtsBridge, user: str) -> None:
    name, _ = new_source(svc)
    assert_error(svc.complete(user, name), 400)
    assert leftovers(svc.user_root) == []


def test_100_char_username_is_valid(svc: DtsBridge) -> None:
    """The limit is 100: a 100-character name passes the syntax check (then it must exist)."""
    user = "a" * 100
    name, src = new_source(svc)
    (svc.user_root / user).mkdir(exist_ok=True)
    r = svc.complete(user, name)
    assert r.status == 201, r
    assert r.json()["path"] == f"/{user}/{name}"


def test_400_user_does_not_exist(svc: DtsBridge) -> None:
    name, _ = new_source(svc)
    err = assert_error(svc.complete("carol", name), 400)
    assert "carol" in err["message"]
    assert not (svc.user_root / "carol").exists()
    # a file where a user's folder would be is an unsafe destination (issue 9): 403, never a copy
    (svc.user_root / "dave").write_text("not a folder")
    assert assert_error(svc.complete("dave", name), 403)["reason"] == "unsafe_destination"


# -- 401 / 403 --------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": ""},
    {"Authorization": "nope-not-a-token"},
    {"Authorization": "Bearer nope-not-a-token"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
], ids=["none", "empty", "bad", "bearer-bad", "bearer-empty", "basic"])
def test_401_no_or_bad_token(svc: DtsBridge, headers: dict[str, str]) -> None:
    name, _ = new_source(svc)
    r = svc.call("POST", "/complete_transfer", json_body={"target_user": "alice", "subdirectory": name},
                 headers=headers)
    assert_error(r, 401)
    assert r.headers.get("www-authenticate"), r.headers
    assert_nothing_published(svc, "alice", name)


def test_bearer_prefix_accepted_for_token_file(svc: DtsBridge) -> None:
    name, _ = new_source(svc)
    r = svc.complete("alice", name, token=f"Bearer {DTS_TOKEN}")
    assert r.status == 201, r


@pytest.mark.parametrize("token", [NOROLE_TOKEN, ALICE_TOKEN], ids=["norole", "target-user"])
def test_403_token_without_role(svc: DtsBridge, token: str) -> None:
    name, _ = new_source(svc)
    assert_error(svc.complete("alice", name, token=token), 403)
    assert_nothing_published(svc, "alice", name)


def test_403_dotdot(svc: DtsBridge) -> None:
    # a real folder reachable through ..: alice's own datastore, and one beside the DTS area
    outside = make_tree(svc.dts_root.parent / uniq("outside"), {"secret.txt": b"do not read"})
    name, _ = new_source(svc)
    for sub in ("../users/alice", f"../{outside.name}", f"{name}/../../{outside.name}", "..",
                f"{name}/..", str(svc.dts_root / ".." / outside.name)):
        r = svc.complete("bob", sub)
        assert_error(r, 403)
    assert [p.name for p in (svc.user_root / "bob").iterdir() if p.name in (outside.name, "alice", name)] == []
    assert leftovers(svc.user_root) == []


def test_403_absolute_path_elsewhere(svc: DtsBridge) -> None:
    for sub in ("/etc", "/etc/", str(svc.user_root / "alice"), str(svc.dts_root) + "-other/x"):
        assert_error(svc.complete("bob", sub), 403)
    assert not (svc.user_root / "bob" / "etc").exists()
    assert leftovers(svc.user_root) == []


def test_403_symlinked_folder(svc: DtsBridge) -> None:
    outside = make_tree(svc.dts_root.parent / uniq("outside"), {"secret.txt": b"do not read"})
    inner, _ = new_source(svc)
    link_out, link_in, via = uniq("lo"), uniq("li"), uniq("via")
    os.symlink(outside, svc.dts_root / link_out)
    os.symlink(svc.dts_root / inner, svc.dts_root / link_in)  # even a link to a folder inside the area
    os.symlink(svc.dts_root, svc.dts_root / via)  # a link on the way
    for sub in (link_out, link_in, f"{via}/{inner}", str(svc.dts_root / link_out)):
        r = svc.complete("alice", sub)
        assert_error(r, 403)
    for n in (link_out, link_in, inner, outside.name):
        assert_nothing_published(svc, "alice", n)


@pytest.mark.parametrize("target", ["/etc/hostname", "/etc", "inside-file"], ids=["file-out", "dir-out", "file-in"])
def test_403_symlink_inside_tree(svc: DtsBridge, target: str) -> None:
    name, src = new_source(svc)
    if target == "inside-file":
        target = str(src / "f0.bin")
    os.symlink(target, src / "nested" / "link")
    r = svc.complete("alice", name)
    err = assert_error(r, 403)
    assert err.get("reason") in (None, "unsafe_entry", "outside_dts_area"), err
    assert_nothing_published(svc, "alice", name)


def test_403_fifo_inside_tree_does_not_hang(svc: DtsBridge) -> None:
    name, src = new_source(svc)
    os.mkfifo(src / "nested" / "pipe")
    t0 = time.monotonic()
    r = svc.complete("alice", name, timeout=30)
    assert time.monotonic() - t0 < 30
    assert_error(r, 403)
    assert_nothing_published(svc, "alice", name)
    # the service is still fine afterwards
    assert svc.call("GET", "/healthz").status == 200


def test_403_socket_inside_tree(svc: DtsBridge) -> None:
    import socket
    name, src = new_source(svc)
    path = src / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        assert_error(svc.complete("alice", name, timeout=30), 403)
    assert_nothing_published(svc, "alice", name)


# -- 404 --------------------------------------------------------------------------


def test_404_missing_folder_or_regular_file(svc: DtsBridge) -> None:
    missing = uniq("missing")
    assert_error(svc.complete("alice", missing), 404)
    assert_error(svc.complete("alice", str(svc.dts_root / missing)), 404)
    fname = uniq("file") + ".txt"
    (svc.dts_root / fname).write_text("a file, not a folder")
    assert_error(svc.complete("alice", fname), 404)
    assert_nothing_published(svc, "alice", missing)
    assert not (svc.user_root / "alice" / fname).exists()


# -- 413 --------------------------------------------------------------------------


def test_413_body_over_64_kib(svc: DtsBridge) -> None:
    name, _ = new_source(svc)
    body = json.dumps({"target_user": "alice", "subdirectory": name, "pad": "x" * (65 * 1024)}).encode()
    assert len(body) > 64 * 1024
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, raw=body,
                 headers={"Content-Type": "application/json"})
    assert_error(r, 413)
    form = urllib.parse.urlencode({"target_user": "alice", "subdirectory": name, "pad": "y" * (70 * 1024)}).encode()
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, raw=form,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(r, 413)
    assert_nothing_published(svc, "alice", name)
    # just under the limit is read
    small = json.dumps({"target_user": "alice", "subdirectory": name, "pad": "x" * (60 * 1024)}).encode()
    r = svc.call("POST", "/complete_transfer", token=DTS_TOKEN, raw=small,
                 headers={"Content-Type": "application/json"})
    assert r.status == 201, r


def test_413_folder_over_max_payload(service) -> None:
    s = service({"copy": {"max_payload_gb": "0.000001"}})  # about 1 KiB
    name, src = new_source(s, spec={"big.bin": os.urandom(64 * 1024), "small.txt": b"x"})
    err = assert_error(s.complete("alice", name), 413)
    assert err.get("reason") in (None, "payload_too_large"), err
    assert_nothing_published(s, "alice", name)
    # a folder under the limit still goes through
    small, _ = new_source(s, spec={"a.txt": b"tiny"})
    r = s.complete("alice", small)
    assert r.status == 201, r


# -- 500 --------------------------------------------------------------------------


def _manifest(resources: list[dict[str, Any]]) -> bytes:
    return json.dumps({"name": "manifest", "profile": "data-package", "username": "alice",
                       "contributors": [{"id": str(uuid.uuid4())}], "resources": resources}).encode()


@pytest.mark.parametrize("kind", ["bad-hash", "bad-size", "missing-file", "outside-path", "garbage", "not-object"])
def test_500_manifest_problems_leave_nothing(svc: DtsBridge, kind: str) -> None:
    data = b"resource data\n" * 50
    good = {"id": "r", "name": "r", "path": "r.txt", "bytes": len(data), "hash": hashlib.md5(data).hexdigest()}
    manifest = {
        "bad-hash": _manifest([dict(good, hash=hashlib.md5(b"other").hexdigest())]),
        "bad-size": _manifest([dict(good, bytes=len(data) + 1)]),
        "missing-file": _manifest([good, dict(good, id="r2", path="absent.txt")]),
        "outside-path": _manifest([dict(good, path="../outside.txt")]),
        "garbage": b"{this is not json",
        "not-object": b"[1, 2, 3]",
    }[kind]
    name, _ = new_source(svc, spec={"r.txt": data, "manifest.json": manifest})
    r = svc.complete("alice", name)
    err = assert_error(r, 500)
    if "reason" in err:
        assert err["reason"] in ("manifest_mismatch", "checksum_mismatch"), err
    assert_nothing_published(svc, "alice", name)
    if err.get("job_id"):
        st = svc.status(err["job_id"]).json()
        assert st["status"] == "ERROR" and st.get("reason") in ("manifest_mismatch", "checksum_mismatch"), st
        assert st.get("detailed_status"), st


# -- GET /transferStatus ------------------------------------------------------------


@pytest.fixture(scope="module")
def done_job(svc: DtsBridge) -> dict[str, Any]:
    name, src = new_source(svc)
    r = svc.complete("alice", name)
    assert r.status == 201, r
    return {"name": name, **r.json(), "files_expected": len(tree_of(src))}


def test_status_fields(svc: DtsBridge, done_job: dict[str, Any]) -> None:
    r = svc.status(done_job["job_id"])
    assert r.status == 200, r
    st = r.json()
    for k in ("job_id", "status", "detailed_status", "target_user", "subdirectory", "path", "submitter",
              "files_total", "files_done", "bytes_total", "bytes_done",
              "time_submitted", "time_transferring", "time_success"):
        assert k in st, (k, st)
    assert st["job_id"] == done_job["job_id"]
    assert st["status"] == "SUCCESS"
    assert st["target_user"] == "alice"
    assert st["subdirectory"] == done_job["name"]
    assert st["path"] == done_job["path"] == f"/alice/{done_job['name']}"
    assert st["submitter"] == "dts"
    assert st["files_total"] == st["files_done"] == done_job["files"] == done_job["files_expected"]
    assert st["bytes_total"] == st["bytes_done"] == done_job["bytes"]
    for k in ("time_submitted", "time_transferring", "time_success"):
        assert ISO_UTC.match(st[k]), (k, st[k])
    assert st["time_submitted"] <= st["time_transferring"] <= st["time_success"]
    assert "time_error" not in st and "time_cancelled" not in st
    for k in SECRETS:
        assert k not in st, (k, st)
    assert all(v is not None for v in st.values()), st


def test_status_400_without_job_id(svc: DtsBridge) -> None:
    assert_error(svc.call("GET", "/transferStatus", token=DTS_TOKEN), 400)
    assert_error(svc.call("GET", "/transferStatus?job_id=", token=DTS_TOKEN), 400)


def test_status_404_unknown_job(svc: DtsBridge) -> None:
    assert_error(svc.status(str(uuid.uuid4())), 404)
    assert_error(svc.status("not-a-job-id"), 404)


def test_status_target_user_may_read_own_job(svc: DtsBridge, done_job: dict[str, Any]) -> None:
    r = svc.status(done_job["job_id"], token=ALICE_TOKEN)
    assert r.status == 200, r
    assert r.json()["job_id"] == done_job["job_id"]
    r = svc.status(done_job["job_id"], token=f"Bearer {ALICE_TOKEN}")
    assert r.status == 200, r


def test_status_other_user_refused(svc: DtsBridge, done_job: dict[str, Any]) -> None:
    r = svc.status(done_job["job_id"], token=BOB_TOKEN)
    err = assert_error(r, r.status)
    assert r.status in (403, 404), r
    assert "alice" not in json.dumps(err)
    # and a user cannot probe for jobs: unknown is 404 too
    assert r.status in (403, 404)
    r2 = svc.status(str(uuid.uuid4()), token=BOB_TOKEN)
    assert r2.status in (403, 404)


def test_status_401_without_token(svc: DtsBridge, done_job: dict[str, Any]) -> None:
    r = svc.call("GET", "/transferStatus?job_id=" + done_job["job_id"])
    assert_error(r, 401)
    assert r.headers.get("www-authenticate"), r.headers
    r = svc.status(done_job["job_id"], token="bogus")
    assert_error(r, 401)
    assert r.headers.get("www-authenticate"), r.headers


def test_status_of_failed_job_has_reason_and_time_error(svc: DtsBridge) -> None:
    name, _ = new_source(svc, spec={"manifest.json": b"not json at all"})
    r = svc.complete("alice", name, asynchronous=True)
    assert r.status == 202, r
    st = svc.wait_status(r.json()["job_id"], {"SUCCESS", "ERROR"})
    assert st["status"] == "ERROR", st
    assert st["reason"] == "manifest_mismatch", st
    assert ISO_UTC.match(st["time_error"]), st
    assert "time_success" not in st and "path" not in st, st


def test_unknown_route_and_method_are_json(svc: DtsBridge) -> None:
    assert_error(svc.call("GET", "/no_such_route", token=DTS_TOKEN), 404)
    r = svc.call("GET", "/complete_transfer", token=DTS_TOKEN)
    assert_error(r, 405)


# -- Redis unreachable ---------------------------------------------------------------


@pytest.mark.timeout(180)
def test_redis_unreachable_503_then_recovers(service, redis_proc: RedisProcess) -> None:
    s = service({"redis": {"timeout_seconds": "2"}})
    name, _ = new_source(s)
    assert s.complete("alice", name).status == 201
    redis_proc.stop()
    try:
        fresh, _ = new_source(s)
        for call in (lambda: s.complete("alice", fresh, timeout=30),
                     lambda: s.complete("alice", name, timeout=30),
                     lambda: s.status(str(uuid.uuid4())),
                     lambda: s.call("POST", "/complete_transfer", token=DTS_TOKEN, timeout=30,
                                    form={"target_user": "alice", "subdirectory": name})):
            t0 = time.monotonic()
            r = call()
            elapsed = time.monotonic() - t0
            assert r.status == 503, (r, s.log_tail())
            assert_error(r, 503)
            assert elapsed < 15, elapsed
        assert s.call("GET", "/healthz").status == 503
        assert s.proc is not None and s.proc.poll() is None  # no crash
    finally:
        redis_proc.start()
    # the same process works again once Redis is back (no restart of dtsbridge)
    deadline = time.monotonic() + 60
    name2, src2 = new_source(s)
    last: Any = None
    while time.monotonic() < deadline:
        last = s.complete("alice", name2, timeout=30)
        if last.status in (200, 201):
            break
        assert last.status == 503, last
        time.sleep(0.5)
    assert last is not None and last.status in (200, 201), last
    assert tree_of(s.user_root / "alice" / name2) == tree_of(src2)
    s.wait_healthy(30)


@pytest.mark.timeout(180)
def test_redis_lost_while_a_request_waits(service, redis_proc: RedisProcess) -> None:
    """A synchronous request waiting for its copy gets 503 promptly when Redis goes away; the job still ends."""
    s = service({"redis": {"timeout_seconds": "2"}}, start=False)
    base_env = s.env
    s.env = lambda: {**base_env(), "DTSBRIDGE_FAULT_PAUSE": "copy:3"}  # type: ignore[method-assign]
    s.start()
    name, src = new_source(s)
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["r"] = s.complete("alice", name, timeout=170)
        except BaseException as e:  # noqa: BLE001 - reported below
            out["r"] = e
        out["t"] = time.monotonic()

    th = threading.Thread(target=call)
    th.start()
    deadline = time.monotonic() + 30
    while "fault point copy reached" not in s.log_text():
        assert time.monotonic() < deadline, s.log_tail()
        time.sleep(0.05)
    assert redis_proc.proc is not None
    os.kill(redis_proc.proc.pid, signal.SIGSTOP)  # unreachable: accepts nothing, answers nothing
    stopped = time.monotonic()
    try:
        th.join(60)
        assert "r" in out, "the waiting request did not answer within 60 s of Redis going away"
        assert isinstance(out["r"], Response), out
        assert_error(out["r"], 503)
        assert out["t"] - stopped < 30, out["t"] - stopped
    finally:
        os.kill(redis_proc.proc.pid, signal.SIGCONT)
        th.join(120)
    # once Redis answers again, a repeat joins the same job, which is copied and published once
    deadline = time.monotonic() + 90
    while True:
        r = s.complete("alice", name, timeout=90)
        if r.status in (200, 201) or time.monotonic() > deadline:
            break
        assert r.status == 503, r
        time.sleep(0.5)
    assert r.status in (200, 201), r
    assert tree_of(s.user_root / "alice" / name) == tree_of(src)
    assert sorted(p.name for p in (s.user_root / "alice").iterdir() if p.name.startswith(name)) == [name]
    assert leftovers(s.user_root) == []


@pytest.mark.timeout(120)
def test_starts_without_redis_and_connects_later(service, redis_proc: RedisProcess) -> None:
    redis_proc.stop()
    s = service({"redis": {"timeout_seconds": "2"}}, start=False)
    try:
        s.start(wait=False)
        deadline = time.monotonic() + 30
        seen: Any = None
        while time.monotonic() < deadline:
            assert s.proc is not None and s.proc.poll() is None, s.log_tail()
            try:
                seen = s.call("GET", "/healthz", timeout=10)
                break
            except OSError:
                time.sleep(0.1)
        assert seen is not None and seen.status == 503, seen
        name, src = new_source(s)
        assert_error(s.complete("alice", name, timeout=30), 503)
    finally:
        redis_proc.start()
    s.wait_healthy(60)
    r = s.complete("alice", name)
    assert r.status == 201, r
    assert tree_of(s.user_root / "alice" / name) == tree_of(src)


# -- the kbase backend ---------------------------------------------------------------

KB_DTS, KB_DTS2, KB_NOROLE, KB_ALICE, KB_SERVICE = "kb-dts-tok", "kb-dts2-tok", "kb-norole-tok", "kb-alice-tok", \
    "kb-service-tok"


@pytest.fixture(scope="class")
def fake_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeAuth2Process]:
    fake = FakeAuth2Process(workdir=str(tmp_path_factory.mktemp("auth2")), state={
        "users": {"kdts": {"customroles": ["DTS_TRANSFER"]}, "knorole": {"customroles": ["OTHER"]},
                  "alice": {"customroles": []}, "carol": {"customroles": []}, "svcacct": {"customroles": []}},
        "tokens": {KB_DTS: "kdts", KB_DTS2: "kdts", KB_NOROLE: "knorole", KB_ALICE: "alice",
                   KB_SERVICE: "svcacct"},
    })
    fake.start()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture(scope="class")
def kbase_svc(tmp_path_factory: pytest.TempPathFactory, fake_auth: FakeAuth2Process) -> Iterator[DtsBridge]:
    root = tmp_path_factory.mktemp("kbase")
    rp = start_private_redis(root)
    s = DtsBridge(root, rp.url, settings={
        "auth": {"backend": "kbase", "kbase_url": fake_auth.url, "service_token": KB_SERVICE,
                 "timeout_seconds": "3"},
        "users": {"check": "kbase"},
    })
    try:
        s.start()
        yield s
    finally:
        s.stop()
        s.kill()
        rp.stop()


class TestKBaseBackend:
    def test_role_token_bare_and_bearer(self, kbase_svc: DtsBridge) -> None:
        name, src = new_source(kbase_svc)
        r = kbase_svc.complete("alice", name, token=KB_DTS)
        assert r.status == 201, r
        assert tree_of(kbase_svc.user_root / "alice" / name) == tree_of(src)
        st = kbase_svc.status(r.json()["job_id"], token=KB_DTS).json()
        assert st["submitter"] == "kdts", st
        name2, _ = new_source(kbase_svc)
        r = kbase_svc.complete("alice", name2, token=f"Bearer {KB_DTS2}")
        assert r.status == 201, r

    def test_target_user_reads_own_job(self, kbase_svc: DtsBridge) -> None:
        name, _ = new_source(kbase_svc)
        r = kbase_svc.complete("alice", name, token=KB_DTS)
        assert r.status == 201, r
        st = kbase_svc.status(r.json()["job_id"], token=KB_ALICE)
        assert st.status == 200 and st.json()["target_user"] == "alice", st
        other = kbase_svc.status(r.json()["job_id"], token=KB_NOROLE)
        assert other.status in (403, 404), other

    def test_token_without_role_403(self, kbase_svc: DtsBridge) -> None:
        name, _ = new_source(kbase_svc)
        assert_error(kbase_svc.complete("alice", name, token=KB_NOROLE), 403)
        assert_error(kbase_svc.complete("alice", name, token=KB_ALICE), 403)
        assert_nothing_published(kbase_svc, "alice", name)

    def test_invalid_token_401(self, kbase_svc: DtsBridge) -> None:
        name, _ = new_source(kbase_svc)
        for tok in ("kb-no-such-token", "Bearer kb-no-such-token-2"):
            r = kbase_svc.complete("alice", name, token=tok)
            assert_error(r, 401)
            assert r.headers.get("www-authenticate"), r.headers
        r = kbase_svc.call("POST", "/complete_transfer", json_body={"target_user": "alice", "subdirectory": name})
        assert_error(r, 401)
        assert_nothing_published(kbase_svc, "alice", name)

    def test_expired_token_401(self, kbase_svc: DtsBridge, fake_auth: FakeAuth2Process) -> None:
        expired = f"kb-expired-{uuid.uuid4().hex}"
        fake_auth.add_token(expired, "kdts", expires=int(time.time() * 1000) - 60_000)
        name, _ = new_source(kbase_svc)
        r = kbase_svc.complete("alice", name, token=expired)
        assert_error(r, 401)
        assert r.headers.get("www-authenticate"), r.headers
        assert_nothing_published(kbase_svc, "alice", name)

    def test_token_answers_are_cached(self, kbase_svc: DtsBridge, fake_auth: FakeAuth2Process) -> None:
        name, _ = new_source(kbase_svc)
        assert kbase_svc.complete("alice", name, token=KB_DTS).status in (200, 201)
        fake_auth.reset_counts()
        r = kbase_svc.complete("alice", name, token=KB_DTS)
        assert r.status == 200, r
        counts = fake_auth.counts()
        assert counts["/api/V2/token"] == 0 and counts["/api/V2/me"] == 0, counts

    def test_kbase_user_check_creates_folder(self, kbase_svc: DtsBridge) -> None:
        assert not (kbase_svc.user_root / "carol").exists()
        name, src = new_source(kbase_svc)
        r = kbase_svc.complete("carol", name, token=KB_DTS)
        assert r.status == 201, r
        assert r.json()["path"] == f"/carol/{name}"
        assert (kbase_svc.user_root / "carol").is_dir()
        assert tree_of(kbase_svc.user_root / "carol" / name) == tree_of(src)

    def test_kbase_unknown_user_400(self, kbase_svc: DtsBridge) -> None:
        name, _ = new_source(kbase_svc)
        # bob has a folder but no KBase account: the kbase check is what counts
        for user in ("dave", "bob"):
            assert_error(kbase_svc.complete(user, name, token=KB_DTS), 400)
        assert not (kbase_svc.user_root / "dave").exists()
        assert_nothing_published(kbase_svc, "bob", name)

    def test_auth2_errors_give_503(self, kbase_svc: DtsBridge, fake_auth: FakeAuth2Process) -> None:
        name, _ = new_source(kbase_svc)
        fresh = [f"kb-fresh-{uuid.uuid4().hex}" for _ in range(3)]
        fake_auth.control(tokens={t: "kdts" for t in fresh})
        try:
            fake_auth.set_mode("error")
            r = kbase_svc.complete("alice", name, token=fresh[0], timeout=30)
            assert_error(r, 503)
            r = kbase_svc.complete("alice", name, token="kb-unknown-while-down-1", timeout=30)
            assert_error(r, 503)  # never 401 while auth2 cannot answer
            fake_auth.set_mode("garbage")
            assert_error(kbase_svc.complete("alice", name, token=fresh[1], timeout=30), 503)
        finally:
            fake_auth.set_mode("ok")
        assert_nothing_published(kbase_svc, "alice", name)
        r = kbase_svc.complete("alice", name, token=fresh[2])
        assert r.status == 201, r

    @pytest.mark.parametrize("mode", ["hang", "drop"])
    def test_auth2_hanging_or_dropping_gives_503(self, kbase_svc: DtsBridge, fake_auth: FakeAuth2Process,
                                                 mode: str) -> None:
        name, _ = new_source(kbase_svc)
        fresh = f"kb-fresh-{uuid.uuid4().hex}"
        fake_auth.add_token(fresh, "kdts")
        fake_auth.set_mode(mode)
        try:
            t0 = time.monotonic()
            assert_error(kbase_svc.complete("alice", name, token=fresh, timeout=60), 503)
            assert time.monotonic() - t0 < 30  # [auth] timeout_seconds = 3
            # a status read with an unknown token is 503 too, never 401
            assert_error(kbase_svc.status(str(uuid.uuid4()), token=f"kb-unknown-{mode}"), 503)
        finally:
            fake_auth.set_mode("ok")
        assert_nothing_published(kbase_svc, "alice", name)
        assert kbase_svc.complete("alice", name, token=fresh).status == 201

    def test_auth2_down_gives_503(self, kbase_svc: DtsBridge, fake_auth: FakeAuth2Process) -> None:
        name, _ = new_source(kbase_svc)
        fresh = f"kb-fresh-{uuid.uuid4().hex}"
        fake_auth.add_token(fresh, "kdts")
        fake_auth.stop()
        try:
            t0 = time.monotonic()
            assert_error(kbase_svc.complete("alice", name, token=fresh, timeout=30), 503)
            assert_error(kbase_svc.complete("alice", name, token="kb-unknown-while-down-2", timeout=30), 503)
            assert time.monotonic() - t0 < 25
        finally:
            fake_auth.start()
        r = kbase_svc.complete("alice", name, token=fresh)
        assert r.status == 201, r


# -- ownership -----------------------------------------------------------------------


def test_fixed_ownership(service) -> None:
    need_root("chown to another uid")
    s = service({"ownership": {"mode": "fixed", "uid": "12345", "gid": "23456"},
                 "paths": {"target_subdir": "dts_transfers"}})
    name, src = new_source(s)
    r = s.complete("alice", name)
    assert r.status == 201, r
    dest = s.user_root / "alice" / "dts_transfers" / name
    assert tree_of(dest) == tree_of(src)
    assert tree_owners(dest) == {(12345, 23456)}
    # the source is not given away
    assert (src / "f0.bin").stat().st_uid == os.geteuid()


def test_passwd_ownership(service) -> None:
    need_root("chown to a system user")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user in the system user database")
    s = service({"ownership": {"mode": "passwd"}, "users": {"check": "passwd"}})
    assert not (s.user_root / "nobody").exists()
    name, src = new_source(s)
    r = s.complete("nobody", name)
    assert r.status == 201, r
    dest = s.user_root / "nobody" / name
    assert tree_of(dest) == tree_of(src)
    assert tree_owners(dest) == {(pw.pw_uid, pw.pw_gid)}
    # a user unknown to the system database is refused
    assert_error(s.complete("no_such_user_xyz", name), 400)


# -- disk full ---------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_disk_full_500_no_space_nothing_left(service, tmp_path: Path) -> None:
    need_root("mounting a tmpfs")
    root = tmp_path / "full"
    s = service(root=root, start=False)
    mounted = False
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(s.user_root)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted = True
        (s.user_root / "alice").mkdir()
        s.start()
        name, _ = new_source(s, spec={f"part{i}.bin": os.urandom(2 * 1024 * 1024) for i in range(3)})
        r = s.complete("alice", name, timeout=120)
        err = assert_error(r, 500)
        assert err.get("reason") == "no_space", err
        assert_nothing_published(s, "alice", name)
        assert sorted(os.listdir(s.user_root / "alice")) == []
        assert sorted(os.listdir(s.user_root)) == ["alice"]
        st = s.status(err["job_id"]).json()
        assert st["status"] == "ERROR" and st["reason"] == "no_space", st
        # the space is given back: a small folder still fits
        small, src = new_source(s, spec={"a.txt": b"fits"})
        r = s.complete("alice", small)
        assert r.status == 201, r
        assert tree_of(s.user_root / "alice" / small) == tree_of(src)
    finally:
        s.stop()
        if mounted:
            if subprocess.run(["umount", str(s.user_root)]).returncode != 0:
                subprocess.run(["umount", "-l", str(s.user_root)])


# -- startup ---------------------------------------------------------------------------


@pytest.mark.parametrize("section,key,value", [
    ("copy", "threads", "many"),
    ("ownership", "mode", "everyone"),
    ("paths", "delete_source", "perhaps"),
])
def test_bad_config_exits_with_one_clear_line(tmp_path: Path, section: str, key: str, value: str) -> None:
    s = DtsBridge(tmp_path, "redis://127.0.0.1:1", settings={section: {key: value}})
    s.write_config()
    res = subprocess.run(s.command(), capture_output=True, text=True, timeout=60, env=s.env(), cwd=str(tmp_path))
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    naming = [ln for ln in lines if f"[{section}] {key}" in ln]
    assert len(naming) == 1, out
    assert value in naming[0], out
    assert len(lines) == 1, out


def test_unusable_state_dir_for_embedded_redis_exits_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    s = DtsBridge(tmp_path, "embedded", settings={"state": {"dir": str(blocker)}})
    s.write_config()
    res = subprocess.run(s.command(), capture_output=True, text=True, timeout=60, env=s.env(), cwd=str(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "[state] dir" in lines[0] and str(blocker) in lines[0], out


def test_embedded_redis_that_cannot_start_stops_the_service(tmp_path: Path) -> None:
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    fake = fakebin / "redis-server"
    fake.write_text("#!/bin/sh\necho 'this redis-server refuses to start' >&2\nexit 1\n")
    fake.chmod(0o755)
    s = DtsBridge(tmp_path, "embedded")
    s.extra_env["PATH"] = f"{fakebin}:{os.environ.get('PATH', '')}"
    s.start(wait=False)
    assert s.proc is not None
    rc = s.proc.wait(60)
    assert rc != 0, s.log_tail()
    assert "embedded Redis did not start" in s.log_text(), s.log_tail()


def test_listen_and_redis_overrides(tmp_path: Path, redis_proc: RedisProcess) -> None:
    # the file points at a dead Redis and another port: the command line must win
    s = DtsBridge(tmp_path, "redis://127.0.0.1:1")
    file_port = s.port
    port = free_port()
    base = s.command()
    s.command = lambda: base + ["--listen", f"tcp:{port}:interface=127.0.0.1", "--redis", redis_proc.url]  # type: ignore[method-assign]
    s.port = port
    try:
        s.start()
        name, src = new_source(s)
        r = s.complete("alice", name)
        assert r.status == 201, r
        assert tree_of(s.user_root / "alice" / name) == tree_of(src)
        assert redis_proc.cli("--scan") != ""  # the job lives in the Redis given on the command line
        s.port = file_port
        with pytest.raises(OSError):
            s.call("GET", "/healthz", timeout=2)
    finally:
        s.stop()
        s.kill()


def test_two_foreground_processes_from_one_folder_need_no_pidfile(tmp_path: Path, redis_proc: RedisProcess) -> None:
    """``twistd -n`` without --pidfile writes no ./twistd.pid, so a second process can start beside the first."""
    a = DtsBridge(tmp_path, redis_proc.url, name="a")
    b = DtsBridge(tmp_path, redis_proc.url, name="b", shared_from=a)
    for s in (a, b):
        cmd = s.command()
        s.command = (lambda c: lambda: [x for x in c if x != "--pidfile="])(cmd)  # type: ignore[method-assign]
    try:
        a.start()
        b.start()
        assert not (tmp_path / "twistd.pid").exists()
        name, src = new_source(a)
        r = b.complete("alice", name)
        assert r.status == 201, r
        assert a.complete("alice", name).json()["job_id"] == r.json()["job_id"]
    finally:
        for s in (a, b):
            s.stop()
            s.kill()


def _processes_mentioning(state_dir: str) -> list[int]:
    """redis-server processes whose command line names ``state_dir`` or that run in it."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if "redis" in cmd and (state_dir in cmd or cwd == state_dir):
            found.append(int(pid))
    return found


@pytest.mark.timeout(120)
def test_embedded_redis(tmp_path: Path) -> None:
    s = DtsBridge(tmp_path, "embedded")
    try:
        s.start(timeout=60)
        name, src = new_source(s)
        r = s.complete("alice", name)
        assert r.status == 201, r
        assert tree_of(s.user_root / "alice" / name) == tree_of(src)
        assert _processes_mentioning(str(s.state_dir)), "no embedded redis-server found"
        st = s.status(r.json()["job_id"])
        assert st.status == 200 and st.json()["status"] == "SUCCESS", st
        assert any(p.name.startswith("appendonly") for p in s.state_dir.iterdir()), list(s.state_dir.iterdir())
        code = s.stop()
        assert code is not None, "dtsbridge did not stop on SIGTERM"
        deadline = time.monotonic() + 15
        while _processes_mentioning(str(s.state_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_mentioning(str(s.state_dir)) == []
        # the job survives a restart (append-only persistence under [state] dir)
        s.start(timeout=60)
        st = s.status(r.json()["job_id"])
        assert st.status == 200 and st.json()["status"] == "SUCCESS", st
        again = s.complete("alice", name)
        assert again.status == 200 and again.json()["job_id"] == r.json()["job_id"], again
    finally:
        s.stop()
        s.kill()
