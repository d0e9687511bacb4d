"""The copy engine: verified, link-safe copies of a DTS folder into a datastore.

Synchronous code meant to run in worker threads; it imports nothing from
Twisted.  Every path that comes from a request or a manifest is untrusted:

* the source is resolved beneath ``dts_root`` with ``openat2`` and
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
  RESOLVE_NO_XDEV`` (or, when the kernel lacks it, a component-by-component
  ``O_NOFOLLOW | O_DIRECTORY`` walk from held directory descriptors);
* every open, mkdir, chown and rename in both trees is relative to a held
  directory descriptor and never follows a symbolic link;
* the copy is built in a hidden temporary folder (mode 0700, owned by the
  service) beside its final place and published with
  ``renameat2(..., RENAME_NOREPLACE)``, so nothing existing is ever replaced.

Speed, by design (see docs/performance.md): each source chunk is read once
into a reused buffer, written and hashed while it is there (xxh3-128 by
default; the manifest's own hash in the same pass when it gives one, an S3
multipart ETag for each likely part size), then the
whole copy is read back and hashed again; big files go to threads, largest
first; batches of small files go to a few worker processes
(``CopyOptions.processes``, started once through a ``forkserver``), because
their per-file Python work would otherwise serialise the threads on the GIL.
When the DTS area and the datastore are one filesystem that can share blocks
(``CopyOptions.reflink = "auto"``: XFS with reflink, btrfs), each file is
cloned with ``ioctl(FICLONE)`` instead, through the very descriptors a copy
would use, and the clone is read and hashed once (against the manifest's
hashes when it gives some); the first "cannot clone here" answer
(``EOPNOTSUPP``, ``EXDEV``, ``EINVAL``, ``ENOTTY``) makes the rest of the job copy.

On any failure everything made for the job is removed (the temporary folder
and all it holds) and a :class:`~dtsbridge.errors.TransferError` is raised.
Missing ``target_subdir`` folders that the engine created stay: they are
empty, belong to the user (when an owner is configured) and are harmless.

Test-only hook (no effect when unset): the environment variable
``DTSBRIDGE_FAULT_PAUSE`` (``point:seconds``, several separated by commas,
e.g. ``verify:30``) makes :func:`_fault_point` write ``fault point <point>
reached`` to stderr and sleep that long, so fault-injection tests can
``kill -9`` the process at a known moment.  Points: ``copy`` (after the first
chunk of a job's first file is written), ``verify`` (after a job's first file
is written, before it is re-read), ``publish`` (right before the publish
fence and rename), ``published`` (right after the rename, before the job's
final state is recorded) and ``half`` (once the job's journal has recorded at
least half of its bytes as verified: resume tests kill there).
"""

from __future__ import annotations

import codecs
import concurrent.futures
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import re
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import attrs
import blake3
import xxhash

from dtsbridge.errors import (
    BAD_REQUEST,
    CANCELLED,
    CHECKSUM_MISMATCH,
    INTERNAL,
    IO_ERROR,
    MANIFEST_MISMATCH,
    NO_SPACE,
    OUTSIDE_DTS_AREA,
    PAYLOAD_TOO_LARGE,
    SOURCE_CHANGED,
    SOURCE_NOT_FOUND,
    UNSAFE_DESTINATION,
    UNSAFE_ENTRY,
    TransferError,
)

__all__ = [
    "CHUNK",
    "CopyOptions",
    "check_not_reserved",
    "Plan",
    "Manifest",
    "Result",
    "Source",
    "TempRecord",
    "cleanup_temp",
    "copy_tree",
    "ensure_dir",
    "find_published",
    "etag_part_sizes",
    "normalize_relpath",
    "open_beneath",
    "read_manifest_username",
    "remove_source",
    "resolve_source",
    "scan",
    "shutdown_workers",
    "temp_exists",
    "valid_username",
]

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MANIFEST_NAME = "manifest.json"
MANIFEST_MAX_BYTES = 64 * 1024 * 1024
MANIFEST_CHUNK = 1024 * 1024
#: A job's result names at most this many files whose multipart ETag could not be verified.
UNVERIFIED_NAMES = 10
MAX_NAME_TRIES = 10000
PROGRESS_STEP = 1024 * 1024
#: Permission bits a copied file or folder may keep: the owner's and group's rwx and
#: the others' r-x.  Never world-writable, never setuid, setgid or sticky (README: Security).
MODE_MASK = 0o775
#: Names the engine makes beside a user's folders (temporary folders): a DTS folder
#: so named is refused, never published under a name that a cleanup might take for its own.
RESERVED_PREFIX = ".dtsbridge-"

#: Set to False to force the portable component walk instead of openat2
#: (tests do; it is also switched off automatically on ENOSYS).
USE_OPENAT2 = True

_SYS_openat2 = 437  # x86-64 and aarch64 (generic syscall table) alike
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_FLAGS = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
RENAME_NOREPLACE = 1

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SRC_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DST_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_USERNAME_RE = re.compile(r"[a-z][a-z0-9_]{0,99}")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ATTEMPT_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_MANIFEST_ALGOS = frozenset(
    {
        "md5", "sha1", "sha224", "sha256", "sha384", "sha512",
        "sha3_224", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s",
    }
)
_CHECKSUMS = ("xxh3", "blake3", "sha256", "md5")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2
#: With ``fsync`` on, writeback of a big file's data is started every this many
#: bytes (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so
#: the disk writes while the copy goes on and the final ``syncfs`` has little left.
WRITEBACK_STEP = 8 * 1024 * 1024


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# statx(2) through libc (glibc >= 2.28): the mount id (STATX_MNT_ID, Linux >= 5.8) tells a
# bind mount from its surroundings when both are on one filesystem (same st_dev).
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800  # implied by fstatat, not by statx: the scan must never trigger a mount
AT_EMPTY_PATH = 0x1000
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
STATX_MNT_ID = 0x1000


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32), ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32), ("stx_uid", ctypes.c_uint32), ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16), ("_spare0", ctypes.c_uint16), ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64), ("stx_blocks", ctypes.c_uint64), ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTimestamp), ("stx_btime", _StatxTimestamp), ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp), ("stx_rdev_major", ctypes.c_uint32), ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32), ("stx_dev_minor", ctypes.c_uint32), ("stx_mnt_id", ctypes.c_uint64),
        ("_spare2", ctypes.c_uint64), ("_spare3", ctypes.c_uint64 * 12),
    ]


_HAVE_STATX = hasattr(_libc, "statx")
if _HAVE_STATX:
    _libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]
    _libc.statx.restype = ctypes.c_int


class _Lstat(NamedTuple):
    """What the scan needs of an entry (the ``os.stat_result`` names), plus its mount id (None: unknown)."""

    st_mode: int
    st_size: int
    st_ino: int
    st_nlink: int
    st_dev: int
    st_atime_ns: int
    st_mtime_ns: int
    mnt_id: int | None


_statx_bufs = threading.local()


def _statx(dirfd: int, name: bytes, flags: int, mask: int) -> _Statx | None:
    """statx(2) into this thread's buffer; None when this system has none (old libc or kernel, seccomp)."""
    global _HAVE_STATX
    if not _HAVE_STATX:
        return None
    buf = getattr(_statx_bufs, "buf", None)
    if buf is None:
        buf = _statx_bufs.buf = _Statx()
    if _libc.statx(dirfd, name, flags, mask, ctypes.byref(buf)) == 0:
        return buf  # this thread's buffer: read it before the next call
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM):
        _HAVE_STATX = False
        return None
    raise _os_error(err, os.fsdecode(name))


def _ns(ts: _StatxTimestamp) -> int:
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def _lstat_at(dirfd: int, name: str) -> _Lstat:
    """``lstat`` of ``name`` in ``dirfd`` with the entry's mount id (a bind-mounted file shows its own)."""
    sx = _statx(dirfd, os.fsencode(name), AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, STATX_BASIC_STATS | STATX_MNT_ID)
    if sx is None:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return _Lstat(st.st_mode, st.st_size, st.st_ino, st.st_nlink, st.st_dev, st.st_atime_ns, st.st_mtime_ns, None)
    return _Lstat(sx.stx_mode, sx.stx_size, sx.stx_ino, sx.stx_nlink, os.makedev(sx.stx_dev_major, sx.stx_dev_minor),
                  _ns(sx.stx_atime), _ns(sx.stx_mtime), sx.stx_mnt_id if sx.stx_mask & STATX_MNT_ID else None)


def _mnt_id(fd: int) -> int | None:
    """The id of the mount ``fd`` is on (statx, else /proc/self/fdinfo); None when the system cannot say."""
    sx = _statx(fd, b"", AT_EMPTY_PATH, STATX_MNT_ID)
    if sx is not None and sx.stx_mask & STATX_MNT_ID:
        return int(sx.stx_mnt_id)
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------
# Data classes


@attrs.frozen
class Source:
    """A resolved DTS folder: ``rel`` is its canonical path below dts_root."""

    rel: str
    name: str


@attrs.frozen
class Manifest:
    """What a ``manifest.json`` asks for.

    ``hashes`` maps a file's relative path to ``(algorithm, lowercase hex)``
    pairs that must hold for it; ``size_only`` counts resources with no hash.
    """

    resources: int
    size_only: int
    hashes: dict[str, tuple[tuple[str, str], ...]] = attrs.field(factory=dict, repr=False)


@attrs.frozen
class _FileEntry:
    rel: str
    size: int
    ino: int
    mode: int
    mtime_ns: int


@attrs.frozen
class _DirEntry:
    rel: str
    mode: int
    atime_ns: int
    mtime_ns: int


