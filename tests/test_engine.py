"""Tests of the copy engine on real files (run as root: chown, mknod, mount)."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from dtsbridge import engine
from dtsbridge import errors as E
from dtsbridge.engine import CopyOptions, Source, TransferError
try:
    from fsspy import FsSpy, snapshot
except ImportError:  # tests/ imported as a package
    from tests.fsspy import FsSpy, snapshot

JOB = "job1"


@pytest.fixture(params=["openat2", "fallback"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with openat2, then with the portable component walk (openat2 forbidden)."""
    if request.param == "fallback":
        def forbidden(*a: object) -> int:
            raise AssertionError("openat2 used in fallback mode")
        monkeypatch.setattr(engine.beneath, "USE_OPENAT2", False)
        monkeypatch.setattr(engine.beneath, "_openat2", forbidden)
    return request.param


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dts = tmp / "dts"
        self.users = tmp / "users"
        self.outside = tmp / "outside"
        self.alice = self.users / "alice"
        for d in (self.dts / "alice", self.alice, self.outside / "sub"):
            d.mkdir(parents=True)
        (self.outside / "secret.txt").write_bytes(b"top secret\n")
        (self.outside / "sub" / "deep.txt").write_bytes(b"deep secret\n")

    def src(self, name: str = "dts-1") -> Path:
        p = self.dts / "alice" / name
        p.mkdir(parents=True, exist_ok=True)
        (p / "a.txt").write_bytes(b"hello\n")
        return p

    def copy(self, rel: str = "alice/dts-1", parts: list[str] | None = None, **kw: object) -> engine.Result:
        opts = kw.pop("options", CopyOptions())
        attempt = kw.pop("attempt", "1")
        return engine.copy_tree(str(self.dts), Source(rel, rel.rsplit("/", 1)[-1]), str(self.users),
                                parts or ["alice"], JOB, attempt, opts, **kw)  # type: ignore[arg-type]

    def user_listing(self) -> list[str]:
        return sorted(os.listdir(self.alice))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@contextmanager
def untouched(env: Env) -> Iterator[None]:
    """Assert nothing outside the roots is opened, read or written, and nothing is published."""
    before = snapshot(str(env.outside))
    users_before = snapshot(str(env.users))
    with FsSpy(str(env.outside)) as spy:
        yield
        events = spy.events()
    assert events == [], f"outside folder touched: {events}"
    assert snapshot(str(env.outside)) == before
    assert snapshot(str(env.users)) == users_before, "something was published or left in the datastore"


@contextmanager
def raises(reason: str) -> Iterator[None]:
    """Expect a TransferError with this reason."""
    with pytest.raises(TransferError) as info:
        yield
    assert info.value.reason == reason, f"{info.value!r}"


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def can_mount(path: Path, size: str = "4m") -> bool:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if os.geteuid() != 0:
            pytest.skip(f"cannot mount tmpfs (not root): {r.stderr.strip()}")
        pytest.fail(f"mount failed as root: {r.stderr.strip()}")
    return True


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------------------
# Path helpers


@pytest.mark.parametrize("path,expected", [
    ("a", "a"), ("a/b", "a/b"), ("./a//b/", "a/b"), ("", ""), (".", ""), ("a/./b", "a/b"),
])
def test_normalize_relpath_ok(path: str, expected: str) -> None:
    assert engine.normalize_relpath(path) == expected


@pytest.mark.parametrize("path", ["..", "a/../b", "../x", "/etc", "/", "a\0b", "a/.."])
def test_normalize_relpath_refused(path: str) -> None:
    with raises(E.OUTSIDE_DTS_AREA):
        engine.normalize_relpath(path)


@pytest.mark.parametrize("name,ok", [
    ("alice", True), ("a", True), ("a_1", True), ("a" * 100, True), ("a" * 101, False), ("Alice", False),
    ("1alice", False), ("_a", False), ("al-ice", False), ("alice\n", False), ("", False), ("al ice", False),
    ("../x", False),
])
def test_valid_username(name: str, ok: bool) -> None:
    assert engine.valid_username(name) is ok


