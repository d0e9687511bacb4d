"""Resume after a crash (issue 13): a re-attempt keeps what the previous one had verified, and only that.

Engine tests crash a real copy: a child process runs ``engine.copy_tree`` with
the test hook ``DTSBRIDGE_FAULT_PAUSE=half:…`` (it pauses once the journal has
recorded half the job's bytes) and is killed with SIGKILL there.  The next
attempt is given the dead attempt's folder (name, device, inode) and must
keep exactly the recorded files that still check out: moved, not copied
(same inodes), and everything else copied again.  End-to-end tests do the
same to a real ``twistd`` and count what the restarted process wrote
(``/proc/<pid>/io``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from dtsbridge import engine
from dtsbridge.engine import CopyOptions, Source
from tests.harness import REPO, leftovers, make_tree, tree_of, wait_until
from tests.test_engine import JOB, Env, env  # noqa: F401  (shared fixture)

MiB = 1024 * 1024

CHILD = """
import sys, json
from dtsbridge import engine
a = json.loads(sys.argv[1])
engine.journal.CHECKPOINT_BYTES = a["checkpoint"] or engine.journal.CHECKPOINT_BYTES
engine.copy_tree(a["dts"], engine.Source(a["rel"], a["rel"].rsplit("/", 1)[-1]), a["users"], ["alice"],
                 a["job"], "1", engine.CopyOptions(workers=1, processes=0, fsync=a["fsync"], uid=a["uid"],
                 gid=a["gid"]))
"""


def payload(n: int = 12, size: int = 700_000) -> dict[str, Any]:
    """Files of one size (so 'half the bytes' is half the files), nested, plus a few small ones."""
    tree: dict[str, Any] = {f"f{i:02d}.bin": os.urandom(size) for i in range(n)}
    tree["sub"] = {f"s{i}.txt": os.urandom(1000 + i) for i in range(3)}
    return tree


def crash_half_way(env: Env, rel: str = "alice/dts-1", fsync: bool = False, uid: int | None = None,
                   gid: int | None = None, checkpoint: int | None = None) -> tuple[str, engine.TempRecord]:
    """Copy in a child process, SIGKILL it once half the bytes are verified; the dead attempt's folder."""
    args = {"dts": str(env.dts), "rel": rel, "users": str(env.users), "job": JOB, "fsync": fsync,
            "uid": uid, "gid": gid, "checkpoint": checkpoint}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DTSBRIDGE_")}
    environ.update(DTSBRIDGE_FAULT_PAUSE="half:60", PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=environ, stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        assert b"fault point half reached" in line, line + p.stderr.read()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    name = engine._temp_name(JOB, "1")
    fd = os.open(env.alice / name, os.O_RDONLY | os.O_DIRECTORY)
    try:  # what the service records in Redis for the folder it made
        return name, engine._temp_record(fd, "1", uid)
    finally:
        os.close(fd)


def journal(env: Env, name: str) -> list[dict[str, Any]]:
    lines = (env.alice / name / engine.JOURNAL_NAME).read_text().splitlines()
    return [json.loads(x) for x in lines[1:] if x and "p" in json.loads(x)]


def inodes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_ino for p in root.rglob("*") if p.is_file()}


def resume(env: Env, old: tuple[str, engine.TempRecord] | engine.TempRecord | None, **kw: Any) -> engine.Result:
    kw.setdefault("options", CopyOptions(fsync=False))
    if isinstance(old, tuple):
        old = old[1]
    return env.copy(attempt=kw.pop("attempt", "2"), resume_from=old, **kw)


# ---------------------------------------------------------------------------