@attrs.frozen
class Plan:
    """Result of the scan: totals (``dirs`` excludes the top folder) and manifest.

    ``file_list``/``dir_list``/``top`` carry what the copy needs; they are not
    part of equality or repr.
    """

    files: int
    bytes: int
    dirs: int
    manifest: Manifest | None
    file_list: tuple[_FileEntry, ...] = attrs.field(default=(), eq=False, repr=False)
    dir_list: tuple[_DirEntry, ...] = attrs.field(default=(), eq=False, repr=False)
    top: _DirEntry | None = attrs.field(default=None, eq=False, repr=False)
    dev: int = attrs.field(default=0, eq=False, repr=False)


@attrs.frozen
class CopyOptions:
    """How to copy: verification hash, owner, limits, durability, parallelism."""

    checksum: str = "xxh3"
    uid: int | None = None
    gid: int | None = None
    max_bytes: int | None = None
    fsync: bool = True
    workers: int = 4
    #: Worker processes for batches of small files (0: threads only); see :func:`_worker_pool`.
    processes: int = 0
    #: ``auto``: clone files (``FICLONE``) when source and destination share a filesystem that can;
    #: ``never``: always copy.  See :func:`_clone`.
    reflink: str = "auto"


@attrs.frozen
class TempRecord:
    """What an attempt made: its temporary folder, identified by device, inode, birth time and owners.

    A cleanup removes a temporary folder only when the folder now at its name is
    this very one (device, inode and, where the filesystem records it, birth
    time, so a reused inode number does not pass) and belongs to one of ``uids``
    (the service, and the owner the copy gives it before publishing): never on
    the strength of its name.  A record with ``ino == 0`` is *pending*: written
    before the folder was made, so a crash between ``mkdir`` and recording the
    inode leaves a folder the cleanup still knows; such a folder is only ever
    removed while empty, 0700 and the service's (nothing is written into a
    temporary folder before its inode is recorded).

    ``encode()``/``decode()`` give the one-word form kept in the job's Redis record.
    """

    attempt: str
    dev: int = 0
    ino: int = 0
    btime_ns: int = 0
    uids: tuple[int, ...] = ()

    @property
    def pending(self) -> bool:
        return self.ino == 0

    def encode(self) -> str:
        if self.pending:
            return self.attempt
        return f"{self.attempt}:{self.dev}:{self.ino}:{self.btime_ns}:{','.join(str(u) for u in self.uids)}"

    @classmethod
    def decode(cls, word: str) -> "TempRecord":
        """One record; raises ValueError for a malformed one."""
        attempt, *rest = word.split(":")
        if not _ATTEMPT_RE.fullmatch(attempt):
            raise ValueError(f"bad temporary folder record {word!r}")
        if not rest:
            return cls(attempt)
        dev, ino, btime, uids = rest
        return cls(attempt, int(dev), int(ino), int(btime), tuple(int(u) for u in uids.split(",") if u))

    @classmethod
    def decode_all(cls, text: str | None) -> list["TempRecord"]:
        """Every well-formed record of a space-separated list (malformed words are skipped)."""
        out = []
        for word in (text or "").split():
            try:
                out.append(cls.decode(word))
            except ValueError:
                log.warning("ignoring a malformed temporary folder record %r", word)
        return out


@attrs.frozen
class Result:
    """A published copy.

    With a manifest (``has_manifest``): ``hashed`` files were checked by a hash it
    gives, ``size_only`` resources by size alone (no hash), and ``unverified``
    files carry a multipart ETag that no likely part size matched (checked by size;
    ``unverified_names`` lists the first :data:`UNVERIFIED_NAMES` of them).
    """

    name: str
    files: int
    bytes: int
    size_only: int
    manifest_resources: int
    ino: int
    dev: int
    #: Files (and their bytes) cloned with FICLONE instead of copied.
    files_cloned: int = 0
    bytes_cloned: int = 0
    has_manifest: bool = False
    hashed: int = 0
    unverified: int = 0
    unverified_names: tuple[str, ...] = ()
    #: Files (and their bytes) kept from an earlier attempt's temporary folder (``resume_from``).
    files_resumed: int = 0
    bytes_resumed: int = 0


# --------------------------------------------------------------------------
# Small helpers


def _fault_point(name: str) -> None:
    """Test-only: pause at ``name`` when ``DTSBRIDGE_FAULT_PAUSE`` asks for it (see the module docstring)."""
    spec = os.environ.get("DTSBRIDGE_FAULT_PAUSE")
    if not spec:
        return
    for item in spec.split(","):
        point, _, seconds = item.strip().partition(":")
        if point == name:
            sys.stderr.write(f"dtsbridge: fault point {name} reached\n")
            sys.stderr.flush()
            time.sleep(float(seconds or 30))
            return


def _os_error(err: int, what: str) -> OSError:
    return OSError(err, os.strerror(err), what)


def _reason_for(exc: OSError) -> str:
    return NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else IO_ERROR


def _as_transfer_error(exc: BaseException, context: str) -> TransferError:
    """Turn any exception into a TransferError (NO_SPACE / IO_ERROR / INTERNAL)."""
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, OSError):
        return TransferError(_reason_for(exc), f"{context}: {exc}")
    return TransferError(INTERNAL, f"{context}: unexpected {type(exc).__name__}: {exc}")


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        _close(fd)


def _open_root(path: str, reason: str, what: str) -> int:
    """Open a configured (trusted) root folder; links in the configured path are followed."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise TransferError(reason, f"{what} {path!r} cannot be opened: {exc.strerror}") from None


def _split_parts(relpath: str) -> list[str]:
    return [p for p in relpath.split("/") if p not in ("", ".")]


# --------------------------------------------------------------------------
# Resolving beneath a directory descriptor


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags, mode if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)) else 0, RESOLVE_FLAGS)
    raw = os.fsencode(path)
    for _ in range(16):
        fd = _libc.syscall(_SYS_openat2, ctypes.c_int(dirfd), ctypes.c_char_p(raw), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):  # concurrent rename/mount: retry
            continue
        raise _os_error(err, path)
    raise _os_error(errno.EAGAIN, path)


def _walk_open(dirfd: int, parts: list[str], flags: int, mode: int) -> int:
    """Portable resolution: one O_NOFOLLOW open per component from held fds."""
    top_dev = os.fstat(dirfd).st_dev
    top_mnt = _mnt_id(dirfd)
    cur = dirfd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            fl = (flags | os.O_NOFOLLOW | os.O_CLOEXEC) if last else _DIR_FLAGS
            try:
                nxt = os.open(part, fl, mode, dir_fd=cur)
            except OSError as exc:
                # O_NOFOLLOW|O_DIRECTORY on a link says ENOTDIR: tell links apart.
                if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.EEXIST):
                    try:
                        if stat.S_ISLNK(os.stat(part, dir_fd=cur, follow_symlinks=False).st_mode):
                            raise _os_error(errno.ELOOP, part) from None
                    except FileNotFoundError:
                        pass
                raise
            # Another filesystem, or a bind mount of this one (same st_dev, another mount).
            if os.fstat(nxt).st_dev != top_dev or (top_mnt is not None and _mnt_id(nxt) != top_mnt):
                os.close(nxt)
                raise _os_error(errno.EXDEV, part)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        if cur != dirfd:
            _close(cur)
        raise


def open_beneath(dirfd: int, relpath: str, flags: int, mode: int = 0) -> int:
    """Open ``relpath`` strictly beneath ``dirfd`` without following any link.

    ``""`` or ``"."`` gives a duplicate of ``dirfd``.  ``..``, absolute paths
    and mount crossings fail with ``EXDEV``, links with ``ELOOP``.
    """
    global USE_OPENAT2
    if "\0" in relpath:
        raise _os_error(errno.EINVAL, relpath)
    try:
        os.fsencode(relpath)
    except UnicodeEncodeError:  # e.g. a lone surrogate from JSON: no file can have this name
        raise _os_error(errno.ENOENT, relpath) from None
    if relpath.startswith("/") or ".." in relpath.split("/"):
        raise _os_error(errno.EXDEV, relpath)
    parts = _split_parts(relpath)
    if not parts:
        return os.dup(dirfd)
    if USE_OPENAT2:
        path = "/".join(parts)
        try:
            return _openat2(dirfd, path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY:
                _raise_if_trailing_link(dirfd, path)
            if exc.errno != errno.ENOSYS:
                raise
            USE_OPENAT2 = False
    return _walk_open(dirfd, parts, flags, mode)


def _raise_if_trailing_link(dirfd: int, path: str) -> None:
    """O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR: report ELOOP for a link instead."""
    try:
        fd = _openat2(dirfd, path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0)
    except OSError:
        return
    with _fd(fd):
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise _os_error(errno.ELOOP, path)


def normalize_relpath(path: str) -> str:
    """Canonical relative POSIX form of an untrusted path (``""`` for the top).

    Absolute paths, ``..`` components and NUL bytes raise
    ``TransferError(OUTSIDE_DTS_AREA)``.
    """
    if not isinstance(path, str):
        raise TransferError(BAD_REQUEST, "path must be a string")
    if "\0" in path:
        raise TransferError(OUTSIDE_DTS_AREA, f"path {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise TransferError(OUTSIDE_DTS_AREA, f"path {path!r} is absolute")
    if len(path) > 4096:
        raise TransferError(OUTSIDE_DTS_AREA, "path is too long")
    parts = _split_parts(path)
    if ".." in parts:
        raise TransferError(OUTSIDE_DTS_AREA, f"path {path!r} contains '..'")
    return "/".join(parts)


def _abs_parts(path: str) -> list[str]:
    return _split_parts(path)


def _source_error(exc: OSError, rel: str) -> TransferError:
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return TransferError(OUTSIDE_DTS_AREA, f"{rel!r} goes through a symbolic link or leaves the DTS area")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):  # too long a name cannot exist
        return TransferError(SOURCE_NOT_FOUND, f"{rel!r} does not exist or is not a folder")
    return TransferError(_reason_for(exc), f"cannot open {rel!r}: {exc.strerror}")


def _open_source_dir(rootfd: int, rel: str) -> int:
    try:
        fd = open_beneath(rootfd, rel, _DIR_FLAGS)
    except OSError as exc:
        raise _source_error(exc, rel) from None
    if not stat.S_ISDIR(os.fstat(fd).st_mode):  # cannot happen with O_DIRECTORY; belt and braces
        os.close(fd)
        raise TransferError(SOURCE_NOT_FOUND, f"{rel!r} is not a folder")
    return fd


def resolve_source(dts_root: str, subdirectory: str) -> Source:
    """Resolve a request's ``subdirectory`` to a folder strictly inside ``dts_root``."""
    if not isinstance(subdirectory, str):
        raise TransferError(BAD_REQUEST, "subdirectory must be a string")
    if "\0" in subdirectory:
        raise TransferError(OUTSIDE_DTS_AREA, "subdirectory contains a NUL byte")
    if subdirectory.startswith("/"):
        parts = _abs_parts(subdirectory)
        if ".." in parts:
            raise TransferError(OUTSIDE_DTS_AREA, f"{subdirectory!r} contains '..'")
        if not parts:
            raise TransferError(BAD_REQUEST, "subdirectory names the DTS area itself")
        rest: list[str] | None = None
        for root in (os.path.realpath(dts_root), os.path.normpath(os.path.abspath(dts_root))):
            rparts = _abs_parts(root)
            if parts[: len(rparts)] == rparts:
                rest = parts[len(rparts):]
                break
        if rest is None:
            raise TransferError(OUTSIDE_DTS_AREA, f"{subdirectory!r} is outside the DTS area")
        rel = "/".join(rest)
    else:
        rel = normalize_relpath(subdirectory)
    if not rel:
        raise TransferError(BAD_REQUEST, "subdirectory names the DTS area itself")
    name = rel.rsplit("/", 1)[-1]
    check_not_reserved(name)
    with _fd(_open_root(dts_root, SOURCE_NOT_FOUND, "DTS area")) as rootfd:
        _close(_open_source_dir(rootfd, rel))
    return Source(rel=rel, name=name)


