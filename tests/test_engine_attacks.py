"""Adversarial tests of the copy engine (runs as root on real files).

Attackers: the request's ``subdirectory``; the DTS account (contents of the
DTS folder: links, FIFOs, deep trees, odd names, manifest.json); the user, who
owns ``user_root/<user>`` and may create, rename and replace entries in it at
any moment while a job runs.  Races are real: threads flip entries with
``renameat2(RENAME_EXCHANGE)`` in a loop for a bounded time.

Each test names the weakness it proves fixed (or the property it pins down).
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dtsbridge import engine
from dtsbridge import errors as E
from dtsbridge.engine import CopyOptions, Source, TransferError
from tests.test_engine import JOB, Env as EngineEnv, dead_attempt, resolver, untouched_outside  # noqa: F401

RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


class Env(EngineEnv):
    """test_engine's folders (dts, users/alice, an outside folder with secrets), copying without fsync."""

    def copy(self, rel: str = "alice/dts-1", parts: list[str] | None = None, **kw: object) -> engine.Result:
        kw.setdefault("options", CopyOptions(fsync=False))
        return super().copy(rel, parts, **kw)

    def temp(self, attempt: str = "1") -> Path:
        return self.alice / f".dtsbridge-{JOB}-{attempt}.tmp"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield Env(tmp_path)
    # Deep trees (thousands of levels) break pytest's own tmp_path cleanup in later
    # sessions (shutil.rmtree recursion): remove them now, with rm (no depth limit).
    for child in tmp_path.iterdir():
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(child)], check=False)


@contextmanager
def raises(reason: str) -> Iterator[TransferError]:
    with pytest.raises(TransferError) as info:
        yield info  # type: ignore[misc]
    assert info.value.reason == reason, f"{info.value!r}"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def make_deep(top: Path, depth: int, name: str = "d") -> None:
    """A chain of ``depth`` folders below ``top`` (made relative to descriptors: no PATH_MAX limit)."""
    cur = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=cur)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=cur), "wb") as f:
            f.write(b"bottom\n")
    finally:
        os.close(cur)


class FifoTrap:
    """A FIFO outside the roots and a detector: ``hits`` counts moments someone held it open for reading.

    Opening a FIFO for writing with O_NONBLOCK succeeds only while a reader has it
    open; a reader blocked in ``open`` is released by it (so a buggy engine is
    caught, not hung).
    """

    def __init__(self, where: Path) -> None:
        self.path = where / "trap.fifo"
        os.mkfifo(self.path)
        self.hits = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.0005)
                continue
            self.hits += 1
            os.close(fd)

    def __enter__(self) -> "FifoTrap":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


class Flipper:
    """Swaps each ``dNNN`` folder with its twin ``lNNN`` (a link to ``target``) in a loop (RENAME_EXCHANGE)."""

    def __init__(self, folder: Path, target: Path, n: int) -> None:
        self.folder = folder
        self.n = n
        for i in range(n):
            (folder / f"d{i:03d}").mkdir()
            (folder / f"d{i:03d}" / "x").write_bytes(b"x")
            os.symlink(target, folder / f"l{i:03d}")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            names = [(f"d{i:03d}".encode(), f"l{i:03d}".encode()) for i in range(self.n)]
            while not self.stop.is_set():
                for a, b in names:
                    _libc.renameat2(fd, a, fd, b, RENAME_EXCHANGE)
        finally:
            os.close(fd)

    def __enter__(self) -> "Flipper":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def run_bounded(fn: Callable[[], object], seconds: float = 20) -> object:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the engine hung (blocked on a FIFO?)"
    if "exc" in out:
        raise out["exc"]  # type: ignore[misc]
    return out.get("value")


# ---------------------------------------------------------------------------
# Finding 1: removal (shutil.rmtree) opened sub-folders with a plain O_RDONLY,
# following a link (or opening a FIFO) swapped in between its stat and open.