def test_resume_keeps_verified_files_and_copies_the_rest(env: Env) -> None:
    src = make_tree(env.dts / "alice" / "dts-1", payload())
    files = tree_of(src)
    old = crash_half_way(env)
    recorded = journal(env, old[0])
    assert 0 < len(recorded) < len(files)
    old_inodes = inodes(env.alice / old[0])
    r = resume(env, old)
    dst = env.alice / "dts-1"
    assert tree_of(dst) == files
    kept = {rec["p"] for rec in recorded}
    assert r.files_resumed == len(kept) and r.bytes_resumed == sum(len(files[p]) for p in kept)
    assert 2 * r.bytes_resumed >= sum(len(d) for d in files.values()) - 2 * 700_000
    new_inodes = inodes(dst)
    for p in kept:  # moved, not copied
        assert new_inodes[p] == old_inodes[p], p
    assert engine.JOURNAL_NAME not in os.listdir(dst)
    # The old folder still holds what was not kept (the caller removes it by its record).
    assert set(tree_of(env.alice / old[0])) == ({engine.JOURNAL_NAME} | (set(old_inodes) - kept - {engine.JOURNAL_NAME}))


def test_kept_files_that_do_not_check_out_are_copied_again(env: Env) -> None:
    """Corrupted (same size and time), changed at the source, or replaced by another file: never trusted."""
    src = make_tree(env.dts / "alice" / "dts-1", payload())
    old = crash_half_way(env)
    kept = sorted(rec["p"] for rec in journal(env, old[0]))
    assert len(kept) >= 4
    oldroot = env.alice / old[0]
    # 1. a byte flipped in a kept copy, size and mtime restored
    victim = oldroot / kept[0]
    st = victim.stat()
    with open(victim, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    # 2. the source of another one rewritten since the crash
    (src / kept[1]).write_bytes(os.urandom(700_000))
    # 3. a third one replaced by a new file with other content of the same size, mode and time
    #    (the filesystem may well give it the freed inode number)
    third = oldroot / kept[2]
    st3 = third.stat()
    third.unlink()
    third.write_bytes(os.urandom(st3.st_size))
    os.chmod(third, st3.st_mode & 0o777)
    os.utime(third, ns=(st3.st_atime_ns, st3.st_mtime_ns))
    # 4. a file not in the source planted in the old folder; the journal is left as it was
    (oldroot / "planted.txt").write_bytes(b"not from the source")
    r = resume(env, old)
    dst = env.alice / "dts-1"
    assert tree_of(dst) == tree_of(src)
    assert r.files_resumed == len(kept) - 3


def test_a_folder_not_the_recorded_one_is_never_adopted(env: Env) -> None:
    src = make_tree(env.dts / "alice" / "dts-1", payload())
    name, rec = crash_half_way(env)
    assert resume(env, attrs.evolve(rec, ino=rec.ino + 1)).files_resumed == 0  # another inode: a look-alike
    if rec.btime_ns:  # another birth time: the inode number was reused
        assert resume(env, attrs.evolve(rec, btime_ns=rec.btime_ns + 1), attempt="3").files_resumed == 0
    assert resume(env, engine.TempRecord("1"), attempt="4").files_resumed == 0  # no inode recorded
    os.chmod(env.alice / name, 0o755)  # once others could enter it, nothing in it is trusted
    assert resume(env, rec, attempt="5").files_resumed == 0
    os.chmod(env.alice / name, 0o700)
    os.chown(env.alice / name, 1000, 1000)  # not ours
    assert resume(env, rec, attempt="6").files_resumed == 0
    os.chown(env.alice / name, 0, 0)
    assert resume(env, rec, attempt="7").files_resumed > 0  # the very folder, ours alone: kept
    published = [d for d in os.listdir(env.alice) if d.startswith("dts-1")]
    assert len(published) == 5 + bool(rec.btime_ns)
    for d in published:
        assert tree_of(env.alice / d) == tree_of(src)


def test_owner_and_mode_are_checked(env: Env) -> None:
    """With [ownership] fixed, a kept file must still have that owner; with another owner it is copied again."""
    src = make_tree(env.dts / "alice" / "dts-1", payload())
    old = crash_half_way(env, uid=1234, gid=5678)
    kept = sorted(rec["p"] for rec in journal(env, old[0]))
    os.chown(env.alice / old[0] / kept[0], 1234, 1)
    os.chmod(env.alice / old[0] / kept[1], 0o600)
    r = resume(env, old, options=CopyOptions(fsync=False, uid=1234, gid=5678))
    assert r.files_resumed == len(kept) - 2
    dst = env.alice / "dts-1"
    assert tree_of(dst) == tree_of(src)
    assert {(p.stat().st_uid, p.stat().st_gid) for p in dst.rglob("*")} == {(1234, 5678)}


@pytest.mark.parametrize("checkpoint", [None, 1])
def test_durable_records_and_hashing(env: Env, monkeypatch: pytest.MonkeyPatch, checkpoint: int | None) -> None:
    """Kept files are re-hashed unless their record is durable (a later syncfs checkpoint) and they are big.

    Without a checkpoint (the dead attempt synced nothing) every kept file is
    read and hashed again; with one after each file, only the small ones are.
    """
    src = make_tree(env.dts / "alice" / "dts-1", payload())
    old = crash_half_way(env, fsync=True, checkpoint=checkpoint)
    marks = [json.loads(x) for x in (env.alice / old[0] / engine.JOURNAL_NAME).read_text().splitlines()[1:]]
    assert any("c" in m for m in marks) == (checkpoint is not None)
    hashed: list[int] = []
    real = engine._hash_fd
    monkeypatch.setattr(engine.journal, "_hash_fd", lambda fd, size, *a: hashed.append(size) or real(fd, size, *a))
    r = resume(env, old, options=CopyOptions(fsync=True))
    assert r.files_resumed > 0
    assert tree_of(env.alice / "dts-1") == tree_of(src)
    if checkpoint is None:
        assert len(hashed) == r.files_resumed
    else:  # the last record may come after the last checkpoint
        assert all(size <= engine.CHUNK for size in hashed[:-1])
        assert len(hashed) < r.files_resumed


def test_journal_checkpoints_are_read(tmp_path: Path) -> None:
    d = tmp_path / "t"
    d.mkdir(mode=0o700)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        j = engine._Journal(fd, "xxh3", fsync=True)
        j.add([("a", 5, 1, 2, 3, "h1", [], "")])
        j.checkpoint()
        j.add([("b", 5, 4, 5, 6, "h2", ["md5:00"], "hashed")])
        j.close()
        with open(d / engine.JOURNAL_NAME, "ab") as f:
            f.write(b'{"p":"c","s":1,')  # a line cut by a crash
        recs = engine._read_journal(fd, "xxh3")
        assert set(recs) == {"a", "b"}
        assert recs["a"].durable and not recs["b"].durable
        assert recs["b"].manifest == frozenset({"md5:00"})
        assert engine._read_journal(fd, "sha256") == {}  # another checksum: nothing usable
    finally:
        os.close(fd)


def test_source_with_a_journal_named_entry_is_copied_without_journal(env: Env) -> None:
    src = make_tree(env.dts / "alice" / "dts-1", {engine.JOURNAL_NAME: b"mine\n", "a.txt": b"a"})
    r = env.copy(options=CopyOptions(fsync=False))
    assert tree_of(env.alice / r.name) == tree_of(src)


def test_manifest_hashes_must_have_been_checked(env: Env) -> None:
    """A kept file counts only if it was checked against every hash the (current) manifest gives it."""
    tree = payload()
    src = make_tree(env.dts / "alice" / "dts-1", tree)
    old = crash_half_way(env)
    kept = sorted(rec["p"] for rec in journal(env, old[0]))
    data = (src / kept[0]).read_bytes()
    (src / "manifest.json").write_text(json.dumps({"resources": [
        {"path": kept[0], "bytes": len(data), "hash": hashlib.md5(data).hexdigest()}]}))
    r = resume(env, old)
    assert r.files_resumed == len(kept) - 1
    assert tree_of(env.alice / "dts-1") == tree_of(src)


def test_no_leftovers_after_a_resumed_copy_fails(env: Env) -> None:
    src = make_tree(env.dts / "alice" / "dts-1", payload())
    old = crash_half_way(env)
    (src / "manifest.json").write_text("{not json")
    with pytest.raises(engine.TransferError):
        resume(env, old)
    assert sorted(os.listdir(env.alice)) == [old[0]]  # only the old folder, for the caller to remove


def test_kept_files_count_as_checked_by_the_manifest(env: Env) -> None:
    """Files kept from the dead attempt were checked against the manifest then: they still count as hashed."""
    src = make_tree(env.dts / "alice" / "dts-1", payload())
    files = tree_of(src)
    (src / "manifest.json").write_text(json.dumps({"resources": [
        {"path": p, "bytes": len(d), "hash": hashlib.md5(d).hexdigest()} for p, d in files.items()]}))
    old = crash_half_way(env)
    r = resume(env, old)
    assert r.files_resumed > 0
    assert r.hashed == len(files) and r.unverified == 0
    assert tree_of(env.alice / "dts-1") == tree_of(src)


# ---------------------------------------------------------------------------
# End to end: kill -9 a real twistd mid-copy, restart it, count what it copies


FAULT = "DTSBRIDGE_FAULT_PAUSE"


def proc_write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/PID/io")


def crash_service_half_way(services, tree: dict[str, Any], fsync: str = "true") -> tuple[Any, str, Path, list[dict[str, Any]]]:
    """A twistd (one copy thread, no worker processes) killed -9 once half a job's bytes are verified."""
    svc = services({"copy": {"threads": "1", "processes": "0", "lease_seconds": "90", "fsync": fsync}},
                   env={FAULT: "half:300"}, start=False)
    make_tree(svc.dts_root / "run1", tree)
    svc.start()
    r = svc.complete("alice", "run1", asynchronous=True)
    assert r.status == 202, r
    job_id = r.json()["job_id"]
    wait_until(lambda: "fault point half reached" in svc.log_text(), 60, "the half-way fault point", svc.log_tail)
    temps = [n for n in os.listdir(svc.user_root / "alice") if n.startswith(f".dtsbridge-{job_id}-")]
    assert len(temps) == 1, temps
    old = svc.user_root / "alice" / temps[0]
    lines = (old / engine.JOURNAL_NAME).read_text().splitlines()[1:]
    recorded = [json.loads(x) for x in lines if "p" in json.loads(x)]
    svc.kill()
    svc.extra_env.pop(FAULT)
    return svc, job_id, old, recorded


@pytest.mark.timeout(180)
def test_restart_after_kill9_copies_only_the_remainder(services) -> None:
    tree = payload(n=16, size=1_500_000)
    svc, job_id, old, recorded = crash_service_half_way(services, tree)
    files = tree_of(svc.dts_root / "run1")
    total = sum(len(d) for d in files.values())
    kept_bytes = sum(r["s"] for r in recorded)
    assert 2 * kept_bytes >= total - 1_500_000 and len(recorded) < len(files)

    svc.start()
    assert svc.proc is not None
    pid = svc.proc.pid
    job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=90)
    written = proc_write_bytes(pid)
    assert job["status"] == "SUCCESS", job
    assert tree_of(svc.user_root / "alice" / "run1") == files  # every byte right
    assert job["files_resumed"] == len(recorded) and job["bytes_resumed"] == kept_bytes, job
    assert job["attempts"] == 2
    assert job["files_done"] == len(files) and job["bytes_done"] == total
    assert "resumed" in job["detailed_status"]
    # The restarted process wrote the remainder, not the whole (slack: its log, the journal).
    remainder = total - kept_bytes
    assert remainder * 0.9 <= written <= remainder + 512 * 1024, (written, remainder, total)
    assert leftovers(svc.user_root) == []  # the dead attempt's folder is gone too
    assert not old.exists()
    # The engine's own log line reaches the service's log, naming the job.
    assert f"[dtsbridge.engine.journal#info] job {job_id}: resumed {len(recorded)} files" in svc.log_text()


@pytest.mark.timeout(180)
def test_restart_recopies_a_kept_file_that_does_not_check_out(services) -> None:
    tree = payload(n=12, size=1_000_000)
    svc, job_id, old, recorded = crash_service_half_way(services, tree, fsync="false")
    victim = old / recorded[0]["p"]
    st = victim.stat()
    with open(victim, "r+b") as f:  # same size and times, one bit different
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 0x40]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    svc.start()
    job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=90)
    assert job["status"] == "SUCCESS", job
    assert tree_of(svc.user_root / "alice" / "run1") == tree_of(svc.dts_root / "run1")
    assert job["files_resumed"] == len(recorded) - 1, job
    assert leftovers(svc.user_root) == []
    assert (f"[dtsbridge.engine.journal#warn] job {job_id}: resume: {recorded[0]['p']!r} does not match its "
            "record; copying it again") in svc.log_text()


@pytest.mark.parametrize("processes", [0, 2])
def test_every_verified_file_is_journaled(env: Env, monkeypatch: pytest.MonkeyPatch, processes: int) -> None:
    """Files copied by threads and by worker processes alike are recorded (by the service's process)."""
    tree = {f"d{i % 3}": {} for i in range(3)}
    for i in range(60):
        tree[f"d{i % 3}"][f"f{i}.dat"] = os.urandom(5000 + i)  # type: ignore[index]
    tree["big.bin"] = os.urandom(5 * MiB)
    src = make_tree(env.dts / "alice" / "dts-1", tree)
    seen: list[tuple[Any, ...]] = []
    real = engine._Journal.add
    monkeypatch.setattr(engine._Journal, "add", lambda self, recs, *a: seen.extend(recs) or real(self, recs, *a))
    with engine.CopyExecutor(4) as ex:
        env.copy(options=CopyOptions(fsync=False, processes=processes), executor=ex)
    files = tree_of(src)
    assert sorted(r[0] for r in seen) == sorted(files)
    assert all(r[1] == len(files[r[0]]) for r in seen)