def test_open_beneath(env: Env, resolver: str) -> None:
    src = env.src()
    (src / "d").mkdir()
    os.symlink(str(env.outside), src / "lnk")
    fd = os.open(env.dts, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel in ("", "."):
            d = engine.open_beneath(fd, rel, os.O_RDONLY | os.O_DIRECTORY)
            assert os.fstat(d).st_ino == os.fstat(fd).st_ino
            os.close(d)
        f = engine.open_beneath(fd, "alice/dts-1/a.txt", os.O_RDONLY)
        assert os.read(f, 100) == b"hello\n"
        os.close(f)
        with FsSpy(str(env.outside)) as spy:
            for rel, err in [("..", errno.EXDEV), ("alice/../../outside", errno.EXDEV),
                             (str(env.outside), errno.EXDEV), ("alice/dts-1/lnk", errno.ELOOP),
                             ("alice/dts-1/lnk/secret.txt", errno.ELOOP), ("alice/nope", errno.ENOENT)]:
                with pytest.raises(OSError) as info:
                    engine.open_beneath(fd, rel, os.O_RDONLY)
                assert info.value.errno == err, rel
            with pytest.raises(OSError) as info:
                engine.open_beneath(fd, "alice/dts-1/lnk", os.O_RDONLY | os.O_DIRECTORY)
            assert info.value.errno == errno.ELOOP
            assert spy.events() == []
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# resolve_source


def test_resolve_source_relative_and_absolute(env: Env, resolver: str, tmp_path: Path) -> None:
    env.src()
    assert engine.resolve_source(str(env.dts), "alice/dts-1") == Source("alice/dts-1", "dts-1")
    assert engine.resolve_source(str(env.dts), "./alice//dts-1/") == Source("alice/dts-1", "dts-1")
    assert engine.resolve_source(str(env.dts), str(env.dts / "alice" / "dts-1")) == Source("alice/dts-1", "dts-1")
    assert engine.resolve_source(str(env.dts), "alice") == Source("alice", "alice")
    # The configured root is itself reached through a link: both spellings are accepted.
    os.symlink(env.dts, tmp_path / "dtslink")
    cfg = str(tmp_path / "dtslink")
    assert engine.resolve_source(cfg, cfg + "/alice/dts-1") == Source("alice/dts-1", "dts-1")
    assert engine.resolve_source(cfg, str(env.dts) + "/alice/dts-1") == Source("alice/dts-1", "dts-1")


@pytest.mark.parametrize("sub", ["", ".", "/", "ROOT", "ROOT/", "./"])
def test_resolve_source_root_itself(env: Env, sub: str) -> None:
    with raises(E.BAD_REQUEST):
        engine.resolve_source(str(env.dts), sub.replace("ROOT", str(env.dts)))


def test_resolve_source_refusals(env: Env, resolver: str) -> None:
    env.src()
    (env.dts / "alice" / "file").write_bytes(b"x")
    os.symlink(env.outside, env.dts / "alice" / "linkdir")          # the folder itself a link
    os.symlink(env.outside, env.dts / "hop")                         # a link on the way
    os.symlink("dts-1", env.dts / "alice" / "inner-link")            # a link staying inside
    cases = {
        "../outside": E.OUTSIDE_DTS_AREA,
        "alice/../../outside": E.OUTSIDE_DTS_AREA,
        "alice/..": E.OUTSIDE_DTS_AREA,
        str(env.outside): E.OUTSIDE_DTS_AREA,
        "/etc": E.OUTSIDE_DTS_AREA,
        str(env.dts) + "/../outside": E.OUTSIDE_DTS_AREA,
        str(env.dts) + "x/alice": E.OUTSIDE_DTS_AREA,                # a sibling sharing the prefix
        "alice/linkdir": E.OUTSIDE_DTS_AREA,
        "hop/sub": E.OUTSIDE_DTS_AREA,
        "hop": E.OUTSIDE_DTS_AREA,
        "alice/inner-link": E.OUTSIDE_DTS_AREA,
        "alice/dts\0-1": E.OUTSIDE_DTS_AREA,
        "alice/nope": E.SOURCE_NOT_FOUND,
        "alice/file": E.SOURCE_NOT_FOUND,
        "alice/file/x": E.SOURCE_NOT_FOUND,
    }
    with untouched(env):
        for sub, reason in cases.items():
            with raises(reason):
                engine.resolve_source(str(env.dts), sub)


def test_copy_re_resolves_forged_source(env: Env, resolver: str) -> None:
    env.src()
    os.symlink(env.outside, env.dts / "alice" / "evil")
    with untouched(env):
        with raises(E.OUTSIDE_DTS_AREA):
            env.copy("alice/evil")
        with raises(E.OUTSIDE_DTS_AREA):
            env.copy("../outside")
        with raises(E.SOURCE_NOT_FOUND):
            env.copy("alice/missing")


# ---------------------------------------------------------------------------
# A normal copy


def build_tree(src: Path) -> None:
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "emptydir").mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    (src / "empty.txt").write_bytes(b"")
    (src / "sub" / "x.txt").write_bytes(b"x" * 1000)
    (src / "sub" / "deeper" / "y.bin").write_bytes(os.urandom(engine.CHUNK))
    os.chmod(src / "sub" / "x.txt", 0o640)
    os.chmod(src / "big.bin", 0o4755)                 # setuid is stripped
    os.chmod(src / "sub", 0o750)
    os.chmod(src / "emptydir", 0o2775)               # setgid is stripped
    for i, p in enumerate(sorted(src.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_500_000_000_123_456_789 + i * 1000))
    os.chmod(src, 0o751)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_400_000_000_000_000_000))


def assert_same_tree(src: Path, dst: Path) -> None:
    s = {str(p.relative_to(src)): p for p in src.rglob("*")}
    d = {str(p.relative_to(dst)): p for p in dst.rglob("*")}
    assert sorted(s) == sorted(d)
    for rel in ["."] + list(s):
        sp, dp = (src / rel), (dst / rel)
        ss, ds = sp.lstat(), dp.lstat()
        assert stat.S_IFMT(ss.st_mode) == stat.S_IFMT(ds.st_mode), rel
        assert stat.S_IMODE(ds.st_mode) == stat.S_IMODE(ss.st_mode) & 0o775, rel  # see test_mode_policy
        assert ds.st_mtime_ns == ss.st_mtime_ns, rel
        if sp.is_file():
            assert sp.read_bytes() == dp.read_bytes(), rel


def test_normal_copy(env: Env, resolver: str) -> None:
    src = env.src()
    build_tree(src)
    plans: list[engine.Plan] = []
    progress: list[tuple[int, int]] = []
    with untouched_outside(env):
        r = env.copy(on_plan=plans.append, on_progress=lambda f, b: progress.append((f, b)))
    dst = env.alice / "dts-1"
    assert r.name == "dts-1"
    assert (r.files, r.bytes) == (5, 3 * 1024 * 1024 + 12345 + 6 + 1000 + engine.CHUNK)
    assert (r.size_only, r.manifest_resources) == (0, 0)
    st = dst.lstat()
    assert (r.dev, r.ino) == (st.st_dev, st.st_ino)
    assert plans == [engine.Plan(files=5, bytes=r.bytes, dirs=3, manifest=None)]
    assert progress[-1] == (5, r.bytes)
    assert progress == sorted(progress)
    assert_same_tree(src, dst)
    assert stat.S_IMODE((dst / "big.bin").stat().st_mode) == 0o755
    assert stat.S_IMODE((dst / "emptydir").stat().st_mode) == 0o775
    assert env.user_listing() == ["dts-1"]                            # no temp left
    assert engine.scan(str(env.dts), Source("alice/dts-1", "dts-1")) == plans[0]


