"""The worker side: claim queued jobs, run their copies, keep their leases, recover and sweep.

:class:`Worker` is a Twisted ``MultiService`` made of two :class:`Periodic` timers:

- *claiming* (every 0.2 s, and at once when woken by :meth:`Worker.claim_soon`):
  take queued jobs from Redis while fewer than ``[copy] max_jobs`` copies run here;
  each claim is a lease and each copy runs in the thread pool (the copy engine);
- *housekeeping* (every second, :meth:`Worker.tick`): renew the leases of the running
  copies and record their progress, end stalled copies, put jobs whose lease lapsed
  (a killed process, a lost host) back in the queue, end staging and job timeouts,
  trim old jobs and refresh the job counts of ``/metrics``.

A job's end, whichever way it comes, is told to ``on_ended`` (the request side's
:class:`~dtsbridge.jobs.Waiters`). Stopping the service drains: no new claims,
running copies get ``[drain] grace_seconds`` to finish, the rest are handed back.
The clock/reactor is always passed in (a ``Clock`` in tests).
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import socket
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

import attrs
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtsbridge import engine, errors
from dtsbridge.config import Config
from dtsbridge.metrics import Metrics
from dtsbridge.model import Job, Status, now_iso, user_path
from dtsbridge.store import Store, StoreUnavailable
from dtsbridge.users import RunInThread, Users

T = TypeVar("T")

#: a copy thread still busy this long after its job ended is reported stuck (/healthz)
STUCK_AFTER = 5.0


class Periodic(TimerService):
    """Calls ``fn`` every ``interval`` seconds on ``clock``, whatever it raises or returns.

    magic-wormhole's ``TimerService`` + catch-and-log: a ``LoopingCall`` stops for
    good when its function fails, so every run is wrapped here; a failure (raised,
    or a failed Deferred or coroutine) is logged and the next tick comes as usual.
    The first failure of a streak is logged with its traceback, then one line a
    minute while it lasts, and the recovery once it ends. A run still going when a
    tick is due delays that tick (runs never overlap). The first run is at start.
    """

    log = Logger()

    def __init__(self, name: str, interval: float, fn: Callable[[], object], clock: Any) -> None:
        super().__init__(interval, self._once)
        self.clock = clock
        self.name = name
        self.interval = interval
        self.fn = fn
        self.runs = 0
        self.failures = 0  # in a row
        self._logged_at: float | None = None

    def _once(self) -> Deferred[None]:
        self.runs += 1

        def call() -> object:
            r = self.fn()
            return ensureDeferred(r) if hasattr(r, "__await__") and not isinstance(r, Deferred) else r  # type: ignore[arg-type]

        d = defer.maybeDeferred(call)
        return d.addCallbacks(self._ok, self._failed)

    def _ok(self, _: object) -> None:
        if self.failures:
            self.log.info("{task} works again after {n} failed runs", task=self.name, n=self.failures)
        self.failures = 0
        self._logged_at = None

    def _failed(self, f: Failure) -> None:
        self.failures += 1
        now = self.clock.seconds()
        if self._logged_at is None:
            self.log.failure("{task} failed; it runs again in {interval:g} s", f, task=self.name,
                             interval=self.interval)
            self._logged_at = now
        elif now - self._logged_at >= 60:
            self.log.warn("{task} still failing ({n} runs in a row): {error}", task=self.name, n=self.failures,
                          error=f.getErrorMessage())
            self._logged_at = now


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


class SpareExecutor(concurrent.futures.ThreadPoolExecutor):
    """The file-copy thread pool, ``[copy] threads`` wide, widened while ended copies may hold stuck threads.

    A ThreadPoolExecutor starts threads lazily up to ``_max_workers`` (CPython), so raising it
    lets new work run beside threads stuck in a hung read; lowering it again only stops new
    threads from being made (idle ones stay and serve).
    """

    def widen(self, n: int) -> None:
        with self._shutdown_lock:
            self._max_workers = max(1, self._max_workers + n)


Fields = dict[str, Any]


class Worker(MultiService):
    """Claims and runs this process's copies; keeps their leases; recovers and sweeps for the cluster."""

    log = Logger()

    def __init__(self, config: Config, store: Store, users: Users, run_in_thread: RunInThread, reactor: Any,
                 metrics: Metrics, on_ended: Callable[[str], None], executor: concurrent.futures.Executor | None = None,
                 faults: engine.Faults = engine.Faults()) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.users = users
        self.run_in_thread = run_in_thread
        self.reactor = reactor
        self.metrics = metrics
        self.on_ended = on_ended
        self.executor = executor
        self.faults = faults
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.active: dict[str, Running] = {}  # job_id -> its copy here
        self.draining = False
        self.halt_when_idle = False  # SIGUSR2: finish current jobs, take no more
        self.stopping = False  # stop() is handing jobs back: Redis calls no longer wait out an outage
        self._claiming = False
        self.claims = Periodic("claiming jobs", 0.2, self.claim_soon, reactor)
        self.claims.setServiceParent(self)
        self.housekeeping = Periodic("housekeeping (leases, recovery, staging timeouts)", 1.0, self.tick, reactor)
        self.housekeeping.setServiceParent(self)
        # Cluster-wide counts, refreshed by tick() (never read from Redis at scrape time).
        self.counts: dict[str, int] = {"queued": 0, "staging": 0, "active": 0}
        for name, what in (("queued", "Jobs waiting in the queue"), ("staging", "Jobs waiting for a stager"),
                           ("active", "Jobs claimed by a worker")):
            metrics.add_gauge(f"dtsbridge_jobs_{name}", f"{what} (all processes; as of the last tick)",
                              lambda name=name: self.counts[name])
        metrics.add_counter("dtsbridge_redis_errors", "Redis errors and timeouts seen by this process",
                            lambda: self.store.errors)

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.reactor.callLater(0, lambda: ensureDeferred(self.recover_dead_local()))

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return ensureDeferred(self.drain())

    async def drain(self, grace: float | None = None) -> None:
        """Take no new work; let running copies finish for ``grace`` seconds, then hand them back.

        A copy past its publish fence may already be published: it is never handed
        back (nor can it be cancelled); it finishes and records its result here.
        """
        self.draining = True
        if self.claims.running:
            self.claims.stopService()
        grace = self.config.drain_grace if grace is None else grace
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            await task.deferLater(self.reactor, 0.1, lambda: None)
        self.stopping = True  # from now on no Redis call waits out an outage (_retrying)
        runs = list(self.active.values())
        for run in runs:
            # Lost first (a copy stopped by us records no CANCELLED or ERROR of its own), then
            # no fence from now on: a copy not yet fenced will not publish. A run whose job
            # already ended (stalled copy) keeps its claim, so that if the thread never returns,
            # recovery finds the ended job and removes its temporary folder.
            run.lost = True
            if run.ended is None:
                run.stop.set()
        for run in runs:
            if run.ended is None:
                await self._hand_back(run)
        # let the publishing ones finish and the others clean their temporary folders
        deadline = time.monotonic() + 10
        while self.active and time.monotonic() < deadline:
            await task.deferLater(self.reactor, 0.05, lambda: None)
        if self.housekeeping.running:
            self.housekeeping.stopService()

    async def _hand_back(self, run: Running) -> None:
        try:
            r = await self.store.release(run.job_id, run.token, "handed back to the queue by a stopping process")
        except Exception as e:  # noqa: BLE001
            self.log.warn("could not hand {job_id} back ({e}); its lease will lapse and another process "
                          "will take it up", job_id=run.job_id, e=e)
            return
        if r == "publishing":
            self.log.info("job {job_id} is publishing; letting it finish", job_id=run.job_id)
            run.lost = False  # it still holds its claim: it records its own result
            return
        self.log.info("handing {job_id} back to the queue at shutdown", job_id=run.job_id)

    # -- what the request side and /healthz ask ----------------------------

    def stop_copy(self, job_id: str) -> bool:
        """Tell this process's copy of ``job_id`` to stop (a cancel); False when none runs here."""
        run = self.active.get(job_id)
        if run is None:
            return False
        run.stop.set()
        return True

    def copies(self) -> int:
        """Copies that hold one of the ``[copy] max_jobs`` slots: running ones whose job has not ended.

        A job ended while its thread is still busy (stalled in a hung read, timed out) frees
        its slot at once; its thread, until it returns, still counts in :meth:`max_threads`.
        """
        return sum(1 for r in self.active.values() if r.ended is None)

    def max_threads(self) -> int:
        """Copy threads at most, stuck ones included: ``2 * max_jobs`` (the thread pool has
        ``2 * max_jobs + 4``, so the requests' own blocking calls always find a thread)."""
        return 2 * self.config.max_jobs

    def stuck(self, after: float = STUCK_AFTER) -> list[Running]:
        """Copies whose job ended more than ``after`` seconds ago but whose thread has not returned."""
        now = time.monotonic()
        return [r for r in self.active.values() if r.ended is not None and now - r.ended_at >= after]

    # -- claiming and running ----------------------------------------------

    def _ended(self, run: Running, status: Status) -> None:
        """``run``'s job ended while its copy still runs: its slot is free for the next job at once.

        Its threads may stay stuck in the kernel (a hung read): the shared file executor gets
        ``[copy] threads`` more workers until this copy returns, so the next jobs' files are not
        queued behind the stuck ones.
        """
        run.ended, run.ended_at = status, time.monotonic()
        if not run.widened and isinstance(self.executor, SpareExecutor):
            self.executor.widen(self.config.threads)
            run.widened = True
        self.claim_soon()

    def claim_soon(self) -> None:
        """Claim queued jobs now, if this process has room (a no-op while a claim round runs)."""
        if not self._claiming:
            ensureDeferred(self._claim_loop())

    async def _claim_loop(self) -> None:
        self._claiming = True
        try:
            while (not self.draining and not self.halt_when_idle
                   and self.copies() < self.config.max_jobs and len(self.active) < self.max_threads()):
                token = secrets.token_hex(8)
                try:
                    job_id = await self.store.claim(token, self.holder, self.config.lease_seconds, now_iso(),
                                                    self.config.max_jobs_per_user)
                except StoreUnavailable:
                    return
                if job_id is None:
                    return
                run = Running(job_id=job_id, token=token, started=time.monotonic())
                self.active[job_id] = run
                self.metrics.in_flight.set(len(self.active))
                ensureDeferred(self._run(run))
        except Exception as e:  # noqa: BLE001
            self.log.failure("claiming jobs failed: {e}", e=e)
        finally:
            self._claiming = False

    async def _retrying(self, what: str, job_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """Keep trying a Redis call through an outage; a copy's result must not be lost.

        Once the process is stopping (:meth:`drain` is handing jobs back) it gives up
        with :class:`StoreUnavailable` instead: a copy thread waiting on it must not
        hold the thread pool (and the exit) forever. The job's lease then lapses and
        another process, or this one restarted, takes it up.
        """
        delay = 0.2
        while True:
            try:
                return await call()
            except StoreUnavailable as e:
                if self.stopping:
                    raise
                self.log.warn("{what} for {job_id} waits for Redis: {e}", what=what, job_id=job_id, e=e)
                await task.deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 5)

    async def _run(self, run: Running) -> None:
        job_id, token = run.job_id, run.token
        status: Status = Status.ERROR
        fields: Fields = {}
        try:
            self.metrics.jobs_started.inc()
            status, fields = await self._copy(run)
        except StoreUnavailable as e:
            # Redis away (at shutdown _retrying gives up): not the job's failure. Its lease lapses
            # and it is taken up again, here or elsewhere.
            self.log.warn("job {job_id}: Redis unavailable ({e}); leaving it to be taken up again",
                          job_id=job_id, e=e)
            run.lost = True
            fields = {"reason": errors.INTERNAL, "detailed_status": f"Redis unavailable: {e}"}
        except Exception as e:  # noqa: BLE001 - any bug ends the job in ERROR, never hangs it
            self.log.failure("job {job_id} failed unexpectedly", job_id=job_id)
            status, fields = Status.ERROR, {"reason": errors.INTERNAL, "detailed_status": f"internal error: {e}"}
        try:
            # A published copy records its result whenever its claim still holds (the store
            # checks); any other result of a copy this process gave up is not the job's.
            if run.lost and status != Status.SUCCESS:
                self.log.info("job {job_id}: this process no longer holds it; not recording a result",
                              job_id=job_id)
                return
            try:
                ended = await self._retrying("recording the result", job_id, lambda: self.store.finish(
                    job_id, token, status.value, now_iso(), fields))
            except StoreUnavailable as e:
                self.log.warn("job {job_id}: could not record its result at shutdown ({e}); its lease will "
                              "lapse and it will be taken up again", job_id=job_id, e=e)
                return
            if ended is not None and run.ended is None:
                self.metrics.jobs_finished.labels(ended, fields.get("reason", "") if ended != Status.CANCELLED
                                                  else errors.CANCELLED).inc()
                self.metrics.job_seconds.labels(ended).observe(time.monotonic() - run.started)
                self.log.info("job {job_id} ended {status}: {detail}", job_id=job_id, status=ended,
                              detail=fields.get("detailed_status", ""))
        finally:
            self.active.pop(job_id, None)
            if run.widened and isinstance(self.executor, SpareExecutor):
                self.executor.widen(-self.config.threads)
            self.metrics.in_flight.set(len(self.active))
            self.on_ended(job_id)
            self.claim_soon()

    async def _copy(self, run: Running) -> tuple[Status, Fields]:
        """Copy, verify and publish ``run``'s job; its final status and fields (raises only on a bug)."""
        job = await self._retrying("reading the job", run.job_id, lambda: self.store.get_job(run.job_id))
        if job is None:
            return Status.ERROR, {"reason": errors.INTERNAL, "detailed_status": "job record vanished"}
        cfg = self.config
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
                found = await self._published_before(run, job, dest_parts, source)
                if found is not None:
                    return Status.SUCCESS, found
            # Resume: the latest earlier attempt's folder (as recorded) is kept for this attempt to
            # take its verified files from; every other one goes now, that one once the copy ends.
            resume_from = next((r for r in reversed(engine.TempRecord.decode_all(job.extra.get("temp_dirs")))
                                if not r.pending and r.attempt != attempt), None)
            await self._cleanup_temps(job, dest_parts, keep=resume_from)
            uid, gid = await self.run_in_thread(self.users.ownership, job.target_user)
            options = engine.CopyOptions(checksum=cfg.checksum, uid=uid, gid=gid,
                                         max_bytes=cfg.max_payload_bytes, fsync=cfg.fsync, workers=cfg.threads,
                                         processes=cfg.processes, reflink=cfg.reflink, faults=self.faults)
            copy = _Copy(self, run, self.metrics)
            # Recorded before the folder is made (then with its inode as soon as it is), so
            # that a crash at any moment leaves a folder a later cleanup knows to be ours.
            pending = engine.TempRecord(attempt).encode()
            if not await self._retrying("recording the temporary folder", run.job_id,
                                        lambda: self.store.add_temp(run.job_id, run.token, pending)):
                raise errors.TransferError(errors.CANCELLED, "lost claim")
            try:
                result = await self.run_in_thread(
                    engine.copy_tree, cfg.dts_root, source, cfg.user_root, dest_parts, job.job_id, attempt, options,
                    on_plan=copy.on_plan, on_progress=copy.on_progress, should_stop=run.stop.is_set,
                    before_publish=copy.before_publish, on_temp=copy.on_temp, executor=self.executor,
                    resume_from=resume_from)
            except Exception:
                # copy_tree removed its folder; make sure (by inode) before forgetting it.
                await self._settle_attempt(job.job_id, dest_parts, attempt, copy.made or [engine.TempRecord(attempt)])
                raise
            finally:
                if resume_from is not None:  # what is left of the earlier attempt's folder
                    await self._settle_attempt(job.job_id, dest_parts, resume_from.attempt, [resume_from])
            await self._settle_attempt(job.job_id, dest_parts, attempt, [])  # published: nothing to remove
        except errors.TransferError as e:
            if e.reason == errors.CANCELLED:
                return Status.CANCELLED, {"detailed_status": "cancelled; everything made for it was removed"}
            return Status.ERROR, {"reason": e.reason, "detailed_status": e.message,
                                  "files_done": run.files_done, "bytes_done": run.bytes_done}
        copy.phase_done("publish")
        return Status.SUCCESS, await self._success(job, source, result, copy.scanned)

    async def _published_before(self, run: Running, job: Job, dest_parts: list[str],
                                 source: engine.Source) -> Fields | None:
        """The success fields when an earlier attempt published before its process died, else None."""
        name = await self.run_in_thread(
            engine.find_published, self.config.user_root, dest_parts, source.name,
            int(job.extra["publish_dev"]), int(job.extra["publish_ino"]))
        if name is None:
            await self._retrying("clearing a dead attempt's publish record", job.job_id,
                                 lambda: self.store.unfence(job.job_id, run.token))
            return None
        await self._cleanup_temps(job, dest_parts)
        self.log.info("job {job_id}: found its folder {name} published before a crash", job_id=job.job_id, name=name)
        files = int(job.extra.get("publish_files") or job.files_total or 0)
        nbytes = int(job.extra.get("publish_bytes") or job.bytes_total or 0)
        return {"path": user_path(job.target_user, self.config.target_subdir, name),
                "files_total": files, "files_done": files, "bytes_total": nbytes, "bytes_done": nbytes,
                "detailed_status": f"published {name} (recovered after a restart)"}

    async def _success(self, job: Job, source: engine.Source, result: engine.Result,
                       scanned: list[engine.Plan]) -> Fields:
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
            detail += _manifest_detail(result)
            for check, n in (("hashed", result.hashed), ("size_only", result.size_only),
                             ("unverified", result.unverified)):
                if n:
                    self.metrics.manifest_files.labels(check).inc(n)
        fields["detailed_status"] = detail
        if cfg.delete_source and not scanned:
            fields["detailed_status"] = detail + "; the source was kept: no record of what was copied"
        elif cfg.delete_source:
            try:
                kept = await self.run_in_thread(engine.remove_source, cfg.dts_root, source, scanned[-1])
                if kept is None:
                    fields["source_deleted"] = True
                else:
                    self.log.warn("job {job_id}: the source was kept partially: {kept}", job_id=job.job_id, kept=kept)
                    fields["detailed_status"] = detail + f"; the source was kept partially: {kept}"
            except Exception as e:  # noqa: BLE001 - the copy stands; say what was left
                self.log.warn("job {job_id}: could not delete the source: {e}", job_id=job.job_id, e=e)
                fields["detailed_status"] = detail + f"; the source could not be deleted: {e}"
        return fields

    # -- housekeeping ------------------------------------------------------

    async def tick(self) -> None:
        """Every second: renew leases and record progress, then recover lapsed jobs and staging timeouts.

        Runs as a :class:`Periodic`: whatever it raises is logged and it runs again at
        the next tick. Each step is tried even when an earlier one failed (but none
        once Redis is unreachable).
        """
        renewed = True
        failure: Exception | None = None
        for run in list(self.active.values()):
            fields = {"files_done": run.files_done, "bytes_done": run.bytes_done,
                      "files_total": run.files_total, "bytes_total": run.bytes_total,
                      "detailed_status": run.phase}
            try:
                st = await self.store.heartbeat(run.job_id, run.token, self.config.lease_seconds, fields)
            except StoreUnavailable:
                renewed = False
                continue
            except Exception as e:  # noqa: BLE001 - any other refusal: renew the other runs, then report it
                renewed = False
                failure = failure or e
                continue
            if st is None:
                self.log.warn("job {job_id}: lease lost; stopping this copy", job_id=run.job_id)
                run.lost = True
                run.stop.set()
            elif st in (Status.CANCELLED, Status.ERROR, Status.SUCCESS):  # cancelled, timed out or given up
                if run.ended is None and st != Status.CANCELLED:
                    self._ended(run, Status(st))
                run.stop.set()
        steps: list[Callable[[], Awaitable[object]]] = [
            self._recover_lapsed, self._sweep_staging, self._sweep_deadlines, self.store.trim, self._refresh_counts]
        if renewed and self.config.stall_seconds > 0:
            steps.insert(0, self._stalls)
        if not renewed:
            # Redis was away: our own leases may have lapsed meanwhile. Renew them first (next
            # tick) rather than let a recover that reaches Redis first requeue our running copies.
            steps.remove(self._recover_lapsed)
        for step in steps:
            try:
                await step()
            except StoreUnavailable:
                break  # Redis is away: the other steps would each wait out the timeout too
            except Exception as e:  # noqa: BLE001 - the next steps still run; reported below
                failure = failure or e
        if failure is not None:
            raise failure

    async def _recover_lapsed(self) -> None:
        requeued, ended = await self.store.recover("resumed after its worker was lost")
        for job_id in requeued:
            self.log.info("job {job_id}: lease lapsed; back in the queue", job_id=job_id)
        for job_id in ended:
            await self._cleanup_ended(job_id)
        if requeued:
            self.claim_soon()

    async def _sweep_staging(self) -> None:
        for job_id in await self.store.sweep_staging(now_iso()):
            self.log.info("job {job_id}: staging timed out", job_id=job_id)
            self.metrics.jobs_finished.labels(Status.ERROR.value, errors.STAGING_TIMEOUT).inc()
            self.on_ended(job_id)

    async def _sweep_deadlines(self) -> None:
        for job_id in await self.store.sweep_deadlines(now_iso()):
            self.log.info("job {job_id}: not finished within its timeout_seconds; ended", job_id=job_id)
            self.metrics.jobs_finished.labels(Status.ERROR.value, errors.TIMEOUT).inc()
            run = self.active.get(job_id)
            if run is not None:
                if run.ended is None:
                    self._ended(run, Status.ERROR)
                run.stop.set()
            self.on_ended(job_id)

    async def _refresh_counts(self) -> None:
        self.counts = await self.store.counts()

    async def _stalls(self) -> None:
        """End every running copy whose bytes have not moved for ``[copy] stall_seconds``.

        Decided here, on the reactor, from the progress the engine reports, because
        the copying thread itself may be stuck in the kernel (a hung NFS read) and
        never look at its stop flag. The job ends in Redis at once, fenced by its
        claim; the thread is told to stop and, whenever it returns, the engine
        removes its temporary folder (or recovery does, if this process dies first).
        """
        limit = self.config.stall_seconds
        now = time.monotonic()
        for run in list(self.active.values()):
            if run.ended is not None or run.lost or run.stop.is_set() or run.phase == "publishing":
                continue
            idle = now - (run.moved or run.started)
            if idle < limit:
                continue
            detail = f"stalled: no bytes moved for {idle:.0f} seconds ([copy] stall_seconds = {limit:g})"
            try:
                ok = await self.store.give_up(run.job_id, run.token, now_iso(), errors.STALLED, detail,
                                              {"files_done": run.files_done, "bytes_done": run.bytes_done})
            except StoreUnavailable:
                return
            run.stop.set()
            if ok:
                self._ended(run, Status.ERROR)
                self.log.warn("job {job_id} {detail}", job_id=run.job_id, detail=detail)
                self.metrics.jobs_finished.labels(Status.ERROR.value, errors.STALLED).inc()
                self.metrics.job_seconds.labels(Status.ERROR.value).observe(now - run.started)
                self.on_ended(run.job_id)

    # -- temporary folders and recovery --------------------------------------

    async def _cleanup_temps(self, job: Job, dest_parts: list[str], keep: engine.TempRecord | None = None) -> int:
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

    async def _settle_attempt(self, job_id: str, dest_parts: list[str], attempt: str,
                              records: list[engine.TempRecord]) -> None:
        """After copy_tree: remove what is left of this attempt's folder (if anything), forget its record."""
        try:
            if records:
                await self.run_in_thread(engine.cleanup_temp, self.config.user_root, dest_parts, job_id, records)
            await self.store.drop_temps(job_id, [attempt])
        except (errors.TransferError, StoreUnavailable) as e:  # the record stays for a later cleanup
            self.log.warn("job {job_id}: attempt {attempt} not settled: {e}", job_id=job_id, attempt=attempt, e=e)

    async def _cleanup_ended(self, job_id: str) -> None:
        job = await self.store.get_job(job_id)
        if job is None or not job.dest_parts:
            return
        parts = [p for p in job.dest_parts.split("/") if p]
        n = await self._cleanup_temps(job, parts)
        if n:
            self.log.info("job {job_id}: removed {n} temporary folders of a dead attempt", job_id=job_id, n=n)

    async def recover_dead_local(self) -> None:
        """At start: jobs held by a dead process on this host go back to the queue at once."""
        try:
            await self._recover_dead_local()
        except Exception as e:  # noqa: BLE001 - Redis away or refusing: try again shortly
            if not isinstance(e, StoreUnavailable):
                self.log.failure("recovering the jobs of dead local processes failed; trying again in 5 s")
            if not self.draining:
                # Redis away (e.g. the embedded one still starting): soon again, so a restart resumes its jobs
                self.reactor.callLater(0.2 if isinstance(e, StoreUnavailable) else 5,
                                       lambda: ensureDeferred(self.recover_dead_local()))

    async def _recover_dead_local(self) -> None:
        host = socket.gethostname()
        holders = await self.store.active_holders()
        for job_id, claim, holder in holders:
            h, _, pid = holder.rpartition(":")
            if h != host or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            requeued, ended = await self.store.recover("resumed after its process died", job_id, claim)
            for j in ended:
                await self._cleanup_ended(j)
            if requeued:
                self.log.info("job {job_id}: its process {pid} died; back in the queue", job_id=job_id, pid=pid)
        self.claim_soon()


