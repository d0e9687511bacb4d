"""Reflink clones (issue 13): on a loop-mounted XFS with ``reflink=1`` files are cloned, not copied.

Run as root on real filesystems: an XFS image mounted with ``-o loop`` (the
clone must really share the source's blocks: ``FIEMAP`` flags the copy's
extents ``SHARED``), this machine's ext4 and a tmpfs (which cannot clone: the
engine must copy without failing anything and try the ioctl once per job),
and a real ``twistd`` whose DTS area and datastore are on the XFS.  Skipped
with the reason when not root or without ``mkfs.xfs``/loop devices, except
under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from dtsbridge import engine
from dtsbridge import errors as E
from dtsbridge.engine import CopyOptions, Source, TransferError
from tests.fsmount import loop_xfs, loop_xfs_unavailable, shared_bytes
from tests.harness import DtsBridge, leftovers, make_tree, tree_of
from tests.test_engine import JOB, Env

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A reflink XFS, loop-mounted for this module's tests; unmounted at the end."""
    why = loop_xfs_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"reflink tests cannot run under CI: {why}")
        pytest.skip(why)
    with loop_xfs(tmp_path_factory.mktemp("xfs"), "1G", reflink=True) as mnt:
        yield mnt


@pytest.fixture
def xenv(xfs: Path) -> Env:
    """test_engine's folders (dts, users/alice, outside), on the reflink XFS."""
    return Env(xfs / uuid.uuid4().hex)


def payload() -> dict[str, Any]:
    rnd = os.urandom
    return {
        "big.bin": rnd(9 * MiB + 17),
        "mid.bin": rnd(300_000),
        "empty.dat": b"",
        "sub": {"a.csv": rnd(70_000), "deeper": {"b.json": b'{"x": 1}\n' * 300}},
        **{f"small-{i}.txt": rnd(4096 + i) for i in range(40)},
    }


def with_manifest(root: Path, files: dict[str, bytes], wrong: str | None = None) -> None:
    resources = []
    for rel, data in files.items():
        md5 = hashlib.md5(data).hexdigest()
        if rel == wrong:
            md5 = hashlib.md5(data + b"x").hexdigest()
        resources.append({"id": rel, "name": rel, "path": rel, "bytes": len(data), "hash": md5})
    (root / "manifest.json").write_text(json.dumps({"name": "manifest", "resources": resources}))


class Counting:
    """Counts real calls (the call itself goes through unchanged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clones = 0
        self.read_bytes = 0
        real_ioctl, real_readv, real_preadv = fcntl.ioctl, os.readv, os.preadv

        def ioctl(fd: int, req: int, *a: Any) -> Any:
            if req == engine.FICLONE:
                self.clones += 1
            return real_ioctl(fd, req, *a)

        def readv(fd: int, bufs: Any) -> int:
            n = real_readv(fd, bufs)
            self.read_bytes += n
            return n

        def preadv(fd: int, bufs: Any, off: int, *a: Any) -> int:
            n = real_preadv(fd, bufs, off, *a)
            self.read_bytes += n
            return n

        monkeypatch.setattr(fcntl, "ioctl", ioctl)
        monkeypatch.setattr(os, "readv", readv)
        monkeypatch.setattr(os, "preadv", preadv)


def fill(env: Env, name: str = "dts-1", manifest: bool = True, wrong: str | None = None) -> tuple[Path, dict[str, bytes]]:
    src = make_tree(env.dts / "alice" / name, payload())
    files = tree_of(src)
    if manifest:
        with_manifest(src, files, wrong)
    return src, tree_of(src)


# ---------------------------------------------------------------------------
# The engine on XFS


@pytest.mark.parametrize("processes", [0, 2])
def test_files_are_cloned_and_verified(xenv: Env, processes: int) -> None:
    """Every non-empty file is a clone (FIEMAP: all its extents shared), owned, with mode and times kept."""
    src, files = fill(xenv)
    os.chmod(src / "mid.bin", 0o640)
    os.chmod(src / "small-0.txt", 0o4777)
    os.utime(src / "big.bin", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    with engine.CopyExecutor(4) as ex:
        r = xenv.copy(options=CopyOptions(processes=processes, uid=1234, gid=5678), executor=ex)
    dst = xenv.alice / "dts-1"
    assert tree_of(dst) == files
    nonempty = [rel for rel, data in files.items() if data]
    assert r.files_cloned == len(nonempty) and r.bytes_cloned == sum(len(d) for d in files.values())
    for rel in nonempty:
        assert shared_bytes(dst / rel) >= len(files[rel]), f"{rel} is not a clone"
        assert shared_bytes(src / rel) >= len(files[rel])
    st = os.stat(dst / "big.bin")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert os.stat(dst / "mid.bin").st_mode & 0o777 == 0o640
    assert os.stat(dst / "small-0.txt").st_mode & 0o7777 == 0o775  # as a copy: never setuid, never world-writable
    assert r.manifest_resources == len(files) - 1
    assert leftovers(xenv.users) == []


def test_a_clone_is_read_once(xenv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone shares the source's blocks: one read of it (hashed against the manifest), not source + copy."""
    src, files = fill(xenv)
    spy = Counting(monkeypatch)
    r = xenv.copy(options=CopyOptions(processes=0, fsync=False))
    total = sum(len(d) for d in files.values())
    assert r.files_cloned == len([d for d in files.values() if d])
    assert spy.read_bytes == total  # a plain copy reads 2x: source, then the copy back
    monkeypatch.undo()
    spy = Counting(monkeypatch)
    r = xenv.copy(options=CopyOptions(processes=0, fsync=False, reflink="never"), attempt="2")
    assert r.files_cloned == 0 and spy.clones == 0
    assert spy.read_bytes == 2 * total