@pytest.mark.parametrize("processes", [0, 2])
def test_mode_policy(env: Env, processes: int) -> None:
    """Copies keep the owner's and group's rwx but never get o+w, setuid, setgid or sticky (README: Security).

    Before: a 3777 folder came out 0777 (sticky dropped, world-writable kept) and a
    0666 file stayed writable by everyone in the user's datastore.
    """
    src = env.src()
    cases_files = {"ww.txt": (0o666, 0o664), "all.bin": (0o6777, 0o775), "priv.txt": (0o600, 0o600),
                   "g.txt": (0o660, 0o660), "none.txt": (0o000, 0o000), "a.txt": (0o644, 0o644)}
    cases_dirs = {"tmpish": (0o3777, 0o775), "sticky": (0o1777, 0o775), "gw": (0o2770, 0o770),
                  "plain": (0o750, 0o750)}
    for name, (mode, _) in cases_dirs.items():
        (src / name).mkdir()
        (src / name / "f").write_bytes(b"f")
        os.chmod(src / name, mode)
    for name, (mode, _) in cases_files.items():
        (src / name).write_bytes(b"data " + name.encode())
        os.chmod(src / name, mode)
    os.chmod(src, 0o3777)
    env.copy(options=CopyOptions(fsync=False, processes=processes))
    dst = env.alice / "dts-1"
    got = {n: stat.S_IMODE((dst / n).lstat().st_mode) for n in [*cases_files, *cases_dirs]}
    want = {n: w for n, (_, w) in [*cases_files.items(), *cases_dirs.items()]}
    assert got == want
    assert stat.S_IMODE(dst.lstat().st_mode) == 0o775                  # the top folder too


@contextmanager
def untouched_outside(env: Env) -> Iterator[None]:
    before = snapshot(str(env.outside))
    with FsSpy(str(env.outside)) as spy:
        yield
        events = spy.events()
    assert events == [], f"outside folder touched: {events}"
    assert snapshot(str(env.outside)) == before


@pytest.mark.parametrize("checksum", ["xxh3", "blake3", "sha256", "md5"])
def test_checksums(env: Env, checksum: str) -> None:
    src = env.src()
    build_tree(src)
    env.copy(options=CopyOptions(checksum=checksum, fsync=False))
    assert_same_tree(src, env.alice / "dts-1")


def test_unknown_checksum(env: Env) -> None:
    env.src()
    with raises(E.BAD_REQUEST):
        env.copy(options=CopyOptions(checksum="crc0"))
    assert env.user_listing() == []


@pytest.mark.parametrize("workers,external", [(1, False), (3, True)])
def test_workers_and_external_executor(env: Env, workers: int, external: bool) -> None:
    src = env.src()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(i * 5000))
    ex = concurrent.futures.ThreadPoolExecutor(2) if external else None
    try:
        r = env.copy(options=CopyOptions(workers=workers), executor=ex)
    finally:
        if ex:
            ex.shutdown()
    assert r.files == 41
    assert_same_tree(src, env.alice / "dts-1")


def worker_processes() -> list[int]:
    """Live processes below this one that are not its children: the forkserver's, i.e. copy workers."""
    parent: dict[int, int] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parent[int(d)] = int(fields[1])

    def below(pid: int) -> bool:
        while pid in parent and pid > 1:
            pid = parent[pid]
            if pid == os.getpid():
                return True
        return False

    return [p for p, pp in parent.items() if pp != os.getpid() and below(p)]


def test_worker_processes_belong_to_their_owner(env: Env) -> None:
    """No pool outlives its owner: a copy given no CopyExecutor stops the worker processes it
    started; a CopyExecutor keeps its own for the next job and stops them with itself."""
    src = env.src()
    for i in range(300):
        (src / f"s{i:03d}.txt").write_bytes(b"small %d\n" % i)
    before = set(worker_processes())
    r = env.copy(options=CopyOptions(fsync=False, processes=2))
    assert r.files == 301  # and env.src()'s own file
    assert set(worker_processes()) <= before
    with engine.CopyExecutor(2) as ex:
        env.copy(options=CopyOptions(fsync=False, processes=2), executor=ex, attempt="2")
        assert set(worker_processes()) - before, "the executor's worker processes wait for the next job"
    assert set(worker_processes()) <= before
    assert_same_tree(src, env.alice / "dts-1-1")


def test_ownership(env: Env) -> None:
    src = env.src()
    build_tree(src)
    r = env.copy(parts=["alice", "dts_transfers", "more"], options=CopyOptions(uid=12345, gid=23456))
    top = env.alice / "dts_transfers" / "more" / r.name
    for p in [top, *top.rglob("*"), env.alice / "dts_transfers", env.alice / "dts_transfers" / "more"]:
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (12345, 23456), p
    assert env.alice.stat().st_uid == 0                                 # existing folders untouched
    assert_same_tree(src, top)


def test_existing_target_subdir_not_chowned(env: Env) -> None:
    env.src()
    (env.alice / "dts_transfers").mkdir()
    env.copy(parts=["alice", "dts_transfers"], options=CopyOptions(uid=12345, gid=12345))
    assert (env.alice / "dts_transfers").stat().st_uid == 0
    assert (env.alice / "dts_transfers" / "dts-1" / "a.txt").stat().st_uid == 12345


# ---------------------------------------------------------------------------
# Unsafe entries inside the tree


