"""Manifests as DTS really writes them (SPEC "Contract additions" → "Manifests as DTS really writes them").

Fixtures come from DTS's own code (tests/dts_fixtures.py): JDP, NMDC and S3
transfers in ``<dts_root>/<username>/dts-<uuid>/`` with ``manifest.json`` sent
last, S3 multipart ETags, the 0-byte manifest of a transfer with no resources.
The engine is tested directly; the service end to end through
``/complete_transfer`` and through the watcher, against real ``twistd``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import tracemalloc
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from dtsbridge import engine
from dtsbridge.engine import CopyOptions, Source
from dtsbridge.errors import MANIFEST_MISMATCH, TransferError
from tests.dts_fixtures import MiB, Transfer, jdp_transfer, nmdc_transfer, s3_etag
from tests.harness import DTS_TOKEN, DtsBridge, leftovers, tree_of, wait_until

# ---------------------------------------------------------------------------
# Part sizes tried for an ETag


def test_etag_part_sizes_follow_the_part_count() -> None:
    size = 17 * MiB + 5
    sizes = engine.etag_part_sizes(size, 3)
    assert sizes[0] == 8 * MiB                      # the AWS CLI / boto3 default first
    assert 5 * MiB not in sizes                     # 5 MiB parts would make 4 parts: ruled out
    assert {6 * MiB, 7 * MiB} <= set(sizes)         # whole-MiB sizes that make 3 parts
    assert all(-(-size // ps) == 3 for ps in sizes)
    assert len(sizes) == len(set(sizes)) <= engine.ETAG_MAX_CANDIDATES
    # 512 MiB in 64 parts: only 8 MiB fits, so one md5 state, not one per known size
    assert engine.etag_part_sizes(512 * MiB, 64) == [8 * MiB]
    assert len(engine._ETagCheck("0" * 32 + "-64", 512 * MiB).cands) == 1  # noqa: SLF001
    assert engine.etag_part_sizes(100, 3) == []     # no whole-MiB size makes 3 parts of 100 bytes
    assert engine.etag_part_sizes(10 * MiB, 1) == [10 * MiB]  # one part: the md5 of the md5
    assert engine.etag_part_sizes(10 * MiB, 10_001) == []
    # a small part count allows many sizes: bounded
    assert len(engine.etag_part_sizes(4096 * MiB, 2)) == engine.ETAG_MAX_CANDIDATES


# ---------------------------------------------------------------------------
# The engine


class Env:
    def __init__(self, tmp: Path) -> None:
        self.dts = tmp / "dts"
        self.users = tmp / "users"
        (self.users / "alice").mkdir(parents=True)
        self.dts.mkdir()

    def copy(self, t: Transfer, **kw: Any) -> engine.Result:
        name = t.rel.rsplit("/", 1)[-1]
        return engine.copy_tree(str(self.dts), Source(t.rel, name), str(self.users), ["alice"],
                                "00000000-0000-0000-0000-000000000001", "1", kw.pop("options", CopyOptions()), **kw)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def s3_transfer(dts: Path, user: str = "alice") -> tuple[Transfer, str]:
    """Single- and multipart S3 objects; returns the transfer and the key whose ETag nothing can match."""
    t = Transfer(dts, user)
    t.s3("runs/single.bin", os.urandom(300_000), None)                 # single PUT: md5
    t.s3("runs/eight.bin", os.urandom(17 * MiB + 5), 8 * MiB)         # AWS CLI / boto3 default: 3 parts
    t.s3("runs/five.bin", os.urandom(11 * MiB), 5 * MiB)              # 3 parts (8 MiB would make 2)
    t.s3("runs/seven.bin", os.urandom(20 * MiB), 7 * MiB)             # whole MiB, allowed by 3 parts
    t.s3("runs/one-part.bin", os.urandom(70_000), 8 * MiB)            # multipart upload of one part: "-1"
    t.s3("tiny/small-multi.bin", os.urandom(200_000), 1 * MiB)        # "-1" again, small enough for a worker
    odd = "runs/odd-part-size.bin"
    t.s3(odd, os.urandom(11 * MiB), 5 * MiB + 512 * 1024)             # 5.5 MiB parts: no whole-MiB size
    return t.finish(), odd


def test_s3_multipart_etags_verified_in_the_read_pass(env: Env) -> None:
    t, odd = s3_transfer(env.dts)
    assert json.loads((t.folder / "manifest.json").read_bytes())["resources"][1]["hash"].endswith("-3")
    for opts in (CopyOptions(), CopyOptions(processes=2)):
        r = env.copy(t, options=opts)
        assert (r.has_manifest, r.manifest_resources, r.hashed, r.size_only, r.unverified) == (True, 7, 6, 0, 1), r
        assert r.unverified_names == (odd,)
        assert tree_of(env.users / "alice" / r.name) == tree_of(t.folder)


def test_multipart_etag_of_a_changed_file_is_unverified_not_failed_but_md5_fails(env: Env) -> None:
    t = Transfer(env.dts, "alice")
    data = os.urandom(9 * MiB)
    t.s3("a.bin", data, 8 * MiB)
    t.put("a.bin", data[:-1] + bytes([data[-1] ^ 1]))       # one bit differs from what S3 hashed
    t.finish()
    r = env.copy(t)
    assert (r.hashed, r.unverified, r.unverified_names) == (0, 1, ("a.bin",))
    t2 = Transfer(env.dts, "alice")
    t2.jdp("img/submissions/1/x.fna", b"ACGT" * 1000)
    t2.put("img/submissions/1/x.fna", b"ACGA" * 1000)
    t2.finish()
    with pytest.raises(TransferError) as e:
        env.copy(t2)
    assert e.value.reason == MANIFEST_MISMATCH and "md5" in e.value.message


def test_s3_multipart_etags_checked_on_clones(tmp_path: Path) -> None:
    """With reflink, a clone is read once: the ETag candidates are fed from that one read."""
    from tests.fsmount import loop_xfs, loop_xfs_unavailable
    why = loop_xfs_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    with loop_xfs(tmp_path / "xfs", "512M", reflink=True) as mnt:
        env = Env(mnt / "e")
        t, odd = s3_transfer(env.dts)
        r = env.copy(t, options=CopyOptions(processes=2))
        assert r.files_cloned == 8 and (r.hashed, r.unverified, r.unverified_names) == (6, 1, (odd,)), r
        assert tree_of(env.users / "alice" / r.name) == tree_of(t.folder)


@pytest.mark.parametrize("kind", ["jdp", "nmdc", "empty"])
def test_dts_sources(env: Env, kind: str) -> None:
    if kind == "jdp":
        t = jdp_transfer(env.dts).finish()
        want = (3, 3, 0)
    elif kind == "nmdc":
        t = nmdc_transfer(env.dts).finish()
        assert any("\\:" in p.name for p in t.folder.iterdir())   # the escaped colon is on disk
        want = (2, 2, 0)
    else:
        t = Transfer(env.dts, "alice")
        t.put("notes.txt", b"no resources")
        t.finish()
        assert (t.folder / "manifest.json").read_bytes() == b""   # what DTS writes for no resources
        want = (0, 0, 0)
    r = env.copy(t)
    assert r.has_manifest and (r.manifest_resources, r.hashed, r.unverified) == want
    assert tree_of(env.users / "alice" / r.name) == tree_of(t.folder)


def write_manifest(env: Env, body: bytes, files: dict[str, bytes] | None = None) -> Transfer:
    t = Transfer(env.dts, "alice")
    for k, v in (files or {"a.txt": b"a"}).items():
        t.put(k, v)
    t.finish(body=body)
    return t


@pytest.mark.parametrize("body", [
    b'  {"resources" : [ {"path": "a.txt", "hash": "' + hashlib.md5(b"a").hexdigest().encode() + b'"} ] } \n',
    b'{"username": "x", "instructions": {"objects": [[1], {"a": []}]}, "resources": [{"path": "a.txt"},'
    b' {"path": "b\\u002etxt", "bytes": 1}], "z": null}',
    b'{"resources": []}',
])
def test_streaming_parse_reads_what_json_reads(env: Env, body: bytes) -> None:
    json.loads(body)
    t = write_manifest(env, body, {"a.txt": b"a", "b.txt": b"b"})
    r = env.copy(t)
    assert r.manifest_resources == len(json.loads(body)["resources"])


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_streaming_parse_across_chunk_boundaries(env: Env, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Text read a few bytes at a time: numbers, strings, keys and UTF-8 characters cut anywhere."""
    monkeypatch.setattr(engine.manifest, "MANIFEST_CHUNK", chunk)
    files = {f"d{i % 3}/f{i}.txt": os.urandom(i * 37) for i in range(1, 30)}
    resources = [{"id": f"r{i}", "path": k, "bytes": len(v), "hash": hashlib.md5(v).hexdigest(), "n": 1234567 + i,
                  "f": 1.5e10, "t": True, "z": None, "description": "résumé ✓ 🧬 " * (i % 4)}
                 for i, (k, v) in enumerate(files.items())]
    body = json.dumps({"name": "manifest", "resources": resources, "instructions": {"big": "y" * 50_000},
                       "n": 12345678901234567890, "username": "alice"}, ensure_ascii=False, indent=1).encode()
    t = write_manifest(env, body, files)
    r = env.copy(t)
    assert (r.manifest_resources, r.hashed) == (29, 29)
    assert engine.read_manifest_username(str(env.dts), t.rel) == "alice"


def test_streaming_parse_never_takes_half_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.manifest, "MANIFEST_CHUNK", 1)
    for chunks in (['{"resources": [], "n": 12', '34}'], ['{"resources": [], "n": 12', '34', '', '}'],
                   ['{"n": tr', 'ue, "resources": [{"bytes": 1', '0}]}']):
        seen: list[Any] = []
        doc = engine._walk_manifest(iter(chunks), lambda i, r: seen.append(r))  # noqa: SLF001
        assert doc == json.loads("".join(chunks)) | {"resources": len(json.loads("".join(chunks))["resources"])}
        assert seen == json.loads("".join(chunks))["resources"]


@pytest.mark.parametrize("body,needle", [
    (b'{"resources": []} {}', "JSON"),
    (b'{"resources": [], "resources": []}', "twice"),
    (b'{"resources": [{"path": "a.txt"},]}', "JSON"),
    (b'{"resources": [{"path": "a.txt"}]', "JSON"),
    (b'{"resources": "a.txt"}', "resources"),
    # padded past the density guard, so that the parser itself meets the nesting
    (b'{"pad": "' + b' ' * 4_000_000 + b'", "resources": [' + b'[' * 200_000 + b']' * 200_000 + b']}', "nested"),
    (b'{"pad": "' + b' ' * 4_000_000 + b'", "instructions": ' + b'{"a":' * 200_000 + b'1' + b'}' * 200_000
     + b', "resources": []}', "nested"),
    (b'{"x": 1' + b'9' * 5000 + b', "resources": []}', "JSON"),
    # inside a resource, short enough for json's own decoder: still refused past the reader's depth
    (b'{"resources": [{"path": "a.txt", "x": ' + b'[' * 600 + b']' * 600 + b'}]}', "nested"),
    (b'{"resources": [{"path": "a.txt", "x": 1' + b'9' * 5000 + b'}]}', "JSON"),
    (b'{"resources": [{"path": "a.txt", "x": [1,]}]}', "JSON"),
])
def test_streaming_parse_refuses_what_json_refuses(env: Env, body: bytes, needle: str) -> None:
    t = write_manifest(env, body)
    with pytest.raises(TransferError) as e:
        env.copy(t)
    assert e.value.reason == MANIFEST_MISMATCH and needle in e.value.message, e.value.message
    assert os.listdir(env.users / "alice") == []


