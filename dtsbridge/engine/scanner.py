"""Scanning the source folder through descriptors, refusing unsafe entries."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from dtsbridge.errors import (BAD_REQUEST, PAYLOAD_TOO_LARGE, SOURCE_CHANGED, SOURCE_NOT_FOUND, UNSAFE_ENTRY,
                              TransferError)
from dtsbridge.engine.data import Plan, Source, _DirEntry, _FileEntry
from dtsbridge.engine.beneath import (_DIR_FLAGS, _as_transfer_error, _fd, _lstat_at, _mnt_id, _open_root,
                                      _open_source_dir, normalize_relpath, open_beneath)
from dtsbridge.engine.manifest import _read_manifest

log = logging.getLogger(__name__)

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


def _scan_fd(srcfd: int, max_bytes: int | None, on_folder: Callable[[], None] = lambda: None) -> Plan:
    """Walk the folder ``srcfd``, refusing unsafe entries, and read its manifest.

    ``on_folder`` is called before each folder is listed (the copy's caller hears
    that a long scan is moving, and may stop it by raising).
    """
    top_st = os.fstat(srcfd)
    dev = top_st.st_dev
    mnt = _mnt_id(srcfd)
    files: list[_FileEntry] = []
    dirs: list[_DirEntry] = []
    total = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        on_folder()
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
                file_list=tuple(files), dir_list=tuple(dirs), top=top, dev=dev,
                ino=top_st.st_ino)



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


