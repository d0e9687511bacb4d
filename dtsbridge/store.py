"""The Redis store: every job's durable state, the work queue and its leases.

Layout (``P`` is ``[redis] key_prefix``, ``dtsbridge`` by default):

- ``P:job:<id>``      hash: the job (see :mod:`dtsbridge.model`)
- ``P:jobs``          sorted set: every job id by creation time (ms)
- ``P:queue``         list: jobs waiting for a worker (LPUSH new, RPOP to claim)
- ``P:active``        sorted set: claimed jobs by lease deadline (ms, Redis clock)
- ``P:staging``       sorted set: jobs in STAGING by staging deadline (ms)
- ``P:deadlines``     sorted set: jobs with a ``timeout_seconds`` by deadline (ms)
- ``P:user_active``   hash: target user -> number of their claimed (running) jobs,
  for ``[copy] max_jobs_per_user``
- ``P:folder:<user>:<folder>``  string: the job that owns "copy this folder for
  this user"; a repeat of the request finds it here
- ``P:watched:<folder>``  string: the watcher has taken this folder (SET NX); once its
  job exists, the job id, kept for ``WATCH_MARK_MS`` (at least the retention) and renewed
  while the folder is still in the DTS area, so the folder is never delivered twice
- ``P:expiring``      sorted set: ended jobs by the time they are forgotten (ms)
- ``P:events``        stream: every job change (see :mod:`dtsbridge.lua`), kept for ``EVENT_KEEP_MS``;
  its consumer group ``webhooks`` turns events into webhook deliveries
- ``P:hooks``         sorted set: pending webhook deliveries by next attempt (ms);
  ``P:hook:<event id> <url>`` hash: a delivery's body, URL, attempts, first try
  (see :mod:`dtsbridge.hooks`)

Retention: when a job ends and no worker holds it any more, the script that
ends it gives its hash and its folder key (if it still names it) a ``PEXPIRE``
of the job's ``retain_ms`` (``[state]
retention_days``, recorded at creation) and adds it to ``P:expiring``;
:meth:`Store.trim` (every housekeeping tick) then drops the index entries
(``P:jobs``, ``P:expiring``) of jobs whose time is up. Redis memory is thus
bounded by the jobs of the retention period plus the live ones.

Every change that must be atomic is one Lua script (:mod:`dtsbridge.lua`), and
every script reads the time from Redis (``TIME``) so hosts with skewed clocks
agree on leases and deadlines. Callers never see a key or a script's reply: each
method returns a value, an enum or a small result, or raises one of the
:class:`StoreRefused` exceptions (:class:`JobGone`, :class:`LeaseLost`,
:class:`AlreadyEnded`, :class:`Publishing`, :class:`NotStaging`,
:class:`BadCode`). A worker holds a job through a *claim token* stored on the job:
heartbeats, the publish fence and the final state are refused once the claim
has moved on, so a stale worker can never publish twice or overwrite a newer
state (asynq's pending list / active set / recoverer design).

Every call carries a deadline: txredisapi waits forever while Redis is down,
so a call that does not answer in ``timeout`` seconds fails with
:class:`StoreUnavailable`, which the web layer turns into 503.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, TypedDict

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dtsbridge import lua
from dtsbridge.lua import DEFAULT_RETAIN_MS, EVENT_KEEP_MS, WATCH_MARK_MS
from dtsbridge.model import Job, Status, now_iso

if TYPE_CHECKING:
    from dtsbridge.hooks import HookQueue

__all__ = ["DEFAULT_RETAIN_MS", "EVENT_KEEP_MS", "WATCH_MARK_MS", "AlreadyEnded", "BadCode", "Counts", "Created",
           "Folder", "Holder", "JobGone", "LeaseLost", "NotStaging", "Publishing", "Recovered", "StoreRefused",
           "Release", "Store", "StoreUnavailable", "Trimmed", "WatchMark", "connect", "parse_events",
           "refused_for_now"]

# Reconnect quickly after a Redis restart (the library's default backs off to 10 s).
txredisapi.RedisFactory.maxDelay = 2
txredisapi.RedisFactory.initialDelay = 0.2


class StoreUnavailable(Exception):
    """Redis did not answer in time, or the connection is down."""


# -- what the store refuses -------------------------------------------------------


class StoreRefused(Exception):
    """The store refused a change: the job is not in a state that allows it (nothing changed)."""


class JobGone(StoreRefused):
    """No such job: never made, or forgotten after its retention."""


class LeaseLost(StoreRefused):
    """The claim token no longer holds the job: another attempt took it over, or it was forgotten."""


class AlreadyEnded(StoreRefused):
    """The job has already ended, in ``status``."""

    def __init__(self, status: Status) -> None:
        super().__init__(f"the job has already ended ({status.value})")
        self.status = status


class Publishing(StoreRefused):
    """The job is past its publish fence: its folder may be published, so it can no longer be
    cancelled or handed back; its holder records the result."""


class NotStaging(StoreRefused):
    """The job is not waiting for a stager (any more)."""


class BadCode(StoreRefused):
    """The authcode is not the job's (or was used already)."""


