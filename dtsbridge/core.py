"""The bridge: takes requests, queues jobs in Redis, runs copies in the thread pool.

:class:`Bridge` is the core that the web layer and the watcher hand work to.
It has no HTTP in it. Blocking work (path resolution, user checks, the copy
engine) runs through ``run_in_thread``; the reactor thread only talks to
Redis and keeps time.

One process runs at most ``[copy] max_jobs`` copies at once. Jobs wait in the
Redis queue where any process may claim them; a claim is a lease renewed by
:meth:`Bridge.tick` every second, and a lease that lapses (a killed process,
a lost host) puts the job back in the queue for whoever is alive.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import os
import pwd
import secrets
import socket
import stat
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger

from dtsbridge import engine, errors
from dtsbridge.config import Config
from dtsbridge.metrics import Metrics
from dtsbridge.model import Job, Status, looks_like_job_id, now_iso, user_path
from dtsbridge.store import Store, StoreUnavailable


class RequestError(Exception):
    """A request the bridge refuses; ``code`` is the HTTP status to answer."""

    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


class Draining(Exception):
    """The process is shutting down and takes no new work."""


class Periodic:
    """Calls ``fn`` every ``interval`` seconds on ``clock``, whatever it raises or returns.

    magic-wormhole's ``TimerService`` + catch-and-log: a ``LoopingCall`` stops for
    good when its function fails, so every run is wrapped here; a failure (raised,
    or a failed Deferred or coroutine) is logged and the next tick comes as usual.
    The first failure of a streak is logged with its traceback, then one line a
    minute while it lasts, and the recovery once it ends. A run still going when a
    tick is due delays that tick (runs never overlap).
    """

    log = Logger()

    def __init__(self, name: str, interval: float, fn: Callable[[], Any], clock) -> None:
        self.name = name
        self.interval = interval
        self.fn = fn
        self.clock = clock
        self.runs = 0
        self.failures = 0  # in a row
        self._logged_at: float | None = None
        self._loop = task.LoopingCall(self._once)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self, now: bool = True) -> None:
        self._loop.start(self.interval, now=now).addErrback(
            lambda f: self.log.failure("{task}: its loop stopped", f, task=self.name))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _once(self) -> Deferred:
        self.runs += 1

        def call() -> Any:
            r = self.fn()
            return ensureDeferred(r) if hasattr(r, "__await__") and not isinstance(r, Deferred) else r

        d = defer.maybeDeferred(call)
        d.addCallbacks(self._ok, self._failed)
        return d

    def _ok(self, _: Any) -> None:
        if self.failures:
            self.log.info("{task} works again after {n} failed runs", task=self.name, n=self.failures)
        self.failures = 0
        self._logged_at = None

    def _failed(self, f) -> None:
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
    ended: str | None = None  # the job ended while its copy still runs (stalled, timeout, cancel)
    ended_at: float = 0.0  # time.monotonic() when it was so ended
    widened: bool = False  # the file executor was widened for its possibly stuck threads


#: a copy thread still busy this long after its job ended is reported stuck (/healthz)
STUCK_AFTER = 5.0


class SpareExecutor(concurrent.futures.ThreadPoolExecutor):
    """The file-copy thread pool, ``[copy] threads`` wide, widened while ended copies may hold stuck threads.

    A ThreadPoolExecutor starts threads lazily up to ``_max_workers`` (CPython), so raising it
    lets new work run beside threads stuck in a hung read; lowering it again only stops new
    threads from being made (idle ones stay and serve).
    """

    def widen(self, n: int) -> None:
        with self._shutdown_lock:
            self._max_workers = max(1, self._max_workers + n)


def hash_code(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class Bridge:
    """Jobs from request to final state."""

    log = Logger()

    def __init__(self, config: Config, store: Store, run_in_thread: Callable[..., Deferred],
                 user_checker, reactor=None, metrics: Metrics | None = None, executor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811
        self.config = config
        self.store = store
        self.run_in_thread = run_in_thread
        self.users = user_checker
        self.reactor = reactor
        self.metrics = metrics or Metrics()
        self.executor = executor
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.running: dict[str, Running] = {}
        self.draining = False
        self.halt_when_idle = False  # SIGUSR2: finish current jobs, take no more
        self.stopping = False  # stop() is handing jobs back: Redis calls no longer wait out an outage
        self._waiters: dict[str, list[Deferred]] = {}
        self._claiming = False
        self._poll = None
        self._tick = None
        # Cluster-wide counts, refreshed by tick() (never read from Redis at scrape time).
        self.counts: dict[str, int] = {"queued": 0, "staging": 0, "active": 0}
        self.metrics.add_gauge("dtsbridge_jobs_queued", "Jobs waiting in the queue (all processes; as of the last tick)",
                               lambda: self.counts["queued"])
        self.metrics.add_gauge("dtsbridge_jobs_staging", "Jobs waiting for a stager (all processes; as of the last tick)",
                               lambda: self.counts["staging"])
        self.metrics.add_gauge("dtsbridge_jobs_active", "Jobs claimed by a worker (all processes; as of the last tick)",
                               lambda: self.counts["active"])
        self.metrics.add_counter("dtsbridge_redis_errors", "Redis errors and timeouts seen by this process",
                                 lambda: self.store.errors)

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._poll = Periodic("claiming jobs", 0.2, self._claim_soon, self.reactor)
        self._poll.start(now=False)
        self._tick = Periodic("housekeeping (leases, recovery, staging timeouts)", 1.0, self.tick, self.reactor)
        self._tick.start(now=True)
        self.reactor.callLater(0, lambda: ensureDeferred(self.recover_dead_local()))

    async def stop(self, grace: float | None = None) -> None:
        """Take no new work; let running copies finish for ``grace`` seconds, then hand them back.

        A copy past its publish fence may already be published: it is never handed
        back (nor can it be cancelled); it finishes and records its result here.
        """
        self.draining = True
        if self._poll is not None:
            self._poll.stop()
        grace = self.config.drain_grace if grace is None else grace
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            await task.deferLater(self.reactor, 0.1, lambda: None)
        self.stopping = True  # from now on no Redis call waits out an outage (_retrying)
        runs = list(self.running.values())
        for run in runs:
            # Lost first (a copy stopped by us records no CANCELLED or ERROR of its own), then
            # no fence from now on: a copy not yet fenced will not publish. A run whose job
            # already ended (stalled copy) keeps its claim, so that if the thread never returns,
            # recovery finds the ended job and removes its temporary folder.
            run.lost = True
            if run.ended is None:
                run.stop.set()
        for run in runs:
            if run.ended is not None:
                continue
            try:
                r = await self.store.release(run.job_id, run.token, "handed back to the queue by a stopping process")
            except Exception as e:  # noqa: BLE001
                self.log.warn("could not hand {job_id} back ({e}); its lease will lapse and another process "
                              "will take it up", job_id=run.job_id, e=e)
                continue
            if r == "publishing":
                self.log.info("job {job_id} is publishing; letting it finish", job_id=run.job_id)
                run.lost = False  # it still holds its claim: it records its own result
                continue
            self.log.info("handing {job_id} back to the queue at shutdown", job_id=run.job_id)
        # let the publishing ones finish and the others clean their temporary folders
        deadline = time.monotonic() + 10
        while self.running and time.monotonic() < deadline:
            await task.deferLater(self.reactor, 0.05, lambda: None)
        if self._tick is not None:
            self._tick.stop()

    # -- requests --------------------------------------------------------

    def _ownership(self, user: str) -> tuple[int | None, int | None]:
        if self.config.ownership == "fixed":
            return self.config.uid, self.config.gid
        if self.config.ownership == "passwd":
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise errors.TransferError(errors.USER_NOT_FOUND, f"user {user!r} has no system account "
                                           "([ownership] mode = passwd gives files to it)") from None
            return pw.pw_uid, pw.pw_gid
        return None, None

    async def check_user(self, user: str) -> None:
        if not engine.valid_username(user):
            raise RequestError(400, "target_user is not a valid KBase username "
                                    "(a lowercase letter, then lowercase letters, digits or _; at most 100)",
                               reason=errors.BAD_REQUEST)
        # A datastore folder that is a link or not a folder is refused whatever says the user exists.
        if not await self.run_in_thread(_user_folder_safe, self.config.user_root, user):
            raise RequestError(403, f"the datastore folder of {user!r} is a symbolic link or not a folder",
                               reason=errors.UNSAFE_DESTINATION)
        if not await self.users.exists(user):
            raise RequestError(400, f"user {user!r} does not exist", reason=errors.USER_NOT_FOUND)
        try:
            # (only a passwd lookup blocks; it also tells a missing account early, as a 400)
            uid, gid = (await self.run_in_thread(self._ownership, user) if self.config.ownership == "passwd"
                        else self._ownership(user))
            if self.config.users_check != "directory":
                await self.run_in_thread(engine.ensure_dir, self.config.user_root, [user], uid, gid)
        except errors.TransferError as e:
            raise RequestError(e.http_status, e.message, reason=e.reason) from None

    async def resolve(self, subdirectory: str) -> engine.Source:
        try:
            return await self.run_in_thread(engine.resolve_source, self.config.dts_root, subdirectory)
        except errors.TransferError as e:
            raise RequestError(e.http_status, e.message, reason=e.reason) from None

    def _new_fields(self, status: Status, user: str, subdirectory: str, submitter: str, kind: str,
                    source: engine.Source | None) -> dict[str, Any]:
        now = now_iso()
        fields: dict[str, Any] = {
            "status": status.value,
            "target_user": user,
            "subdirectory": subdirectory,
            "submitter": submitter,
            "kind": kind,
            "dest_parts": "/".join((user, *self.config.target_subdir)),
            "detailed_status": "queued" if status == Status.SUBMITTED else "waiting for the stager",
        }
        # A time_<status> for each status entered: a staged job enters SUBMITTED only when staged.
        fields["time_staging" if status == Status.STAGING else "time_submitted"] = now
        if source is not None:
            fields["source_rel"] = source.rel
        return fields

    async def submit(self, user: str, subdirectory: str, submitter: str, kind: str = "complete",
                     source: engine.Source | None = None, timeout: float | None = None) -> tuple[Job, bool]:
        """Queue a copy of ``subdirectory`` for ``user``, or join the job that already owns it.

        Returns the job and whether this call created it.
        """
        if self.draining:
            raise Draining()
        await self.check_user(user)
        if source is None:
            try:
                source = await self.resolve(subdirectory)
            except RequestError as e:
                # A repeat of a request that succeeded answers with its job even when the
                # source is gone since (delete_source), for as long as the job is kept.
                done = await self._succeeded_for(user, subdirectory) if e.code == 404 else None
                if done is None:
                    raise
                return done, False
        job_id = str(uuid.uuid4())
        fields = self._new_fields(Status.SUBMITTED, user, subdirectory, submitter, kind, source)
        if timeout is not None:
            fields["timeout_seconds"] = f"{timeout:g}"
        created, job_id = await self.store.create_job(
            job_id, fields, folder_key=self.store.folder_key(user, source.rel))
        if created:
            self.log.info("job {job_id} queued: {folder} for {user} by {submitter}", job_id=job_id,
                          folder=source.rel, user=user, submitter=submitter)
            self._claim_soon()
        return await self._must_get(job_id), created

    async def _succeeded_for(self, user: str, subdirectory: str) -> Job | None:
        """The successful job that owns ``subdirectory`` for ``user``, if any (no filesystem access)."""
        try:
            rel = await self.run_in_thread(_staging_rel, self.config.dts_root, subdirectory)
        except errors.TransferError:
            return None
        if not rel:
            return None
        job_id = await self.store.folder_job(self.store.folder_key(user, rel))
        job = await self.store.get_job(job_id) if job_id else None
        return job if job is not None and job.status == Status.SUCCESS else None

    async def _must_get(self, job_id: str) -> Job:
        job = await self.store.get_job(job_id)
        if job is None:
            raise RequestError(500, f"the record of job {job_id} vanished from the job store",
                               reason=errors.INTERNAL, job_id=job_id)
        return job

    async def submit_staging(self, user: str, subdirectory: str, submitter: str,
                             timeout: float | None, job_timeout: float | None = None) -> tuple[Job, str]:
        """Register a job that waits for a stager; returns it and the one-time authcode."""
        if self.draining:
            raise Draining()
        await self.check_user(user)
        # The folder is checked when staging is done; refuse the obviously bad now
        # (in a thread: the check resolves the DTS root's real path).
        try:
            rel = await self.run_in_thread(_staging_rel, self.config.dts_root, subdirectory)
            engine.check_not_reserved(rel.rsplit("/", 1)[-1])
        except errors.TransferError as e:
            raise RequestError(e.http_status, e.message, reason=e.reason) from None
        if not rel:
            raise RequestError(400, "subdirectory names the DTS area itself")
        timeout = self.config.staging_timeout if timeout is None else timeout
        if not 0 < timeout <= self.config.staging_max_timeout:
            raise RequestError(400, f"staging_timeout must be between 0 and {self.config.staging_max_timeout:g} seconds")
        code = secrets.token_urlsafe(24)
        job_id = str(uuid.uuid4())
        fields = self._new_fields(Status.STAGING, user, subdirectory, submitter, "staged", None)
        fields.update(authcode_hash=hash_code(code), staging_timeout=int(timeout))
        if job_timeout is not None:
            fields["timeout_seconds"] = f"{job_timeout:g}"
        # the job and its staging deadline in one step: no job can wait for a stager forever
        await self.store.create_job(job_id, fields, staging_s=timeout)
        self.log.info("job {job_id} waits for a stager ({timeout:g} s)", job_id=job_id, timeout=timeout)
        return await self._must_get(job_id), code

    async def done_staging(self, job_id: str, code: str, success: bool, path: str | None,
                           staged_to: str | None, msg: str | None) -> Job:
        stored = await self.store.get_field(job_id, "authcode_hash") if looks_like_job_id(job_id) else None
        given = hash_code(code)
        if stored is None or not hmac.compare_digest(stored, given):
            raise RequestError(403, "unknown job, wrong or used authcode, or the job is not waiting for staging")
        fields: dict[str, Any] = {"staged_to": staged_to, "stager_msg": msg, "stager_success": success}
        folder_key = None
        if success:
            job = await self._must_get(job_id)
            source = await self.resolve_for_staging(job.subdirectory, path)
            fields.update(source_rel=source.rel, stager_path=path,
                          detailed_status="staged; queued for copying")
            folder_key = self.store.folder_key(job.target_user, source.rel)
        else:
            fields.update(detailed_status=f"the stager reported failure: {msg or 'no message'}")
        r = await self.store.staged(job_id, given, success, now_iso(), fields, folder_key)
        if r != "OK":
            raise RequestError(403, "unknown job, wrong or used authcode, or the job is not waiting for staging")
        self.log.info("job {job_id} staged: success={success}", job_id=job_id, success=success)
        if success:
            self._claim_soon()
        else:
            self.metrics.jobs_finished.labels("ERROR", errors.STAGING_FAILED).inc()
        return await self._must_get(job_id)

    async def resolve_for_staging(self, subdirectory: str, path: str | None = None) -> engine.Source:
        """The folder a stager delivers: ``path`` if given, which must be the submitted
        ``subdirectory`` or a folder inside it (403 otherwise), else ``subdirectory``.

        Nothing here uses up the authcode: every refusal leaves the job waiting.
        """
        try:
            base = await self.run_in_thread(_staging_rel, self.config.dts_root, subdirectory)
            rel = base if not path else await self.run_in_thread(_staging_rel, self.config.dts_root, path)
        except errors.TransferError as e:
            raise RequestError(403, f"path: {e.message}", reason=e.reason) from None
        # Lexical containment is enough: the folder is then opened component by component
        # without following any symbolic link, so what is opened is what was named.
        if not base or not (rel == base or rel.startswith(base + "/")):
            raise RequestError(403, "path must be the submitted subdirectory or a folder inside it",
                               reason="outside_subdirectory")
        try:
            return await self.resolve(rel)
        except RequestError as e:
            # A folder that does not exist (yet) is a bad parameter: 400, and the code is not used up.
            if e.code == 404:
                raise RequestError(400, f"path: {e.message}", reason=e.extra.get("reason")) from None
            raise

    async def cancel(self, job_id: str) -> Job:
        r = await self.store.cancel(job_id, now_iso(), "cancelled on request")
        if r == "NOTFOUND":
            raise RequestError(404, f"no job {job_id}")
        if r == "PUBLISHING":
            raise RequestError(409, "the job is publishing its folder and can no longer be cancelled")
        if r != "OK":
            raise RequestError(409, f"the job has already ended ({r})")
        self.log.info("job {job_id} cancelled", job_id=job_id)
        run = self.running.get(job_id)
        if run is not None:
            run.stop.set()
        else:
            self.metrics.jobs_finished.labels("CANCELLED", errors.CANCELLED).inc()
        self._notify(job_id)
        return await self._must_get(job_id)

    async def wait(self, job_id: str) -> Job:
        """Wait until the job ends (here or in another process)."""
        # Each failed read already took a full Redis timeout: give the caller its
        # 503 after a bounded outage (the job itself carries on), not after minutes.
        failing_since: float | None = None
        while True:
            try:
                job = await self._must_get(job_id)  # a record that vanished: say so, never wait forever
                failing_since = None
            except StoreUnavailable:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                elif now - failing_since > 3 * self.config.redis_timeout:
                    raise
                job = None
            if job is not None and job.final:
                return job
            d = Deferred()
            self._waiters.setdefault(job_id, []).append(d)
            d.addTimeout(0.5, self.reactor)
            try:
                await d
            except defer.TimeoutError:
                pass
            finally:
                ws = self._waiters.get(job_id, [])
                if d in ws:
                    ws.remove(d)
                if not ws:
                    self._waiters.pop(job_id, None)

    def _notify(self, job_id: str) -> None:
        for d in self._waiters.pop(job_id, []):
            if not d.called:
                d.callback(None)

    # -- the worker ------------------------------------------------------

    def copies(self) -> int:
        """Copies that hold one of the ``[copy] max_jobs`` slots: running ones whose job has not ended.

        A job ended while its thread is still busy (stalled in a hung read, timed out) frees
        its slot at once; its thread, until it returns, still counts in :meth:`max_threads`.
        """
        return sum(1 for r in self.running.values() if r.ended is None)

    def max_threads(self) -> int:
        """Copy threads at most, stuck ones included: ``2 * max_jobs`` (the thread pool has
        ``2 * max_jobs + 4``, so the requests' own blocking calls always find a thread)."""
        return 2 * self.config.max_jobs

    def stuck(self, after: float = STUCK_AFTER) -> list[Running]:
        """Copies whose job ended more than ``after`` seconds ago but whose thread has not returned."""
        now = time.monotonic()
        return [r for r in self.running.values() if r.ended is not None and now - r.ended_at >= after]

    def _ended(self, run: Running, status: str) -> None:
        """``run``'s job ended while its copy still runs: its slot is free for the next job at once.

        Its threads may stay stuck in the kernel (a hung read): the shared file executor gets
        ``[copy] threads`` more workers until this copy returns, so the next jobs' files are not
        queued behind the stuck ones.
        """
        run.ended, run.ended_at = status, time.monotonic()
        if not run.widened and isinstance(self.executor, SpareExecutor):
            self.executor.widen(self.config.threads)
            run.widened = True
        self._claim_soon()

    def _claim_soon(self) -> None:
        if not self._claiming:
            ensureDeferred(self._claim_loop())

    async def _claim_loop(self) -> None:
        self._claiming = True
        try:
            while (not self.draining and not self.halt_when_idle
                   and self.copies() < self.config.max_jobs and len(self.running) < self.max_threads()):
                token = secrets.token_hex(8)
                try:
                    job_id = await self.store.claim(token, self.holder, self.config.lease_seconds, now_iso(),
                                                    self.config.max_jobs_per_user)
                except StoreUnavailable:
                    return
                if job_id is None:
                    return
                run = Running(job_id=job_id, token=token, started=time.monotonic())
                self.running[job_id] = run
                self.metrics.in_flight.set(len(self.running))
                ensureDeferred(self._run(run))
        except Exception as e:  # noqa: BLE001
            self.log.failure("claiming jobs failed: {e}", e=e)
        finally:
            self._claiming = False

    async def _retrying(self, what: str, job_id: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Keep trying a Redis call through an outage; a copy's result must not be lost.

        Once the process is stopping (:meth:`stop` is handing jobs back) it gives up
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
        status, fields = "ERROR", {}
        try:
            self.metrics.jobs_started.inc()
            status, fields = await self._copy(run)
        except StoreUnavailable as e:
            # Redis away (at shutdown _retrying gives up): not the job's failure. Its lease lapses
            # and it is taken up again, here or elsewhere.
            self.log.warn("job {job_id}: Redis unavailable ({e}); leaving it to be taken up again",
                          job_id=job_id, e=e)
            run.lost = True
            status, fields = "ERROR", {"reason": errors.INTERNAL, "detailed_status": f"Redis unavailable: {e}"}
        except Exception as e:  # noqa: BLE001 - any bug ends the job in ERROR, never hangs it
            self.log.failure("job {job_id} failed unexpectedly", job_id=job_id)
            status, fields = "ERROR", {"reason": errors.INTERNAL, "detailed_status": f"internal error: {e}"}
        try:
            # A published copy records its result whenever its claim still holds (the store
            # checks); any other result of a copy this process gave up is not the job's.
            if run.lost and status != "SUCCESS":
                self.log.info("job {job_id}: this process no longer holds it; not recording a result",
                              job_id=job_id)
                return
            try:
                ended = await self._retrying("recording the result", job_id, lambda: self.store.finish(
                    job_id, token, status, now_iso(), fields))
            except StoreUnavailable as e:
                self.log.warn("job {job_id}: could not record its result at shutdown ({e}); its lease will "
                              "lapse and it will be taken up again", job_id=job_id, e=e)
                return
            if ended is not None and run.ended is None:
                self.metrics.jobs_finished.labels(ended, fields.get("reason", "") if ended != "CANCELLED"
                                                  else errors.CANCELLED).inc()
                self.metrics.job_seconds.labels(ended).observe(time.monotonic() - run.started)
                self.log.info("job {job_id} ended {status}: {detail}", job_id=job_id, status=ended,
                              detail=fields.get("detailed_status", ""))
        finally:
            self.running.pop(job_id, None)
            if run.widened and isinstance(self.executor, SpareExecutor):
                self.executor.widen(-self.config.threads)
            self.metrics.in_flight.set(len(self.running))
            self._notify(job_id)
            self._claim_soon()

    async def _copy(self, run: Running) -> tuple[str, dict[str, Any]]:
        job = await self._retrying("reading the job", run.job_id, lambda: self.store.get_job(run.job_id))
        if job is None:
            return "ERROR", {"reason": errors.INTERNAL, "detailed_status": "job record vanished"}
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
                name = await self.run_in_thread(
                    engine.find_published, cfg.user_root, dest_parts, source.name,
                    int(job.extra["publish_dev"]), int(job.extra["publish_ino"]))
                if name is not None:
                    await self._cleanup_temps(job, dest_parts)
                    self.log.info("job {job_id}: found its folder {name} published before a crash",
                                  job_id=job.job_id, name=name)
                    files = int(job.extra.get("publish_files") or job.files_total or 0)
                    nbytes = int(job.extra.get("publish_bytes") or job.bytes_total or 0)
                    return "SUCCESS", {
                        "path": user_path(job.target_user, cfg.target_subdir, name),
                        "files_total": files, "files_done": files, "bytes_total": nbytes, "bytes_done": nbytes,
                        "detailed_status": f"published {name} (recovered after a restart)"}
                await self._retrying("clearing a dead attempt's publish record", job.job_id,
                                     lambda: self.store.unfence(job.job_id, run.token))
            # Resume: the latest earlier attempt's folder (as recorded) is kept for this attempt to
            # take its verified files from; every other one goes now, that one once the copy ends.
            resume_from = next((r for r in reversed(engine.TempRecord.decode_all(job.extra.get("temp_dirs")))
                                if not r.pending and r.attempt != attempt), None)
            await self._cleanup_temps(job, dest_parts, keep=resume_from)
            uid, gid = await self.run_in_thread(self._ownership, job.target_user)
            options = engine.CopyOptions(checksum=cfg.checksum, uid=uid, gid=gid,
                                         max_bytes=cfg.max_payload_bytes, fsync=cfg.fsync, workers=cfg.threads,
                                         processes=cfg.processes, reflink=cfg.reflink)
            phase_started = [time.monotonic()]

            scanned: list[engine.Plan] = []  # what was copied: all that delete_source may remove

            def on_plan(plan) -> None:
                scanned.append(plan)
                run.files_total, run.bytes_total = plan.files, plan.bytes
                run.phase = "copying and verifying"
                now = time.monotonic()
                self.metrics.phase_seconds.labels("scan").observe(now - phase_started[0])
                phase_started[0] = now

            def on_progress(files_done: int, bytes_done: int) -> None:
                run.files_done, run.bytes_done = files_done, bytes_done
                run.moved = time.monotonic()

            def before_publish(tmpname: str, dev: int, ino: int) -> bool:
                run.phase = "publishing"
                now = time.monotonic()
                self.metrics.phase_seconds.labels("copy").observe(now - phase_started[0])
                phase_started[0] = now
                if run.stop.is_set():
                    return False
                try:
                    return blockingCallFromThread(self.reactor, lambda: ensureDeferred(self._retrying(
                        "fencing the publish", run.job_id, lambda: self.store.fence(run.job_id, run.token, {
                            "publish_tmp": tmpname, "publish_dev": dev, "publish_ino": ino,
                            "publish_files": run.files_total, "publish_bytes": run.bytes_total}))))
                except StoreUnavailable:  # stopping with Redis away: do not publish; the job is taken up again
                    run.lost = True
                    return False

            made: list[engine.TempRecord] = []

            def record_temp(word: str) -> bool:
                return blockingCallFromThread(self.reactor, lambda: ensureDeferred(self._retrying(
                    "recording the temporary folder", run.job_id,
                    lambda: self.store.add_temp(run.job_id, run.token, word))))

            def on_temp(record: engine.TempRecord) -> None:
                made.append(record)
                if not record_temp(record.encode()):
                    raise errors.TransferError(errors.CANCELLED, "lost claim")

            # Recorded before the folder is made (then with its inode as soon as it is), so
            # that a crash at any moment leaves a folder a later cleanup knows to be ours.
            pending = engine.TempRecord(attempt).encode()
            if not await self._retrying("recording the temporary folder", run.job_id,
                                        lambda: self.store.add_temp(run.job_id, run.token, pending)):
                raise errors.TransferError(errors.CANCELLED, "lost claim")
            try:
                result = await self.run_in_thread(
                    engine.copy_tree, cfg.dts_root, source, cfg.user_root, dest_parts, job.job_id, attempt, options,
                    on_plan=on_plan, on_progress=on_progress, should_stop=run.stop.is_set,
                    before_publish=before_publish, on_temp=on_temp, executor=self.executor,
                    resume_from=resume_from)
            except Exception:
                # copy_tree removed its folder; make sure (by inode) before forgetting it.
                await self._settle_attempt(job.job_id, dest_parts, attempt, made or [engine.TempRecord(attempt)])
                raise
            finally:
                if resume_from is not None:  # what is left of the earlier attempt's folder
                    await self._settle_attempt(job.job_id, dest_parts, resume_from.attempt, [resume_from])
            await self._settle_attempt(job.job_id, dest_parts, attempt, [])  # published: nothing to remove
        except errors.TransferError as e:
            if e.reason == errors.CANCELLED:
                return "CANCELLED", {"detailed_status": "cancelled; everything made for it was removed"}
            return "ERROR", {"reason": e.reason, "detailed_status": e.message,
                             "files_done": run.files_done, "bytes_done": run.bytes_done}
        self.metrics.phase_seconds.labels("publish").observe(time.monotonic() - phase_started[0])
        self.metrics.bytes_copied.inc(result.bytes)
        self.metrics.files_copied.inc(result.files)
        detail = f"copied and verified {result.files} files ({result.bytes} bytes) to {result.name}"
        fields: dict[str, Any] = {
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
        return "SUCCESS", fields

    # -- housekeeping ------------------------------------------------------

    async def tick(self) -> None:
        """Every second: renew leases and record progress, then recover lapsed jobs and staging timeouts.

        Runs as a :class:`Periodic`: whatever it raises is logged and it runs again at
        the next tick. Each step is tried even when an earlier one failed (but none
        once Redis is unreachable).
        """
        renewed = True
        failure: Exception | None = None
        for run in list(self.running.values()):
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
            elif st in ("CANCELLED", "ERROR", "SUCCESS"):  # cancelled, timed out or given up
                if run.ended is None and st != "CANCELLED":
                    self._ended(run, st)
                run.stop.set()
        steps = [self._recover_lapsed, self._sweep_staging, self._sweep_deadlines, self.store.trim,
                 self._refresh_counts]
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
            self._claim_soon()

    async def _sweep_staging(self) -> None:
        for job_id in await self.store.sweep_staging(now_iso()):
            self.log.info("job {job_id}: staging timed out", job_id=job_id)
            self.metrics.jobs_finished.labels("ERROR", errors.STAGING_TIMEOUT).inc()
            self._notify(job_id)

    async def _sweep_deadlines(self) -> None:
        for job_id in await self.store.sweep_deadlines(now_iso()):
            self.log.info("job {job_id}: not finished within its timeout_seconds; ended", job_id=job_id)
            self.metrics.jobs_finished.labels("ERROR", errors.TIMEOUT).inc()
            run = self.running.get(job_id)
            if run is not None:
                if run.ended is None:
                    self._ended(run, "ERROR")
                run.stop.set()
            self._notify(job_id)

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
        for run in list(self.running.values()):
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
                self._ended(run, "ERROR")
                self.log.warn("job {job_id} {detail}", job_id=run.job_id, detail=detail)
                self.metrics.jobs_finished.labels("ERROR", errors.STALLED).inc()
                self.metrics.job_seconds.labels("ERROR").observe(now - run.started)
                self._notify(run.job_id)

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
        n = await self.run_in_thread(engine.cleanup_temp, self.config.user_root, dest_parts, job.job_id, records)
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
        self._claim_soon()


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




def _staging_rel(dts_root: str, path: str) -> str:
    """``path`` (relative to ``dts_root`` or absolute inside it) as a canonical relative path; blocking."""
    return engine.normalize_relpath(_relative_to_root(dts_root, path))


def _user_folder_safe(user_root: str, user: str) -> bool:
    """False when ``user_root/<user>`` exists as anything but a real folder (a link, a file...)."""
    try:
        st = os.lstat(os.path.join(user_root, user))
    except (FileNotFoundError, NotADirectoryError):
        return True  # absent: the user check decides (and may create it)
    return stat.S_ISDIR(st.st_mode)


def _relative_to_root(dts_root: str, path: str) -> str:
    """Strip the DTS root from an absolute path for a syntax check (the real check opens the folder)."""
    if path.startswith("/"):
        for root in {os.path.normpath(dts_root), os.path.realpath(dts_root)}:
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return path[len(root):].lstrip("/") or "."
        raise errors.TransferError(errors.OUTSIDE_DTS_AREA, f"{path!r} is not inside the DTS area")
    return path
