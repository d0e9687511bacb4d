"""The request side: jobs from a request to the answer, with no HTTP in it.

:class:`Jobs` queues a copy (:meth:`~Jobs.submit`), registers one that waits for a
stager (:meth:`~Jobs.submit_staging`, :meth:`~Jobs.done_staging`), cancels,
waits for the end, reads and lists jobs. It refuses with the domain exceptions
of :mod:`dtsbridge.errors` (:class:`~dtsbridge.errors.Invalid`,
:class:`~dtsbridge.errors.Forbidden`, :class:`~dtsbridge.errors.NotFound`, …),
which carry a ``reason`` and never an HTTP status: :mod:`dtsbridge.web` maps them.

The copies themselves are the :class:`~dtsbridge.worker.Worker`'s: Jobs only
wakes it (a new job is queued), asks it to stop a copy (a cancel) and asks
whether the process is draining. A job's end, wherever it comes from, wakes
the requests waiting for it through :class:`Waiters`.
"""

from __future__ import annotations

import hmac
import secrets
import time
import uuid
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dtsbridge import engine, errors
from dtsbridge.config import Config
from dtsbridge.interfaces import ThreadRunner
from dtsbridge.metrics import Metrics
from dtsbridge.model import Job, Status, exact, looks_like_job_id, now_iso
from dtsbridge.store import AlreadyEnded, BadCode, Folder, JobGone, NotStaging, Publishing, Store, StoreUnavailable
from dtsbridge.tokenfile import hash_token
from dtsbridge.users import Users, staging_rel


class Copier(Protocol):
    """What the request side needs of the process's worker."""

    holder: str
    draining: bool

    def claim_soon(self) -> None:
        """A job was queued: look for work now rather than at the next poll."""

    def stop_copy(self, job_id: str) -> bool:
        """Tell this process's copy of ``job_id`` to stop; False when it runs no copy of it."""


@attrs.frozen
class Caller:
    """Who asks: a user, and whether it holds the transfer role (then it may see every job)."""

    user: str
    transfer: bool

    def scope(self, user: str | None, refusal: str) -> str | None:
        """Whose jobs the caller sees when it asks for ``user``'s: any (transfer role), else only its own."""
        if self.transfer:
            return user
        if user not in (None, self.user):
            raise errors.Forbidden(refusal)
        return self.user