# -- what the store answers -------------------------------------------------------


@enum.unique
class Release(enum.StrEnum):
    """What handing a claimed job back to the queue did."""

    RELEASED = "released"  # back in the queue (or, ended meanwhile, scheduled to be forgotten)
    LOST = "lost"  # the claim had moved on: nothing done
    PUBLISHING = "publishing"  # refused: past its publish fence, the holder must finish it


@enum.unique
class WatchMark(enum.Enum):
    """The watcher's mark of a folder."""

    TAKING = "taking"  # a process is making the folder's job right now (the mark expires if it dies)
    DONE = "done"  # the folder has its job (or had one): never delivered again


class Folder(NamedTuple):
    """A target user's copy of a folder of the DTS area: at most one live job owns it."""

    user: str
    rel: str  # canonical, beneath the DTS area


class Created(NamedTuple):
    created: bool  # false: a live job (queued, staging, running or successful) already owned the folder
    job_id: str  # the job made, or the one joined


class Recovered(NamedTuple):
    requeued: list[str]  # back in the queue
    ended: list[str]  # ended meanwhile: their claim dropped, their temporary folders to remove


class Trimmed(NamedTuple):
    dropped: int  # index entries of forgotten jobs dropped
    scheduled: int  # ended jobs without an expiry given one


class Holder(NamedTuple):
    job_id: str
    claim: str  # the claim token
    holder: str  # ``host:pid`` of the process holding it


class Counts(TypedDict):
    queued: int
    active: int
    staging: int


#: Redis error codes that mean "up, but refusing for now" (loading, failing over, out of
#: memory under noeviction, short of replicas): the caller gets a 503 and may retry.
_REFUSED_FOR_NOW = re.compile(r"(?:^|: -)(LOADING|BUSY|MASTERDOWN|READONLY|TRYAGAIN|OOM|NOREPLICAS)\b")


def refused_for_now(message: str) -> bool:
    """Whether a Redis error is a passing refusal, as a reply (``OOM command not allowed…``)
    or wrapped by a script (``ERR Error running script …: @user_script:25: -OOM …``)."""
    return _REFUSED_FOR_NOW.search(message) is not None


def refusal_text(message: str) -> str:
    """Redis's refusal without what wraps it: a script's SHA and line are ours, not the caller's
    business (``OOM command not allowed when used memory > 'maxmemory'.``)."""
    m = _REFUSED_FOR_NOW.search(message)
    text = message[m.start(1):] if m else message
    return re.split(r"\s*script: [0-9a-f]+, on @user_script", text)[0].strip()


def _flat(fields: Mapping[str, object] | Iterable[tuple[str, object]]) -> list[str]:
    items = fields.items() if isinstance(fields, Mapping) else fields
    out: list[str] = []
    for k, v in items:
        if v is None:
            continue
        if isinstance(v, bool):
            v = "1" if v else "0"
        out += [k, str(v)]
    return out


