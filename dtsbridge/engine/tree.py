"""Copying a whole folder: the order of operations of one job, from resolving the source to publishing."""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import stat
from collections.abc import Callable

from dtsbridge.errors import (BAD_REQUEST, CANCELLED, IO_ERROR, SOURCE_NOT_FOUND, UNSAFE_DESTINATION,
                              TransferError)
from dtsbridge.engine.data import CopyOptions, Plan, Result, Source, TempRecord, for_job
from dtsbridge.engine.beneath import (RENAME_NOREPLACE, _DIR_FLAGS, _as_transfer_error, _btime_ns, _close,
                                      _fd, _open_root, _open_source_dir, _renameat2, _syncfs, _walk_dest,
                                      check_not_reserved, normalize_relpath, open_beneath)
from dtsbridge.engine.remove import MAX_NAME_TRIES, _candidate, _remove_temp, _temp_name
from dtsbridge.engine.scanner import _scan_fd
from dtsbridge.engine.copyfile import _Job, _new_hash, _set_dir_attrs
from dtsbridge.engine.journal import JOURNAL_NAME, _Journal, _salvage
from dtsbridge.engine.workers import CopyExecutor, WorkerPool, _Where, _run_files

log = logging.getLogger(__name__)

@for_job
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

    Files go to ``executor``'s threads (or this call's own); with
    ``options.processes``, batches of small files go to worker processes: those
    of ``executor`` when it is a :class:`CopyExecutor` (the service's, started
    once), else a pool started for this call and stopped when it ends.
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

        def scanning() -> None:
            if should_stop():
                raise TransferError(CANCELLED, "cancelled")
            on_progress(0, 0)  # a scan of many folders is moving too: no stall

        plan = _scan_fd(srcfd, options.max_bytes, scanning)
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
        pool = own_pool = None
        if where is not None:
            pool = executor.processes if isinstance(executor, CopyExecutor) else None
            if pool is None:
                pool = own_pool = WorkerPool()
        try:
            _run_files(job, executor, where, [f for f in plan.file_list if f.rel not in kept], pool)
        finally:
            if own_pool is not None:
                own_pool.shutdown(wait=True)
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
        options.faults.pause("publish")
        if not before_publish(tmpname, tmp_id[0], tmp_id[1]):
            raise TransferError(CANCELLED, "lost claim")
        final = _publish(parentfd, tmpname, tmp_id, name)
        options.faults.pause("published")
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



def _temp_record(tmpfd: int, attempt: str, uid: int | None) -> TempRecord:
    st = os.fstat(tmpfd)
    uids = (st.st_uid,) if uid is None or uid == st.st_uid else (st.st_uid, uid)
    return TempRecord(attempt, st.st_dev, st.st_ino, _btime_ns(tmpfd), uids)



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