class Waiters:
    """Requests waiting for a job's end; :meth:`notify` wakes them (they then read the job again)."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[Deferred[None]]] = {}

    def add(self, job_id: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.setdefault(job_id, []).append(d)
        return d

    def discard(self, job_id: str, d: Deferred[None]) -> None:
        ws = self._waiting.get(job_id, [])
        if d in ws:
            ws.remove(d)
        if not ws:
            self._waiting.pop(job_id, None)

    def notify(self, job_id: str) -> None:
        for d in self._waiting.pop(job_id, []):
            if not d.called:
                d.callback(None)


class Jobs:
    """Jobs from request to final state, as the API and the watcher see them."""

    log = Logger()

    def __init__(self, config: Config, store: Store, users: Users, run_in_thread: ThreadRunner,
                 worker: Copier, waiters: Waiters, clock: IReactorTime, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.users = users
        self.run_in_thread = run_in_thread
        self.worker = worker
        self.waiters = waiters
        self.clock = clock
        self.metrics = metrics

    @property
    def draining(self) -> bool:
        return self.worker.draining

    @property
    def holder(self) -> str:
        return self.worker.holder

    # -- queueing -------------------------------------------------------------

    async def resolve(self, subdirectory: str) -> engine.Source:
        """The source folder ``subdirectory`` names in the DTS area (opened safely, in a thread)."""
        try:
            return await self.run_in_thread(engine.resolve_source, self.config.dts_root, subdirectory)
        except errors.TransferError as e:
            raise errors.refused(e) from None

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
            raise errors.Draining()
        await self.users.check(user)
        if source is None:
            try:
                source = await self.resolve(subdirectory)
            except errors.NotFound:
                # A repeat of a request that succeeded answers with its job even when the
                # source is gone since (delete_source), for as long as the job is kept.
                done = await self._succeeded_for(user, subdirectory)
                if done is None:
                    raise
                return done, False
        job_id = str(uuid.uuid4())
        fields = self._new_fields(Status.SUBMITTED, user, subdirectory, submitter, kind, source)
        if timeout is not None:
            fields["timeout_seconds"] = exact(timeout)
        created, job_id = await self.store.create_job(job_id, fields, Folder(user, source.rel))
        if created:
            self.log.info("job {job_id} queued: {folder} for {user} by {submitter}", job_id=job_id,
                          folder=source.rel, user=user, submitter=submitter)
            self.worker.claim_soon()
        return await self._must_get(job_id), created

    async def _succeeded_for(self, user: str, subdirectory: str) -> Job | None:
        """The successful job that owns ``subdirectory`` for ``user``, if any (no filesystem access)."""
        try:
            rel = await self.run_in_thread(staging_rel, self.config.dts_root, subdirectory)
        except errors.TransferError:
            return None
        if not rel:
            return None
        job = await self.store.job_for_folder(Folder(user, rel))
        return job if job is not None and job.status == Status.SUCCESS else None

    async def _must_get(self, job_id: str) -> Job:
        job = await self.store.get_job(job_id)
        if job is None:
            raise errors.Internal(f"the record of job {job_id} vanished from the job store",
                                  reason=errors.INTERNAL, job_id=job_id)
        return job

    # -- staging ----------------------------------------------------------------

    async def submit_staging(self, user: str, subdirectory: str, submitter: str,
                             timeout: float | None, job_timeout: float | None = None) -> tuple[Job, str]:
        """Register a job that waits for a stager; returns it and the one-time authcode."""
        if self.draining:
            raise errors.Draining()
        await self.users.check(user)
        # The folder is checked when staging is done; refuse the obviously bad now
        # (in a thread: the check resolves the DTS root's real path).
        try:
            rel = await self.run_in_thread(staging_rel, self.config.dts_root, subdirectory)
            engine.check_not_reserved(rel.rsplit("/", 1)[-1])
        except errors.TransferError as e:
            raise errors.refused(e) from None
        if not rel:
            raise errors.Invalid("subdirectory names the DTS area itself")
        timeout = self.config.staging_timeout if timeout is None else timeout
        if not 0 < timeout <= self.config.staging_max_timeout:
            raise errors.Invalid(
                f"staging_timeout must be between 0 and {self.config.staging_max_timeout:g} seconds")
        code = secrets.token_urlsafe(24)
        job_id = str(uuid.uuid4())
        fields = self._new_fields(Status.STAGING, user, subdirectory, submitter, "staged", None)
        fields.update(authcode_hash=hash_token(code), staging_timeout=exact(timeout))
        if job_timeout is not None:
            fields["timeout_seconds"] = exact(job_timeout)
        # the job and its staging deadline in one step: no job can wait for a stager forever
        await self.store.create_staging_job(job_id, fields, timeout)
        self.log.info("job {job_id} waits for a stager ({timeout:g} s)", job_id=job_id, timeout=timeout)
        return await self._must_get(job_id), code

    async def done_staging(self, job_id: str, code: str, success: bool, path: str | None,
                           staged_to: str | None, msg: str | None) -> Job:
        """The stager's report: queue the staged folder, or end the job in ERROR."""
        stored = await self.store.authcode_hash(job_id) if looks_like_job_id(job_id) else None
        given = hash_token(code)
        if stored is None or not hmac.compare_digest(stored, given):
            raise errors.Forbidden("unknown job, wrong or used authcode, or the job is not waiting for staging")
        fields: dict[str, Any] = {"staged_to": staged_to, "stager_msg": msg, "stager_success": success}
        folder = None
        if success:
            job = await self._must_get(job_id)
            source = await self.resolve_for_staging(job.subdirectory, path)
            fields.update(source_rel=source.rel, stager_path=path,
                          detailed_status="staged; queued for copying")
            folder = Folder(job.target_user, source.rel)
        else:
            fields.update(detailed_status=f"the stager reported failure: {msg or 'no message'}")
        try:
            await self.store.finish_staging(job_id, given, success, now_iso(), fields, folder)
        except (JobGone, NotStaging, BadCode):
            raise errors.Forbidden("unknown job, wrong or used authcode, or the job is not waiting for staging") from None
        self.log.info("job {job_id} staged: success={success}", job_id=job_id, success=success)
        if success:
            self.worker.claim_soon()
        else:
            self.metrics.jobs_finished.labels(Status.ERROR.value, errors.STAGING_FAILED).inc()
        return await self._must_get(job_id)

    async def resolve_for_staging(self, subdirectory: str, path: str | None = None) -> engine.Source:
        """The folder a stager delivers: ``path`` if given, which must be the submitted
        ``subdirectory`` or a folder inside it (Forbidden otherwise), else ``subdirectory``.

        Nothing here uses up the authcode: every refusal leaves the job waiting.
        """
        try:
            base = await self.run_in_thread(staging_rel, self.config.dts_root, subdirectory)
            rel = base if not path else await self.run_in_thread(staging_rel, self.config.dts_root, path)
        except errors.TransferError as e:
            raise errors.Forbidden(f"path: {e.message}", reason=e.reason) from None
        # Lexical containment is enough: the folder is then opened component by component
        # without following any symbolic link, so what is opened is what was named.
        if not base or not (rel == base or rel.startswith(base + "/")):
            raise errors.Forbidden("path must be the submitted subdirectory or a folder inside it",
                                   reason="outside_subdirectory")
        try:
            return await self.resolve(rel)
        except errors.NotFound as e:
            # A folder that does not exist (yet) is a bad parameter, and the code is not used up.
            raise errors.Invalid(f"path: {e.message}", reason=e.reason) from None

    # -- cancelling, waiting, reading -------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        try:
            await self.store.cancel_job(job_id, now_iso(), "cancelled on request")
        except JobGone:
            raise errors.NotFound(f"no job {job_id}") from None
        except Publishing:
            raise errors.Conflict("the job is publishing its folder and can no longer be cancelled") from None
        except AlreadyEnded as e:
            raise errors.Conflict(f"the job has already ended ({e.status.value})") from None
        self.log.info("job {job_id} cancelled", job_id=job_id)
        if not self.worker.stop_copy(job_id):
            self.metrics.jobs_finished.labels(Status.CANCELLED.value, errors.CANCELLED).inc()
        self.waiters.notify(job_id)
        return await self._must_get(job_id)

    async def wait(self, job_id: str) -> Job:
        """Wait until the job ends (here or in another process)."""
        # Each failed read already took a full Redis timeout: give the caller its
        # 503 after a bounded outage (the job itself carries on), not after minutes.
        failing_since: float | None = None
        while True:
            job: Job | None
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
            d = self.waiters.add(job_id)
            d.addTimeout(0.5, self.clock)
            try:
                await d
            except defer.TimeoutError:
                pass
            finally:
                self.waiters.discard(job_id, d)

    async def read(self, job_id: str, caller: Caller) -> Job:
        """The job, for its target user or a caller with the transfer role."""
        job = await self.store.get_job(job_id) if looks_like_job_id(job_id) else None
        if not caller.transfer and job is not None and job.target_user != caller.user:
            raise errors.Forbidden("only the target user or a transfer service may read this job")
        if job is None:
            raise errors.NotFound(f"no job {job_id}")
        return job

    async def listing(self, caller: Caller, user: str | None, status: str | None, limit: int) -> list[Job]:
        """The latest jobs, ``user``'s (a caller without the transfer role: its own only), of ``status``."""
        user = caller.scope(user, "you may list only your own jobs")
        if status is not None and status not in Status.__members__:
            raise errors.Invalid(f"status must be one of {', '.join(Status.__members__)}")
        return await self.store.list_jobs(user=user, status=status, limit=limit)