def parse_events(entries: Iterable[Any] | None) -> list[tuple[str, Job]]:
    """``XRANGE``/``XREAD`` entries (``[id, [field, value, …]]``) as (event id, job as it was then)."""
    out: list[tuple[str, Job]] = []
    for entry_id, flat in entries or []:
        h = dict(zip(flat[::2], flat[1::2]))
        job_id = h.pop("job_id", None)
        if job_id and "status" in h:
            try:
                out.append((entry_id, Job.from_hash(job_id, h)))
            except ValueError:  # an unknown status: skip the entry rather than stop the stream
                continue
    return out


def connect(url: str, poolsize: int = 10) -> Any:
    """A lazy, self-reconnecting txredisapi connection pool for ``url`` (txredisapi connects through
    Twisted's global reactor: it takes no other).

    ``redis://[:password@]host:port[/db]``, ``unix:///path/redis.sock[?db=N]``, or
    ``redis+sentinel://host:port[,host:port…]/master_name[/db]`` (Sentinel).
    Database 0 is never SELECTed, so a reconnect cannot fail on SELECT.
    """
    u = urllib.parse.urlsplit(url)
    kw: dict[str, Any] = dict(poolsize=poolsize, reconnect=True, convertNumbers=False, connectTimeout=5)
    if u.password:
        kw["password"] = urllib.parse.unquote(u.password)
    if u.scheme == "unix":
        q = urllib.parse.parse_qs(u.query)
        db = int(q.get("db", ["0"])[0])
        return txredisapi.lazyUnixConnectionPool(u.path, dbid=db or None, **kw)
    if u.scheme == "redis+sentinel":
        hosts = []
        for hp in u.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hp.rpartition(":")
            hosts.append((host or hp, int(port or 26379)))
        parts = [p for p in u.path.split("/") if p]
        if not parts:
            raise ValueError("redis+sentinel:// URL needs a master name: redis+sentinel://host:26379/mymaster")
        db = int(parts[1]) if len(parts) > 1 else 0
        sentinel = txredisapi.Sentinel(hosts)
        return sentinel.master_for(parts[0], dbid=db or None, poolsize=poolsize,
                                   **{k: v for k, v in kw.items() if k in ("password",)})
    if u.scheme == "redis":
        db = int(u.path.strip("/") or 0)
        return txredisapi.lazyConnectionPool(u.hostname or "127.0.0.1", u.port or 6379, dbid=db or None, **kw)
    raise ValueError(f"unsupported Redis URL {url!r}")