@pytest.mark.timeout(60)
def test_cleanup_temp_race_never_opens_a_planted_link(env: Env) -> None:
    """The user plants a look-alike temp folder whose sub-folders flip into links to a FIFO outside.

    Before the fix the engine opened the FIFO through the link (as root: a FIFO
    blocks the thread forever, a device node would be opened with its side effects).
    """
    deadline = time.monotonic() + 3
    rounds = 0
    with FifoTrap(env.outside) as trap:
        while time.monotonic() < deadline and trap.hits == 0:
            rec = dead_attempt(env, f"r{rounds}")
            look_alike = env.temp(f"r{rounds}")          # a real dead attempt's folder, filled with flippers
            with Flipper(look_alike, trap.path, 40):
                try:
                    run_bounded(lambda: engine.cleanup_temp(str(env.users), ["alice"], JOB, [rec]))
                except TransferError:
                    pass  # a race may make removal fail; it must never go through a link
            rounds += 1
            if look_alike.exists():
                for p in look_alike.iterdir():
                    if p.is_symlink() or not p.is_dir():
                        p.unlink()
                    else:
                        for q in p.iterdir():
                            q.unlink()
                        p.rmdir()
                look_alike.rmdir()
    assert trap.hits == 0, f"the engine opened a FIFO outside user_root through a planted link ({rounds} rounds)"
    assert rounds >= 3
    assert (env.outside / "secret.txt").read_bytes() == b"top secret\n"
    assert stat.S_ISFIFO(os.lstat(trap.path).st_mode)


@pytest.mark.timeout(60)
def test_remove_source_race_never_opens_a_link_outside_dts(env: Env, resolver: str) -> None:
    """delete_source: the DTS account flips folders of the (copied) source into links to a FIFO outside."""
    deadline = time.monotonic() + 2
    rounds = 0
    with FifoTrap(env.outside) as trap:
        while time.monotonic() < deadline and trap.hits == 0:
            src = env.src(f"r{rounds}")
            with Flipper(src, trap.path, 40):
                try:
                    run_bounded(lambda: engine.remove_source(str(env.dts), Source(f"alice/r{rounds}", f"r{rounds}")))
                except TransferError:
                    pass
            rounds += 1
    assert trap.hits == 0, f"remove_source opened a FIFO outside dts_root through a link ({rounds} rounds)"
    assert (env.outside / "secret.txt").read_bytes() == b"top secret\n"


def test_removal_unlinks_links_fifos_and_keeps_what_they_point_to(env: Env, resolver: str) -> None:
    """Removal never reads or removes through links, and never blocks on a FIFO inside the tree."""
    src = env.src()
    (src / "sub").mkdir()
    os.symlink(env.outside, src / "sub" / "out")
    os.symlink(env.outside / "secret.txt", src / "s")
    os.mkfifo(src / "sub" / "fifo")
    with untouched_outside(env):
        run_bounded(lambda: engine.remove_source(str(env.dts), Source("alice/dts-1", "dts-1")))
    assert not src.exists()


# ---------------------------------------------------------------------------
# Finding 2: removal recursed once per folder level: a deep tree raised
# RecursionError (not a TransferError) out of copy_tree's failure path, leaked
# its descriptors and left the temporary folder behind.


@pytest.mark.timeout(120)
def test_failed_copy_of_a_deep_tree_leaves_nothing(env: Env) -> None:
    src = env.src()
    make_deep(src, 1200, "a")          # rel paths stay under PATH_MAX (2 bytes per level)
    before = open_fds()
    with raises(E.CANCELLED):
        env.copy(before_publish=lambda *a: False)
    assert sorted(os.listdir(env.alice)) == [], "the temporary folder was left behind"
    assert open_fds() == before, "descriptors leaked on the failure path"


@pytest.mark.timeout(120)
def test_cleanup_temp_of_a_very_deep_temp(env: Env) -> None:
    """A dead attempt's folder grown 3000 levels deep: removed, no RecursionError, no fd pile-up."""
    rec = dead_attempt(env, "5")
    make_deep(env.temp("5"), 3000)
    before = open_fds()
    assert engine.cleanup_temp(str(env.users), ["alice"], JOB, [rec]) == 1
    assert os.listdir(env.alice) == []
    assert open_fds() == before


