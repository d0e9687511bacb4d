"""Resolving beneath a held directory descriptor: openat2, renameat2, statx through ctypes; destination folders."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from dtsbridge.errors import (BAD_REQUEST, INTERNAL, IO_ERROR, NO_SPACE, OUTSIDE_DTS_AREA, SOURCE_NOT_FOUND,
                              UNSAFE_DESTINATION, TransferError)
from dtsbridge.engine.data import Source

log = logging.getLogger(__name__)

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

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2


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
    return int(ts.tv_sec) * 1_000_000_000 + int(ts.tv_nsec)


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
# Small helpers



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


def _renameat2(olddir: int, old: str, newdir: int, new: str, flags: int) -> None:
    if _libc.renameat2(olddir, os.fsencode(old), newdir, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise _os_error(err, new)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        raise _os_error(ctypes.get_errno(), "syncfs")


def _btime_ns(fd: int) -> int:
    """The folder's birth time in ns (statx STATX_BTIME); 0 when the filesystem does not record it."""
    sx = _statx(fd, b"", AT_EMPTY_PATH, STATX_BTIME)
    if sx is None or not sx.stx_mask & STATX_BTIME:
        return 0
    return _ns(sx.stx_btime)


