"""Copying one file: read once, write and hash in one pass, read back and hash again; or clone (FICLONE)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import blake3
import xxhash

from dtsbridge.errors import (BAD_REQUEST, CANCELLED, CHECKSUM_MISMATCH, MANIFEST_MISMATCH, SOURCE_CHANGED,
                              UNSAFE_ENTRY, TransferError)
from dtsbridge.engine.data import (CHECKSUMS, CHUNK, UNVERIFIED_NAMES, CopyOptions, Faults, Plan, _DirEntry,
                                   _FileEntry)
from dtsbridge.engine.beneath import (SYNC_FILE_RANGE_WRITE, _DIR_FLAGS, _DST_FLAGS, _SRC_FLAGS, _close,
                                      _libc, open_beneath)
from dtsbridge.engine.manifest import ETAG, _ETagCheck
from dtsbridge.engine.scanner import _open_source_subdir

if TYPE_CHECKING:
    from dtsbridge.engine.journal import _Journal

log = logging.getLogger(__name__)

PROGRESS_STEP = 1024 * 1024
#: Permission bits a copied file or folder may keep: the owner's and group's rwx and
#: the others' r-x.  Never world-writable, never setuid, setgid or sticky (README: Security).
MODE_MASK = 0o775

#: With ``fsync`` on, writeback of a big file's data is started every this many
#: bytes (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so
#: the disk writes while the copy goes on and the final ``syncfs`` has little left.
WRITEBACK_STEP = 8 * 1024 * 1024


# --------------------------------------------------------------------------
# Copy


def _new_hash(name: str) -> Any:
    if name == "xxh3":
        return xxhash.xxh3_128()
    if name == "blake3":
        return blake3.blake3()
    if name in ("sha256", "md5"):
        return hashlib.new(name)
    raise TransferError(BAD_REQUEST, f"unknown checksum {name!r} (one of {', '.join(CHECKSUMS)})")


class _Job:
    """Shared state of one copy: counters, stop flag, source/temp descriptors."""

    def __init__(self, srcfd: int, tmpfd: int, dev: int, plan: Plan, options: CopyOptions,
                 on_progress: Callable[[int, int], None], should_stop: Callable[[], bool]) -> None:
        self.srcfd = srcfd
        self.tmpfd = tmpfd
        self.dev = dev
        self.plan = plan
        self.options = options
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.abort = threading.Event()
        self.lock = threading.Lock()
        self.files_done = 0
        self.bytes_done = 0
        self.hashes = plan.manifest.hashes if plan.manifest else {}
        self.hashed = 0  # files checked by a manifest hash
        self.unverified = 0  # files whose only manifest hash is an ETag no part size matched
        self.unverified_names: list[str] = []
        self.faults_fired: set[str] = set()
        self.faults = options.faults
        self.owner = None if options.uid is None and options.gid is None else (
            -1 if options.uid is None else options.uid, -1 if options.gid is None else options.gid)
        self.umask = _current_umask()
        # Cloning is tried only when both trees are on one filesystem; the first
        # "cannot clone here" answer turns it off for the rest of the job.
        self.reflink = options.reflink == "auto" and _same_fs(srcfd, tmpfd)
        self.files_cloned = 0
        self.bytes_cloned = 0
        #: Where verified files are recorded: the job's journal (main process), or a list
        #: sent back to it (worker processes); None: not recorded.
        self.journal: _Journal | None = None
        self.records: list[tuple[Any, ...]] | None = None
        self.files_resumed = 0
        self.bytes_resumed = 0

    def fault_once(self, name: str) -> None:
        """Test-only: pause at ``name`` (see :class:`Faults`) the first time this job reaches it."""
        if not self.faults:
            return
        with self.lock:
            if name in self.faults_fired:
                return
            self.faults_fired.add(name)
        self.faults.pause(name)

    def claim_faults(self, points: set[str]) -> Faults:
        """The pauses among ``points`` not yet reached, now counted as reached: for a worker
        process to make (each still once per job, whoever copies the file that reaches it)."""
        if not self.faults:
            return self.faults
        with self.lock:
            left = points - self.faults_fired
            self.faults_fired |= left
        return self.faults.only(left)

    def check_stop(self) -> None:
        if self.abort.is_set():
            raise TransferError(CANCELLED, "stopped because another file failed")
        if self.should_stop():
            raise TransferError(CANCELLED, "cancelled")

    def checked(self, hashed: int, unverified: int, names: list[str] | tuple[str, ...]) -> None:
        """Count files checked against the manifest's hashes (and those no ETag candidate matched)."""
        with self.lock:
            self.hashed += hashed
            self.unverified += unverified
            room = UNVERIFIED_NAMES - len(self.unverified_names)
            if room > 0:
                self.unverified_names.extend(names[:room])

    def progress(self, nbytes: int, files: int) -> None:
        with self.lock:
            self.bytes_done += nbytes
            self.files_done += files
            self.on_progress(self.files_done, self.bytes_done)

    def cloned(self, nbytes: int, files: int = 1) -> None:
        with self.lock:
            self.files_cloned += files
            self.bytes_cloned += nbytes

    def verified(self, entry: _FileEntry, dfd: int, st: os.stat_result, digest: str, checked: str) -> None:
        """Record a file completely written, verified and owned (for a later attempt to keep).

        ``checked``: what the manifest's hashes said (see :func:`_check_manifest_hashes`).
        """
        rec = (entry.rel, st.st_size, os.fstat(dfd).st_ino, st.st_ino, st.st_mtime_ns, digest,
               _manifest_words(self.hashes.get(entry.rel, ())), checked)
        if self.records is not None:
            self.records.append(rec)
        elif self.journal is not None:
            self.journal_add([rec])

    def journal_add(self, recs: list[tuple[Any, ...]], checkpoint: bool = True, background: bool = False) -> None:
        if self.journal is None:
            return
        self.journal.add(recs, checkpoint, background)
        if self.faults and 2 * self.journal.recorded >= self.plan.bytes:
            self.fault_once("half")


def _same_fs(srcfd: int, tmpfd: int) -> bool:
    try:
        return os.fstat(srcfd).st_dev == os.fstat(tmpfd).st_dev
    except OSError:
        return False


#: ``ioctl(dst, FICLONE, src)``: make ``dst`` share all of ``src``'s blocks (linux/fs.h).
FICLONE = 0x40049409
#: Answers that mean "this filesystem (pair) cannot clone": copy instead, and stop trying for this job.
_NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS})


def _clone(job: _Job, sfd: int, dfd: int) -> bool:
    """Try to clone ``sfd`` into the new, empty ``dfd``; False (and no more tries) when it cannot be done."""
    if not job.reflink:
        return False
    try:
        fcntl.ioctl(dfd, FICLONE, sfd)
        return True
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise
        job.reflink = False
        log.info("cloning is not possible here (%s); copying instead", exc.strerror)
        if os.fstat(dfd).st_size:  # never happens for these answers; stay exact anyway
            os.ftruncate(dfd, 0)
        return False


_buffers = threading.local()


def _buffer() -> memoryview:
    """This thread's reusable copy buffer (``CHUNK`` bytes; shared by every job the thread runs)."""
    mv = getattr(_buffers, "buf", None)
    if mv is None or len(mv) != CHUNK:
        mv = _buffers.buf = memoryview(bytearray(CHUNK))
    return mv


def _current_umask() -> int | None:
    """The process umask, read without changing it (``None`` when /proc does not say)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range to disk now (best effort: errors show at syncfs)."""
    _libc.sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


class _Dirs:
    """The source and temp-folder descriptors of the folder a worker is in (reused for its neighbours).

    The folder is resolved beneath the job's descriptors with :func:`open_beneath`;
    a file is then opened by its single name with ``O_NOFOLLOW`` relative to it,
    which is exactly as strict and saves resolving the whole path per file.
    """

    __slots__ = ("rel", "src", "dst")

    def __init__(self) -> None:
        self.rel: str | None = None
        self.src: int | None = None
        self.dst: int | None = None

    def get(self, job: _Job, parent: str) -> tuple[int, int]:
        if parent != self.rel or self.src is None or self.dst is None:
            self.close()
            self.src = _open_source_subdir(job.srcfd, parent, "the copy")
            self.dst = open_beneath(job.tmpfd, parent, _DIR_FLAGS)
            self.rel = parent
        return self.src, self.dst

    def close(self) -> None:
        _close(self.src)
        _close(self.dst)
        self.rel = self.src = self.dst = None