def _attack(env: Env, src: Path, kind: str) -> None:
    if kind == "symlink-file":
        os.symlink(env.outside / "secret.txt", src / "s.txt")
    elif kind == "symlink-dir":
        (src / "d").mkdir()
        os.symlink(env.outside, src / "d" / "o")
    elif kind == "symlink-relative":
        os.symlink("../../../outside/secret.txt", src / "rel.txt")
    elif kind == "fifo":
        os.mkfifo(src / "pipe")
    elif kind == "socket":
        os.mknod(src / "sock", stat.S_IFSOCK | 0o600)
    elif kind == "device":
        os.mknod(src / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "blockdev":
        os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    elif kind == "hardlink":
        os.link(env.outside / "secret.txt", src / "hl.txt")
    else:
        raise AssertionError(kind)


ATTACKS = ["symlink-file", "symlink-dir", "symlink-relative", "fifo", "socket", "device", "blockdev", "hardlink"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ATTACKS)
def test_unsafe_entries_refused(env: Env, resolver: str, kind: str) -> None:
    src = env.src()
    (src / "zz.bin").write_bytes(os.urandom(100_000))
    _attack(env, src, kind)
    src_before = snapshot(str(src)) if kind not in ("fifo",) else None
    called: list[object] = []
    with untouched(env):
        with raises(E.UNSAFE_ENTRY):
            engine.scan(str(env.dts), Source("alice/dts-1", "dts-1"))
        with raises(E.UNSAFE_ENTRY):
            env.copy(parts=["alice", "dts_transfers"], on_plan=called.append)
    assert called == []
    assert not (env.alice / "dts_transfers").exists()                  # nothing made before the scan passed
    if src_before is not None:
        assert snapshot(str(src)) == src_before


def bind_mount(what: Path, where: Path) -> None:
    """``mount --bind what where`` (root only: skipped with the reason otherwise, but never under CI=true)."""
    r = subprocess.run(["mount", "--bind", str(what), str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.geteuid() != 0 and os.environ.get("CI") != "true":
            pytest.skip(f"mount --bind needs root; running as uid {os.geteuid()}: {r.stderr.strip()}")
        pytest.fail(f"mount --bind {what} {where} failed: {r.stderr.strip()}")


@contextmanager
def bound(what: Path, where: Path) -> Iterator[None]:
    bind_mount(what, where)
    try:
        yield
    finally:
        umount(where)


def test_bind_mounted_file_refused(env: Env, resolver: str) -> None:
    """A file of the same filesystem bind-mounted into the tree: same st_dev, another mount: 403 unsafe_entry.

    Before: directory bind mounts were refused (openat2 RESOLVE_NO_XDEV on folders) but a
    bind-mounted file was copied, handing the user a file from outside the DTS area.
    """
    src = env.src()
    (src / "sub").mkdir()
    (src / "sub" / "innocent.txt").write_bytes(b"")         # the mount point
    assert os.stat(env.outside / "secret.txt").st_dev == os.stat(src).st_dev
    called: list[object] = []
    with bound(env.outside / "secret.txt", src / "sub" / "innocent.txt"):
        assert (src / "sub" / "innocent.txt").read_bytes() == b"top secret\n"
        with untouched(env):
            with raises(E.UNSAFE_ENTRY):
                engine.scan(str(env.dts), Source("alice/dts-1", "dts-1"))
            with raises(E.UNSAFE_ENTRY):
                env.copy(parts=["alice", "dts_transfers"], on_plan=called.append)
    assert called == []
    assert not (env.alice / "dts_transfers").exists()


@pytest.mark.parametrize("processes", [0, 2])
def test_file_bind_mounted_after_the_scan_refused(env: Env, resolver: str, processes: int) -> None:
    """The mount appears between the scan and the copy: each file's open refuses it; nothing is left."""
    src = env.src()
    for i in range(10):
        (src / f"f{i}.txt").write_bytes(b"x%d" % i)
    target = src / "f5.txt"
    mounted: list[bool] = []

    def on_plan(plan: engine.Plan) -> None:
        bind_mount(env.outside / "secret.txt", target)
        mounted.append(True)

    try:
        with raises(E.UNSAFE_ENTRY):
            env.copy(options=CopyOptions(fsync=False, processes=processes, workers=1), on_plan=on_plan)
    finally:
        if mounted:
            umount(target)
    assert mounted
    assert env.user_listing() == []
    assert (env.outside / "secret.txt").read_bytes() == b"top secret\n"


def test_bind_mounted_folder_of_the_same_filesystem_refused(env: Env, resolver: str) -> None:
    """A folder of the same filesystem bind-mounted into the tree (the component walk compared st_dev only)."""
    src = env.src()
    (src / "d").mkdir()
    with bound(env.outside / "sub", src / "d"):
        with untouched(env):
            with raises(E.UNSAFE_ENTRY):
                env.copy()
        with raises(E.OUTSIDE_DTS_AREA):
            engine.resolve_source(str(env.dts), "alice/dts-1/d")


def test_removal_never_descends_into_a_bind_mount(env: Env, resolver: str) -> None:
    """delete_source of a tree holding a bind mount of an outside folder: refused, the outside folder intact."""
    src = env.src()
    (src / "d").mkdir()
    with bound(env.outside / "sub", src / "d"):
        with raises(E.IO_ERROR):
            engine.remove_source(str(env.dts), Source("alice/dts-1", "dts-1"))
    assert (env.outside / "sub" / "deep.txt").read_bytes() == b"deep secret\n"


def test_mount_point_inside_refused(env: Env, resolver: str) -> None:
    src = env.src()
    mnt = src / "mnt"
    mnt.mkdir()
    can_mount(mnt, "1m")
    try:
        (mnt / "f").write_bytes(b"on another fs")
        with untouched(env):
            with raises(E.UNSAFE_ENTRY):
                env.copy()
            # The source folder itself being a mount point is refused at resolution.
        with raises(E.OUTSIDE_DTS_AREA):
            engine.resolve_source(str(env.dts), "alice/dts-1/mnt")
    finally:
        umount(mnt)


def test_toctou_file_swapped_for_link_after_scan(env: Env, resolver: str) -> None:
    src = env.src()

    def swap(plan: engine.Plan) -> None:
        os.unlink(src / "a.txt")
        os.symlink(env.outside / "secret.txt", src / "a.txt")

    with untouched(env):
        with raises(E.UNSAFE_ENTRY):
            env.copy(on_plan=swap)


def test_source_changed_after_scan(env: Env) -> None:
    src = env.src()

    def grow(plan: engine.Plan) -> None:
        with open(src / "a.txt", "ab") as f:
            f.write(b"more")

    with raises(E.SOURCE_CHANGED):
        env.copy(on_plan=grow)
    assert env.user_listing() == []

    def replace(plan: engine.Plan) -> None:
        os.unlink(src / "a.txt")
        (src / "a.txt").write_bytes(b"hello\n")

    with raises(E.SOURCE_CHANGED):
        env.copy(on_plan=replace)
    assert env.user_listing() == []


# ---------------------------------------------------------------------------
# Destination safety


def test_planted_link_at_final_name(env: Env, resolver: str) -> None:
    env.src()
    os.symlink(env.outside, env.alice / "dts-1")
    with untouched_outside(env):
        r = env.copy()
    assert r.name == "dts-1-1"
    assert os.readlink(env.alice / "dts-1") == str(env.outside)
    assert (env.alice / "dts-1-1" / "a.txt").read_bytes() == b"hello\n"
    assert env.user_listing() == ["dts-1", "dts-1-1"]


def test_planted_dangling_link_and_file_at_final_name(env: Env) -> None:
    env.src()
    os.symlink(env.outside / "not-yet", env.alice / "dts-1")
    (env.alice / "dts-1-1").write_bytes(b"user file")
    with untouched_outside(env):
        r = env.copy()
    assert r.name == "dts-1-2"
    assert not (env.outside / "not-yet").exists()
    assert (env.alice / "dts-1-1").read_bytes() == b"user file"


@pytest.mark.parametrize("where", ["target_subdir", "user", "deeper"])
def test_planted_link_in_destination_path(env: Env, resolver: str, where: str) -> None:
    env.src()
    if where == "target_subdir":
        os.symlink(env.outside, env.alice / "dts_transfers")
        parts = ["alice", "dts_transfers"]
    elif where == "deeper":
        (env.alice / "a").mkdir()
        os.symlink(env.outside, env.alice / "a" / "b")
        parts = ["alice", "a", "b", "c"]
    else:
        os.symlink(env.outside, env.users / "bob")
        parts = ["bob"]
    with untouched(env):
        with raises(E.UNSAFE_DESTINATION):
            env.copy(parts=parts)
        with raises(E.UNSAFE_DESTINATION):
            engine.ensure_dir(str(env.users), parts, 12345, 12345)


def test_target_subdir_is_a_file(env: Env) -> None:
    env.src()
    (env.alice / "dts_transfers").write_bytes(b"not a folder")
    with raises(E.UNSAFE_DESTINATION):
        env.copy(parts=["alice", "dts_transfers"])
    assert (env.alice / "dts_transfers").read_bytes() == b"not a folder"


def test_user_folder_must_exist(env: Env) -> None:
    env.src()
    with raises(E.BAD_REQUEST):
        env.copy(parts=["carol"])
    with raises(E.BAD_REQUEST):
        env.copy(parts=["carol", "dts_transfers"])
    assert not (env.users / "carol").exists()


@pytest.mark.parametrize("bad", [[".."], ["alice", ".."], ["alice/x"], [""], ["alice", "."]])
def test_bad_destination_parts(env: Env, bad: list[str]) -> None:
    env.src()
    with untouched(env):
        with pytest.raises(TransferError) as info:
            env.copy(parts=bad)
    assert info.value.reason in (E.UNSAFE_DESTINATION, E.BAD_REQUEST)


def test_collisions(env: Env) -> None:
    env.src()
    names = [env.copy(attempt=str(i)).name for i in range(3)]
    assert names == ["dts-1", "dts-1-1", "dts-1-2"]
    assert env.user_listing() == names


def test_ensure_dir(env: Env, resolver: str) -> None:
    engine.ensure_dir(str(env.users), ["alice", "x", "y"], 12345, 54321)
    for p in (env.alice / "x", env.alice / "x" / "y"):
        assert (p.stat().st_uid, p.stat().st_gid) == (12345, 54321)
    engine.ensure_dir(str(env.users), ["alice", "x", "y"], None, None, create=False)
    with raises(E.BAD_REQUEST):
        engine.ensure_dir(str(env.users), ["alice", "nope"], None, None, create=False)
    assert not (env.alice / "nope").exists()


# ---------------------------------------------------------------------------
# Manifests


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def manifest_src(env: Env, resources: object, raw: bytes | None = None) -> Path:
    src = env.src()
    (src / "data").mkdir()
    (src / "data" / "r1.csv").write_bytes(b"1,2,3\n")
    (src / "r2.bin").write_bytes(os.urandom(700_000))
    body = raw if raw is not None else json.dumps({"name": "manifest", "profile": "data-package",
                                                   "resources": resources}).encode()
    (src / "manifest.json").write_bytes(body)
    return src


def res(path: str, data: bytes | None, h: str | None = "md5", nbytes: int | None = None) -> dict:
    d: dict = {"id": path, "name": path, "path": path, "format": "bin"}
    if data is not None:
        d["bytes"] = len(data) if nbytes is None else nbytes
    if h == "md5" and data is not None:
        d["hash"] = md5(data)
    elif h is not None:
        d["hash"] = h
    return d


def test_manifest_ok(env: Env, resolver: str) -> None:
    r1 = b"1,2,3\n"
    src = manifest_src(env, [])
    r2 = (src / "r2.bin").read_bytes()
    doc = {"resources": [res("data/r1.csv", r1), res("./r2.bin", r2, "SHA256:" + hashlib.sha256(r2).hexdigest().upper()),
                         res("a.txt", b"hello\n", "")]}
    (src / "manifest.json").write_text(json.dumps(doc))
    r = env.copy()
    assert (r.manifest_resources, r.size_only, r.files) == (3, 1, 4)
    assert_same_tree(src, env.alice / "dts-1")
    plan = engine.scan(str(env.dts), Source("alice/dts-1", "dts-1"))
    assert plan.manifest is not None and plan.manifest.resources == 3 and plan.manifest.size_only == 1


def test_manifest_empty_file(env: Env) -> None:
    src = manifest_src(env, None, raw=b"")
    r = env.copy()
    assert (r.manifest_resources, r.size_only) == (0, 0)
    assert (env.alice / "dts-1" / "manifest.json").read_bytes() == b""
    assert_same_tree(src, env.alice / "dts-1")


def test_manifest_size_only(env: Env) -> None:
    manifest_src(env, [res("data/r1.csv", b"1,2,3\n", ""), res("a.txt", b"hello\n", None)])
    r = env.copy()
    assert (r.manifest_resources, r.size_only) == (2, 2)


@pytest.mark.parametrize("algo", ["sha1", "sha512", "blake2b", "md5"])
def test_manifest_algorithms(env: Env, algo: str) -> None:
    data = b"1,2,3\n"
    manifest_src(env, [res("data/r1.csv", data, f"{algo}:{hashlib.new(algo, data).hexdigest()}")])
    assert env.copy().manifest_resources == 1


BAD_MANIFESTS = {
    "md5-mismatch": ([res("data/r1.csv", b"1,2,4\n")], None, "data/r1.csv"),
    "sha256-mismatch": ([res("data/r1.csv", b"1,2,3\n", "sha256:" + "0" * 64)], None, "data/r1.csv"),
    "big-file-hash-mismatch": ([res("r2.bin", None, "md5:" + "a" * 32)], None, "r2.bin"),
    "size-mismatch": ([res("data/r1.csv", b"1,2,3\n", nbytes=7)], None, "data/r1.csv"),
    "missing-path": ([res("data/nope.csv", b"x")], None, "data/nope.csv"),
    "dotdot-path": ([res("../outside/secret.txt", b"top secret\n")], None, "../outside/secret.txt"),
    "dotdot-inside": ([res("data/../data/r1.csv", b"1,2,3\n")], None, "data/../data/r1.csv"),
    "absolute-path": ([res("/etc/passwd", b"x")], None, "/etc/passwd"),
    "folder-path": ([res("data", None, "")], None, "data"),
    "unknown-algo": ([res("data/r1.csv", b"1,2,3\n", "crc32:abcd")], None, "crc32"),
    "bad-hex": ([res("data/r1.csv", b"1,2,3\n", "xyz")], None, "data/r1.csv"),
    "bytes-not-int": ([res("data/r1.csv", b"1,2,3\n") | {"bytes": "6"}], None, "data/r1.csv"),
    "garbage": (None, b"{not json", "JSON"),
    "not-utf8": (None, b"\xff\xfe{}", "JSON"),
    "not-object": (None, b"[1, 2]", "object"),
    "resources-not-list": (None, b'{"resources": {"path": "a.txt"}}', "resources"),
    "no-resources": (None, b'{"name": "manifest"}', "resources"),
    "resource-not-object": ([["a.txt"]], None, "#0"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_manifest_mismatch(env: Env, resolver: str, case: str) -> None:
    resources, raw, needle = BAD_MANIFESTS[case]
    manifest_src(env, resources, raw)
    plans: list[object] = []
    with untouched(env):
        with pytest.raises(TransferError) as info:
            env.copy(on_plan=plans.append)
    assert info.value.reason == E.MANIFEST_MISMATCH
    assert needle in info.value.message
    if "hash-mismatch" not in case and "md5-mismatch" not in case and "sha256-mismatch" not in case:
        assert plans == []                                              # checked before copying anything


def test_manifest_too_large(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest_src(env, [])
    monkeypatch.setattr(engine.manifest, "MANIFEST_MAX_BYTES", 10)
    with raises(E.MANIFEST_MISMATCH):
        env.copy()


# ---------------------------------------------------------------------------
# Limits, cancellation, fences, faults


def test_payload_limit(env: Env) -> None:
    src = env.src()
    (src / "big").write_bytes(b"x" * 10_000)
    plans: list[object] = []
    with untouched(env):
        with raises(E.PAYLOAD_TOO_LARGE):
            env.copy(parts=["alice", "dts_transfers"], options=CopyOptions(max_bytes=10_000), on_plan=plans.append)
        with raises(E.PAYLOAD_TOO_LARGE):
            engine.scan(str(env.dts), Source("alice/dts-1", "dts-1"), max_bytes=9_999)
    assert plans == []
    assert env.copy(options=CopyOptions(max_bytes=10_006)).files == 2


@pytest.mark.parametrize("workers", [1, 4])
def test_cancel_mid_copy(env: Env, workers: int) -> None:
    src = env.src()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(os.urandom(1_500_000))
    seen: list[tuple[int, int]] = []
    stop = {"now": False}

    def progress(f: int, b: int) -> None:
        seen.append((f, b))
        if b >= 3_000_000:
            stop["now"] = True

    with raises(E.CANCELLED):
        env.copy(parts=["alice", "t"], options=CopyOptions(workers=workers), on_progress=progress,
                 should_stop=lambda: stop["now"])
    assert seen and seen[-1][1] < 20 * 1_500_000
    assert os.listdir(env.alice / "t") == []                           # temp removed; target_subdir may stay


def test_a_long_scan_reports_each_folder_and_can_be_cancelled(env: Env) -> None:
    """The scan says it is moving (progress (0, 0) before each folder: a scan longer than
    [copy] stall_seconds is no stall) and stops at a cancel, before anything is made."""
    src = env.src()
    for i in range(30):
        (src / f"d{i:02d}").mkdir()
        (src / f"d{i:02d}" / "f.txt").write_bytes(b"x" * i)
    seen: list[tuple[int, int]] = []
    r = env.copy(on_progress=lambda f, b: seen.append((f, b)))
    assert seen[:31] == [(0, 0)] * 31                                  # the top folder and 30 below it
    assert seen[-1] == (r.files, r.bytes) and r.files >= 30

    asked = {"n": 0}

    def stop() -> bool:
        asked["n"] += 1
        return asked["n"] > 10                                          # cancelled inside the scan

    with raises(E.CANCELLED):
        env.copy(parts=["alice", "t"], should_stop=stop)
    assert asked["n"] == 11
    assert not (env.alice / "t").exists()                               # the scan comes before any folder


def test_cancel_before_start(env: Env) -> None:
    env.src()
    with raises(E.CANCELLED):
        env.copy(should_stop=lambda: True)
    assert env.user_listing() == []


def test_before_publish_false(env: Env) -> None:
    src = env.src()
    build_tree(src)
    got: list[tuple[str, int, int]] = []

    def fence(tmpname: str, dev: int, ino: int) -> bool:
        st = os.lstat(env.alice / tmpname)
        assert (st.st_dev, st.st_ino) == (dev, ino)
        assert engine.temp_exists(str(env.users), ["alice"], JOB, "7")
        got.append((tmpname, dev, ino))
        return False

    with pytest.raises(TransferError) as info:
        env.copy(attempt="7", before_publish=fence)
    assert info.value.reason == E.CANCELLED and "lost claim" in info.value.message
    assert got and got[0][0] == f".dtsbridge-{JOB}-7.tmp"
    assert env.user_listing() == []
    assert not engine.temp_exists(str(env.users), ["alice"], JOB, "7")


def test_unexpected_exception_cleans_up(env: Env) -> None:
    src = env.src()
    (src / "b").write_bytes(os.urandom(3_000_000))

    def boom(f: int, b: int) -> None:
        raise ZeroDivisionError("oops")

    with pytest.raises(TransferError) as info:
        env.copy(on_progress=boom)
    assert info.value.reason == E.INTERNAL
    assert env.user_listing() == []


@pytest.mark.parametrize("workers", [1, 4])
def test_enospc(tmp_path: Path, workers: int) -> None:
    env = Env(tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    can_mount(small, "4m")
    try:
        (small / "alice").mkdir()
        src = env.src()
        for i in range(3):
            (src / f"f{i}.bin").write_bytes(os.urandom(2_000_000))
        with pytest.raises(TransferError) as info:
            engine.copy_tree(str(env.dts), Source("alice/dts-1", "dts-1"), str(small), ["alice", "dts"],
                             JOB, "1", CopyOptions(workers=workers))
        assert info.value.reason == E.NO_SPACE, info.value
        assert os.listdir(small / "alice" / "dts") == []
        assert os.statvfs(small).f_bfree * os.statvfs(small).f_frsize > 3_500_000   # everything freed
    finally:
        umount(small)


# ---------------------------------------------------------------------------
# Crash recovery helpers


def test_folder_at_this_attempts_temp_name_is_left_alone(env: Env) -> None:
    """Attempts have names of their own: something already at ours was not made by this attempt. Kept, job fails.

    Before: it was removed, files and all, on the strength of its name.
    """
    env.src()
    planted = env.alice / f".dtsbridge-{JOB}-1.tmp"
    planted.mkdir()
    (planted / "precious").write_bytes(b"mine")
    with raises(E.UNSAFE_DESTINATION):
        env.copy()
    assert (planted / "precious").read_bytes() == b"mine"
    assert env.user_listing() == [planted.name]


def test_planted_link_at_temp_name(env: Env) -> None:
    env.src()
    os.symlink(env.outside, env.alice / f".dtsbridge-{JOB}-1.tmp")
    with untouched_outside(env):
        with raises(E.UNSAFE_DESTINATION):
            env.copy()
    assert os.path.islink(env.alice / f".dtsbridge-{JOB}-1.tmp")


def dead_attempt(env: Env, attempt: str, uid: int | None = None, parts: list[str] | None = None) -> engine.TempRecord:
    """A real attempt whose process dies (``os._exit``) at the publish fence: its temporary folder stays.

    Returns the record the attempt handed to ``on_temp`` (what the service keeps in Redis).
    """
    env.src()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child copies, then "crashes" just before publishing
        try:
            os.close(r)
            env.copy(attempt=attempt, parts=parts, options=CopyOptions(fsync=False, workers=1, uid=uid, gid=uid),
                     on_temp=lambda rec: os.write(w, rec.encode().encode()),
                     before_publish=lambda *a: os._exit(0))
        finally:
            os._exit(1)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    rec = engine.TempRecord.decode(data.decode())
    assert not rec.pending and rec.attempt == attempt
    return rec


def test_temp_record_encoding() -> None:
    rec = engine.TempRecord("a1", 2049, 123456, 1_700_000_000_123_456_789, (0, 4242))
    assert engine.TempRecord.decode(rec.encode()) == rec
    assert engine.TempRecord.decode("a1") == engine.TempRecord("a1") and engine.TempRecord("a1").pending
    assert engine.TempRecord.decode_all(f"x {rec.encode()} bad/one a:1 y") == [
        engine.TempRecord("x"), rec, engine.TempRecord("y")]


def test_cleanup_temp_removes_recorded_attempts(env: Env) -> None:
    """A dead attempt's folder (chowned to the user before the fence, or not) and a pending one are removed."""
    rec1 = dead_attempt(env, "1")
    rec2 = dead_attempt(env, "2", uid=4242)
    assert rec2.uids == (os.geteuid(), 4242)
    assert os.stat(env.alice / f".dtsbridge-{JOB}-2.tmp").st_uid == 4242
    pfd = os.open(env.alice, os.O_RDONLY | os.O_DIRECTORY)
    os.close(engine._make_temp(pfd, f".dtsbridge-{JOB}-3.tmp")[0])     # crashed before its inode was recorded
    os.close(pfd)
    (env.alice / "dts-1").mkdir()
    os.symlink(env.outside / "sub", env.alice / f".dtsbridge-{JOB}-1.tmp" / "link")
    recs = [rec1, rec2, engine.TempRecord("3"), engine.TempRecord("4"), rec1]
    with untouched_outside(env):
        assert engine.cleanup_temp(str(env.users), ["alice"], JOB, recs) == 3
    assert env.user_listing() == ["dts-1"]
    assert engine.cleanup_temp(str(env.users), ["alice"], JOB, recs) == 0
    assert engine.cleanup_temp(str(env.users), ["alice", "missing"], JOB, recs) == 0
    assert engine.cleanup_temp(str(env.users), ["nobody"], JOB, recs) == 0


def test_find_published(env: Env) -> None:
    env.src()
    (env.alice / "dts-1").mkdir()
    r = env.copy()
    assert r.name == "dts-1-1"
    users, parts = str(env.users), ["alice"]
    assert engine.find_published(users, parts, "dts-1", r.dev, r.ino) == "dts-1-1"
    assert engine.find_published(users, parts, "dts-1", r.dev, r.ino + 999_999) is None
    assert engine.find_published(users, ["nobody"], "dts-1", r.dev, r.ino) is None
    # Gaps: dts-1-1 renamed to dts-1-30 (the gap of 28 missing names is crossed).
    os.rename(env.alice / "dts-1-1", env.alice / "dts-1-30")
    assert engine.find_published(users, parts, "dts-1", r.dev, r.ino) == "dts-1-30"
    os.rename(env.alice / "dts-1-30", env.alice / "dts-1-200")
    assert engine.find_published(users, parts, "dts-1", r.dev, r.ino) is None
    # A link with the right name is never taken for it.
    os.rename(env.alice / "dts-1-200", env.tmp / "moved")
    os.symlink(env.tmp / "moved", env.alice / "dts-1-1")
    assert engine.find_published(users, parts, "dts-1", r.dev, r.ino) is None


@pytest.mark.parametrize("sub", ["alice/.dtsbridge-job1-1.tmp", ".dtsbridge-x", "alice/.dtsbridge-", "ABS",
                                 "alice/.DTSBridge-job1-1.tmp"])
def test_reserved_names_refused(env: Env, resolver: str, sub: str) -> None:
    """A DTS folder named like the engine's own temporary folders is refused (400) before anything is made.

    Before: it was published under that name, and the job it imitates later removed
    it, files and all, as its own temporary folder.
    """
    rel = "alice/.dtsbridge-job1-1.tmp" if sub == "ABS" else sub
    src = env.src(rel.split("/", 1)[1]) if "/" in rel else env.dts / rel
    src.mkdir(parents=True, exist_ok=True)
    (src / "f").write_bytes(b"f")
    request = str(env.dts / rel) if sub == "ABS" else rel
    with untouched(env):
        with raises(E.BAD_REQUEST):
            engine.resolve_source(str(env.dts), request)
        with raises(E.BAD_REQUEST):
            env.copy(rel)
    # Inside a transfer such names are just names (never beside a temporary folder).
    ok = env.src("ok")
    (ok / ".dtsbridge-job1-1.tmp").mkdir()
    assert engine.resolve_source(str(env.dts), "alice/ok").name == "ok"
    assert env.copy("alice/ok").name == "ok"


def test_temp_exists(env: Env) -> None:
    assert not engine.temp_exists(str(env.users), ["alice"], JOB, "1")
    (env.alice / f".dtsbridge-{JOB}-1.tmp").mkdir()
    assert engine.temp_exists(str(env.users), ["alice"], JOB, "1")
    assert not engine.temp_exists(str(env.users), ["alice", "nope"], JOB, "1")


@pytest.mark.parametrize("job,attempt", [("a/b", "1"), ("", "1"), ("j", "1-2"), ("j", "../x"), ("j\0", "1")])
def test_bad_job_names(env: Env, job: str, attempt: str) -> None:
    env.src()
    with raises(E.BAD_REQUEST):
        engine.copy_tree(str(env.dts), Source("alice/dts-1", "dts-1"), str(env.users), ["alice"], job, attempt,
                         CopyOptions())
    assert env.user_listing() == []


def test_remove_source(env: Env, resolver: str) -> None:
    src = env.src()
    build_tree(src)
    os.symlink(env.outside, src / "sub" / "out")
    os.symlink(env.outside / "secret.txt", src / "s")
    with untouched_outside(env):
        engine.remove_source(str(env.dts), Source("alice/dts-1", "dts-1"))
    assert not src.exists()
    assert (env.dts / "alice").is_dir()
    engine.remove_source(str(env.dts), Source("alice/dts-1", "dts-1"))   # already gone: fine
    os.symlink(env.outside, env.dts / "alice" / "lnk")
    with untouched_outside(env):
        engine.remove_source(str(env.dts), Source("alice/lnk", "lnk"))   # a link is not removed through
    with raises(E.OUTSIDE_DTS_AREA):
        engine.remove_source(str(env.dts), Source("../outside", "outside"))
    assert (env.outside / "secret.txt").exists()


def test_fsspy_sees_reads_and_writes(env: Env) -> None:
    """The spy itself works: a naive copy that follows links is caught."""
    import shutil
    src = env.src()
    os.symlink(env.outside / "secret.txt", src / "s.txt")
    with FsSpy(str(env.outside)) as spy:
        shutil.copytree(src, env.tmp / "naive")
        events = spy.events()
    assert any(name == "secret.txt" and "OPEN" in kinds for _, name, kinds in events)
    with FsSpy(str(env.outside)) as spy:
        (env.outside / "sub" / "new").write_bytes(b"x")
        events = spy.events()
    assert any(name == "new" and "CREATE" in kinds for _, name, kinds in events)
