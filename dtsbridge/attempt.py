"""One attempt at a job's copy: from the claim to the result the worker records.

:class:`Attempt` runs the copy engine for one claimed job (in the thread pool) and
answers its callbacks from the copying threads: progress, phases, the temporary
folder it makes (recorded in Redis before and after ``mkdir``) and the publish
fence (recorded before the rename: a copy past it may already be published, and
is never handed back). It also finds a folder an earlier attempt published before
its process died, and says what a published copy did (``detailed_status``, the
manifest check, ``delete_source``).

:class:`Temps` removes the temporary folders attempts recorded, each checked by
device, inode, birth time and owner, never taken on its name.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, cast

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger

from dtsbridge import engine, errors
from dtsbridge.config import Config
from dtsbridge.model import Job, Status, user_path
from dtsbridge.store import Store, StoreUnavailable
from dtsbridge.interfaces import ThreadRunner

if TYPE_CHECKING:
    from dtsbridge.worker import Worker

Fields = dict[str, Any]


@attrs.define
class Running:
    """A copy this process is running."""

    job_id: str
    token: str
    started: float
    stop: threading.Event = attrs.Factory(threading.Event)
    files_done: int = 0
    bytes_done: int = 0
    files_total: int | None = None
    bytes_total: int | None = None
    phase: str = "starting"
    lost: bool = False
    moved: float = 0.0  # time.monotonic() of the engine's last progress report (0: started)
    ended: Status | None = None  # the job ended while its copy still runs (stalled, timeout, cancel)
    ended_at: float = 0.0  # time.monotonic() when it was so ended
    widened: bool = False  # the file executor was widened for its possibly stuck threads


class Temps:
    """The temporary folders attempts recorded making: removed (when they are what was made), then forgotten."""

    log = Logger()

    def __init__(self, config: Config, store: Store, run_in_thread: ThreadRunner) -> None:
        self.config = config
        self.store = store
        self.run_in_thread = run_in_thread

    async def cleanup(self, job: Job, dest_parts: list[str], keep: engine.TempRecord | None = None) -> int:
        """Remove the temporary folders earlier attempts of ``job`` recorded making, then forget them.

        Each is checked by device, inode, birth time and owner (engine.cleanup_temp),
        never taken on its name: a look-alike the user or DTS made is left alone.
        ``keep`` (the folder a resumed attempt takes files from) stays, with its record.
        """
        records = [r for r in engine.TempRecord.decode_all(job.extra.get("temp_dirs"))
                   if keep is None or r.attempt != keep.attempt]
        if not records:
            return 0
        n: int = await self.run_in_thread(engine.cleanup_temp, self.config.user_root, dest_parts, job.job_id,
                                          records)
        try:
            await self.store.drop_temps(job.job_id, [r.attempt for r in records])
        except StoreUnavailable as e:  # kept: checked again, harmlessly, by the next cleanup
            self.log.warn("job {job_id}: could not forget its temporary folder records: {e}", job_id=job.job_id, e=e)
        return n

    async def settle(self, job_id: str, dest_parts: list[str], attempt: str, records: list[engine.TempRecord]) -> None:
        """After copy_tree: remove what is left of this attempt's folder (if anything), forget its record."""
        try:
            if records:
                await self.run_in_thread(engine.cleanup_temp, self.config.user_root, dest_parts, job_id, records)
            await self.store.drop_temps(job_id, [attempt])
        except (errors.TransferError, StoreUnavailable) as e:  # the record stays for a later cleanup
            self.log.warn("job {job_id}: attempt {attempt} not settled: {e}", job_id=job_id, attempt=attempt, e=e)

    async def cleanup_ended(self, job_id: str) -> None:
        """The temporary folders of a job that ended (or was requeued) while an attempt of it was dead."""
        job = await self.store.get_job(job_id)
        if job is None or not job.dest_parts:
            return
        n = await self.cleanup(job, [p for p in job.dest_parts.split("/") if p])
        if n:
            self.log.info("job {job_id}: removed {n} temporary folders of a dead attempt", job_id=job_id, n=n)


