"""Running a job's files: threads for big files, a pool of worker processes for batches of small ones."""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import attrs

from dtsbridge.errors import INTERNAL, SOURCE_CHANGED, SOURCE_NOT_FOUND, UNSAFE_DESTINATION, TransferError
from dtsbridge.engine.data import CHUNK, CopyOptions, Manifest, Plan, _FileEntry
from dtsbridge.engine.beneath import _DIR_FLAGS, _close, _fd, _open_root, _open_source_dir, _walk_dest
from dtsbridge.engine.copyfile import _Dirs, _Job, _copy_file

log = logging.getLogger(__name__)

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
               files: list[_FileEntry] | None = None, pool: WorkerPool | None = None) -> None:
    """Copy every file (or those of ``files``), in parallel; the first error stops the others and is raised.

    Batches of small files go to the worker processes of ``pool`` when
    ``where`` is given and the pool is up; everything else to the thread ``executor``.
    """
    files = list(job.plan.file_list) if files is None else files
    workers = max(1, job.options.workers)
    procs = pool.get(job.options.processes) if where is not None and pool is not None else None
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
        fut: concurrent.futures.Future[Any]
        while True:
            while first_error is None and len(inflight) < window:
                job.check_stop()  # worker processes do not see a cancel: stop handing them batches
                nb = next(it, None)
                if nb is None:
                    break
                b = nb
                if procs is not None and where is not None and all(f.size < PROCESS_FILE_MAX for f in b):
                    try:
                        hashes = {f.rel: job.hashes[f.rel] for f in b if f.rel in job.hashes}
                        opts = attrs.evolve(job.options, reflink="auto" if job.reflink else "never",
                                            faults=job.claim_faults({"copy", "verify"}))
                        rows = [(f.rel, f.size, f.ino, f.mode, f.mtime_ns) for f in b]
                        fut = procs.submit(_worker_copy, where, rows, hashes, opts, job.dev)
                    except (concurrent.futures.BrokenExecutor, RuntimeError, OSError):
                        assert pool is not None
                        pool.drop(procs)
                        procs = None
                        fut = executor.submit(contextvars.copy_context().run, _copy_batch, job, b)
                    else:
                        in_process.add(fut)
                else:
                    fut = executor.submit(contextvars.copy_context().run, _copy_batch, job, b)
                inflight.add(fut)
            if not inflight:
                break
            done, inflight = concurrent.futures.wait(inflight, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if exc is None and fut in in_process:
                    exc = _worker_result(job, fut.result())
                if isinstance(exc, concurrent.futures.BrokenExecutor):
                    if pool is not None:
                        pool.drop(procs)
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


class WorkerPool:
    """The worker processes for batches of small files: started on first use, stopped by its owner.

    Owned by whoever made it (the service: :class:`CopyExecutor`; or one
    :func:`~dtsbridge.engine.tree.copy_tree` call that was given none), who
    calls :meth:`shutdown`.  A pool found broken is dropped and the next job
    starts a new one; one that cannot start at all (no ``forkserver`` here)
    leaves every later job to threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._size = 0
        self._failed = False
        self._closed = False

    def get(self, n: int) -> concurrent.futures.ProcessPoolExecutor | None:
        """The pool of ``n`` worker processes (started now if need be); None when off or unavailable."""
        if n <= 0 or self._failed or self._closed:
            return None
        with self._lock:
            if self._closed:
                return None
            if self._pool is not None and self._size == n:
                return self._pool
            old, self._pool = self._pool, None
            if old is not None:
                old.shutdown(wait=False, cancel_futures=True)
            try:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload([__name__])
                self._pool = concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                                                    initargs=(os.getpid(),))
                self._size = n
            except (OSError, ValueError, ImportError) as exc:
                log.warning("copy worker processes unavailable, using threads only: %s", exc)
                self._failed = True
                return None
            return self._pool

    def drop(self, pool: concurrent.futures.ProcessPoolExecutor | None) -> None:
        """Forget a broken pool (the next job starts a new one)."""
        with self._lock:
            if pool is not None and self._pool is pool:
                self._pool = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self, wait: bool = False) -> None:
        """Stop the worker processes, if any were started; later jobs use threads only.

        Without ``wait`` this returns at once; the processes end as soon as their
        current batch (milliseconds) is done, and the interpreter joins them at
        exit (or a later ``shutdown(wait=True)`` does).
        """
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)


class CopyExecutor(concurrent.futures.ThreadPoolExecutor):
    """The service's copy executors: threads for files, and the :class:`WorkerPool` it owns (``processes``).

    Pass it as ``copy_tree(executor=...)``.  ``shutdown(wait=True)`` stops and joins both;
    ``shutdown(wait=False)`` stops the threads only (joining the processes blocks): then
    ``processes.shutdown(wait=True)`` from a thread that may block.
    """

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.processes = WorkerPool()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self.processes.shutdown(wait=True)


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


#: Kept for the worker's start-up (cleared there); a worker holds no descriptor between batches.
_worker_state: dict[str, Any] = {}


def _worker_dirs(where: _Where) -> tuple[int, int]:
    """Open the job's source and temporary folders for one batch (closed when the batch ends: an idle
    worker holds nothing on a job's folders, whose volume can then be unmounted)."""
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
    return srcfd, tmpfd


def _worker_copy(where: _Where, files: list[tuple[Any, ...]], hashes: dict[str, tuple[tuple[str, str], ...]],
                 options: CopyOptions, dev: int) -> tuple[Any, ...]:
    """In a worker process: copy one batch (``files``: the :class:`_FileEntry` fields, as tuples,
    which pickle in ~60% of the time attrs instances take).

    Answers ``("ok", files, bytes, files_cloned, bytes_cloned, reflink, hashed, unverified,
    unverified names, records)`` (``reflink``: whether cloning still seems possible; ``hashed``,
    ``unverified``: see :meth:`_Job.checked`; ``records``: the verified files, for the
    job's journal) or ``("error", reason, message)``.
    """
    batch = [_FileEntry(*f) for f in files]
    srcfd = tmpfd = None
    try:
        srcfd, tmpfd = _worker_dirs(where)
        manifest = Manifest(resources=0, size_only=0, hashes=hashes) if hashes else None
        plan = Plan(files=len(batch), bytes=0, dirs=0, manifest=manifest)
        job = _Job(srcfd, tmpfd, dev, plan, options, lambda files, nbytes: None, lambda: False)
        job.records = []
        _copy_batch(job, batch)
        return ("ok", job.files_done, job.bytes_done, job.files_cloned, job.bytes_cloned, job.reflink,
                job.hashed, job.unverified, tuple(job.unverified_names), job.records)
    except TransferError as exc:  # not picklable as is: sent as its parts
        return ("error", exc.reason, exc.message)
    finally:
        _close(srcfd)
        _close(tmpfd)


def _worker_result(job: _Job, result: tuple[Any, ...]) -> BaseException | None:
    if result[0] == "ok":
        job.checked(result[6], result[7], result[8])
        job.progress(result[2], result[1])
        job.cloned(result[4], result[3])
        if not result[5]:
            job.reflink = False
        job.journal_add(result[9], background=True)  # the batches keep going out while it syncs
        return None
    return TransferError(result[1], result[2])


