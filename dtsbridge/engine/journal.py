"""Resuming after a crash: the journal of verified files and the salvage of an earlier attempt's folder.

Each verified file is recorded, as the copy goes, in an append-only journal
inside the job's own temporary folder (mode 0700, owned by the service, so
nobody else can reach it).  A line is written only once its file is
completely written, verified and owned.  With ``fsync`` on, every
CHECKPOINT_BYTES of recorded data the filesystem is synced (``syncfs``, the
same call that precedes publishing, brought forward) and a checkpoint line
says how many records that sync made durable.  A later attempt of the same
job (after a crash) is told which folder the previous attempt made (the
caller's own record: name, device, inode) and moves into its new folder
every file that still checks out: same size, inode, owner, mode and time as
recorded, from a source file that is unchanged since (inode, size, mtime),
and the same hash when reading it is cheap (small files) or when the data
may not have reached the disk (records after the last checkpoint).
Everything else is copied again; nothing in the old folder is trusted
because of its name.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import stat
import threading
from typing import Any

import attrs

from dtsbridge.errors import UNSAFE_DESTINATION, TransferError
from dtsbridge.engine.data import CHUNK, TempRecord
from dtsbridge.engine.beneath import (RENAME_NOREPLACE, _DIR_FLAGS, _close, _fd, _renameat2, _syncfs,
                                      open_beneath)
from dtsbridge.engine.remove import _is_recorded, _open_child_dir
from dtsbridge.engine.copyfile import MODE_MASK, _Job, _buffer, _manifest_words, _new_hash, _write_all

log = logging.getLogger(__name__)

#: The journal's name, at the top of the temporary folder (a source holding an
#: entry of that name at its top gets no journal: it cannot be resumed).
JOURNAL_NAME = ".dtsbridge-journal"
JOURNAL_MAX_BYTES = 512 * 1024 * 1024
#: With ``fsync``, the filesystem is synced and a checkpoint recorded every this many journaled bytes.
CHECKPOINT_BYTES = 256 * 1024 * 1024
_JOURNAL_VERSION = 1
#: One compact JSON encoder for every line (``json.dumps`` with options builds a new one per call).
_encode = json.JSONEncoder(separators=(",", ":")).encode


class _Journal:
    """The append-only record of a job's verified files (main process only; thread-safe)."""

    def __init__(self, dirfd: int, checksum: str, fsync: bool) -> None:
        self.dirfd = dirfd
        self.fd: int | None = os.open(JOURNAL_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                                      | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        self.fsync = fsync
        self.lock = threading.Lock()
        self.sync_lock = threading.Lock()
        self.lines = 0  # records written
        self.recorded = 0  # their bytes
        self.unsynced = 0
        self._syncer: threading.Thread | None = None  # the background checkpoint, while one runs
        self._again = False  # another was asked for meanwhile
        self._write([{"v": _JOURNAL_VERSION, "checksum": checksum}])

    def _write(self, objs: list[dict[str, Any]]) -> None:
        if self.fd is None:
            return
        data = "".join([_encode(o) + "\n" for o in objs]).encode()
        _write_all(self.fd, memoryview(data))  # O_APPEND: one write per call, never interleaved

    def add(self, recs: list[tuple[Any, ...]], checkpoint: bool = True, background: bool = False) -> None:
        """Append records; with ``checkpoint`` (files written by this attempt) they count towards the next sync.

        ``background``: a checkpoint that falls due runs in a thread of its own (for the
        thread that hands batches to the worker processes: while it waited for the disk,
        ~0.2 s per 256 MiB of small files here, the workers ran out of work).
        """
        if not recs:
            return
        objs = [{"p": rel, "s": size, "i": ino, "si": sino, "m": mtime, "h": digest, "mh": mh, "mr": mr}
                for rel, size, ino, sino, mtime, digest, mh, mr in recs]
        with self.lock:
            self._write(objs)
            self.lines += len(objs)
            nbytes = sum(r[1] for r in recs)
            self.recorded += nbytes
            if checkpoint:
                self.unsynced += nbytes
            due = self.fsync and self.unsynced >= CHECKPOINT_BYTES
            if due:
                self.unsynced = 0
        if due:
            if background:
                self._checkpoint_soon()
            else:
                self.checkpoint()

    def _checkpoint_soon(self) -> None:
        """Checkpoint in a background thread: one at a time, and once more after it if asked meanwhile."""
        with self.lock:
            if self._syncer is not None:
                self._again = True
                return
            t = self._syncer = threading.Thread(target=contextvars.copy_context().run, args=(self._sync_loop,),
                                                name="dtsbridge-checkpoint", daemon=True)
        t.start()

    def _sync_loop(self) -> None:
        while True:
            self.checkpoint()
            with self.lock:
                if not self._again or self.fd is None:
                    self._syncer = None
                    return
                self._again = False

    def checkpoint(self) -> None:
        """syncfs, then record that every line written before it is on disk with its file's data."""
        if not self.sync_lock.acquire(blocking=False):
            return  # another thread is at it
        try:
            with self.lock:
                upto = self.lines
            _syncfs(self.dirfd)
            with self.lock:
                self._write([{"c": upto}])
        except OSError as exc:  # the final syncfs will report it; a resume just hashes more
            log.warning("journal checkpoint failed: %s", exc)
        finally:
            self.sync_lock.release()

    def close(self) -> None:
        """Close the journal, once a background checkpoint (which syncs its folder) is done."""
        with self.lock:
            fd, self.fd = self.fd, None
            syncer = self._syncer
        if syncer is not None:
            syncer.join()
        _close(fd)



@attrs.frozen
class _Record:
    size: int
    ino: int
    src_ino: int
    mtime_ns: int
    digest: str
    durable: bool
    manifest: frozenset[str] = frozenset()
    checked: str = ""


def _read_journal(dirfd: int, checksum: str) -> dict[str, _Record]:
    """The verified files an earlier attempt recorded in ``dirfd`` (empty when unusable)."""
    try:
        fd = os.open(JOURNAL_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return {}
    with _fd(fd):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1 \
                or st.st_size > JOURNAL_MAX_BYTES:
            return {}
        chunks = []
        while True:
            b = os.read(fd, 1024 * 1024)
            if not b:
                break
            chunks.append(b)
    lines = b"".join(chunks).split(b"\n")
    raw: list[tuple[str, tuple[int, int, int, int, str], frozenset[str], str]] = []
    durable_upto = 0
    for i, line in enumerate(lines):
        try:
            o = json.loads(line)
        except ValueError:  # e.g. the last line, cut by the crash
            continue
        if not isinstance(o, dict):
            continue
        if i == 0:
            if o.get("v") != _JOURNAL_VERSION or o.get("checksum") != checksum:
                return {}
            continue
        if "c" in o:
            if isinstance(o["c"], int):
                durable_upto = max(durable_upto, o["c"])
            continue
        try:
            rel, size, ino, sino, mtime, digest, mh, mr = (o["p"], o["s"], o["i"], o["si"], o["m"], o["h"],
                                                           o["mh"], o["mr"])
        except KeyError:
            continue
        if isinstance(rel, str) and isinstance(digest, str) and isinstance(mh, list) and isinstance(mr, str) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in (size, ino, sino, mtime)):
            raw.append((rel, (size, ino, sino, mtime, digest), frozenset(w for w in mh if isinstance(w, str)), mr))
    out: dict[str, _Record] = {}
    for n, (rel, (size, ino, sino, mtime, digest), mh, mr) in enumerate(raw):
        out[rel] = _Record(size, ino, sino, mtime, digest, durable=n < durable_upto, manifest=mh, checked=mr)
    return out


def _hash_fd(fd: int, size: int, checksum: str, job: _Job) -> str | None:
    """Hash a file of ``size`` bytes; None if it holds another number of bytes."""
    h = _new_hash(checksum)
    buf = _buffer()
    off = 0
    while True:
        job.check_stop()
        want = min(len(buf), size + 1 - off)
        n = os.preadv(fd, [buf[:want]], off)
        if n:
            h.update(buf[:n])
            off += n
        if n < want or off > size:
            break
    return h.hexdigest() if off == size else None


def _salvage(job: _Job, parentfd: int, name: str, rec: TempRecord) -> set[str]:
    """Move the still-good verified files of an earlier attempt's folder into this attempt's; their paths.

    The old folder ``name`` must be the very one ``rec`` recorded (device,
    inode, birth time: :func:`_is_recorded`), still the service's with mode
    0700 (as made, never yet given to the user: nobody else could have entered
    it).  Each kept file is checked
    (see the module docstring) through a descriptor opened without following
    links, then renamed into the same place in the new folder
    (``RENAME_NOREPLACE``) and recorded in the new journal.  A file that does
    not check out is left where it is (the caller removes the old folder) and
    copied again.
    """
    if rec.pending:
        return set()
    try:
        oldfd = _open_child_dir(parentfd, name)
    except OSError:
        oldfd = None
    if oldfd is None:
        return set()
    dev = rec.dev
    kept: set[str] = set()
    with _fd(oldfd):
        st = os.fstat(oldfd)
        if not _is_recorded(oldfd, rec) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
            log.warning("not resuming from %s: it is not the folder recorded, or not ours alone", name)
            return set()
        records = _read_journal(oldfd, job.options.checksum)
        if not records:
            return set()
        want_uid = os.geteuid() if job.options.uid is None else job.options.uid
        want_gid = job.options.gid
        entries = sorted((f for f in job.plan.file_list if f.rel in records), key=lambda f: f.rel)
        olddirs: dict[str, int | None] = {}
        newdirs: dict[str, int] = {}
        moved: list[tuple[Any, ...]] = []
        try:
            for f in entries:
                job.check_stop()
                r = records[f.rel]
                if (r.size, r.src_ino, r.mtime_ns) != (f.size, f.ino, f.mtime_ns):
                    continue  # the source changed since: copy it again
                mh = _manifest_words(job.hashes.get(f.rel, ()))
                if mh != sorted(r.manifest) or (mh and r.checked not in ("hashed", "unverified")):
                    continue  # checked against other manifest hashes than today's
                parent, _, fname = f.rel.rpartition("/")
                if parent not in olddirs:
                    try:
                        olddirs[parent] = open_beneath(oldfd, parent, _DIR_FLAGS | os.O_NONBLOCK)
                    except OSError:
                        olddirs[parent] = None
                odir = olddirs[parent]
                if odir is None:
                    continue
                try:
                    fd = os.open(fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=odir)
                except OSError:
                    continue
                with _fd(fd):
                    fst = os.fstat(fd)
                    if (not stat.S_ISREG(fst.st_mode) or fst.st_nlink != 1 or fst.st_dev != dev
                            or fst.st_ino != r.ino or fst.st_size != f.size or fst.st_mtime_ns != f.mtime_ns
                            or fst.st_uid != want_uid or (want_gid is not None and fst.st_gid != want_gid)
                            or stat.S_IMODE(fst.st_mode) != f.mode & MODE_MASK):
                        continue
                    if (not r.durable or f.size <= CHUNK) and _hash_fd(fd, f.size, job.options.checksum, job) != r.digest:
                        log.warning("resume: %r does not match its record; copying it again", f.rel)
                        continue
                    if parent not in newdirs:
                        newdirs[parent] = open_beneath(job.tmpfd, parent, _DIR_FLAGS)
                    ndir = newdirs[parent]
                    try:
                        _renameat2(odir, fname, ndir, fname, RENAME_NOREPLACE)
                    except OSError as exc:
                        log.warning("resume: cannot move %r: %s", f.rel, exc)
                        continue
                    if os.stat(fname, dir_fd=ndir, follow_symlinks=False).st_ino != r.ino:
                        raise TransferError(UNSAFE_DESTINATION, f"{f.rel!r} changed while it was moved")
                kept.add(f.rel)
                moved.append((f.rel, f.size, r.ino, f.ino, f.mtime_ns, r.digest, mh, r.checked))
                if r.checked == "hashed":
                    job.checked(1, 0, ())
                elif r.checked == "unverified":
                    job.checked(0, 1, (f.rel,))
                job.files_resumed += 1
                job.bytes_resumed += f.size
                if len(moved) >= 256:  # (moved, not written: no sync is due for them)
                    job.journal_add(moved, checkpoint=False)
                    moved = []
        finally:
            job.journal_add(moved, checkpoint=False)
            for dirfd in (*olddirs.values(), *newdirs.values()):
                _close(dirfd)
    if kept:
        job.progress(job.bytes_resumed, job.files_resumed)
        log.info("resumed %d files (%d bytes) from %s", job.files_resumed, job.bytes_resumed, name)
    return kept