def _copy_file(job: _Job, entry: _FileEntry, dirs: _Dirs | None = None) -> int:
    """Copy, hash, verify and own one file inside the temp folder; returns bytes not yet reported.

    Each source chunk is read once and, while it is in the buffer, written and
    fed to the verification hash (and to any hash the manifest gives); the copy
    is then read back in full and hashed again.  Reads stop at the size the
    scan saw; the source's ``fstat`` before and after tells whether it changed.
    """
    job.check_stop()
    rel = entry.rel
    own = dirs is None
    if own:
        dirs = _Dirs()
    assert dirs is not None
    try:
        parent, _, name = rel.rpartition("/")
        sdir, ddir = dirs.get(job, parent)
        try:
            sfd = open_beneath(sdir, name, _SRC_FLAGS)  # no link, no mount (a bind-mounted file)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENXIO):
                raise TransferError(UNSAFE_ENTRY, f"{rel!r} became unsafe during the copy") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise TransferError(SOURCE_CHANGED, f"{rel!r} vanished during the copy") from None
            raise
        try:
            st = os.fstat(sfd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1 or st.st_dev != job.dev:
                raise TransferError(UNSAFE_ENTRY, f"{rel!r} became unsafe during the copy")
            size = st.st_size
            if st.st_ino != entry.ino or size != entry.size:
                raise TransferError(SOURCE_CHANGED, f"{rel!r} changed since the scan")
            mode = st.st_mode & MODE_MASK
            # Created with its final mode when the umask keeps it (inside the 0700 temp folder
            # nobody else can reach it before publishing); otherwise fchmod'ed below.
            exact = job.umask is not None and mode & ~job.umask == mode
            dfd = os.open(name, _DST_FLAGS, mode if exact else 0o600, dir_fd=ddir)
            try:
                return _copy_data(job, entry, sfd, dfd, st, exact)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    finally:
        if own:
            dirs.close()


def _copy_data(job: _Job, entry: _FileEntry, sfd: int, dfd: int, st: os.stat_result, exact: bool) -> int:
    if entry.size and _clone(job, sfd, dfd):
        return _check_clone(job, entry, sfd, dfd, st, exact)
    rel = entry.rel
    size = st.st_size
    checksum = job.options.checksum
    main = _new_hash(checksum)
    wanted, extra = _manifest_hashers(job, rel, size)
    buf = _buffer()
    blen = len(buf)
    total = 0
    pending = 0
    flushed = 0
    writeback = job.options.fsync and size >= WRITEBACK_STEP
    while total < size:
        job.check_stop()
        n = os.readv(sfd, [buf[:min(blen, size - total)]])
        if n == 0:
            break
        chunk = buf[:n]
        _write_all(dfd, chunk)
        if total == 0:
            job.fault_once("copy")
        main.update(chunk)
        for h in extra:
            h.update(chunk)
        total += n
        pending += n
        if pending >= PROGRESS_STEP:
            job.progress(pending, 0)
            pending = 0
        if writeback and total - flushed >= WRITEBACK_STEP:
            _start_writeback(dfd, flushed, total - flushed)
            flushed = total
    if writeback and total > flushed:
        _start_writeback(dfd, flushed, total - flushed)
    st2 = os.fstat(sfd)
    if total != entry.size or st2.st_size != size or st2.st_mtime_ns != st.st_mtime_ns:
        raise TransferError(SOURCE_CHANGED, f"{rel!r} changed while it was copied")
    checked = _check_manifest_hashes(job, rel, wanted, extra)
    job.fault_once("verify")
    # Read the whole copy back (asking for one byte more than written, so a longer file shows).
    check = _new_hash(checksum)
    off, _ = _read_hashing(job, dfd, total, [check], False)
    if off != total or check.digest() != main.digest():
        raise TransferError(CHECKSUM_MISMATCH, f"the copy of {rel!r} does not match its source")
    _finish_file(job, dfd, st, exact)
    job.verified(entry, dfd, st, main.hexdigest(), checked)
    return pending


def _read_hashing(job: _Job, fd: int, size: int, hashers: list[Any], count: bool) -> tuple[int, int]:
    """Read ``fd`` from its start into this thread's buffer, asking for one byte more than
    ``size`` (so a longer file shows), and feed every hasher; returns (bytes read, bytes not yet
    reported).  ``count``: the bytes are progress (else a keep-alive every MiB: a long read is no stall)."""
    buf = _buffer()
    blen = len(buf)
    off = pending = 0
    while True:
        job.check_stop()
        want = min(blen, size + 1 - off)
        n = os.preadv(fd, [buf[:want]], off)
        if n:
            chunk = buf[:n]
            for h in hashers:
                h.update(chunk)
            off += n
            pending += n
            if pending >= PROGRESS_STEP:
                job.progress(pending if count else 0, 0)
                pending = 0
        if n < want or off > size:
            return off, pending if count else 0


def _manifest_hashers(job: _Job, rel: str, size: int) -> tuple[tuple[tuple[str, str], ...], list[Any]]:
    """The manifest's hashes for ``rel`` and one hasher for each (fed in the same read pass)."""
    wanted = job.hashes.get(rel, ())
    return wanted, [_ETagCheck(hexd, size) if algo == ETAG else hashlib.new(algo) for algo, hexd in wanted]


def _check_manifest_hashes(job: _Job, rel: str, wanted: tuple[tuple[str, str], ...], extra: list[Any]) -> str:
    """Compare what was read with the manifest's hashes and count the file as hashed or unverified.

    A hash that differs fails the job, except a multipart ETag: one that no likely
    part size matches is no sign of corruption (the part size is unknown), so the
    file counts as unverified (it was checked by size).  Returns ``"hashed"``,
    ``"unverified"`` or ``""`` (the manifest gives no hash), for the journal.
    """
    if not wanted:
        return ""
    verified = False
    for h, (algo, hexd) in zip(extra, wanted):
        if algo == ETAG:
            verified = verified or h.matches()
        elif h.hexdigest() != hexd:
            raise TransferError(MANIFEST_MISMATCH,
                                f"manifest.json: {algo} of {rel!r} is {h.hexdigest()}, the manifest says {hexd}")
        else:
            verified = True
    if verified:
        job.checked(1, 0, ())
        return "hashed"
    job.checked(0, 1, (rel,))
    return "unverified"


def _finish_file(job: _Job, dfd: int, st: os.stat_result, exact: bool) -> None:
    """Give a verified file its owner, mode and times (the source's)."""
    if job.owner is not None:
        os.fchown(dfd, *job.owner)
    if not exact:
        os.fchmod(dfd, st.st_mode & MODE_MASK)
    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _check_clone(job: _Job, entry: _FileEntry, sfd: int, dfd: int, st: os.stat_result, exact: bool) -> int:
    """Verify a clone: it shares the source's blocks, so they are read (hashed) once.

    The clone is a point-in-time copy of the whole source; an unchanged source
    ``fstat`` (size and mtime) after it means it holds what the scan saw.  The
    shared blocks are then read once, through the source's descriptor (whose
    pages are the ones likely in memory: the clone's are not, even though they
    are the same blocks on disk), at the scanned size, hashed for the journal
    and checked against the manifest's hashes when there are some; a source
    still unchanged after that read means what was read is what the clone holds.
    """
    rel = entry.rel
    size = st.st_size
    st2 = os.fstat(sfd)
    if st2.st_size != size or st2.st_mtime_ns != st.st_mtime_ns or os.fstat(dfd).st_size != size:
        raise TransferError(SOURCE_CHANGED, f"{rel!r} changed while it was cloned")
    job.fault_once("copy")
    main = _new_hash(job.options.checksum)
    wanted, extra = _manifest_hashers(job, rel, size)
    off, pending = _read_hashing(job, sfd, size, [main, *extra], True)
    st3 = os.fstat(sfd)
    if st3.st_size != size or st3.st_mtime_ns != st.st_mtime_ns:
        raise TransferError(SOURCE_CHANGED, f"{rel!r} changed while it was cloned")
    if off != size:
        raise TransferError(CHECKSUM_MISMATCH, f"the clone of {rel!r} does not match its source")
    checked = _check_manifest_hashes(job, rel, wanted, extra)
    job.fault_once("verify")
    job.cloned(size)
    _finish_file(job, dfd, st, exact)
    job.verified(entry, dfd, st, main.hexdigest(), checked)
    return pending


def _set_dir_attrs(fd: int, d: _DirEntry, options: CopyOptions) -> None:
    if options.uid is not None or options.gid is not None:
        os.fchown(fd, -1 if options.uid is None else options.uid, -1 if options.gid is None else options.gid)
    os.fchmod(fd, d.mode & MODE_MASK)
    os.utime(fd, ns=(d.atime_ns, d.mtime_ns))


#: Files at least this large are copied one per task (largest first); smaller
#: ones go in batches of neighbours (same folder), which share folder

def _manifest_words(wanted: Any) -> list[str]:
    """The manifest hashes a file was checked against, as ``algorithm:hex`` words."""
    return sorted(f"{algo}:{hexd}" for algo, hexd in wanted)