def big_manifest(t: Transfer, n: int) -> bytes:
    """``n`` JDP-style resources (with credit: ~1.5 KB each) over two files."""
    t.jdp("img/submissions/1/a.fna", b"A")
    t.jdp("img/submissions/1/b.fna", b"B")
    a, b = t.resources
    return json.dumps({"name": "manifest", "username": "alice",
                       "resources": [a if i % 2 else b for i in range(n)]}).encode()


def test_parse_memory_is_a_few_times_the_manifest(env: Env) -> None:
    t = Transfer(env.dts, "alice")
    body = big_manifest(t, 6000)
    t.finish(body=body)
    tracemalloc.start()
    try:
        plan = engine.scan(str(env.dts), Source(t.rel, t.rel.rsplit("/", 1)[-1]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert plan.manifest is not None and plan.manifest.resources == 6000
    # json.loads would hold every resource as Python objects at once: ~8-10x the text
    assert peak < 3 * len(body), (peak, len(body))


def test_username_reader_shares_the_guards_and_closes_what_it_opens(env: Env) -> None:
    t = jdp_transfer(env.dts, "bob").finish()
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        assert engine.read_manifest_username(str(env.dts), t.rel) == "bob"
    assert len(os.listdir("/proc/self/fd")) <= fds
    empty = Transfer(env.dts, "alice").finish()
    assert engine.read_manifest_username(str(env.dts), empty.rel) is None
    for body in (b"[" * 200_000 + b"]" * 200_000, b"[" + b"[]," * 200_000 + b"[]]", b'{"username": "a", "res'):
        bad = write_manifest(env, body)
        with pytest.raises(TransferError) as e:
            engine.read_manifest_username(str(env.dts), bad.rel)
        assert e.value.reason == MANIFEST_MISMATCH


# ---------------------------------------------------------------------------
# End to end: /complete_transfer and the watcher, against real twistd


WATCH = {"watch": {"enabled": "true", "interval_seconds": "0.3", "settle_seconds": "0.5"}}


def jobs(b: DtsBridge, **query: Any) -> list[dict[str, Any]]:
    r = b.call("GET", "/jobs?" + urllib.parse.urlencode({"limit": 1000, **query}), token=DTS_TOKEN)
    assert r.status == 200, r
    return r.json()["jobs"]


def metric(b: DtsBridge, name: str, labels: str) -> float:
    text = b.call("GET", "/metrics", token=DTS_TOKEN).body.decode()
    m = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def check_done(b: DtsBridge, st: dict[str, Any], t: Transfer, user: str = "alice") -> None:
    assert st["status"] == "SUCCESS", st
    name = t.rel.split("/")[1]
    assert st["path"] == f"/{user}/{name}"
    assert tree_of(b.user_root / user / name) == tree_of(t.folder)


@pytest.mark.timeout(240)
def test_dts_transfers_through_complete_transfer(services) -> None:
    b = services()
    s3, odd = s3_transfer(b.dts_root)
    jdp = jdp_transfer(b.dts_root).finish()
    nmdc = nmdc_transfer(b.dts_root).finish()
    empty = Transfer(b.dts_root, "alice").finish()
    want = {s3.rel: (7, 6, 0, 1), jdp.rel: (3, 3, 0, 0), nmdc.rel: (2, 2, 0, 0), empty.rel: (0, 0, 0, 0)}
    for t in (s3, jdp, nmdc, empty):
        r = b.complete("alice", t.rel, timeout=180)
        assert r.status == 201, r
        st = b.status(r.json()["job_id"]).json()
        check_done(b, st, t)
        got = tuple(st.get(k) for k in ("manifest_resources", "manifest_hashed", "manifest_size_only",
                                        "manifest_unverified"))
        assert got == want[t.rel], st
        if t is s3:
            assert odd in st["detailed_status"] and "unverified" in st["detailed_status"], st
    assert metric(b, "dtsbridge_manifest_files_total", 'check="unverified"') == 1
    assert metric(b, "dtsbridge_manifest_files_total", 'check="hashed"') == 11
    assert leftovers(b.user_root) == []


@pytest.mark.timeout(240)
def test_unverified_files_named_up_to_ten(services) -> None:
    b = services()
    t = Transfer(b.dts_root, "alice")
    for i in range(12):
        t.s3(f"objs/o{i:02d}.bin", os.urandom(1000 + i), None, etag=hashlib.md5(b"%d" % i).hexdigest() + "-2")
    t.s3("objs/size-only.bin", b"x", None, etag="")
    t.finish()
    r = b.complete("alice", t.rel)
    assert r.status == 201, r
    st = b.status(r.json()["job_id"]).json()
    assert (st["manifest_hashed"], st["manifest_size_only"], st["manifest_unverified"]) == (0, 1, 12), st
    named = re.findall(r"objs/o\d\d\.bin", st["detailed_status"])
    assert len(named) == 10 and "2 more" in st["detailed_status"], st["detailed_status"]


def watched(b: DtsBridge, rel: str, timeout: float = 90) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        js = [j for j in jobs(b) if j.get("subdirectory") == rel and j["status"] in ("SUCCESS", "ERROR")]
        return js[0] if js else None
    return wait_until(find, timeout, f"a finished watcher job for {rel}", b.log_tail, 0.2)


@pytest.mark.timeout(300)
def test_dts_transfers_through_the_watcher(services) -> None:
    b = services(WATCH)
    s3, odd = s3_transfer(b.dts_root)
    jdp = jdp_transfer(b.dts_root)
    # payload first; the folder is not taken before its manifest is there
    time.sleep(1.5)
    assert [j for j in jobs(b) if j.get("subdirectory") == jdp.rel] == []
    jdp.finish()
    nmdc = nmdc_transfer(b.dts_root).finish()
    empty = Transfer(b.dts_root, "alice").finish()
    for t in (s3, jdp, nmdc, empty):
        st = watched(b, t.rel)
        check_done(b, st, t)
        assert st["submitter"] == "watcher" and "manifest_hashed" in st, st
    assert watched(b, s3.rel)["manifest_unverified"] == 1 and odd in watched(b, s3.rel)["detailed_status"]
    assert watched(b, jdp.rel)["manifest_hashed"] == 3
    # a later /complete_transfer for one of them is a repeat
    r = b.complete("alice", jdp.rel)
    assert r.status == 200 and r.json()["job_id"] == watched(b, jdp.rel)["job_id"], r


@pytest.mark.timeout(300)
def test_watcher_refuses_manifests_it_cannot_trust(services) -> None:
    b = services(WATCH)
    # in alice's DTS folder, a manifest naming bob: nothing is delivered to anyone
    other = jdp_transfer(b.dts_root, "alice").finish(username="bob")
    bad = {}
    for kind, body in {"bad-json": b'{"username": "alice", "resources": [',
                       "deep": b"[" * 200_000 + b"]" * 200_000,
                       "deep-in-object": b'{"username": "alice", "resources": [' + b'{"a":' * 200_000 + b"1"
                                         + b"}" * 200_000 + b"]}",
                       "bomb": b"[" + b"[]," * 3_000_000 + b"[]]"}.items():
        t = Transfer(b.dts_root, "alice")
        t.put("x.txt", b"x")
        bad[kind] = t.finish(body=body)
    good = jdp_transfer(b.dts_root).finish()
    st = watched(b, other.rel)
    assert st["status"] == "ERROR" and st["reason"] == "manifest_mismatch", st
    assert "bob" in st["detailed_status"], st
    for kind, t in bad.items():
        st = watched(b, t.rel)
        assert st["status"] == "ERROR" and st["reason"] == "manifest_mismatch", (kind, st)
        assert st["submitter"] == "watcher"
    check_done(b, watched(b, good.rel), good)
    time.sleep(2)  # several more passes: each folder keeps its one job
    all_jobs = jobs(b)
    for t in (other, *bad.values()):
        assert len([j for j in all_jobs if j.get("subdirectory") == t.rel]) == 1, t.rel
    assert not (b.user_root / "bob").exists() or os.listdir(b.user_root / "bob") == []
    assert sorted(os.listdir(b.user_root / "alice")) == [good.rel.split("/")[1]]
    log = b.log_text()
    assert "Unhandled" not in log and "Traceback" not in log, log[-3000:]
    assert leftovers(b.user_root) == []


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(400)
def test_watch_mode_descriptors_stay_flat(services) -> None:
    """Issue 9 item 1: reading a manifest's username leaked the dts_root descriptor, one per folder."""
    b = services(WATCH | {"copy": {"max_jobs": "4"}})
    assert b.proc is not None

    def batch(n: int) -> list[Transfer]:
        ts = []
        for _ in range(n):
            t = Transfer(b.dts_root, "alice")
            t.jdp("img/submissions/1/x.fna", b"ACGT")
            ts.append(t.finish())
        return ts

    def all_done(ts: list[Transfer]) -> bool:
        rels = {t.rel for t in ts}
        return len([j for j in jobs(b) if j.get("subdirectory") in rels and j["status"] == "SUCCESS"]) == len(ts)

    warm = batch(20)
    wait_until(lambda: all_done(warm), 120, "the first 20 folders", b.log_tail, 0.5)
    time.sleep(1)
    before = open_fds(b.proc.pid)
    more = batch(300)
    wait_until(lambda: all_done(more), 300, "300 more folders", b.log_tail, 0.5)
    time.sleep(1)
    after = open_fds(b.proc.pid)
    assert after - before < 10, f"{before} descriptors before 300 watched folders, {after} after"


@pytest.mark.parametrize("chunk", [16, 4096, 1024 * 1024])
def test_small_resources_decoded_whole_read_as_the_streaming_reader_reads_them(monkeypatch: pytest.MonkeyPatch,
                                                                              chunk: int) -> None:
    """Resources that fit a slice go through json's C decoder (the speed of DTS manifests); what they
    read as is exactly what the streaming reader makes of them, a long one is left to that reader."""
    monkeypatch.setattr(engine.manifest, "MANIFEST_CHUNK", chunk)
    texts = ['{"path": "a.txt", "bytes": 1, "hash": "h", "credit": {"a": [1, {"b": null}], "c": "]}"}}',
             '{"path": ["a"], "bytes": {"n": 1}, "hash": null, "x": []}',
             '{"path": "a", "hash": "h", "path": {"x": 1}}',
             '{"path": [1], "path": "b", "bytes": 12345678901234567890, "f": 1.5e3}',
             '{}',
             '{"path": "big", "pad": [' + '"xy",' * 30_000 + '"z"], "bytes": 3}',
             '{"path": "r\\u00e9sum\\u00e9 \\ud83e\\uddec", "hash": "md5:00"}']
    body = '{"username": "u", "resources": [' + ",\n  ".join(texts * 3) + "]}"
    fast = []
    real = engine.manifest._decode_small  # noqa: SLF001

    def counted(w: Any, i: int) -> Any:
        got = real(w, i)
        fast.append(got[0] is not None)
        return got

    def walk() -> list[Any]:
        seen: list[Any] = []
        chunks = (body[k:k + chunk] for k in range(0, len(body), chunk))
        assert engine._walk_manifest(chunks, lambda i, r: seen.append(r)) == {"username": "u", "resources": 21}
        return seen

    monkeypatch.setattr(engine.manifest, "_decode_small", counted)
    decoded = walk()
    assert fast == [True, True, True, True, True, False, True] * 3
    monkeypatch.setattr(engine.manifest, "_decode_small", lambda w, i: (None, i))
    assert decoded == walk()
    assert decoded[:7] == [{"path": "a.txt", "bytes": 1, "hash": "h"}, {"path": [], "bytes": [], "hash": None},
                           {"path": [], "hash": "h"}, {"path": "b", "bytes": 12345678901234567890}, {},
                           {"path": "big", "bytes": 3}, {"path": "résumé 🧬", "hash": "md5:00"}]