@pytest.mark.timeout(120)
def test_user_fills_the_temp_once_it_is_theirs_then_the_job_fails(env: Env) -> None:
    """After the top folder is given to the user (just before the fence) they own the temp folder.

    They fill it with a deep tree and links out; the fence then fails: everything
    is removed, nothing outside is touched, and the error is a TransferError.
    """
    src = env.src()
    (src / "sub").mkdir()
    (src / "sub" / "b.txt").write_bytes(b"b\n")
    uid = 4242

    def attacker(tmpname: str, dev: int, ino: int) -> bool:
        tmp = env.alice / tmpname
        assert os.stat(tmp).st_uid == uid        # it is the user's now
        make_deep(tmp / "sub", 1500)
        os.symlink(env.outside, tmp / "out")
        os.symlink(env.outside / "secret.txt", tmp / "sub" / "s")
        return False

    with untouched_outside(env):
        with raises(E.CANCELLED):
            env.copy(options=CopyOptions(uid=uid, gid=uid, fsync=False), before_publish=attacker)
    assert os.listdir(env.alice) == []


# ---------------------------------------------------------------------------
# Finding 3: a user who renamed the temp folder away made the failure path skip
# it: a root-owned copy stayed behind under the user's chosen name.


def test_temp_renamed_away_and_replaced_mid_copy(env: Env, resolver: str) -> None:
    src = env.src()
    for i in range(20):
        (src / f"f{i}.txt").write_bytes(b"data %d\n" % i)
    (env.outside / "sub").chmod(0o755)
    outside_uid = os.stat(env.outside / "sub").st_uid
    done = []

    def should_stop() -> bool:
        if not done and env.temp().exists():
            done.append(1)
            os.rename(env.temp(), env.alice / "stolen")        # the user moves ours away…
            os.symlink(env.outside / "sub", env.temp())        # …and plants a link in its place
        return False

    with untouched_outside(env):
        with raises(E.UNSAFE_DESTINATION):
            env.copy(options=CopyOptions(uid=4242, gid=4242, fsync=False), should_stop=should_stop)
    assert done
    assert os.path.islink(env.temp()), "the user's link is theirs: left alone, never followed"
    assert os.stat(env.outside / "sub").st_uid == outside_uid
    # What we made is removed through the descriptor we hold, wherever the user put the folder.
    assert os.listdir(env.alice / "stolen") == []
    assert not (env.alice / "dts-1").exists()


@pytest.mark.timeout(120)
def test_worker_processes_never_write_into_a_replacement_temp(env: Env) -> None:
    """Worker processes re-open the temp folder by path: a look-alike put at its name is refused (inode check)."""
    src = env.src()
    for i in range(300):
        (src / f"s{i:03d}.txt").write_bytes(b"small %d\n" % i)
    done: list[int] = []
    fenced: list[int] = []

    def should_stop() -> bool:
        if not done and env.temp().exists():
            done.append(1)
            os.rename(env.temp(), env.alice / "stolen")
            env.temp().mkdir()                          # a real folder at the temp's name
        return False

    with engine.CopyExecutor(2) as ex:  # the service's executor: its worker processes stop with it
        with untouched_outside(env):
            with raises(E.UNSAFE_DESTINATION):
                env.copy(options=CopyOptions(fsync=False, processes=2, workers=2), should_stop=should_stop,
                         before_publish=lambda *a: fenced.append(1) or True, executor=ex)
    assert done
    assert fenced == [], "the workers' own check must stop the job (threads would only fail at publish)"
    assert os.listdir(env.temp()) == [], "a worker wrote into the look-alike"
    assert os.listdir(env.alice / "stolen") == []


# ---------------------------------------------------------------------------
# Finding 4: manifest.json nested deeper than Python's recursion limit raised
# RecursionError (INTERNAL from copy_tree; a raw RecursionError from scan()).


@pytest.mark.parametrize("doc", [b"[" * 200_000 + b"]" * 200_000,
                                 b'{"resources": [' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"]}"])
def test_manifest_nesting_bomb(env: Env, doc: bytes) -> None:
    src = env.src()
    (src / "manifest.json").write_bytes(doc)
    with raises(E.MANIFEST_MISMATCH):
        engine.scan(str(env.dts), Source("alice/dts-1", "dts-1"))
    with raises(E.MANIFEST_MISMATCH):
        env.copy()
    assert os.listdir(env.alice) == []


# ---------------------------------------------------------------------------
# Finding 5: request strings that cannot name a folder escaped as the wrong error.


@pytest.mark.parametrize("sub", ["alice/\ud800", "alice/dts-\udfff/x"])
def test_subdirectory_not_encodable(env: Env, resolver: str, sub: str) -> None:
    """A lone surrogate (valid in JSON) cannot be a file name: 404, not UnicodeEncodeError (500)."""
    env.src()
    with raises(E.SOURCE_NOT_FOUND):
        engine.resolve_source(str(env.dts), sub)


@pytest.mark.parametrize("kind", ["long-name", "long-absolute"])
def test_subdirectory_too_long(env: Env, resolver: str, kind: str) -> None:
    """Names longer than NAME_MAX / paths past PATH_MAX do not exist: not an I/O error (500)."""
    env.src()
    sub = "alice/" + "n" * 300 if kind == "long-name" else str(env.dts) + "/alice" + "/abcdefgh" * 600
    with pytest.raises(TransferError) as info:
        engine.resolve_source(str(env.dts), sub)
    assert info.value.reason in (E.SOURCE_NOT_FOUND, E.OUTSIDE_DTS_AREA), info.value


# ---------------------------------------------------------------------------
# Properties that hold (documented here because nothing else pins them down).


@pytest.mark.parametrize("processes", [0, 2])
def test_file_swapped_for_fifo_after_scan_never_blocks(env: Env, processes: int) -> None:
    """O_NONBLOCK on every source open: a FIFO swapped in after the scan is refused, never waited on."""
    src = env.src()
    (src / "b.txt").write_bytes(b"b\n")

    def swap(plan: engine.Plan) -> None:
        os.unlink(src / "b.txt")
        os.mkfifo(src / "b.txt")

    with engine.CopyExecutor(4) as ex:
        with raises(E.UNSAFE_ENTRY):
            run_bounded(lambda: env.copy(on_plan=swap, options=CopyOptions(fsync=False, processes=processes),
                                         executor=ex))
    assert os.listdir(env.alice) == []