@contextlib.contextmanager
def slow_disk_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, int, threading.Event,
                                                                                        threading.Event]]:
    """A journal checkpointing every 10 bytes whose syncfs waits for ``release`` (``held``: one is waiting)."""
    monkeypatch.setattr(engine.journal, "CHECKPOINT_BYTES", 10)
    held, release = threading.Event(), threading.Event()
    real = engine.journal._syncfs

    def slow_disk(fd: int) -> None:
        held.set()
        assert release.wait(30)
        real(fd)

    monkeypatch.setattr(engine.journal, "_syncfs", slow_disk)
    d = tmp_path / "t"
    d.mkdir(mode=0o700)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        j = engine._Journal(fd, "xxh3", fsync=True)
        j.add([("a", 20, 1, 2, 3, "h1", [], "")], background=True)
        assert held.wait(10)  # the checkpoint waits for the disk, the adder does not
        j.add([("b", 20, 4, 5, 6, "h2", [], "")], background=True)  # due again meanwhile
        yield j, fd, held, release
    finally:
        os.close(fd)


def test_a_checkpoint_due_from_the_batch_collector_runs_beside_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Records from worker processes: the thread handing out their batches never waits for the disk;
    checkpoints run one at a time beside it, and close waits for the one under way."""
    with slow_disk_journal(tmp_path, monkeypatch) as (j, fd, held, release):
        closer = threading.Thread(target=j.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive()  # close waits for the checkpoint under way
        release.set()
        closer.join(30)
        assert not closer.is_alive()
        assert set(engine._read_journal(fd, "xxh3")) == {"a", "b"}


def test_background_checkpoints_cover_records_added_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint asked for while one ran runs next: both records end up durable."""
    with slow_disk_journal(tmp_path, monkeypatch) as (j, fd, held, release):
        release.set()
        deadline = time.monotonic() + 10
        while j._syncer is not None and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.01)
        j.close()
        recs = engine._read_journal(fd, "xxh3")
        assert recs["a"].durable and recs["b"].durable