class Store:
    """Async access to jobs, queue and leases; every call answers or fails within ``timeout``."""

    log = Logger()

    def __init__(self, redis: Any, reactor: IReactorTime, prefix: str = "dtsbridge", timeout: float = 5.0,
                 retention_s: float = DEFAULT_RETAIN_MS / 1000) -> None:
        self._redis = redis
        self.prefix = prefix
        self.timeout = timeout
        #: ``[state] retention_days`` in ms: recorded on each job made here (``retain_ms``)
        self.retain_ms = max(1, int(retention_s * 1000))
        #: how long a watcher's mark lives unrenewed (see :data:`lua.WATCHED_DONE`)
        self.mark_ms = max(self.retain_ms, WATCH_MARK_MS)
        self.reactor = reactor
        self.errors = 0  # Redis errors and timeouts seen (for /metrics)
        from dtsbridge.hooks import HookQueue
        #: the webhook deliveries
        self.hooks: HookQueue = HookQueue(self)

    # -- plumbing ---------------------------------------------------------

    @property
    def redis(self) -> Any:
        """The connection pool; until :meth:`attach` (embedded Redis still starting) every call is a 503."""
        if self._redis is None:
            raise StoreUnavailable("Redis is starting")
        return self._redis

    def attach(self, redis: Any) -> None:
        """Use this connection pool from now on (for a Redis that was not up when the store was made)."""
        self._redis = redis

    def key(self, *parts: str) -> str:
        """A key of this store (for :mod:`dtsbridge.hooks`; nothing outside the store builds one)."""
        return ":".join((self.prefix, *parts))

    def _folder_key(self, folder: Folder) -> str:
        return self.key("folder", folder.user, folder.rel)

    async def call(self, d: Deferred[Any]) -> Any:
        """Wait for a Redis call within ``timeout``: :class:`StoreUnavailable` if Redis is away or refusing for now."""
        d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except (defer.TimeoutError, defer.CancelledError, txredisapi.ConnectionError) as e:
            self.errors += 1
            raise StoreUnavailable(f"Redis did not answer: {e.__class__.__name__}") from None
        except txredisapi.ResponseError as e:
            self.errors += 1
            msg = str(e)
            # Redis up but refusing for now (loading, failing over, out of memory under
            # noeviction, short of replicas): a 503, and retried by whoever must not give up.
            if refused_for_now(msg):
                raise StoreUnavailable(f"Redis is not ready: {refusal_text(msg)}") from None
            raise
        except ConnectionError as e:  # builtin, e.g. refused while connecting
            self.errors += 1
            raise StoreUnavailable(f"Redis is unreachable: {e}") from None

    async def eval(self, script: str, keys: list[str], args: list[str]) -> Any:
        """Run one of the :mod:`dtsbridge.lua` scripts (the prefix goes first in ARGV)."""
        return await self.call(self.redis.eval(script, keys, [self.prefix, *args]))

    async def _eval_replicated(self, script: str, keys: list[str], args: list[str], required: bool = True) -> Any:
        """Run a script, then, when the primary has replicas, wait until one of them has it (``WAIT 1``).

        ``WAIT`` only covers the writes of the connection it runs on, so the script,
        ``ROLE`` and ``WAIT`` go over one connection taken from the pool for the
        duration. What this guards (a job's creation, its publish fence) then
        survives a Sentinel failover. ``required``: no replica's acknowledgement in
        time is a :class:`StoreUnavailable` (the write stands on the primary; a
        repeat of the request finds it); otherwise it is only logged.
        """
        redis = self.redis
        factory = getattr(redis, "_factory", None)
        if factory is None or not hasattr(factory, "connectionQueue"):  # not a txredisapi pool
            return await self.eval(script, keys, args)
        conn = await self.call(factory.getConnection())
        try:
            r = await self.call(conn.eval(script, keys, [self.prefix, *args]))
            role = await self.call(conn.role())
            if role and role[0] == "master" and len(role) > 2 and role[2]:
                wait_ms = max(100, int(self.timeout * 800))
                acked = await self.call(conn.execute_command("WAIT", 1, wait_ms))
                if int(acked or 0) < 1:
                    self.errors += 1
                    if required:
                        raise StoreUnavailable(f"no replica confirmed the write within {wait_ms} ms")
                    self.log.warn("no Redis replica confirmed a write within {ms} ms", ms=wait_ms)
            return r
        finally:
            factory.connectionQueue.put(conn)

    # -- reading ----------------------------------------------------------

    async def ping(self) -> bool:
        return (await self.call(self.redis.ping())) in ("PONG", b"PONG", True)

    async def writable(self) -> None:
        """Raise :class:`StoreUnavailable` unless Redis takes writes now (a PING answers even when
        every write is refused: out of memory under noeviction, a read-only replica, short of replicas).
        One script writes a key and deletes it: nothing is left, whatever the answer."""
        await self.eval(lua.PROBE_WRITE, [self.key("health-probe")], [])

    async def get_job(self, job_id: str) -> Job | None:
        h = await self.call(self.redis.hgetall(self.key("job", job_id)))
        if not h or "status" not in h:
            return None
        return Job.from_hash(job_id, h)

    async def job_for_folder(self, folder: Folder) -> Job | None:
        """The job that owns ``folder`` (live, or the last one that succeeded), if any."""
        job_id = await self.call(self.redis.get(self._folder_key(folder)))
        return await self.get_job(job_id) if job_id else None

    async def authcode_hash(self, job_id: str) -> str | None:
        """The hash of a staging job's one-time authcode (None: no such job, or the code is used)."""
        r: str | None = await self.call(self.redis.hget(self.key("job", job_id), "authcode_hash"))
        return r

    async def counts(self) -> Counts:
        queued = await self.call(self.redis.llen(self.key("queue")))
        active = await self.call(self.redis.zcard(self.key("active")))
        staging = await self.call(self.redis.zcard(self.key("staging")))
        return Counts(queued=int(queued or 0), active=int(active or 0), staging=int(staging or 0))

    async def active_holders(self) -> list[Holder]:
        """Every claimed job, with its claim token and holder."""
        ids = await self.call(self.redis.zrange(self.key("active"), 0, -1))
        out = []
        for job_id in ids or []:
            claim, holder = await self.call(self.redis.hmget(self.key("job", job_id), ["claim", "lease_host"]))
            if claim:
                out.append(Holder(job_id, claim, holder or ""))
        return out

    async def list_jobs(self, user: str | None = None, status: Status | str | None = None, limit: int = 100,
                        scan: int = 20_000) -> list[Job]:
        """The newest jobs (at most ``limit``) matching ``user`` and ``status``, in one round trip.

        At most ``scan`` of the newest jobs are looked at, so a listing stays
        bounded however long the history is.
        """
        r = await self.eval(lua.LIST, [], [user or "", str(status or ""), str(limit), str(scan)])
        out: list[Job] = []
        for i in range(0, len(r or []), 2):
            h = dict(zip(r[i + 1][::2], r[i + 1][1::2]))
            if "status" in h:
                out.append(Job.from_hash(r[i], h))
        return out

    # -- events -----------------------------------------------------------

    @property
    def events_key(self) -> str:
        return self.key("events")

    async def last_event_id(self) -> str:
        """The id of the newest event, or ``0-0`` when there is none."""
        r = await self.call(self.redis.execute_command("XREVRANGE", self.events_key, "+", "-", "COUNT", "1"))
        return str(r[0][0]) if r else "0-0"

    async def events_after(self, after: str, count: int = 500) -> list[tuple[str, Job]]:
        """At most ``count`` events that came after the event ``after``, oldest first."""
        return parse_events(await self.event_entries(after, count))

    async def event_entries(self, after: str, count: int = 500) -> list[Any]:
        """The same as raw ``XRANGE`` entries (``[id, [field, value, …]]``), for callers that parse lazily."""
        r = await self.call(self.redis.execute_command("XRANGE", self.events_key, "(" + after, "+",
                                                       "COUNT", str(count)))
        return list(r or [])

    # -- creating jobs -------------------------------------------------------

    async def create_job(self, job_id: str, fields: Mapping[str, object], folder: Folder | None = None, *,
                         enqueue: bool = True) -> Created:
        """Create a job (queued unless ``enqueue`` is false); with ``folder``, join the live job
        that owns it instead (see :class:`Created`). A job created already ended is scheduled
        to be forgotten like any other."""
        return await self._create(job_id, fields, self._folder_key(folder) if folder else "",
                                  "1" if enqueue else "0")

    async def create_staging_job(self, job_id: str, fields: Mapping[str, object], staging_s: float) -> None:
        """Create a job that waits for a stager, with its staging deadline, in one atomic step."""
        await self._create(job_id, fields, "", f"staging:{max(1, int(staging_s * 1000))}")

    async def _create(self, job_id: str, fields: Mapping[str, object], folder_key: str, mode: str) -> Created:
        r = await self._eval_replicated(lua.CREATE, [folder_key],
                                        [job_id, mode, *_flat(fields), "retain_ms", str(self.retain_ms)])
        return Created(bool(int(r[0])), str(r[1]))

    async def record_watch_failure(self, job_id: str, mark: str, folder: str, user: str, reason: str,
                                   detail: str, iso_now: str) -> None:
        """A folder the watcher cannot complete: a job ended in ERROR (``reason``, ``detail``) so
        operators see why, and the watcher's mark ``mark`` naming it, in one step."""
        fields = {"status": Status.ERROR.value, "target_user": user, "subdirectory": folder, "source_rel": folder,
                  "submitter": "watcher", "kind": "watch", "time_submitted": iso_now, "time_error": iso_now,
                  "reason": reason, "detailed_status": detail, "retain_ms": self.retain_ms}
        await self.eval(lua.WATCH_FAILED, [self.key("watched", mark)], [job_id, str(self.mark_ms), *_flat(fields)])

    # -- a worker's claim ------------------------------------------------------

    async def claim(self, token: str, holder: str, lease_s: float, iso_now: str,
                    per_user_limit: int | None = None) -> str | None:
        """Claim the oldest queued job whose target user runs fewer than ``per_user_limit`` jobs; its id."""
        r = await self.eval(lua.CLAIM, [], [token, holder, str(int(lease_s * 1000)), iso_now,
                                            str(per_user_limit or 0), "1000"])
        return str(r) if r else None

    async def renew(self, job_id: str, token: str, lease_s: float, fields: Mapping[str, object]) -> Status:
        """Renew the lease and record progress; the job's status (it may have been cancelled or
        ended meanwhile). :class:`LeaseLost` when the claim has moved on."""
        r = await self.eval(lua.HEARTBEAT, [], [job_id, token, str(int(lease_s * 1000)), *_flat(fields)])
        if not r:
            raise LeaseLost(job_id)
        return Status(r)

    async def fence(self, job_id: str, token: str, fields: Mapping[str, object]) -> bool:
        """Record the publish (``fields``) and pass the fence: True when the claim holds and the job
        is still copying, so it may publish; False: it must not (lost, cancelled, ended, or past its
        ``timeout_seconds``: then it ends here, in ERROR ``timeout``)."""
        return bool(await self._eval_replicated(lua.FENCE, [], [job_id, token, now_iso(), *_flat(fields)]))

    async def unfence(self, job_id: str, token: str) -> bool:
        """Forget a dead attempt's publish record once it is known not to have published (False: claim lost)."""
        return bool(await self.eval(lua.UNFENCE, [], [job_id, token]))

    async def add_temp(self, job_id: str, token: str, record: str) -> bool:
        """Record a temporary folder of the attempt holding ``token`` (an ``engine.TempRecord`` word);
        False when the claim is lost."""
        return bool(await self.eval(lua.ADD_TEMP, [], [job_id, token, record]))

    async def drop_temps(self, job_id: str, attempts: list[str]) -> None:
        """Forget the temporary folder records of these attempts."""
        if attempts:
            await self.eval(lua.DROP_TEMPS, [], [job_id, *attempts])

    async def record_result(self, job_id: str, token: str, status: Status, iso_now: str,
                            fields: Mapping[str, object]) -> Status:
        """Record the final state if the claim still holds; the status the job ended in (a job
        cancelled or ended meanwhile keeps its own). :class:`LeaseLost` when the claim has moved on."""
        r = await self._eval_replicated(lua.FINISH, [], [job_id, token, Status(status).value, iso_now,
                                                         *_flat(fields)], required=False)
        if not r:
            raise LeaseLost(job_id)
        return Status(r)

    async def release(self, job_id: str, token: str, detail: str) -> Release:
        """Hand a claimed job back to the queue (see :class:`Release`)."""
        r = int(await self.eval(lua.RELEASE, [], [job_id, token, detail]))
        return {1: Release.RELEASED, 0: Release.LOST, 2: Release.PUBLISHING}[r]

    async def recover(self, detail: str, job_id: str | None = None, token: str | None = None) -> Recovered:
        """Requeue lapsed leases (or the one job ``job_id`` whose holder ``token`` is dead)."""
        args = [detail] + ([job_id, token or ""] if job_id else [])
        r = [str(x) for x in await self.eval(lua.RECOVER, [], args)]
        i = r.index("|")
        return Recovered(r[:i], r[i + 1:])

    async def give_up(self, job_id: str, token: str, iso_now: str, reason: str, detail: str,
                      fields: Mapping[str, object] | None = None) -> bool:
        """End this claim's running job in ERROR now, without waiting for its copy (see
        :data:`lua.GIVE_UP`); False when refused (claim lost, publishing, not copying)."""
        return bool(await self.eval(lua.GIVE_UP, [], [job_id, token, iso_now, reason, detail, *_flat(fields or {})]))

    # -- requests on a job -----------------------------------------------------

    async def cancel_job(self, job_id: str, iso_now: str, detail: str) -> None:
        """Cancel a job that has not ended. :class:`JobGone`, :class:`AlreadyEnded` or
        :class:`Publishing` (past its publish fence) when refused."""
        r = str(await self.eval(lua.CANCEL, [], [job_id, iso_now, detail]))
        if r == "NOTFOUND":
            raise JobGone(job_id)
        if r == "PUBLISHING":
            raise Publishing(job_id)
        if r != "OK":
            raise AlreadyEnded(Status(r))

    async def finish_staging(self, job_id: str, code_hash: str, success: bool, iso_now: str,
                             fields: Mapping[str, object], folder: Folder | None = None) -> None:
        """A stager reported: the job is queued (taking ``folder`` unless a live job owns it) or,
        without ``success``, ends in ERROR. :class:`JobGone`, :class:`NotStaging` or
        :class:`BadCode` when refused (the code is then not used up)."""
        r = str(await self._eval_replicated(lua.STAGED, [self._folder_key(folder) if folder else ""],
                                            [job_id, code_hash, "1" if success else "0", iso_now,
                                             *_flat(fields)]))
        if r != "OK":
            raise {"NOTFOUND": JobGone, "NOTSTAGING": NotStaging, "BADCODE": BadCode}[r](job_id)

    # -- housekeeping -------------------------------------------------------------

    async def sweep_deadlines(self, iso_now: str) -> list[str]:
        """End the jobs whose ``timeout_seconds`` ran out (ERROR ``timeout``); their ids."""
        return [str(x) for x in await self.eval(lua.SWEEP_DEADLINES, [], [iso_now]) or []]

    async def sweep_staging(self, iso_now: str) -> list[str]:
        """End the jobs whose stager did not report in time (ERROR ``staging_timeout``); their ids."""
        return [str(x) for x in await self.eval(lua.SWEEP_STAGING, [], [iso_now]) or []]

    async def trim(self, max_due: int = 1000, walk: int = 200) -> Trimmed:
        """Drop index entries of forgotten jobs (see :data:`lua.TRIM`)."""
        r = await self.eval(lua.TRIM, [], [str(max_due), str(walk), str(self.retain_ms)])
        return Trimmed(int(r[0]), int(r[1]))

    # -- the watcher's marks -------------------------------------------------------

    async def mark_watched(self, mark: str, holder: str, ttl_s: int = 300) -> bool:
        """Take a folder for the watcher; True only for the first process to ask.

        The mark expires after ``ttl_s`` unless :meth:`watched_done` makes it
        permanent, so a process that dies between taking a folder and queueing
        its job does not lose the folder for good.
        """
        r = await self.call(self.redis.set(self.key("watched", mark), f"taking:{holder}",
                                           expire=ttl_s, only_if_not_exists=True))
        return r not in (None, False)

    async def watch_mark(self, mark: str) -> WatchMark | None:
        """The folder's watcher mark, if any."""
        v = await self.call(self.redis.get(self.key("watched", mark)))
        if v is None:
            return None
        return WatchMark.TAKING if str(v).startswith("taking:") else WatchMark.DONE

    async def watched_done(self, mark: str, job_id: str) -> None:
        """The folder's job exists: the mark names it for ``mark_ms``, however soon the job is forgotten."""
        await self.eval(lua.WATCHED_DONE, [self.key("watched", mark)], [job_id, str(self.mark_ms)])

    async def keep_watched(self, mark: str) -> None:
        """The done folder is still in the DTS area: its mark lives ``mark_ms`` from now."""
        await self.eval(lua.WATCHED_KEEP, [self.key("watched", mark)], [str(self.mark_ms)])

    async def watched_gone(self, mark: str) -> None:
        """The done folder has left the DTS area: its mark is forgotten after the retention."""
        await self.eval(lua.WATCHED_GONE, [self.key("watched", mark)], [str(self.retain_ms)])

    async def unmark_watched(self, mark: str) -> None:
        """Give a folder back to the watchers (its job could not be created)."""
        await self.call(self.redis.delete(self.key("watched", mark)))

    async def close(self) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.disconnect()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass
