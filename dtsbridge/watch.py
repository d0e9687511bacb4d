"""Watching the DTS area: complete a transfer when its ``manifest.json`` has landed.

DTS writes ``<dts_root>/<username>/dts-<uuid>/`` and sends ``manifest.json``
last. Every ``[watch] interval_seconds`` the watcher lists the folders one and
two levels below ``dts_root`` (never following a link), notes each
``manifest.json`` with its size and mtime, and when one has not changed for
``settle_seconds`` it queues the same job ``/complete_transfer`` would, for the
manifest's ``username`` (or, if the manifest names none, the ``<username>``
folder of the DTS layout). In that layout, a manifest naming another user than
its ``<username>`` folder delivers nothing (an ERROR job, ``manifest_mismatch``).
The manifest is read by the copy engine's reader (size bound, parse-bomb and
nesting guards, streaming parse, in the thread pool): one that cannot be parsed
gives its folder one ERROR job.

Exactly once per folder, across processes: the folder is taken with
``SET NX`` in Redis before the job is queued (a mark that expires after five
minutes unless the job was made, so a process that dies in between loses
nothing), and the job is created under the
folder key that a later ``/complete_transfer`` for the same user and folder
finds (so that call answers 200 with the same ``job_id``). A manifest that
cannot be used fails its job with a reason; it never stops the watcher.

The mark outlives the job (see ``lua.WATCHED_DONE``): it lasts at least
``WATCH_MARK_MS`` (30 days, or the retention if longer), renewed once a day
and at each start while the watcher sees the folder, and cut to the retention
when the folder leaves the DTS area. So a folder is not delivered again after
its job was forgotten and the service restarted.

A folder whose name is not valid UTF-8 (possible on Linux; DTS mirrors source
names) cannot be a job's ``subdirectory``: it gets one ERROR job
(``bad_request``) whose ``subdirectory`` spells the bad bytes as ``\\xNN``,
under a mark of its own (``/`` + that spelling: no real folder's mark begins
with ``/``), and never stops the pass.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from dtsbridge import engine, errors
from dtsbridge.interfaces import ThreadRunner
from dtsbridge.jobs import Jobs
from dtsbridge.worker import Periodic
from dtsbridge.model import Status, now_iso
from dtsbridge.store import StoreUnavailable, WatchMark

MANIFEST = "manifest.json"
#: how often the watcher renews the mark of a done folder it still sees (seconds)
KEEP_EVERY = 86400.0


def shown(rel: str) -> str:
    """``rel`` as valid text: bytes that are not UTF-8 (surrogate-escaped by ``os``) spelt ``\\xNN``."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def mark_name(rel: str) -> str:
    """The folder's name in the watcher's mark: itself, or for a name that is not UTF-8, ``/`` + its spelling."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return "/" + shown(rel)


def find_manifests(dts_root: str) -> dict[str, tuple[int, int]]:
    """``{folder relative to dts_root: (size, mtime_ns)}`` of every manifest one or two levels down."""
    out: dict[str, tuple[int, int]] = {}
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    root = os.open(dts_root, flags)
    try:
        def visit(dirfd: int, rel: str, depth: int) -> None:
            try:
                entries = list(os.scandir(dirfd))
            except OSError:
                return
            for e in entries:
                if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                    continue
                try:
                    fd = os.open(e.name, flags, dir_fd=dirfd)
                except OSError:
                    continue
                try:
                    sub = f"{rel}/{e.name}" if rel else e.name
                    try:
                        st = os.stat(MANIFEST, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        st = None
                    if st is not None and stat.S_ISREG(st.st_mode):
                        out[sub] = (st.st_size, st.st_mtime_ns)
                    elif depth < 2:
                        visit(fd, sub, depth + 1)
                finally:
                    os.close(fd)

        visit(root, "", 1)
    finally:
        os.close(root)
    return out


class _Later(Exception):
    """The folder cannot be taken now (it moved meanwhile); a later pass looks again."""


class WatchService(Service):
    """Polls the DTS area and queues a job for each settled manifest."""

    log = Logger()

    def __init__(self, jobs: Jobs, run_in_thread: ThreadRunner, clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs = jobs
        self.run_in_thread = run_in_thread
        self.clock = clock
        self.cfg = jobs.config
        self.seen: dict[str, tuple[tuple[int, int], float]] = {}
        #: folders this process knows are done -> when it last renewed their mark (clock)
        self.done: dict[str, float] = {}
        self.failed: set[str] = set()  # folders whose last take raised (logged once)
        self._loop: Periodic | None = None
        self._busy = False

    def startService(self) -> None:
        Service.startService(self)
        # whatever a pass raises is logged and the next pass comes (never a dead loop)
        self._loop = Periodic("watching the DTS area", self.cfg.watch_interval, self._poll, self.jobs.clock)
        self._loop.startService()

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop is not None:
            self._loop.stopService()

    def _poll(self) -> None:
        if self._busy or self.jobs.draining:
            return
        self._busy = True
        d = ensureDeferred(self.scan())
        d.addErrback(lambda f: self.log.failure("watching the DTS area failed", f))
        d.addBoth(lambda _: setattr(self, "_busy", False))

    async def scan(self) -> list[str]:
        """One pass: returns the folders queued in it."""
        try:
            found = await self.run_in_thread(find_manifests, self.cfg.dts_root)
        except OSError as e:
            self.log.warn("cannot list the DTS area {root}: {e}", root=self.cfg.dts_root, e=e)
            return []
        now = self.clock()
        queued: list[str] = []
        store = self.jobs.store
        for rel, sig in found.items():
            if rel in self.done:
                if now - self.done[rel] >= KEEP_EVERY:
                    try:
                        await store.keep_watched(mark_name(rel))
                    except StoreUnavailable:
                        return queued
                    self.done[rel] = now
                continue
            prev = self.seen.get(rel)
            if prev is None or prev[0] != sig:
                self.seen[rel] = (sig, now)
                if self.cfg.watch_settle > 0 or prev is None:
                    continue
            elif now - prev[1] < self.cfg.watch_settle:
                continue
            try:
                taken = await self.take(rel)
            except StoreUnavailable:
                return queued
            except Exception as e:  # noqa: BLE001 -- one folder's trouble never keeps the pass from the others
                if rel not in self.failed:
                    self.failed.add(rel)
                    self.log.failure("watcher: {folder} failed; it is tried again each pass (logged once)",
                                     folder=shown(rel))
                else:
                    self.log.debug("watcher: {folder} failed again: {e!r}", folder=shown(rel), e=e)
                continue
            self.failed.discard(rel)
            if taken is None:
                continue  # another process is making its job right now: look again next pass
            if taken:
                queued.append(rel)
            self.done[rel] = now
            self.seen.pop(rel, None)
        for rel in list(self.seen):
            if rel not in found:
                del self.seen[rel]
        self.failed &= set(found)
        for rel in list(self.done):
            if rel not in found:  # left the DTS area (delete_source, DTS's cleanup): forget it in time
                try:
                    await store.watched_gone(mark_name(rel))
                except StoreUnavailable:
                    return queued
                del self.done[rel]
        return queued

    async def take(self, rel: str) -> bool | None:
        """Queue the job for one settled folder unless another process already took it.

        True: queued here; False: the folder has its job already; None: another
        process is taking it right now (its mark expires if that process dies).
        """
        store = self.jobs.store
        name = mark_name(rel)
        mark = await store.watch_mark(name)
        if mark is not None:
            if mark is WatchMark.TAKING:
                return None
            await store.keep_watched(name)  # done before (a restart, another process): still here, still done
            return False
        if not await store.mark_watched(name, self.jobs.holder):
            return None
        if name != rel:
            return await self.refuse_name(rel, name)
        parts = rel.split("/")
        # The DTS layout, <username>/dts-<uuid>: the folder says whose transfer it is.
        folder_user = parts[0] if len(parts) == 2 and parts[1].startswith("dts-") else None
        user = folder_user or ""
        try:
            try:
                named = await self.run_in_thread(engine.read_manifest_username, self.cfg.dts_root, rel)
            except errors.TransferError as e:
                if e.reason in (errors.SOURCE_NOT_FOUND, errors.SOURCE_CHANGED):
                    raise _Later() from None  # the folder or manifest moved meanwhile: look again next pass
                # Cannot be parsed (bad JSON, nested too deep, a parse bomb) or read: one ERROR job.
                raise errors.Invalid(e.message, reason=e.reason) from None
            if folder_user is not None and named is not None and named != folder_user:
                raise errors.Invalid(f"manifest.json names user {named!r}, but the folder is in "
                                     f"{folder_user!r}'s DTS folder; nothing delivered",
                                     reason=errors.MANIFEST_MISMATCH)
            user = named or user
            if not user:
                raise errors.Invalid("the manifest names no username", reason=errors.MANIFEST_MISMATCH)
            job, created = await self.jobs.submit(user, rel, "watcher", kind="watch")
            await store.watched_done(rel, job.job_id)
            self.log.info("watcher: {folder} for {user} is job {job_id}", folder=rel, user=user, job_id=job.job_id)
        except errors.Refused as e:
            job_id = await self.record_failure(rel, rel, user or "", e)
            self.log.warn("watcher: {folder} cannot be completed: {msg} (job {job_id})", folder=rel,
                          msg=e.message, job_id=job_id)
        except BaseException as e:
            # Not a refusal (Redis away, shutting down): let a later pass, here or elsewhere, try again.
            try:
                await store.unmark_watched(rel)
            except StoreUnavailable:
                pass
            if isinstance(e, _Later):
                return None
            raise
        return True

    async def refuse_name(self, rel: str, name: str) -> bool:
        """One ERROR job for a folder whose name is not UTF-8 (taken under ``name``)."""
        parts = rel.split("/")
        user = parts[0] if len(parts) == 2 and parts[1].startswith("dts-") and mark_name(parts[0]) == parts[0] else ""
        e = errors.Invalid(f"the folder's name '{shown(rel)}' is not valid UTF-8; it cannot be completed "
                           f"(rename it in the DTS area)", reason=errors.BAD_REQUEST)
        try:
            job_id = await self.record_failure(name, shown(rel), user, e)
        except BaseException:
            try:
                await self.jobs.store.unmark_watched(name)
            except StoreUnavailable:
                pass
            raise
        self.log.warn("watcher: {folder} cannot be completed: {msg} (job {job_id})", folder=shown(rel),
                      msg=e.message, job_id=job_id)
        return True

    async def record_failure(self, mark: str, rel: str, user: str, e: errors.Refused) -> str:
        """A job in ERROR for a folder the watcher cannot complete, so operators see why; its mark names it."""
        reason = e.reason or (errors.USER_NOT_FOUND if "user" in e.message else errors.BAD_REQUEST)
        job_id = str(uuid.uuid4())
        await self.jobs.store.record_watch_failure(job_id, mark, rel, user, reason, e.message, now_iso())
        self.jobs.metrics.jobs_finished.labels(Status.ERROR.value, reason).inc()
        return job_id