def test_clone_checked_against_the_manifest(xenv: Env) -> None:
    """A clone whose content is not what the manifest's md5 says fails the job and leaves nothing."""
    fill(xenv, wrong="big.bin")
    with pytest.raises(TransferError) as info:
        xenv.copy(options=CopyOptions(processes=0))
    assert info.value.reason == E.MANIFEST_MISMATCH and "big.bin" in info.value.message
    assert xenv.user_listing() == []


def test_reflink_never_copies(xenv: Env) -> None:
    src, files = fill(xenv, manifest=False)
    r = xenv.copy(options=CopyOptions(reflink="never"))
    dst = xenv.alice / "dts-1"
    assert tree_of(dst) == files and r.files_cloned == 0
    assert shared_bytes(dst / "big.bin") == 0


def test_other_filesystem_is_never_tried(xenv: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DTS area on XFS, datastore on ext4: no clone is attempted (EXDEV is known up front)."""
    src, files = fill(xenv)
    users = tmp_path / "users"
    (users / "alice").mkdir(parents=True)
    spy = Counting(monkeypatch)
    r = engine.copy_tree(str(xenv.dts), Source("alice/dts-1", "dts-1"), str(users), ["alice"], JOB, "1",
                         CopyOptions(processes=0))
    assert spy.clones == 0 and r.files_cloned == 0
    assert tree_of(users / "alice" / "dts-1") == files


# ---------------------------------------------------------------------------
# Filesystems that cannot clone: copy, once-tried, nothing failed


def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.geteuid() != 0 and os.environ.get("CI") != "true":
            pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
        pytest.fail(f"mount tmpfs failed: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(params=["ext4", "tmpfs"])
def plainfs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """One filesystem holding both trees that cannot clone: this machine's ext4 (tmp_path), or a tmpfs."""
    if request.param == "ext4":
        yield tmp_path / "fs"
    else:
        yield from tmpfs(tmp_path / "fs")


@pytest.mark.parametrize("processes", [0, 2])
def test_no_reflink_filesystem_copies(plainfs: Path, processes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """FICLONE answers EOPNOTSUPP/EXDEV/EINVAL here: every file is copied, nothing fails, and the
    ioctl is tried at most once in this process for the whole job."""
    env = Env(plainfs)
    src, files = fill(env)
    spy = Counting(monkeypatch)
    with engine.CopyExecutor(4) as ex:
        r = env.copy(options=CopyOptions(processes=processes), executor=ex)
    assert tree_of(env.alice / "dts-1") == files
    assert r.files_cloned == 0
    assert spy.clones <= 1
    if processes == 0:
        assert spy.clones == 1


def test_bad_reflink_mode_refused(xenv: Env) -> None:
    fill(xenv)
    with pytest.raises(TransferError) as info:
        xenv.copy(options=CopyOptions(reflink="always"))
    assert info.value.reason == E.BAD_REQUEST


# ---------------------------------------------------------------------------
# End to end: a real twistd with both roots on the XFS


def test_service_clones_on_xfs_and_copies_elsewhere(xfs: Path, tmp_path: Path, redis_proc) -> None:  # noqa: F811
    """``[copy] reflink = auto`` (the default): the job's files are clones on XFS, copies on ext4."""
    svc = DtsBridge(xfs / f"svc-{uuid.uuid4().hex[:8]}", redis_proc.url)
    plain = DtsBridge(tmp_path / "plain", redis_proc.url, settings={"redis": {"key_prefix": "plain"}})
    try:
        svc.start()
        plain.start()
        for b in (svc, plain):
            src = make_tree(b.dts_root / "alice" / "dts-e2e", payload())
            with_manifest(src, tree_of(src))
        r = svc.complete("alice", "alice/dts-e2e")
        assert r.status == 201, r
        job = svc.wait_status(r.json()["job_id"], "SUCCESS")
        files = tree_of(svc.dts_root / "alice" / "dts-e2e")
        dst = svc.user_root / "alice" / "dts-e2e"
        assert tree_of(dst) == files
        nonempty = [rel for rel, data in files.items() if data]
        assert job["files_cloned"] == len(nonempty), job
        assert job["bytes_cloned"] == sum(len(d) for d in files.values())
        assert "cloned" in job["detailed_status"]
        assert shared_bytes(dst / "big.bin") >= 9 * MiB
        assert leftovers(svc.user_root) == []

        r = plain.complete("alice", "alice/dts-e2e")
        assert r.status == 201, r
        job = plain.wait_status(r.json()["job_id"], "SUCCESS")
        assert "files_cloned" not in job, job
        assert tree_of(plain.user_root / "alice" / "dts-e2e") == tree_of(plain.dts_root / "alice" / "dts-e2e")
    finally:
        svc.kill()
        plain.kill()


def test_service_reflink_never(xfs: Path, redis_proc) -> None:  # noqa: F811
    svc = DtsBridge(xfs / f"svc-{uuid.uuid4().hex[:8]}", redis_proc.url, settings={"copy": {"reflink": "never"}})
    try:
        svc.start()
        make_tree(svc.dts_root / "alice" / "dts-n", {"big.bin": os.urandom(5 * MiB)})
        r = svc.complete("alice", "alice/dts-n")
        assert r.status == 201, r
        job = svc.wait_status(r.json()["job_id"], "SUCCESS")
        assert "files_cloned" not in job
        assert shared_bytes(svc.user_root / "alice" / "dts-n" / "big.bin") == 0
    finally:
        svc.kill()
