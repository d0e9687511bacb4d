"""Manifests listing a path more than once, and big members outside ``resources`` (the engine, directly)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dtsbridge import engine
from dtsbridge.engine import Source
from dtsbridge.errors import MANIFEST_MISMATCH, TransferError


def _folder(tmp_path: Path, manifest: bytes | str) -> tuple[Path, Source]:
    dts = tmp_path / "dts"
    src = dts / "alice" / "q"
    src.mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello")
    (src / "b.txt").write_bytes(b"world")
    (src / "manifest.json").write_bytes(manifest.encode() if isinstance(manifest, str) else manifest)
    return dts, Source("alice/q", "q")


MD5_HELLO = hashlib.md5(b"hello").hexdigest()


def test_a_path_listed_with_different_hashes_is_a_mismatch_named_at_once(tmp_path: Path) -> None:
    # 20,000 entries for one file, each with another hash: refused at the second, naming it
    res = [{"path": "a.txt", "bytes": 5, "hash": hashlib.md5(str(i).encode()).hexdigest()} for i in range(20_000)]
    dts, src = _folder(tmp_path, json.dumps({"username": "alice", "resources": res}))
    with pytest.raises(TransferError) as e:
        engine.scan(str(dts), src)
    assert e.value.reason == MANIFEST_MISMATCH
    assert "'a.txt'" in e.value.message and "more than once" in e.value.message, e.value.message


def test_a_path_listed_with_other_bytes_is_a_mismatch(tmp_path: Path) -> None:
    res = [{"path": "a.txt", "hash": MD5_HELLO}, {"path": "a.txt", "bytes": 5, "hash": MD5_HELLO}]
    dts, src = _folder(tmp_path, json.dumps({"resources": res}))
    with pytest.raises(TransferError) as e:
        engine.scan(str(dts), src)
    assert e.value.reason == MANIFEST_MISMATCH and "'a.txt'" in e.value.message


def test_identical_repeated_entries_are_checked_once(tmp_path: Path) -> None:
    a = {"path": "a.txt", "bytes": 5, "hash": MD5_HELLO}
    b = {"path": "b.txt", "bytes": 5}
    dts, src = _folder(tmp_path, json.dumps({"resources": [a, b] * 10_000}))
    plan = engine.scan(str(dts), src)
    m = plan.manifest
    assert m is not None
    assert m.hashes == {"a.txt": (("md5", MD5_HELLO),)}
    assert m.size_only == 1
    # and the copy verifies it as one hashed file, one size-only
    users = tmp_path / "users"
    (users / "alice").mkdir(parents=True)
    r = engine.copy_tree(str(dts), src, str(users), ["alice"], "00000000-0000-0000-0000-000000000001", "1",
                         engine.CopyOptions())
    assert r.hashed == 1 and r.size_only == 1, r


def test_members_outside_resources_are_skipped_not_built(tmp_path: Path) -> None:
    """A ~24 MiB member of 2-character strings (no nesting, so no parse-bomb guard fires) costs little:
    it is skipped as it is read, never made into Python objects (~16x its size)."""
    n = 24 * 1024 * 1024 // 5
    body = ('{"name":"manifest","username":"alice","instructions":{"objects":[' + '"ab",' * (n - 1) + '"ab"'
            + '], "x": [1, 2.5e3, true, null, {"y": "z\\"]"}]},"resources":[{"path":"a.txt","bytes":5,"hash":"%s",'
            '"credit": {"a": [' % MD5_HELLO + '"cd",' * 100_000 + '"cd"]}}]}')
    dts, _ = _folder(tmp_path, body)
    prog = textwrap.dedent(f"""
        import resource, sys
        from dtsbridge import engine
        from dtsbridge.engine import Source
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        plan = engine.scan({str(dts)!r}, Source("alice/q", "q"))
        assert engine.read_manifest_username({str(dts)!r}, "alice/q") == "alice"
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(plan.manifest.resources, plan.manifest.hashes["a.txt"][0][1], (after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resources, md5, grew = out.stdout.split()
    assert (int(resources), md5) == (1, MD5_HELLO)
    # the text is read 1 MiB at a time; building the member would take ~16x the manifest's size
    assert int(grew) < 2 * len(body), (int(grew), len(body))