def check_not_reserved(name: str) -> None:
    """A transfer folder is published under its own name: refuse the names the engine keeps for itself.

    In any case (``.DTSBridge-…`` too): on a case-insensitive filesystem it is the same name.
    """
    if name[:len(RESERVED_PREFIX)].lower() == RESERVED_PREFIX:
        raise TransferError(BAD_REQUEST, f"folder names beginning with {RESERVED_PREFIX!r} are reserved "
                                         f"for dtsbridge's temporary folders: {name!r}")


def valid_username(name: str) -> bool:
    """KBase's rule: a lowercase letter, then up to 99 of ``[a-z0-9_]``."""
    return isinstance(name, str) and _USERNAME_RE.fullmatch(name) is not None


# --------------------------------------------------------------------------
# Destination folders


def _check_component(part: str) -> None:
    if not isinstance(part, str) or not part or part in (".", "..") or "/" in part or "\0" in part:
        raise TransferError(UNSAFE_DESTINATION, f"bad destination folder name {part!r}")


def _walk_dest(root: str, parts: list[str], uid: int | None, gid: int | None, create_from: int) -> int:
    """Open ``root/parts...`` link-safely; create components at index >= create_from.

    Returns a descriptor of the last folder.  Newly made folders are given to
    ``uid``/``gid``; existing ones are never touched.
    """
    for p in parts:
        _check_component(p)
    cur = _open_root(root, UNSAFE_DESTINATION, "destination root")
    try:
        for i, part in enumerate(parts):
            made = False
            for _ in range(3):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=cur)
                    break
                except FileNotFoundError:
                    if i < create_from:
                        raise TransferError(BAD_REQUEST, f"destination folder {'/'.join(parts[:i + 1])!r} does not exist") from None
                    try:
                        os.mkdir(part, 0o755, dir_fd=cur)
                        made = True
                    except FileExistsError:
                        pass
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise TransferError(UNSAFE_DESTINATION,
                                            f"destination {'/'.join(parts[:i + 1])!r} is a link or not a folder") from None
                    raise
            else:
                raise TransferError(UNSAFE_DESTINATION, f"destination {part!r} keeps changing")
            os.close(cur)
            cur = nxt  # from here the except clauses below close it
            if made and (uid is not None or gid is not None):
                st = os.fstat(cur)
                if st.st_uid == os.geteuid():  # ours, not something swapped in
                    os.fchown(cur, -1 if uid is None else uid, -1 if gid is None else gid)
        return cur
    except TransferError:
        _close(cur)
        raise
    except OSError as exc:
        _close(cur)
        raise TransferError(_reason_for(exc), f"cannot open destination: {exc}") from None


def ensure_dir(root: str, parts: list[str], uid: int | None, gid: int | None, create: bool = True) -> None:
    """Make (or with ``create=False`` only check) ``root/parts...`` as real folders."""
    _close(_walk_dest(root, list(parts), uid, gid, 0 if create else len(parts)))