class Attempt:
    """One claimed job's copy, verify and publish, for ``worker``; :meth:`run` gives its final status and fields."""

    log = Logger()

    def __init__(self, worker: Worker, run: Running) -> None:
        self.worker = worker
        self.config = worker.config
        self.store = worker.store
        self.run_in_thread = worker.run_in_thread
        self.metrics = worker.metrics
        self.temps = worker.temps
        self.running = run
        self.phase_started = time.monotonic()
        self.scanned: list[engine.Plan] = []  # what was copied: all that delete_source may remove
        self.made: list[engine.TempRecord] = []

    async def run(self) -> tuple[Status, Fields]:
        """Copy, verify and publish the job; its final status and fields (raises only on a bug or Redis away)."""
        run, worker, cfg = self.running, self.worker, self.config
        job = await worker.retrying("reading the job", run.job_id, lambda: self.store.get_job(run.job_id))
        if job is None:
            return Status.ERROR, {"reason": errors.INTERNAL, "detailed_status": "job record vanished"}
        dest_parts = [p for p in job.dest_parts.split("/") if p]
        attempt = run.token
        self.log.info("job {job_id}: copying {folder} for {user} (attempt {attempt})", job_id=job.job_id,
                      folder=job.source_rel, user=job.target_user, attempt=job.extra.get("attempts"))
        try:
            if not job.source_rel:
                raise errors.TransferError(errors.SOURCE_NOT_FOUND, "the job names no source folder")
            source = engine.Source(rel=job.source_rel, name=job.source_rel.rsplit("/", 1)[-1])
            # A previous attempt may have published before its process died.
            if job.extra.get("publish_ino"):
                found = await self._published_before(job, dest_parts, source)
                if found is not None:
                    return Status.SUCCESS, found
            # Resume: the latest earlier attempt's folder (as recorded) is kept for this attempt to
            # take its verified files from; every other one goes now, that one once the copy ends.
            resume_from = next((r for r in reversed(engine.TempRecord.decode_all(job.extra.get("temp_dirs")))
                                if not r.pending and r.attempt != attempt), None)
            await self.temps.cleanup(job, dest_parts, keep=resume_from)
            uid, gid = await self.run_in_thread(worker.users.ownership, job.target_user)
            options = engine.CopyOptions(checksum=cfg.checksum, uid=uid, gid=gid,
                                         max_bytes=cfg.max_payload_bytes, fsync=cfg.fsync, workers=cfg.threads,
                                         processes=cfg.processes, reflink=cfg.reflink, faults=worker.faults)
            # Recorded before the folder is made (then with its inode as soon as it is), so
            # that a crash at any moment leaves a folder a later cleanup knows to be ours.
            pending = engine.TempRecord(attempt).encode()
            if not await worker.retrying("recording the temporary folder", run.job_id,
                                         lambda: self.store.add_temp(run.job_id, run.token, pending)):
                raise errors.TransferError(errors.CANCELLED, "lost claim")
            try:
                result: engine.Result = await self.run_in_thread(
                    engine.copy_tree, cfg.dts_root, source, cfg.user_root, dest_parts, job.job_id, attempt, options,
                    on_plan=self.on_plan, on_progress=self.on_progress, should_stop=run.stop.is_set,
                    before_publish=self.before_publish, on_temp=self.on_temp, executor=worker.executor,
                    resume_from=resume_from)
            except Exception:
                # copy_tree removed its folder; make sure (by inode) before forgetting it.
                await self.temps.settle(job.job_id, dest_parts, attempt, self.made or [engine.TempRecord(attempt)])
                raise
            finally:
                if resume_from is not None:  # what is left of the earlier attempt's folder
                    await self.temps.settle(job.job_id, dest_parts, resume_from.attempt, [resume_from])
            await self.temps.settle(job.job_id, dest_parts, attempt, [])  # published: nothing to remove
        except errors.TransferError as e:
            if e.reason == errors.CANCELLED:
                return Status.CANCELLED, {"detailed_status": "cancelled; everything made for it was removed"}
            return Status.ERROR, {"reason": e.reason, "detailed_status": e.message,
                                  "files_done": run.files_done, "bytes_done": run.bytes_done}
        self._phase_done("publish")
        return Status.SUCCESS, await self._success(job, source, result)

    async def _published_before(self, job: Job, dest_parts: list[str], source: engine.Source) -> Fields | None:
        """The success fields when an earlier attempt published before its process died, else None."""
        name: str | None = await self.run_in_thread(
            engine.find_published, self.config.user_root, dest_parts, source.name,
            int(job.extra["publish_dev"]), int(job.extra["publish_ino"]))
        if name is None:
            await self.worker.retrying("clearing a dead attempt's publish record", job.job_id,
                                       lambda: self.store.unfence(job.job_id, self.running.token))
            return None
        await self.temps.cleanup(job, dest_parts)
        self.log.info("job {job_id}: found its folder {name} published before a crash", job_id=job.job_id, name=name)
        files = int(job.extra.get("publish_files") or job.files_total or 0)
        nbytes = int(job.extra.get("publish_bytes") or job.bytes_total or 0)
        return {"path": user_path(job.target_user, self.config.target_subdir, name),
                "files_total": files, "files_done": files, "bytes_total": nbytes, "bytes_done": nbytes,
                "detailed_status": f"published {name} (recovered after a restart)"}

    async def _success(self, job: Job, source: engine.Source, result: engine.Result) -> Fields:
        """The fields of a published copy (and the source deleted, with ``[paths] delete_source``)."""
        cfg = self.config
        self.metrics.bytes_copied.inc(result.bytes)
        self.metrics.files_copied.inc(result.files)
        detail = f"copied and verified {result.files} files ({result.bytes} bytes) to {result.name}"
        fields: Fields = {
            "path": user_path(job.target_user, cfg.target_subdir, result.name),
            "files_total": result.files, "files_done": result.files,
            "bytes_total": result.bytes, "bytes_done": result.bytes,
        }
        if result.files_cloned:
            fields["files_cloned"] = result.files_cloned
            fields["bytes_cloned"] = result.bytes_cloned
            detail += f" ({result.files_cloned} cloned)"
        if result.files_resumed:
            fields["files_resumed"] = result.files_resumed
            fields["bytes_resumed"] = result.bytes_resumed
            detail += (f"; resumed: {result.files_resumed} files ({result.bytes_resumed} bytes) verified by an "
                       "earlier attempt were kept")
        if result.has_manifest:
            fields.update(manifest_resources=result.manifest_resources, manifest_hashed=result.hashed,
                          manifest_size_only=result.size_only, manifest_unverified=result.unverified)
            detail += manifest_detail(result)
            for check, n in (("hashed", result.hashed), ("size_only", result.size_only),
                             ("unverified", result.unverified)):
                if n:
                    self.metrics.manifest_files.labels(check).inc(n)
        fields["detailed_status"] = detail
        if cfg.delete_source and not self.scanned:
            fields["detailed_status"] = detail + "; the source was kept: no record of what was copied"
        elif cfg.delete_source:
            try:
                kept = await self.run_in_thread(engine.remove_source, cfg.dts_root, source, self.scanned[-1])
                if kept is None:
                    fields["source_deleted"] = True
                else:
                    self.log.warn("job {job_id}: the source was kept partially: {kept}", job_id=job.job_id, kept=kept)
                    fields["detailed_status"] = detail + f"; the source was kept partially: {kept}"
            except Exception as e:  # noqa: BLE001 - the copy stands; say what was left
                self.log.warn("job {job_id}: could not delete the source: {e}", job_id=job.job_id, e=e)
                fields["detailed_status"] = detail + f"; the source could not be deleted: {e}"
        return fields

    # -- the engine's callbacks, from its threads -----------------------------

    def _phase_done(self, phase: str) -> None:
        now = time.monotonic()
        self.metrics.phase_seconds.labels(phase).observe(now - self.phase_started)
        self.phase_started = now

    def on_plan(self, plan: engine.Plan) -> None:
        self.scanned.append(plan)
        self.running.files_total, self.running.bytes_total = plan.files, plan.bytes
        self.running.phase = "copying and verifying"
        self._phase_done("scan")

    def on_progress(self, files_done: int, bytes_done: int) -> None:
        self.running.files_done, self.running.bytes_done = files_done, bytes_done
        self.running.moved = time.monotonic()

    def _on_reactor(self, what: str, call: Callable[[], Awaitable[bool]]) -> bool:
        """``call`` (a Redis call, retried through an outage) on the reactor; this thread waits for it."""
        worker = self.worker

        def retried() -> Any:
            return ensureDeferred(worker.retrying(what, self.running.job_id, call))

        return bool(blockingCallFromThread(cast(IReactorFromThreads, worker.reactor), retried))

    def before_publish(self, tmpname: str, dev: int, ino: int) -> bool:
        run = self.running
        run.phase = "publishing"
        self._phase_done("copy")
        if run.stop.is_set():
            return False
        try:
            return self._on_reactor("fencing the publish", lambda: self.store.fence(run.job_id, run.token, {
                "publish_tmp": tmpname, "publish_dev": dev, "publish_ino": ino,
                "publish_files": run.files_total, "publish_bytes": run.bytes_total}))
        except StoreUnavailable:  # stopping with Redis away: do not publish; the job is taken up again
            run.lost = True
            return False

    def on_temp(self, record: engine.TempRecord) -> None:
        self.made.append(record)
        word = record.encode()
        if not self._on_reactor("recording the temporary folder",
                                lambda: self.store.add_temp(self.running.job_id, self.running.token, word)):
            raise errors.TransferError(errors.CANCELLED, "lost claim")


def manifest_detail(result: engine.Result) -> str:
    """What the manifest check found, for ``detailed_status``; names the unverified files."""
    detail = (f"; manifest: {result.manifest_resources} resources, {result.hashed} files checked by hash, "
              f"{result.size_only} by size only (no hash given)")
    if result.unverified:
        names = ", ".join(result.unverified_names)
        more = result.unverified - len(result.unverified_names)
        detail += (f", {result.unverified} unverified (an S3 multipart ETag that no likely part size "
                   f"matches; checked by size): {names}" + (f" and {more} more" if more > 0 else ""))
    return detail
