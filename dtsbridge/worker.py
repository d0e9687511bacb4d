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
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar, cast

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtsbridge import engine, errors
from dtsbridge.config import Config
from dtsbridge.metrics import Metrics
from dtsbridge.model import Status, now_iso
from dtsbridge.procs import pid_alive
from dtsbridge.store import LeaseLost, Release, Store, StoreUnavailable
from dtsbridge.attempt import Attempt, Fields, Running, Temps
from dtsbridge.interfaces import ThreadRunner

if TYPE_CHECKING:
    from dtsbridge.interfaces import Reactor
from dtsbridge.users import Users

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
    tick is due delays that tick (runs never overlap). The first run is at start,
    or one interval later with ``now=False``.
    """

    log = Logger()

    def __init__(self, name: str, interval: float, fn: Callable[[], object], clock: IReactorTime,
                 now: bool = True) -> None:
        TimerService.__init__(self, interval, self._once)
        self.clock = self._clock = clock
        self.name = name
        self.interval = interval
        self.fn = fn
        self.now = now
        self.runs = 0
        self.failures = 0  # in a row
        self._logged_at: float | None = None

    def startService(self) -> None:
        if self.now:
            TimerService.startService(self)
            return
        # TimerService's start, with the first run one interval later
        Service.startService(self)
        self._loop = task.LoopingCall(self._once)
        self._loop.clock = self._clock
        self._loopFinished = self._loop.start(self.step, now=False)
        self._loopFinished.addErrback(self._failed)

    def _once(self) -> Deferred[None]:
        self.runs += 1

        def call() -> object:
            r = self.fn()
            return ensureDeferred(r) if isinstance(r, Coroutine) else r

        d = defer.maybeDeferred(call)
        return d.addCallbacks(self._ok, self._failed)

    def _ok(self, _: object) -> None:
        if self.failures:
            self.log.info("{task} works again after {n} failed runs", task=self.name, n=self.failures)
        self.failures = 0
        self._logged_at = None

    def _failed(self, f: Failure) -> None:
        self.failures += 1
        now = self._clock.seconds()
        if self._logged_at is None:
            self.log.failure("{task} failed; it runs again in {interval:g} s", f, task=self.name,
                             interval=self.interval)
            self._logged_at = now
        elif now - self._logged_at >= 60:
            self.log.warn("{task} still failing ({n} runs in a row): {error}", task=self.name, n=self.failures,
                          error=f.getErrorMessage())
            self._logged_at = now


class SpareExecutor(concurrent.futures.ThreadPoolExecutor):
    """The file-copy thread pool, ``[copy] threads`` wide, widened while ended copies may hold stuck threads.

    A ThreadPoolExecutor starts threads lazily up to ``_max_workers`` (CPython), so raising it
    lets new work run beside threads stuck in a hung read; lowering it again only stops new
    threads from being made (idle ones stay and serve).
    """

    def widen(self, n: int) -> None:
        with self._shutdown_lock:
            self._max_workers = max(1, self._max_workers + n)



class Worker(MultiService):
    """Claims and runs this process's copies; keeps their leases; recovers and sweeps for the cluster."""

    log = Logger()

    def __init__(self, config: Config, store: Store, users: Users, run_in_thread: ThreadRunner, reactor: Reactor,
                 metrics: Metrics, on_ended: Callable[[str], None], executor: concurrent.futures.Executor | None = None,
                 faults: engine.Faults = engine.Faults()) -> None:
        MultiService.__init__(self)
        self.config = config
        self.store = store
        self.users = users
        self.run_in_thread = run_in_thread
        self.reactor = reactor
        self.metrics = metrics
        self.on_ended = on_ended
        self.executor = executor
        self.faults = faults
        self.temps = Temps(config, store, run_in_thread)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.active: dict[str, Running] = {}  # job_id -> its copy here
        self.draining = False
        self.halt_when_idle = False  # SIGUSR2: finish current jobs, take no more
        self.stopping = False  # stop() is handing jobs back: Redis calls no longer wait out an outage
        self.recovered = False  # the start-up recovery of dead local processes' jobs is done (/healthz waits for it)
        self._claiming = False
        # (the first claim round after 0.2 s: recovering the jobs of dead local processes goes first)
        self.claims = Periodic("claiming jobs", 0.2, self.claim_soon, reactor, now=False)
        self.claims.setServiceParent(self)
        self.housekeeping = Periodic("housekeeping (leases, recovery, staging timeouts)", 1.0, self.tick, reactor)
        self.housekeeping.setServiceParent(self)
        # Cluster-wide counts, refreshed by tick() (never read from Redis at scrape time).
        self.counts: dict[str, int] = {"queued": 0, "staging": 0, "active": 0}
        for name, what in (("queued", "Jobs waiting in the queue"), ("staging", "Jobs waiting for a stager"),
                           ("active", "Jobs claimed by a worker")):
            metrics.add_gauge(f"dtsbridge_jobs_{name}", f"{what} (all processes; as of the last tick)",
                              self._count(name))
        metrics.add_counter("dtsbridge_redis_errors", "Redis errors and timeouts seen by this process",
                            lambda: self.store.errors)

    def _count(self, name: str) -> Callable[[], int]:
        return lambda: self.counts[name]

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        MultiService.startService(self)
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
        if r is Release.PUBLISHING:
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

    async def retrying(self, what: str, job_id: str, call: Callable[[], Awaitable[T]]) -> T:
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
            status, fields = await Attempt(self, run).run()
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
                ended = await self.retrying("recording the result", job_id, lambda: self.store.record_result(
                    job_id, token, status, now_iso(), fields))
            except StoreUnavailable as e:
                self.log.warn("job {job_id}: could not record its result at shutdown ({e}); its lease will "
                              "lapse and it will be taken up again", job_id=job_id, e=e)
                return
            except LeaseLost:
                return  # another attempt holds the job: its result is that attempt's to record
            if run.ended is None:
                if ended != status:  # an end recorded meanwhile stands (a deadline met at the publish fence)
                    fields = await self._kept_end(job_id, fields)
                self.metrics.jobs_finished.labels(ended.value, fields.get("reason", "") if ended != Status.CANCELLED
                                                  else errors.CANCELLED).inc()
                self.metrics.job_seconds.labels(ended.value).observe(time.monotonic() - run.started)
                self.log.info("job {job_id} ended {status}: {detail}", job_id=job_id, status=ended,
                              detail=fields.get("detailed_status", ""))
        finally:
            self.active.pop(job_id, None)
            if run.widened and isinstance(self.executor, SpareExecutor):
                self.executor.widen(-self.config.threads)
            self.metrics.in_flight.set(len(self.active))
            self.on_ended(job_id)
            self.claim_soon()

    async def _kept_end(self, job_id: str, fields: Fields) -> Fields:
        """The reason and detail of the end the store kept instead of this attempt's (for the log and metrics)."""
        try:
            job = await self.store.get_job(job_id)
        except StoreUnavailable:
            return fields
        if job is None:
            return fields
        return {"reason": job.reason or "", "detailed_status": job.detailed_status or ""}

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
                st = await self.store.renew(run.job_id, run.token, self.config.lease_seconds, fields)
            except LeaseLost:
                self.log.warn("job {job_id}: lease lost; stopping this copy", job_id=run.job_id)
                run.lost = True
                run.stop.set()
                continue
            except StoreUnavailable:
                renewed = False
                continue
            except Exception as e:  # noqa: BLE001 - any other refusal: renew the other runs, then report it
                renewed = False
                failure = failure or e
                continue
            if st.final:  # cancelled, timed out or given up
                if run.ended is None and st != Status.CANCELLED:
                    self._ended(run, st)
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
            await self.temps.cleanup_ended(job_id)
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
        self.counts = cast(dict[str, int], await self.store.counts())

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

    # -- recovery ---------------------------------------------------------------

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
            if h != host or not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            requeued, ended = await self.store.recover("resumed after its process died", job_id, claim)
            for j in ended:
                await self.temps.cleanup_ended(j)
            if requeued:
                self.log.info("job {job_id}: its process {pid} died; back in the queue", job_id=job_id, pid=pid)
        self.recovered = True
        self.claim_soon()