def _temp_name(job_id: str, attempt: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise TransferError(BAD_REQUEST, f"bad job id {job_id!r}")
    if not isinstance(attempt, str) or not _ATTEMPT_RE.fullmatch(attempt):
        raise TransferError(BAD_REQUEST, f"bad attempt {attempt!r} (letters, digits, '_')")
    return f".dtsbridge-{job_id}-{attempt}.tmp"


def _open_parent_or_none(user_root: str, dest_parts: list[str]) -> int | None:
    try:
        return _walk_dest(user_root, list(dest_parts), None, None, len(dest_parts))
    except TransferError:
        return None


#: Folders nested deeper than this below the one being emptied are moved up into it
#: (renamed) rather than entered, so a removal holds at most this many descriptors.
RMTREE_MAX_DEPTH = 64
_RM_DIR_FLAGS = _DIR_FLAGS | os.O_NONBLOCK


def _open_subdir(dirfd: int, name: str, dev: int, mnt: int | None = None) -> int | None:
    """Open folder ``name`` of ``dirfd`` for removal; None when it is gone or is not a folder (any more).

    O_DIRECTORY|O_NOFOLLOW|O_NONBLOCK: a link, FIFO or device swapped in for the
    folder fails with ENOTDIR/ELOOP here instead of being followed or opened.
    """
    try:
        fd = os.open(name, _RM_DIR_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    # A mount point (another filesystem, or a bind mount of this one): never descend into it.
    if os.fstat(fd).st_dev != dev or (mnt is not None and _mnt_id(fd) != mnt):
        os.close(fd)
        raise _os_error(errno.EXDEV, name)
    return fd


def _unlink_entry(dirfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass


def _empty_dir(topfd: int) -> None:
    """Remove everything inside the folder ``topfd``, never following a link nor opening a non-folder.

    Replaces ``shutil.rmtree``, which (Python 3.11) opens each sub-folder with a
    plain ``O_RDONLY`` after a separate stat: whoever can write in the tree (the
    user, once the temp folder is theirs or for a look-alike they made; the DTS
    account for ``remove_source``) could swap a folder for a link in between and
    have root open what it points to (a FIFO blocks the thread for ever, a
    device is opened with its side effects); and it recursed once per level, so
    a deep tree raised RecursionError (not a TransferError) with descriptors
    leaked and the folder left behind.  Here the walk is iterative, every
    folder is opened by :func:`_open_subdir` relative to its parent's
    descriptor, and folders deeper than :data:`RMTREE_MAX_DEPTH` are renamed up
    into ``topfd`` (RENAME_NOREPLACE, same tree) and emptied from there.
    """
    dev = os.fstat(topfd).st_dev
    mnt = _mnt_id(topfd)
    queue: list[str | None] = [None]  # None: topfd itself; a name: a folder moved up into topfd
    moved = 0
    while queue:
        item = queue.pop()
        if item is None:
            start: int | None = os.dup(topfd)
        else:
            start = _open_subdir(topfd, item, dev, mnt)
            if start is None:
                _unlink_entry(topfd, item)
                continue
        # Frames: (descriptor, names left, name in the parent frame).
        stack: list[tuple[int, list[str], str | None]] = []
        try:
            stack.append((start, os.listdir(start), item))
            while stack:
                fd, names, here = stack[-1]
                if not names:
                    stack.pop()
                    os.close(fd)
                    if stack and here is not None:
                        os.rmdir(here, dir_fd=stack[-1][0])  # only ever removes an empty folder
                    continue
                name = names.pop()
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    _unlink_entry(fd, name)
                    continue
                if len(stack) >= RMTREE_MAX_DEPTH:
                    while True:
                        up = f".dtsbridge-rm-{moved}"
                        moved += 1
                        try:
                            _renameat2(fd, name, topfd, up, RENAME_NOREPLACE)
                            break
                        except OSError as exc:
                            if exc.errno != errno.EEXIST or moved > MAX_NAME_TRIES:
                                raise
                    queue.append(up)
                    continue
                sub = _open_subdir(fd, name, dev, mnt)
                if sub is None:  # no longer a folder: a link/FIFO/file now, removed as one
                    _unlink_entry(fd, name)
                    continue
                try:
                    listing = os.listdir(sub)
                except BaseException:
                    os.close(sub)
                    raise
                stack.append((sub, listing, name))
        finally:
            for fd, _, _ in stack:
                _close(fd)
        if item is not None:
            os.rmdir(item, dir_fd=topfd)


def _rmtree_at(parentfd: int, name: str, expect: tuple[int, int] | None = None) -> bool:
    """Remove folder ``name`` in ``parentfd`` without following links; False if absent or not a folder.

    With ``expect`` (device, inode) only that very folder is removed.
    """
    dev = os.fstat(parentfd).st_dev
    fd = _open_subdir(parentfd, name, dev, _mnt_id(parentfd))
    if fd is None:
        return False
    with _fd(fd):
        st = os.fstat(fd)
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            return False
        _empty_dir(fd)
    os.rmdir(name, dir_fd=parentfd)  # only ever removes an empty folder
    return True


def cleanup_temp(user_root: str, dest_parts: list[str], job_id: str, records: list[TempRecord]) -> int:
    """Remove the temporary folders that ``records`` say a job's attempts made; returns how many.

    Only a folder that is still the very one recorded is removed (see
    :class:`TempRecord`): a look-alike at one of the names (the user may create,
    rename and swap anything in their own folder) is left alone, whatever it is
    called.  Raises TransferError when a removal fails.
    """
    _temp_name(job_id, "0")
    if not records:
        return 0
    pfd = _open_parent_or_none(user_root, dest_parts)
    if pfd is None:
        return 0
    removed = 0
    try:
        dev, mnt = os.fstat(pfd).st_dev, _mnt_id(pfd)
        for rec in records:
            name = _temp_name(job_id, rec.attempt)
            try:
                if _remove_recorded(pfd, name, rec, dev, mnt):
                    removed += 1
            except OSError as exc:
                raise TransferError(_reason_for(exc), f"cannot remove {name!r}: {exc}") from None
    finally:
        os.close(pfd)
    return removed


def _is_recorded(fd: int, rec: TempRecord) -> bool:
    """Whether the open folder ``fd`` is the one ``rec`` describes (device, inode, birth time, owner)."""
    st = os.fstat(fd)
    if rec.pending:  # made by this service, never chowned, never written into: 0700 and empty
        return (st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
                and not os.listdir(fd))
    if (st.st_dev, st.st_ino) != (rec.dev, rec.ino) or st.st_uid not in rec.uids:
        return False
    return not rec.btime_ns or _btime_ns(fd) in (0, rec.btime_ns)


def _remove_recorded(parentfd: int, name: str, rec: TempRecord, dev: int, mnt: int | None) -> bool:
    fd = _open_subdir(parentfd, name, dev, mnt)
    if fd is None:
        return False
    with _fd(fd):
        if not _is_recorded(fd, rec):
            log.warning("%s is not the temporary folder this job made; left alone", name)
            return False
        if not rec.pending:
            _empty_dir(fd)
        # rmdir goes by name: make sure the name still is this folder (a swap in between
        # could at most lose an empty folder, as rmdir never removes a non-empty one).
        st, now = os.fstat(fd), os.stat(name, dir_fd=parentfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            return False
    try:
        os.rmdir(name, dir_fd=parentfd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def temp_exists(user_root: str, dest_parts: list[str], job_id: str, attempt: str) -> bool:
    """Whether this attempt's temporary folder is present (as a real folder)."""
    name = _temp_name(job_id, attempt)
    pfd = _open_parent_or_none(user_root, dest_parts)
    if pfd is None:
        return False
    with _fd(pfd):
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False


def _candidate(base: str, i: int) -> str:
    return base if i == 0 else f"{base}-{i}"


def find_published(user_root: str, dest_parts: list[str], base_name: str, dev: int, ino: int,
                   limit: int = 10000) -> str | None:
    """Which of ``base_name``, ``base_name-1``, … is the folder ``dev``/``ino`` (after a crash)."""
    pfd = _open_parent_or_none(user_root, dest_parts)
    if pfd is None:
        return None
    missing = 0
    with _fd(pfd):
        for i in range(limit + 1):
            name = _candidate(base_name, i)
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                missing += 1
                if missing >= 50:
                    return None
                continue
            except OSError:
                return None
            missing = 0
            if st.st_dev == dev and st.st_ino == ino and stat.S_ISDIR(st.st_mode):
                return name
    return None


def remove_source(dts_root: str, source: Source) -> None:
    """Delete the DTS folder link-safely (``delete_source``); a missing one is fine."""
    rel = normalize_relpath(source.rel)
    if not rel:
        raise TransferError(BAD_REQUEST, "refusing to remove the DTS area itself")
    parent, _, name = rel.rpartition("/")
    with _fd(_open_root(dts_root, SOURCE_NOT_FOUND, "DTS area")) as rootfd:
        try:
            pfd = open_beneath(rootfd, parent, _DIR_FLAGS)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _source_error(exc, parent) from None
        with _fd(pfd):
            try:
                _rmtree_at(pfd, name)
            except OSError as exc:
                raise TransferError(_reason_for(exc), f"cannot remove {rel!r}: {exc}") from None


# --------------------------------------------------------------------------
# Scan and manifest


def _open_source_subdir(srcfd: int, rel: str, during: str) -> int:
    """Open a folder of the source tree again, link-safely; a folder swapped for a link,
    a mount or nothing since the scan fails the job."""
    try:
        return open_beneath(srcfd, rel, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            raise TransferError(UNSAFE_ENTRY, f"{rel!r} became a link, a mount or a file during {during}") from None
        if exc.errno == errno.ENOENT:
            raise TransferError(SOURCE_CHANGED, f"{rel!r} vanished during {during}") from None
        raise


def _scan_fd(srcfd: int, max_bytes: int | None) -> Plan:
    top_st = os.fstat(srcfd)
    dev = top_st.st_dev
    mnt = _mnt_id(srcfd)
    files: list[_FileEntry] = []
    dirs: list[_DirEntry] = []
    total = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        dfd = _open_source_subdir(srcfd, rel, "the scan")
        with _fd(dfd):
            for name in sorted(os.listdir(dfd)):
                path = f"{rel}/{name}" if rel else name
                try:
                    st = _lstat_at(dfd, name)
                except FileNotFoundError:
                    raise TransferError(SOURCE_CHANGED, f"{path!r} vanished during the scan") from None
                mode = st.st_mode
                if stat.S_ISLNK(mode):
                    raise TransferError(UNSAFE_ENTRY, f"{path!r} is a symbolic link")
                if st.st_dev != dev:
                    raise TransferError(UNSAFE_ENTRY, f"{path!r} is on another filesystem (mount point)")
                if mnt is not None and st.mnt_id is not None and st.mnt_id != mnt:
                    raise TransferError(UNSAFE_ENTRY, f"{path!r} is a mount point (a bind mount)")
                if stat.S_ISDIR(mode):
                    dirs.append(_DirEntry(path, stat.S_IMODE(mode), st.st_atime_ns, st.st_mtime_ns))
                    stack.append(path)
                elif stat.S_ISREG(mode):
                    if st.st_nlink > 1:
                        raise TransferError(UNSAFE_ENTRY, f"{path!r} has {st.st_nlink} hard links")
                    files.append(_FileEntry(path, st.st_size, st.st_ino, stat.S_IMODE(mode), st.st_mtime_ns))
                    total += st.st_size
                    if max_bytes is not None and total > max_bytes:
                        raise TransferError(PAYLOAD_TOO_LARGE,
                                            f"the folder holds more than the limit of {max_bytes} bytes")
                else:
                    raise TransferError(UNSAFE_ENTRY, f"{path!r} is not a regular file or folder")
    manifest = _read_manifest(srcfd, {f.rel: f for f in files})
    top = _DirEntry("", stat.S_IMODE(top_st.st_mode), top_st.st_atime_ns, top_st.st_mtime_ns)
    return Plan(files=len(files), bytes=total, dirs=len(dirs), manifest=manifest,
                file_list=tuple(files), dir_list=tuple(dirs), top=top, dev=dev)


def _bad_manifest(msg: str) -> TransferError:
    return TransferError(MANIFEST_MISMATCH, f"manifest.json: {msg}")


#: The pseudo-algorithm of an S3 multipart ETag (``<32 hex>-<parts>``) in :attr:`Manifest.hashes`.
ETAG = "s3etag"
_ETAG_RE = re.compile(r"([0-9a-f]{32})-([1-9][0-9]{0,4})")
#: The most parts an S3 multipart upload may have.
ETAG_MAX_PARTS = 10_000
MiB = 1024 * 1024
#: Part sizes in common use, in the order they are tried: 8 MiB (AWS CLI and boto3's
#: default) first, then other tools' defaults, then boto3's doublings of 8 MiB (what it
#: switches to when a file would need more than 10,000 parts).
ETAG_COMMON_PART_MIB = (8, 5, 15, 16, 64, 100, 32, 128, 256, 512, 1024, 2048, 4096)
#: At most this many part sizes are tried for one ETag (each costs one md5 state in the read pass).
ETAG_MAX_CANDIDATES = 12


def etag_part_sizes(size: int, parts: int) -> list[int]:
    """Part sizes (bytes) an S3 upload of ``size`` bytes in ``parts`` parts may have used, likeliest first.

    The sizes in common use that give exactly ``parts`` parts, then the whole-MiB sizes
    that do (smallest first: a tool splitting a file evenly rounds up); a size the
    part count rules out is never tried.  At most :data:`ETAG_MAX_CANDIDATES`.
    """
    if parts < 1 or parts > ETAG_MAX_PARTS or size < 0:
        return []
    if parts == 1:  # every part size >= size gives the same ETag: md5 of the file's md5
        return [max(size, 1)]
    if size < parts:  # not enough bytes for that many non-empty parts
        return []

    def fits(ps: int) -> bool:
        return ps > 0 and -(-size // ps) == parts

    out: list[int] = []
    for mib in ETAG_COMMON_PART_MIB:
        if fits(mib * MiB):
            out.append(mib * MiB)
    # ceil(size / ps) == parts  <=>  size/parts <= ps <= (size-1)/(parts-1)
    lo = -(-(-(-size // parts)) // MiB)
    hi = (size - 1) // (parts - 1) // MiB
    m = max(lo, 1)
    while m <= hi and len(out) < ETAG_MAX_CANDIDATES:
        if m * MiB not in out and fits(m * MiB):
            out.append(m * MiB)
        m += 1
    return out[:ETAG_MAX_CANDIDATES]


class _ETagCheck:
    """Checks an S3 multipart ETag in the copy's single read pass.

    One md5 state per candidate part size (see :func:`etag_part_sizes`): it hashes
    the part being read, and at each part boundary its 16-byte digest is kept and
    the state starts again.  At the end, the md5 of the kept digests, ``-<parts>``,
    is compared with the manifest's; any candidate matching verifies the file.
    """

    __slots__ = ("want", "parts", "cands")

    def __init__(self, etag: str, size: int) -> None:
        hexd, _, n = etag.partition("-")
        self.want = hexd
        self.parts = int(n)
        # [part size, bytes in the current part, md5 state, digests so far]
        self.cands = [[ps, 0, hashlib.md5(), bytearray()] for ps in etag_part_sizes(size, self.parts)]

    def update(self, chunk: memoryview) -> None:
        n = len(chunk)
        for c in self.cands:
            ps, filled, h, digests = c
            off = 0
            while off < n:
                take = min(n - off, ps - filled)
                h.update(chunk[off:off + take] if take != n else chunk)
                filled += take
                off += take
                if filled == ps:
                    digests += h.digest()
                    h = c[2] = hashlib.md5()
                    filled = 0
            c[1] = filled

    def matches(self) -> bool:
        for ps, filled, h, digests in self.cands:
            if filled or not digests:
                digests = digests + h.digest()
            if len(digests) // 16 == self.parts and hashlib.md5(digests).hexdigest() == self.want:
                return True
        return False


def _parse_hash(value: Any, path: str) -> tuple[str, str] | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad_manifest(f"hash of {path!r} is not a string")
    if ":" in value:
        algo, hexd = value.split(":", 1)
        algo = algo.strip().lower().replace("-", "")
        algo = {"sha3224": "sha3_224", "sha3256": "sha3_256", "sha3384": "sha3_384", "sha3512": "sha3_512"}.get(algo, algo)
    else:
        algo, hexd = "md5", value
        etag = _ETAG_RE.fullmatch(value.strip().lower())
        if etag is not None:
            if int(etag.group(2)) > ETAG_MAX_PARTS:
                raise _bad_manifest(f"hash of {path!r} is an S3 ETag of more than {ETAG_MAX_PARTS} parts")
            return ETAG, etag.group(0)
    hexd = hexd.strip().lower()
    if algo not in _MANIFEST_ALGOS:
        raise _bad_manifest(f"unknown hash algorithm {algo!r} for {path!r}")
    if not _HEX_RE.fullmatch(hexd) or len(hexd) != 2 * hashlib.new(algo).digest_size:
        raise _bad_manifest(f"hash of {path!r} is not a valid {algo} digest")
    return algo, hexd


def _open_manifest(dirfd: int, ino: int | None = None) -> int:
    """Open ``manifest.json`` in ``dirfd``: a regular file with one link (the scan's inode when given)."""
    try:
        fd = open_beneath(dirfd, MANIFEST_NAME, _SRC_FLAGS)
    except OSError as exc:
        raise TransferError(SOURCE_CHANGED, f"manifest.json cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (ino is not None and st.st_ino != ino) or st.st_nlink > 1:
            raise TransferError(SOURCE_CHANGED if ino is not None else UNSAFE_ENTRY,
                                "manifest.json changed during the scan" if ino is not None
                                else "manifest.json is not a regular file with one link")
        if st.st_size > MANIFEST_MAX_BYTES:
            raise _bad_manifest(f"larger than {MANIFEST_MAX_BYTES} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _manifest_text(fd: int) -> Iterator[str]:
    """The manifest's text, decoded :data:`MANIFEST_CHUNK` bytes at a time.

    Stops with ``manifest_mismatch`` past :data:`MANIFEST_MAX_BYTES` read (whatever
    the size said), at bytes that are not UTF-8, and as soon as what was read is a
    parse bomb: ``[[],[],…`` costs ~30x its size as Python objects, while a real
    manifest has an object or two per resource of a few hundred bytes, so more than
    one ``[`` or ``{`` per 16 bytes (beyond 10,000) is refused before it is parsed.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = containers = 0
    while True:
        b = os.read(fd, min(MANIFEST_CHUNK, MANIFEST_MAX_BYTES + 1 - size))
        if not b:
            break
        size += len(b)
        if size > MANIFEST_MAX_BYTES:
            raise _bad_manifest(f"larger than {MANIFEST_MAX_BYTES} bytes")
        containers += b.count(b"[") + b.count(b"{")
        if containers > size // 16 + 10_000:
            raise _bad_manifest(f"holds {containers} JSON objects and lists in its first {size} bytes; "
                                "not a manifest")
        try:
            yield decoder.decode(b)
        except UnicodeDecodeError as exc:
            raise _bad_manifest(f"not valid JSON (not UTF-8 near byte {size - len(b) + exc.start})") from None
    try:
        yield decoder.decode(b"", True)
    except UnicodeDecodeError:
        raise _bad_manifest("not valid JSON (it ends inside a UTF-8 character)") from None


class _Window:
    """A window on text arriving in chunks, for a JSON parse that holds only what it still needs.

    ``s`` is the text from some point on; :meth:`more` appends chunks (at least
    doubling what lies after ``i``, so re-parsing a value that did not fit costs
    O(n) in all); :meth:`drop` forgets what was parsed.
    """

    __slots__ = ("s", "chunks", "done")

    def __init__(self, chunks: Iterator[str]) -> None:
        self.s = ""
        self.chunks = chunks
        self.done = False

    def more(self, i: int) -> bool:
        if self.done:
            return False
        want = max(len(self.s) - i, MANIFEST_CHUNK)
        got = []
        n = 0
        for c in self.chunks:
            got.append(c)
            n += len(c)
            if n >= want:
                break
        else:
            self.done = True
        if got:
            self.s = self.s[i:] + "".join(got) if i else self.s + "".join(got)
        return bool(got) or not self.done

    def drop(self, i: int) -> int:
        """Forget the text before ``i``; returns ``i``'s new index (0)."""
        if i:
            self.s = self.s[i:]
        return 0

    def ws(self, i: int) -> int:
        """Index of the next non-blank character (``len(s)`` at the end of the text)."""
        while True:
            i = _WS.match(self.s, i).end()
            if i < len(self.s) or self.done:
                return i
            i = self.drop(i)
            self.more(0)

    def value(self, i: int, scan: Callable[[str, int], tuple[Any, int]]) -> tuple[Any, int]:
        """``scan(s, i)`` (a JSON value, or a string after its quote), fetching text until it fits."""
        while True:
            try:
                v, end = scan(self.s, i)
                # A value reaching the end of the window may go on (a number cut in two).
                if end < len(self.s) or self.done:
                    return v, end
            except ValueError:
                if self.done:
                    raise
            i = self.drop(i)
            self.more(0)


_JSON = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def _walk_manifest(chunks: Iterator[str], on_resource: Callable[[int, Any], None]) -> dict[str, Any] | None:
    """Parse a manifest's top-level object as its text arrives, handing each element of ``resources``
    to ``on_resource`` as soon as it is read; None for an empty (0-byte) manifest.

    Streaming: the text is read a chunk at a time and forgotten once parsed, and
    resources are decoded one at a time (``raw_decode``) and dropped once handled,
    so the cost in memory is a chunk and one resource, not the document (whose
    Python objects would take ~5-10x its size); and the parse is many short steps,
    never one long call that holds the GIL.  Returns the other top-level members,
    and ``resources`` as the number of resources.  Bad JSON, nesting too deep, no
    object, no ``resources`` list: ``manifest_mismatch``.
    """
    w = _Window(chunks)
    decode = _JSON.raw_decode
    out: dict[str, Any] = {}
    count = None
    try:
        w.more(0)
        if w.done and not w.s:
            return None
        i = w.ws(0)
        if w.s[i:i + 1] != "{":
            w.value(i, decode)  # tells bad JSON (or nesting too deep) from JSON that is no object
            raise _bad_manifest("not a JSON object")
        i = w.ws(i + 1)
        if w.s[i:i + 1] == "}":
            i += 1
        else:
            while True:
                i = w.drop(i)
                if w.s[i:i + 1] != '"':
                    raise ValueError("expected a member name")
                key, i = w.value(i + 1, json.decoder.scanstring)
                i = w.ws(i)
                if w.s[i:i + 1] != ":":
                    raise ValueError(f"expected ':' after {key!r}")
                i = w.ws(i + 1)
                if key == "resources" and w.s[i:i + 1] == "[":
                    if count is not None:
                        raise _bad_manifest("'resources' is given twice")
                    count = 0
                    i = w.ws(i + 1)
                    if w.s[i:i + 1] == "]":
                        i += 1
                    else:
                        while True:
                            if i > MANIFEST_CHUNK:
                                i = w.drop(i)
                            res, i = w.value(i, decode)
                            on_resource(count, res)
                            count += 1
                            i = w.ws(i)
                            c = w.s[i:i + 1]
                            i = w.ws(i + 1)
                            if c == "]":
                                break
                            if c != ",":
                                raise ValueError(f"expected ',' or ']' after resource #{count - 1}")
                    out[key] = count
                else:
                    value, i = w.value(i, decode)
                    if key == "resources":
                        raise _bad_manifest("'resources' is missing or not a list")
                    out[key] = value
                i = w.ws(i)
                c = w.s[i:i + 1]
                i = w.ws(i + 1)
                if c == "}":
                    break
                if c != ",":
                    raise ValueError(f"expected ',' or '}}' after {key!r}")
        if w.ws(i) != len(w.s):
            raise ValueError("extra data after the object")
    except RecursionError:  # "[[[[…" nested past the interpreter's limit: not a manifest
        raise _bad_manifest("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a number too long to convert, …
        raise _bad_manifest(f"not valid JSON ({exc})") from None
    if count is None:
        raise _bad_manifest("'resources' is missing or not a list")
    return out


def _read_manifest(srcfd: int, files: dict[str, _FileEntry]) -> Manifest | None:
    entry = files.get(MANIFEST_NAME)
    if entry is None:
        return None
    if entry.size > MANIFEST_MAX_BYTES:
        raise _bad_manifest(f"larger than {MANIFEST_MAX_BYTES} bytes")
    hashes: dict[str, Any] = {}
    size_only = 0

    def on_resource(i: int, res: Any) -> None:
        nonlocal size_only
        if not isinstance(res, dict):
            raise _bad_manifest(f"resource #{i} is not an object")
        raw = res.get("path")
        if not isinstance(raw, str) or not raw:
            raise _bad_manifest(f"resource #{i} has no path")
        try:
            path = normalize_relpath(raw)
        except TransferError as exc:
            raise _bad_manifest(f"resource path {raw!r} is outside the folder ({exc.message})") from None
        if not path:
            raise _bad_manifest(f"resource path {raw!r} names the folder itself")
        f = files.get(path)
        if f is None:
            raise _bad_manifest(f"resource {raw!r} is missing from the folder (or is not a regular file)")
        nbytes = res.get("bytes")
        if nbytes is not None:
            if isinstance(nbytes, bool) or not isinstance(nbytes, int):
                raise _bad_manifest(f"bytes of {raw!r} is not an integer")
            if nbytes != f.size:
                raise _bad_manifest(f"resource {raw!r} has {f.size} bytes, the manifest says {nbytes}")
        h = _parse_hash(res.get("hash"), raw)
        if h is None:
            size_only += 1
            return
        old = hashes.get(f.rel)
        if old is None:
            hashes[f.rel] = (h,)  # keyed by the scan's own string: no second copy of each path
        elif h not in old:
            hashes[f.rel] = old + (h,)

    with _fd(_open_manifest(srcfd, entry.ino)) as fd:
        doc = _walk_manifest(_manifest_text(fd), on_resource)
    if doc is None:  # 0 bytes: a transfer with no resources
        return Manifest(resources=0, size_only=0, hashes={})
    return Manifest(resources=doc["resources"], size_only=size_only, hashes=hashes)


def read_manifest_username(dts_root: str, rel: str) -> str | None:
    """The ``username`` that the ``manifest.json`` of folder ``rel`` (below dts_root) names, or None.

    The same reader as the copy's (size bound, parse-bomb and nesting guards,
    streaming parse), without checking the resources against the folder (the job
    does).  A 0-byte manifest names nobody.  A manifest that cannot be parsed
    raises :class:`TransferError` (``manifest_mismatch``); a folder or manifest
    that cannot be opened safely raises it with the opening's reason.
    """
    rel = normalize_relpath(rel)
    if not rel:
        raise TransferError(BAD_REQUEST, "the folder names the DTS area itself")
    try:
        with _fd(_open_root(dts_root, SOURCE_NOT_FOUND, "DTS area")) as rootfd:
            with _fd(_open_source_dir(rootfd, rel)) as dirfd:
                with _fd(_open_manifest(dirfd)) as fd:
                    doc = _walk_manifest(_manifest_text(fd), lambda i, res: None)
    except OSError as exc:
        raise _as_transfer_error(exc, "reading manifest.json failed") from None
    if doc is None:
        return None
    user = doc.get("username")
    return user if isinstance(user, str) and user else None


def scan(dts_root: str, source: Source, max_bytes: int | None = None) -> Plan:
    """Walk the source folder through descriptors, refusing unsafe entries; read its manifest."""
    rel = normalize_relpath(source.rel)
    if not rel:
        raise TransferError(BAD_REQUEST, "the source names the DTS area itself")
    with _fd(_open_root(dts_root, SOURCE_NOT_FOUND, "DTS area")) as rootfd:
        with _fd(_open_source_dir(rootfd, rel)) as srcfd:
            try:
                return _scan_fd(srcfd, max_bytes)
            except OSError as exc:
                raise _as_transfer_error(exc, "scan failed") from None


# --------------------------------------------------------------------------
# Copy


def _new_hash(name: str) -> Any:
    if name == "xxh3":
        return xxhash.xxh3_128()
    if name == "blake3":
        return blake3.blake3()
    if name in ("sha256", "md5"):
        return hashlib.new(name)
    raise TransferError(BAD_REQUEST, f"unknown checksum {name!r} (one of {', '.join(_CHECKSUMS)})")


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
        self.faults = bool(os.environ.get("DTSBRIDGE_FAULT_PAUSE"))
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
        """Test-only: :func:`_fault_point` the first time this job reaches ``name``."""
        if not self.faults:
            return
        with self.lock:
            if name in self.faults_fired:
                return
            self.faults_fired.add(name)
        _fault_point(name)

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

    def journal_add(self, recs: list[tuple[Any, ...]], checkpoint: bool = True) -> None:
        if self.journal is None:
            return
        self.journal.add(recs, checkpoint)
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
    off = 0
    reread = 0
    while True:
        job.check_stop()
        want = min(blen, total + 1 - off)
        n = os.preadv(dfd, [buf[:want]], off)
        if n:
            check.update(buf[:n])
            off += n
            reread += n
            if reread >= PROGRESS_STEP:  # still moving: a long read-back is no stall
                job.progress(0, 0)
                reread = 0
        if n < want or off > total:
            break
    if off != total or check.digest() != main.digest():
        raise TransferError(CHECKSUM_MISMATCH, f"the copy of {rel!r} does not match its source")
    _finish_file(job, dfd, st, exact)
    job.verified(entry, dfd, st, main.hexdigest(), checked)
    return pending


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
    buf = _buffer()
    blen = len(buf)
    off = 0
    pending = 0
    while True:
        job.check_stop()
        want = min(blen, size + 1 - off)
        n = os.preadv(sfd, [buf[:want]], off)
        if n:
            chunk = buf[:n]
            main.update(chunk)
            for h in extra:
                h.update(chunk)
            off += n
            pending += n
            if pending >= PROGRESS_STEP:
                job.progress(pending, 0)
                pending = 0
        if n < want or off > size:
            break
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
#: descriptors and report progress once per batch.
BIG_FILE = 4 * 1024 * 1024
BATCH_FILES = 64
BATCH_BYTES = 4 * 1024 * 1024


def _batches(files: list[_FileEntry], max_files: int = BATCH_FILES,
             max_bytes: int = BATCH_BYTES) -> Iterator[list[_FileEntry]]:
    """Big files alone, largest first; then the small ones in scan order (folder by folder), grouped."""
    for f in sorted((f for f in files if f.size >= BIG_FILE), key=lambda f: -f.size):
        yield [f]
    batch: list[_FileEntry] = []
    size = 0
    for f in files:
        if f.size >= BIG_FILE:
            continue
        batch.append(f)
        size += f.size
        if len(batch) >= max_files or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _copy_batch(job: _Job, batch: list[_FileEntry]) -> None:
    dirs = _Dirs()
    pending = 0
    done = 0
    try:
        for f in batch:
            pending += _copy_file(job, f, dirs)
            done += 1
    finally:
        dirs.close()
        if done:
            job.progress(pending, done)


def _run_files(job: _Job, executor: concurrent.futures.Executor | None, where: _Where | None = None,
               files: list[_FileEntry] | None = None) -> None:
    """Copy every file (or those of ``files``), in parallel; the first error stops the others and is raised.

    Batches of small files go to the worker processes when ``where`` is given
    and the pool is up; everything else to the thread ``executor``.
    """
    files = list(job.plan.file_list) if files is None else files
    workers = max(1, job.options.workers)
    procs = _worker_pool(job.options.processes) if where is not None and not job.faults else None
    own: concurrent.futures.ThreadPoolExecutor | None = None
    inflight: set[concurrent.futures.Future[Any]] = set()
    if executor is None and (procs is not None or (workers > 1 and len(files) > 1)):
        executor = own = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dtsbridge-file")
    in_process: set[concurrent.futures.Future[Any]] = set()
    try:
        if executor is None:
            for b in _batches(files):
                _copy_batch(job, b)
            return
        window = max(workers, job.options.processes if procs is not None else 0) * 2
        first_error: BaseException | None = None
        it = _batches(files)
        while True:
            while first_error is None and len(inflight) < window:
                job.check_stop()  # worker processes do not see a cancel: stop handing them batches
                b = next(it, None)
                if b is None:
                    break
                if procs is not None and where is not None and all(f.size < PROCESS_FILE_MAX for f in b):
                    try:
                        hashes = {f.rel: job.hashes[f.rel] for f in b if f.rel in job.hashes}
                        opts = job.options if job.reflink else attrs.evolve(job.options, reflink="never")
                        fut = procs.submit(_worker_copy, where, b, hashes, opts, job.dev)
                    except (concurrent.futures.BrokenExecutor, RuntimeError, OSError):
                        _drop_worker_pool(procs)
                        procs = None
                        fut = executor.submit(_copy_batch, job, b)
                    else:
                        in_process.add(fut)
                else:
                    fut = executor.submit(_copy_batch, job, b)
                inflight.add(fut)
            if not inflight:
                break
            done, inflight = concurrent.futures.wait(inflight, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if exc is None and fut in in_process:
                    exc = _worker_result(job, fut.result())
                if isinstance(exc, concurrent.futures.BrokenExecutor):
                    _drop_worker_pool(procs)
                    exc = TransferError(INTERNAL, "a copy worker process died")
                if exc is not None and first_error is None:
                    first_error = exc
                    job.abort.set()
        if first_error is not None:
            # Prefer the real cause over "stopped because another file failed".
            raise first_error
    except BaseException:
        job.abort.set()
        raise
    finally:
        if inflight:  # never leave a worker writing into a folder about to be removed
            concurrent.futures.wait(inflight)
        if own is not None:
            own.shutdown(wait=True)


# --------------------------------------------------------------------------
# Resuming after a crash
#
# Each verified file is recorded, as the copy goes, in an append-only journal
# inside the job's own temporary folder (mode 0700, owned by the service, so
# nobody else can reach it).  A line is written only once its file is
# completely written, verified and owned.  With ``fsync`` on, every
# CHECKPOINT_BYTES of recorded data the filesystem is synced (``syncfs``, the
# same call that precedes publishing, brought forward) and a checkpoint line
# says how many records that sync made durable.  A later attempt of the same
# job (after a crash) is told which folder the previous attempt made (the
# caller's own record: name, device, inode) and moves into its new folder
# every file that still checks out: same size, inode, owner, mode and time as
# recorded, from a source file that is unchanged since (inode, size, mtime),
# and the same hash when reading it is cheap (small files) or when the data
# may not have reached the disk (records after the last checkpoint).
# Everything else is copied again; nothing in the old folder is trusted
# because of its name.

#: The journal's name, at the top of the temporary folder (a source holding an
#: entry of that name at its top gets no journal: it cannot be resumed).
JOURNAL_NAME = ".dtsbridge-journal"
JOURNAL_MAX_BYTES = 512 * 1024 * 1024
#: With ``fsync``, the filesystem is synced and a checkpoint recorded every this many journaled bytes.
CHECKPOINT_BYTES = 256 * 1024 * 1024
_JOURNAL_VERSION = 1


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
        self._write([{"v": _JOURNAL_VERSION, "checksum": checksum}])

    def _write(self, objs: list[dict[str, Any]]) -> None:
        if self.fd is None:
            return
        data = "".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objs).encode()
        _write_all(self.fd, memoryview(data))  # O_APPEND: one write per call, never interleaved

    def add(self, recs: list[tuple[Any, ...]], checkpoint: bool = True) -> None:
        """Append records; with ``checkpoint`` (files written by this attempt) they count towards the next sync."""
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
            self.checkpoint()

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
        with self.lock:
            fd, self.fd = self.fd, None
        _close(fd)


def _manifest_words(wanted: Any) -> list[str]:
    """The manifest hashes a file was checked against, as ``algorithm:hex`` words."""
    return sorted(f"{algo}:{hexd}" for algo, hexd in wanted)


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
    (see the section comment) through a descriptor opened without following
    links, then renamed into the same place in the new folder
    (``RENAME_NOREPLACE``) and recorded in the new journal.  A file that does
    not check out is left where it is (the caller removes the old folder) and
    copied again.
    """
    if rec.pending:
        return set()
    try:
        oldfd = _open_subdir(parentfd, name, os.fstat(parentfd).st_dev, _mnt_id(parentfd))
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
            for fd in (*olddirs.values(), *newdirs.values()):
                _close(fd)
    if kept:
        job.progress(job.bytes_resumed, job.files_resumed)
        log.info("resumed %d files (%d bytes) from %s", job.files_resumed, job.bytes_resumed, name)
    return kept


# --------------------------------------------------------------------------
# Worker processes for small files
#
# Threads copy big files well (the work is in system calls and hashing, which
# release the GIL), but for thousands of small files the Python work per file
# holds the GIL and threads mostly wait for each other: measured here, 20,000
# files of 4-64 KiB went at ~16,000 files/s with 4 threads, ~25,000 with one,
# and ~28,000-37,000 with two worker processes.  So batches of files smaller
# than one chunk go to a small pool of processes, started once through a
# ``forkserver`` (never forked from the threaded service itself).  A worker
# re-opens the job's source folder and temporary folder with the same
# link-safe resolution, checks they are the very folders (device and inode)
# the job holds, and copies its batch exactly as a thread would.


#: Files below this size (one chunk) may go to the worker processes.
PROCESS_FILE_MAX = CHUNK


@attrs.frozen
class _Where:
    """Where a job's files are, for a worker process to re-open them (checked by device and inode)."""

    dts_root: str
    rel: str
    src_id: tuple[int, int]
    user_root: str
    dest_parts: tuple[str, ...]
    tmpname: str
    tmp_id: tuple[int, int]


_pool_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_size = 0
_pool_failed = False


def _worker_pool(n: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """The shared pool of ``n`` worker processes (started on first use); None when off or unavailable."""
    global _pool, _pool_size, _pool_failed
    if n <= 0 or _pool_failed:
        return None
    with _pool_lock:
        if _pool is not None and _pool_size == n:
            return _pool
        old, _pool = _pool, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            _pool = concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                                           initargs=(os.getpid(),))
            _pool_size = n
        except (OSError, ValueError, ImportError) as exc:
            log.warning("copy worker processes unavailable, using threads only: %s", exc)
            _pool_failed = True
            return None
        return _pool


def _drop_worker_pool(pool: concurrent.futures.ProcessPoolExecutor | None) -> None:
    """Forget a broken pool (the next job starts a new one)."""
    global _pool
    with _pool_lock:
        if pool is not None and _pool is pool:
            _pool = None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def shutdown_workers(wait: bool = False) -> None:
    """Stop the worker processes, if any were started (the service calls this when it stops).

    Without ``wait`` this returns at once; the processes end as soon as their
    current batch (milliseconds) is done, and the interpreter joins them at exit.
    """
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=wait, cancel_futures=True)


def _worker_init(service_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when to stop
    _worker_state.clear()
    # A worker must not outlive the service (kill -9 included): the pool's queues
    # never report EOF to it (every worker holds their write ends), so watch the
    # service's pid and leave the moment it is gone.
    try:
        pidfd: int | None = os.pidfd_open(service_pid)
    except (OSError, AttributeError):
        pidfd = None
        if os.getppid() == 1:
            os._exit(0)
    threading.Thread(target=_watch_service, args=(service_pid, pidfd), name="dtsbridge-watch-service",
                     daemon=True).start()


def _watch_service(service_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the process has exited
    else:
        while True:
            try:
                os.kill(service_pid, 0)
            except ProcessLookupError:
                break
            except OSError:
                pass
            time.sleep(1)
    os._exit(0)


#: In a worker process: the job it last worked for and that job's folder descriptors.
_worker_state: dict[str, Any] = {}


def _worker_dirs(where: _Where) -> tuple[int, int]:
    if _worker_state.get("where") == where:
        return _worker_state["fds"]
    for fd in _worker_state.pop("fds", ()):
        _close(fd)
    _worker_state.pop("where", None)
    with _fd(_open_root(where.dts_root, SOURCE_NOT_FOUND, "DTS area")) as rootfd:
        srcfd = _open_source_dir(rootfd, where.rel)
    try:
        st = os.fstat(srcfd)
        if (st.st_dev, st.st_ino) != where.src_id:
            raise TransferError(SOURCE_CHANGED, f"{where.rel!r} was replaced during the copy")
        with _fd(_walk_dest(where.user_root, list(where.dest_parts), None, None, len(where.dest_parts))) as pfd:
            try:
                tmpfd = os.open(where.tmpname, _DIR_FLAGS, dir_fd=pfd)
            except OSError as exc:
                raise TransferError(UNSAFE_DESTINATION,
                                    f"temporary folder {where.tmpname!r} cannot be opened: {exc.strerror}") from None
        st = os.fstat(tmpfd)
        if (st.st_dev, st.st_ino) != where.tmp_id:
            os.close(tmpfd)
            raise TransferError(UNSAFE_DESTINATION, f"temporary folder {where.tmpname!r} was replaced")
    except BaseException:
        os.close(srcfd)
        raise
    _worker_state["where"] = where
    _worker_state["fds"] = (srcfd, tmpfd)
    return srcfd, tmpfd


def _worker_copy(where: _Where, batch: list[_FileEntry], hashes: dict[str, tuple[tuple[str, str], ...]],
                 options: CopyOptions, dev: int) -> tuple[Any, ...]:
    """In a worker process: copy one batch.

    Answers ``("ok", files, bytes, files_cloned, bytes_cloned, reflink, hashed, unverified,
    unverified names, records)`` (``reflink``: whether cloning still seems possible; ``hashed``,
    ``unverified``: see :meth:`_Job.checked`; ``records``: the verified files, for the
    job's journal) or ``("error", reason, message)``.
    """
    try:
        srcfd, tmpfd = _worker_dirs(where)
        manifest = Manifest(resources=0, size_only=0, hashes=hashes) if hashes else None
        plan = Plan(files=len(batch), bytes=0, dirs=0, manifest=manifest)
        job = _Job(srcfd, tmpfd, dev, plan, options, lambda files, nbytes: None, lambda: False)
        job.faults = False
        job.records = []
        _copy_batch(job, batch)
        return ("ok", job.files_done, job.bytes_done, job.files_cloned, job.bytes_cloned, job.reflink,
                job.hashed, job.unverified, tuple(job.unverified_names), job.records)
    except TransferError as exc:  # not picklable as is: sent as its parts
        return ("error", exc.reason, exc.message)


def _worker_result(job: _Job, result: tuple[Any, ...]) -> BaseException | None:
    if result[0] == "ok":
        job.checked(result[6], result[7], result[8])
        job.progress(result[2], result[1])
        job.cloned(result[4], result[3])
        if not result[5]:
            job.reflink = False
        job.journal_add(result[9])
        return None
    return TransferError(result[1], result[2])


def _renameat2(olddir: int, old: str, newdir: int, new: str, flags: int) -> None:
    if _libc.renameat2(olddir, os.fsencode(old), newdir, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise _os_error(err, new)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        raise _os_error(ctypes.get_errno(), "syncfs")


def copy_tree(dts_root: str, source: Source, user_root: str, dest_parts: list[str], job_id: str, attempt: str,
              options: CopyOptions, *,
              on_plan: Callable[[Plan], None] = lambda p: None,
              on_progress: Callable[[int, int], None] = lambda files_done, bytes_done: None,
              should_stop: Callable[[], bool] = lambda: False,
              before_publish: Callable[[str, int, int], bool] = lambda tmpname, dev, ino: True,
              on_temp: Callable[[TempRecord], None] = lambda record: None,
              executor: concurrent.futures.Executor | None = None,
              resume_from: TempRecord | None = None) -> Result:
    """Copy ``source`` into ``user_root/dest_parts.../<name>``, verified, owned, published atomically.

    ``dest_parts[0]`` (the user's folder) must exist; later components are
    created when missing.  ``on_temp`` gets the :class:`TempRecord` of the
    temporary folder as soon as it is made, before anything is written into it
    (record it durably: it is what lets :func:`cleanup_temp` remove it after a
    crash).  Raises TransferError on any failure, after removing the temporary
    folder.

    ``resume_from`` is the :class:`TempRecord` of an earlier attempt's
    temporary folder beside this one (the caller's own record of it): the
    files its journal lists as verified, and that still check out, are moved
    into this attempt's folder instead of being copied again (see
    :func:`_salvage`).  That folder itself is left for the caller to remove.
    """
    tmpname = _temp_name(job_id, attempt)
    _new_hash(options.checksum)  # validate early
    if options.reflink not in ("auto", "never"):
        raise TransferError(BAD_REQUEST, f"unknown reflink mode {options.reflink!r} (auto or never)")
    if not dest_parts:
        raise TransferError(BAD_REQUEST, "no destination folder")
    rel = normalize_relpath(source.rel)
    if not rel:
        raise TransferError(BAD_REQUEST, "the source names the DTS area itself")
    name = rel.rsplit("/", 1)[-1]
    check_not_reserved(name)

    rootfd = srcfd = parentfd = tmpfd = None
    tmp_id: tuple[int, int] | None = None
    job: _Job | None = None
    try:
        # (1) re-resolve the source, (2-3) scan and read the manifest.
        rootfd = _open_root(dts_root, SOURCE_NOT_FOUND, "DTS area")
        srcfd = _open_source_dir(rootfd, rel)
        if should_stop():
            raise TransferError(CANCELLED, "cancelled")
        plan = _scan_fd(srcfd, options.max_bytes)
        on_plan(plan)
        # (4) destination parent, (5) our temp folder.
        parentfd = _walk_dest(user_root, list(dest_parts), options.uid, options.gid, 1)
        tmpfd, tmp_id = _make_temp(parentfd, tmpname)
        on_temp(_temp_record(tmpfd, attempt, options.uid))
        # (6) folders, then files in parallel (less those kept from an earlier attempt).
        job = _Job(srcfd, tmpfd, plan.dev, plan, options, on_progress, should_stop)
        for d in sorted(plan.dir_list, key=lambda d: d.rel.count("/")):
            parent, _, dname = d.rel.rpartition("/")
            with _fd(open_beneath(tmpfd, parent, _DIR_FLAGS)) as pfd:
                os.mkdir(dname, 0o700, dir_fd=pfd)
        journaled = not any(f.rel == JOURNAL_NAME for f in plan.file_list) and not any(
            d.rel == JOURNAL_NAME for d in plan.dir_list)
        kept: set[str] = set()
        if journaled:
            job.journal = _Journal(tmpfd, options.checksum, options.fsync)
            if resume_from is not None:
                kept = _salvage(job, parentfd, _temp_name(job_id, resume_from.attempt), resume_from)
        where = None
        if options.processes > 0:
            sst = os.fstat(srcfd)
            where = _Where(dts_root, rel, (sst.st_dev, sst.st_ino), user_root, tuple(dest_parts), tmpname, tmp_id)
        _run_files(job, executor, where, [f for f in plan.file_list if f.rel not in kept])
        job.check_stop()
        if job.journal is not None:  # its work is done: it must not be published
            job.journal.close()
            os.unlink(JOURNAL_NAME, dir_fd=tmpfd)
        # (7) folder modes, owners and times, deepest first; the top one last.
        for d in sorted(plan.dir_list, key=lambda d: -d.rel.count("/")):
            with _fd(open_beneath(tmpfd, d.rel, _DIR_FLAGS)) as dfd:
                _set_dir_attrs(dfd, d, options)
        assert plan.top is not None
        _set_dir_attrs(tmpfd, plan.top, options)
        # (8) durability, (9) fence, (10) publish.
        if options.fsync:
            _syncfs(tmpfd)
        if should_stop():
            raise TransferError(CANCELLED, "cancelled")
        _fault_point("publish")
        if not before_publish(tmpname, tmp_id[0], tmp_id[1]):
            raise TransferError(CANCELLED, "lost claim")
        final = _publish(parentfd, tmpname, tmp_id, name)
        _fault_point("published")
    except BaseException as exc:
        try:
            if parentfd is not None and tmp_id is not None:
                _remove_temp(parentfd, tmpname, tmp_id, tmpfd)
        finally:  # never leak the descriptors, whatever the removal raised
            if job is not None and job.journal is not None:
                job.journal.close()
            for fd in (tmpfd, parentfd, srcfd, rootfd):
                _close(fd)
        if not isinstance(exc, Exception):
            raise
        raise _as_transfer_error(exc, "copy failed") from (None if isinstance(exc, TransferError) else exc)
    # (11) the rename is done: the copy is published whatever happens now.
    try:
        if options.fsync:
            os.fsync(parentfd)
    except OSError as exc:
        log.warning("fsync of the destination folder after publishing %s failed: %s", final, exc)
    finally:
        for fd in (tmpfd, parentfd, srcfd, rootfd):
            _close(fd)
    m = plan.manifest
    return Result(name=final, files=plan.files, bytes=plan.bytes,
                  size_only=m.size_only if m else 0, manifest_resources=m.resources if m else 0,
                  ino=tmp_id[1], dev=tmp_id[0], files_cloned=job.files_cloned, bytes_cloned=job.bytes_cloned,
                  has_manifest=m is not None, hashed=job.hashed, unverified=job.unverified,
                  unverified_names=tuple(job.unverified_names),
                  files_resumed=job.files_resumed, bytes_resumed=job.bytes_resumed)


def _make_temp(parentfd: int, tmpname: str) -> tuple[int, tuple[int, int]]:
    """mkdirat the hidden temp folder (0700), open it and check it is ours and empty."""
    try:
        os.mkdir(tmpname, 0o700, dir_fd=parentfd)
    except FileExistsError:
        # Every attempt has a name of its own: whatever is there was not made by this
        # attempt (a planted look-alike, or a leftover only cleanup_temp may judge). Left alone.
        raise TransferError(UNSAFE_DESTINATION, f"{tmpname!r} already exists; it is left alone") from None
    try:
        fd = os.open(tmpname, _DIR_FLAGS, dir_fd=parentfd)
    except OSError as exc:
        raise TransferError(UNSAFE_DESTINATION, f"temporary folder {tmpname!r} cannot be opened: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or os.listdir(fd):
        os.close(fd)
        raise TransferError(UNSAFE_DESTINATION, f"temporary folder {tmpname!r} is not ours")
    return fd, (st.st_dev, st.st_ino)


def _btime_ns(fd: int) -> int:
    """The folder's birth time in ns (statx STATX_BTIME); 0 when the filesystem does not record it."""
    sx = _statx(fd, b"", AT_EMPTY_PATH, STATX_BTIME)
    if sx is None or not sx.stx_mask & STATX_BTIME:
        return 0
    return _ns(sx.stx_btime)


def _temp_record(tmpfd: int, attempt: str, uid: int | None) -> TempRecord:
    st = os.fstat(tmpfd)
    uids = (st.st_uid,) if uid is None or uid == st.st_uid else (st.st_uid, uid)
    return TempRecord(attempt, st.st_dev, st.st_ino, _btime_ns(tmpfd), uids)


def _remove_temp(parentfd: int, tmpname: str, tmp_id: tuple[int, int], tmpfd: int | None = None) -> None:
    """Remove our temp folder if the name still is it (never a look-alike).

    Its contents go first through the descriptor we hold (``tmpfd``): the user
    owns the parent and may have renamed the folder away, and what we made must
    not stay behind under their chosen name.  Then the folder itself, by name,
    only if the name still is that very folder.
    """
    try:
        if tmpfd is not None:
            _empty_dir(tmpfd)
        _rmtree_at(parentfd, tmpname, expect=tmp_id)
    except OSError as exc:
        log.error("cannot remove temporary folder %s: %s", tmpname, exc)


def _publish(parentfd: int, tmpname: str, tmp_id: tuple[int, int], name: str) -> str:
    """Rename the temp folder to ``name``, ``name-1``, … with RENAME_NOREPLACE."""
    for i in range(MAX_NAME_TRIES + 1):
        candidate = _candidate(name, i)
        st = os.stat(tmpname, dir_fd=parentfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != tmp_id:
            raise TransferError(UNSAFE_DESTINATION, f"temporary folder {tmpname!r} was replaced")
        try:
            _renameat2(parentfd, tmpname, parentfd, candidate, RENAME_NOREPLACE)
            return candidate
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                continue
            if exc.errno in (errno.EINVAL, errno.ENOSYS):
                raise TransferError(IO_ERROR, "the destination filesystem cannot rename without replacing "
                                              f"(renameat2 RENAME_NOREPLACE: {exc.strerror})") from None
            raise
    raise TransferError(UNSAFE_DESTINATION, f"no free name for {name!r} after {MAX_NAME_TRIES} tries")