@pytest.mark.timeout(60)
def test_target_subdir_flipping_into_a_link_during_jobs(env: Env) -> None:
    """The user flips target_subdir between a real folder and a link to outside while jobs run."""
    env.src()
    (env.alice / "inbox").mkdir()
    (env.alice / "evil").symlink_to(env.outside)
    stop = threading.Event()

    def flip() -> None:
        fd = os.open(env.alice, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not stop.is_set():
                _libc.renameat2(fd, b"inbox", fd, b"evil", RENAME_EXCHANGE)
        finally:
            os.close(fd)

    ok = 0
    with untouched_outside(env):
        t = threading.Thread(target=flip, daemon=True)
        t.start()
        try:
            for i in range(30):
                try:
                    env.copy(parts=["alice", "inbox"], attempt=str(i), options=CopyOptions(fsync=False, uid=4242))
                    ok += 1
                except TransferError as exc:
                    assert exc.reason == E.UNSAFE_DESTINATION, exc
        finally:
            stop.set()
            t.join(5)
    real = env.alice / ("inbox" if (env.alice / "inbox").is_dir() and not (env.alice / "inbox").is_symlink()
                        else "evil")
    assert len([n for n in os.listdir(real) if n.startswith("dts-1")]) == ok
    assert not [n for n in os.listdir(real) if n.startswith(".dtsbridge-")]


def test_manifest_grown_after_the_scan_is_read_only_up_to_the_bound(env: Env,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The size check is on what is read, not on the scan's st_size: no unbounded read into memory."""
    monkeypatch.setattr(engine.manifest, "MANIFEST_MAX_BYTES", 1000)
    src = env.src()
    (src / "manifest.json").write_bytes(b'{"resources": []}')
    ino = os.stat(src / "manifest.json").st_ino
    entry = engine._FileEntry("manifest.json", 17, ino, 0o644, 0)  # noqa: SLF001 - as the scan saw it
    with open(src / "manifest.json", "ab") as f:
        f.write(b" " * 10_000_000)                   # grows after the scan
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with raises(E.MANIFEST_MISMATCH):
            engine._read_manifest(fd, {"manifest.json": entry})  # noqa: SLF001
    finally:
        os.close(fd)


def test_manifest_parse_bomb_is_refused_before_parsing(tmp_path: Path) -> None:
    """``[[],[],…`` would cost ~30x its size in memory: refused by density, without parsing."""
    import tracemalloc

    from dtsbridge import engine
    from dtsbridge.errors import MANIFEST_MISMATCH, TransferError

    dts = tmp_path / "dts"
    src = dts / "bomb"
    src.mkdir(parents=True)
    (src / "manifest.json").write_bytes(b"[" + b"[]," * 2_000_000 + b"[]]")  # 6 MB
    tracemalloc.start()
    try:
        with pytest.raises(TransferError) as e:
            engine.scan(str(dts), engine.resolve_source(str(dts), "bomb"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == MANIFEST_MISMATCH and "not a manifest" in e.value.message
    assert peak < 40 * 1024 * 1024, f"parsing was attempted: peak {peak} bytes"


# ---------------------------------------------------------------------------
# Issue 9 item 14: cleanups went by name.  A folder named like a job's temporary
# folder (published from a DTS folder so named, or made by the user) was removed,
# files and all, by that job's cleanup.  Now only what the job recorded is removed:
# same device, inode, birth time and an owner it gave it.

USER = 4242


def planted(path: Path, uid: int = USER, mode: int = 0o755) -> Path:
    path.mkdir()
    (path / "precious.txt").write_bytes(b"the user's data\n")
    os.chown(path / "precious.txt", uid, uid)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def test_cleanup_leaves_every_look_alike(env: Env) -> None:
    """The user swaps, plants and imitates; every folder the job did not make survives its cleanup."""
    # (a) ours renamed away and replaced by the user's own folder at the name
    rec_a = dead_attempt(env, "a")
    os.rename(env.temp("a"), env.alice / "stolen")
    planted(env.temp("a"))
    # (b) a pending record (crash before the inode was recorded): a root-owned 0700 folder with
    #     something in it, or a user-owned one, is not what a pending attempt leaves
    planted(env.temp("b"), uid=0, mode=0o700)
    planted(env.temp("c"), mode=0o700)
    (env.temp("c") / "precious.txt").unlink()                 # even empty: not ours (owner)
    # (d) a folder whose inode number is reused (same dev/ino recorded, another birth time)
    d = planted(env.temp("d"), uid=0, mode=0o700)
    st = os.stat(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rec_d = engine.TempRecord("d", st.st_dev, st.st_ino, engine._btime_ns(fd) + 1, (0,))
    finally:
        os.close(fd)
    if rec_d.btime_ns == 1:
        pytest.skip("this filesystem records no birth time")
    # (e) the right inode but an owner the job never gave it
    e = planted(env.temp("e"))
    st = os.stat(e)
    rec_e = engine.TempRecord("e", st.st_dev, st.st_ino, 0, (0, 1234))
    # (f) a copy published earlier under a reserved name (before they were refused), never recorded
    planted(env.temp("f"), uid=0)
    # (g) a link at a recorded name
    rec_g = dead_attempt(env, "g")
    os.rename(env.temp("g"), env.alice / "stolen-g")
    os.symlink(env.outside, env.temp("g"))
    before = {n: sorted(os.listdir(env.alice / n)) for n in os.listdir(env.alice) if (env.alice / n).is_dir()}
    with untouched_outside(env):
        n = engine.cleanup_temp(str(env.users), ["alice"], JOB,
                                [rec_a, engine.TempRecord("b"), engine.TempRecord("c"), rec_d, rec_e, rec_g])
    assert n == 0
    after = {n: sorted(os.listdir(env.alice / n)) for n in os.listdir(env.alice) if (env.alice / n).is_dir()}
    assert after == before
    for x in "abdef":
        assert (env.temp(x) / "precious.txt").read_bytes() == b"the user's data\n", x
    assert os.path.islink(env.temp("g"))


@pytest.mark.timeout(60)
def test_cleanup_races_a_swap_of_the_temp_for_a_look_alike(env: Env) -> None:
    """The user flips our dead temp folder and their own look-alike under the temp name while cleanup runs.

    Whatever the interleaving, the user's folder and its file survive (our folder is
    removed when the name holds it, else left for a later cleanup).
    """
    deadline = time.monotonic() + 3
    rounds = removed = 0
    while time.monotonic() < deadline or rounds < 20:
        attempt = f"s{rounds}"
        rec = dead_attempt(env, attempt)
        theirs = planted(env.alice / f"theirs{rounds}")
        stop = threading.Event()

        def flip() -> None:
            fd = os.open(env.alice, os.O_RDONLY | os.O_DIRECTORY)
            a, b = env.temp(attempt).name.encode(), theirs.name.encode()
            while not stop.is_set():
                _libc.renameat2(fd, a, fd, b, RENAME_EXCHANGE)
            os.close(fd)

        t = threading.Thread(target=flip, daemon=True)
        t.start()
        try:
            removed += run_bounded(lambda: engine.cleanup_temp(str(env.users), ["alice"], JOB, [rec]))
        except TransferError:
            pass
        finally:
            stop.set()
            t.join(5)
        survivors = [p for p in (env.temp(attempt), theirs) if (p / "precious.txt").exists()]
        assert len(survivors) == 1, f"round {rounds}: the user's folder was removed"
        assert survivors[0].stat().st_uid == USER
        rounds += 1
    assert removed > 0, "the cleanup never got its own folder: the race test tested nothing"


@pytest.mark.timeout(90)
def test_failing_copy_races_a_swap_of_its_temp_for_a_look_alike(env: Env) -> None:
    """While a copy fails (the fence says no) the user keeps exchanging our temporary folder with one of theirs.

    The failure path empties our folder through its descriptor and removes the name only
    while it is still ours: the user's folder survives every interleaving, and what we made
    is gone (at most our empty folder stays under the user's name).
    """
    src = env.src()
    for i in range(30):
        (src / f"f{i:02d}.txt").write_bytes(b"data %d\n" % i)
    deadline = time.monotonic() + 3
    rounds = 0
    while time.monotonic() < deadline or rounds < 10:
        attempt = f"w{rounds}"
        theirs = planted(env.alice / f"theirs{rounds}")
        stop = threading.Event()

        def flip() -> None:
            fd = os.open(env.alice, os.O_RDONLY | os.O_DIRECTORY)
            a, b = env.temp(attempt).name.encode(), theirs.name.encode()
            while not stop.is_set():
                _libc.renameat2(fd, a, fd, b, RENAME_EXCHANGE)
            os.close(fd)

        t = threading.Thread(target=flip, daemon=True)
        t.start()
        try:
            with pytest.raises(TransferError):
                run_bounded(lambda: env.copy(attempt=attempt, before_publish=lambda *a: False))
        finally:
            stop.set()
            t.join(5)
        homes = [p for p in (env.temp(attempt), theirs) if (p / "precious.txt").exists()]
        assert len(homes) == 1, f"round {rounds}: the user's folder was removed"
        assert (homes[0] / "precious.txt").read_bytes() == b"the user's data\n"
        for p in (env.temp(attempt), theirs):
            if p.exists() and p not in homes:
                assert os.listdir(p) == [], f"round {rounds}: what we made stayed in {p.name}"
        rounds += 1
    assert not (env.alice / "dts-1").exists()
