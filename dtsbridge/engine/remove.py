"""Removal by recorded identity: temporary folders (device, inode, birth time, owner), published folders, the source."""

from __future__ import annotations

import errno
import logging
import os
import re
import stat

from dtsbridge.errors import BAD_REQUEST, SOURCE_NOT_FOUND, TransferError
from dtsbridge.engine.data import Plan, Source, TempRecord, _ATTEMPT_RE, _FileEntry, for_job
from dtsbridge.engine.beneath import (RENAME_NOREPLACE, _DIR_FLAGS, _btime_ns, _close, _fd, _mnt_id,
                                      _open_root, _os_error, _reason_for, _renameat2, _source_error,
                                      _lstat_at, _walk_dest, normalize_relpath, open_beneath)

log = logging.getLogger(__name__)

MAX_NAME_TRIES = 10000

_JOB_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


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


def _open_child_dir(parentfd: int, name: str) -> int | None:
    """:func:`_open_subdir` of folder ``name`` on ``parentfd``'s own file system and mount."""
    return _open_subdir(parentfd, name, os.fstat(parentfd).st_dev, _mnt_id(parentfd))


def _dev_ino(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


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
            start = os.dup(topfd)
        else:
            opened = _open_subdir(topfd, item, dev, mnt)
            if opened is None:
                _unlink_entry(topfd, item)
                continue
            start = opened
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
    fd = _open_child_dir(parentfd, name)
    if fd is None:
        return False
    with _fd(fd):
        if expect is not None and _dev_ino(fd) != expect:
            return False
        _empty_dir(fd)
    os.rmdir(name, dir_fd=parentfd)  # only ever removes an empty folder
    return True


@for_job
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


def remove_source(dts_root: str, source: Source, plan: Plan | None = None) -> str | None:
    """Delete the DTS folder link-safely (``delete_source``); a missing one is fine.

    With ``plan`` (the scan of the copy) only what was copied goes: the folder
    must still be the very one scanned (device and inode; one that replaced it
    under its name is left alone), and only the files that are still the ones
    copied (inode, size, modification time) are unlinked; any other entry (a
    file that arrived during the copy, one replaced or changed since) stays,
    with the folders that hold it.  Returns None when the folder is gone
    entirely, else what was kept (for the job's ``detailed_status``).
    """
    rel = normalize_relpath(source.rel)
    if not rel:
        raise TransferError(BAD_REQUEST, "refusing to remove the DTS area itself")
    parent, _, name = rel.rpartition("/")
    with _fd(_open_root(dts_root, SOURCE_NOT_FOUND, "DTS area")) as rootfd:
        try:
            pfd = open_beneath(rootfd, parent, _DIR_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _source_error(exc, parent) from None
        with _fd(pfd):
            try:
                if plan is None:
                    _rmtree_at(pfd, name)
                    return None
                return _remove_copied(pfd, name, rel, plan)
            except OSError as exc:
                raise TransferError(_reason_for(exc), f"cannot remove {rel!r}: {exc}") from None


def _remove_copied(pfd: int, name: str, rel: str, plan: Plan) -> str | None:
    """Unlink, in folder ``name`` of ``pfd``, the files of ``plan`` that are still the ones copied; then the
    folders left empty. Returns None when the folder is gone, else what was kept."""
    srcfd = _open_child_dir(pfd, name)
    if srcfd is None:
        return None
    with _fd(srcfd):
        if _dev_ino(srcfd) != (plan.dev, plan.ino):
            log.warning("delete_source: %r is no longer the folder copied (replaced); left in place", rel)
            return f"{rel!r} is no longer the folder that was copied (replaced since); it was left in place"
        by_dir: dict[str, list[tuple[str, _FileEntry]]] = {}
        for f in plan.file_list:
            d, _, fname = f.rel.rpartition("/")
            by_dir.setdefault(d, []).append((fname, f))
        changed: list[str] = []
        for d, entries in by_dir.items():
            try:
                dfd = open_beneath(srcfd, d, _DIR_FLAGS) if d else os.dup(srcfd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                    raise
                changed.extend(f.rel for _, f in entries)
                continue
            with _fd(dfd):
                for fname, f in entries:
                    try:
                        cur = _lstat_at(dfd, fname)
                    except FileNotFoundError:
                        continue
                    if (stat.S_ISREG(cur.st_mode) and cur.st_dev == plan.dev and cur.st_ino == f.ino
                            and cur.st_size == f.size and cur.st_mtime_ns == f.mtime_ns):
                        _unlink_entry(dfd, fname)
                    else:
                        changed.append(f.rel)
        for dent in sorted(plan.dir_list, key=lambda d: d.rel.count("/"), reverse=True):
            dparent, _, dname = dent.rel.rpartition("/")
            try:
                with _fd(open_beneath(srcfd, dparent, _DIR_FLAGS) if dparent else os.dup(srcfd)) as dfd:
                    os.rmdir(dname, dir_fd=dfd)  # only ever removes an empty folder
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) and exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                    raise
        left = os.listdir(srcfd)
    if not left:
        try:
            cur = _lstat_at(pfd, name)
            if stat.S_ISDIR(cur.st_mode) and (cur.st_dev, cur.st_ino) == (plan.dev, plan.ino):
                os.rmdir(name, dir_fd=pfd)  # only ever removes an empty folder
                return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    what = f"{rel!r} was kept partially: entries not copied"
    if changed:
        what += f" ({len(changed)} copied file(s) changed or replaced since, e.g. {changed[0]!r})"
    what += " were left in place, with the folders holding them"
    log.warning("delete_source: %s", what)
    return what


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