class _Copy:
    """The engine's callbacks for one copy (they run in its threads): progress, phases, temps, the fence."""

    def __init__(self, worker: Worker, run: Running, metrics: Metrics) -> None:
        self.worker = worker
        self.run = run
        self.metrics = metrics
        self.phase_started = time.monotonic()
        self.scanned: list[engine.Plan] = []  # what was copied: all that delete_source may remove
        self.made: list[engine.TempRecord] = []

    def phase_done(self, phase: str) -> None:
        now = time.monotonic()
        self.metrics.phase_seconds.labels(phase).observe(now - self.phase_started)
        self.phase_started = now

    def on_plan(self, plan: engine.Plan) -> None:
        self.scanned.append(plan)
        self.run.files_total, self.run.bytes_total = plan.files, plan.bytes
        self.run.phase = "copying and verifying"
        self.phase_done("scan")

    def on_progress(self, files_done: int, bytes_done: int) -> None:
        self.run.files_done, self.run.bytes_done = files_done, bytes_done
        self.run.moved = time.monotonic()

    def _on_reactor(self, what: str, call: Callable[[], Awaitable[bool]]) -> bool:
        """``call`` (a Redis call, retried through an outage) on the reactor; this thread waits for it."""
        worker = self.worker
        result: bool = blockingCallFromThread(
            worker.reactor, lambda: ensureDeferred(worker._retrying(what, self.run.job_id, call)))
        return result

    def before_publish(self, tmpname: str, dev: int, ino: int) -> bool:
        run = self.run
        run.phase = "publishing"
        self.phase_done("copy")
        if run.stop.is_set():
            return False
        try:
            return self._on_reactor("fencing the publish", lambda: self.worker.store.fence(run.job_id, run.token, {
                "publish_tmp": tmpname, "publish_dev": dev, "publish_ino": ino,
                "publish_files": run.files_total, "publish_bytes": run.bytes_total}))
        except StoreUnavailable:  # stopping with Redis away: do not publish; the job is taken up again
            run.lost = True
            return False

    def on_temp(self, record: engine.TempRecord) -> None:
        self.made.append(record)
        word = record.encode()
        if not self._on_reactor("recording the temporary folder",
                                lambda: self.worker.store.add_temp(self.run.job_id, self.run.token, word)):
            raise errors.TransferError(errors.CANCELLED, "lost claim")


def _manifest_detail(result: engine.Result) -> str:
    """What the manifest check found, for ``detailed_status``; names the unverified files."""
    detail = (f"; manifest: {result.manifest_resources} resources, {result.hashed} files checked by hash, "
              f"{result.size_only} by size only (no hash given)")
    if result.unverified:
        names = ", ".join(result.unverified_names)
        more = result.unverified - len(result.unverified_names)
        detail += (f", {result.unverified} unverified (an S3 multipart ETag that no likely part size "
                   f"matches; checked by size): {names}" + (f" and {more} more" if more > 0 else ""))
    return detail


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
