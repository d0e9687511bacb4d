"""``twistd dtsbridge``: the options and the service tree.

``makeService`` wires the parts together as a ``MultiService``:

1. the thread pool that runs the copy engine and every other blocking call;
2. the embedded ``redis-server`` (``[redis] url = embedded``);
3. the web server (Klein resource on the ``[server] listen`` endpoint);
4. the worker (job claiming, copies, leases, recovery, staging timeouts), which the
   request side (:class:`~dtsbridge.jobs.Jobs`, behind the web server) wakes;
5. the watcher of the DTS area (``[watch] enabled``).

Services stop in reverse order, one after the other (:class:`SequentialMultiService`),
so on SIGTERM the watcher and the worker stop first (new jobs get 503 while
running copies finish within ``[drain] grace_seconds``; the web server still
listens meanwhile), then the web server, Redis and the pool.

``[server] log_format = json`` replaces twistd's text log with one JSON object
per line on standard output (:func:`json_log_observer`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ParamSpec, TextIO, TypeVar, cast

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python import threadpool, usage
from twisted.python.failure import Failure

from dtsbridge import __version__, auth, config as configmod, engine
from dtsbridge.events import EventHub
from dtsbridge.http import QuietSite
from dtsbridge.interfaces import Authenticator, ThreadRunner
from dtsbridge.jobs import Jobs, Waiters
from dtsbridge.metrics import Metrics
from dtsbridge.store import Store, StoreUnavailable, connect
from dtsbridge.users import Users
from dtsbridge.redis_server import EmbeddedRedis
from dtsbridge.worker import SpareExecutor, Worker

if TYPE_CHECKING:
    from dtsbridge.interfaces import Reactor

_P = ParamSpec("_P")
_T = TypeVar("_T")

log = Logger(namespace="dtsbridge")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Complete KBase DTS transfers: copy, verify, own and publish folders into users' datastores."
    optParameters = [
        ["config", "c", None, "The INI configuration file (see etc/dtsbridge.ini)."],
        ["listen", "l", None, "A Twisted server endpoint string; overrides [server] listen."],
        ["redis", "r", None, "embedded, redis://…, unix://… or redis+sentinel://…; overrides [redis] url."],
    ]

    def postOptions(self) -> None:
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("nodaemon") and parent.get("pidfile") == "twistd.pid":
            # In the foreground a supervisor tracks the process: write no ./twistd.pid unless
            # asked, so several dtsbridge processes can run from one folder.
            parent["pidfile"] = ""
        overrides = {"server": {"listen": self["listen"]}, "redis": {"url": self["redis"]}}
        try:
            self.config = configmod.load(self["config"], overrides)
            _check_listen(self.config.listen)
        except configmod.ConfigError as e:
            # One clear line, then stop: twistd's usage dump would bury it.
            sys.stderr.write(f"dtsbridge: configuration error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2)


def _check_listen(description: str) -> None:
    """Parse the endpoint string now (nothing listens yet), so a typo is one configuration line."""
    from twisted.internet import endpoints
    from twisted.internet import reactor
    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:  # noqa: BLE001 - Twisted's parser raises ValueError, KeyError, TypeError, ...
        raise configmod.ConfigError(f"[server] listen: {description!r} is not a Twisted server endpoint "
                                    f"string ({e.__class__.__name__}: {e})") from None


class SequentialMultiService(service.MultiService):
    """A MultiService that stops its children one at a time, last first.

    Twisted's MultiService stops every child at once; dtsbridge needs order:
    the worker drains while the web server still answers (503 for new jobs)
    and Redis still records results, and the thread pool stops last.
    """

    log_observer: ILogObserver | None = None  # [server] log_format = json: see json_log_observer

    def setServiceParent(self, parent: service.IServiceCollection) -> None:
        service.MultiService.setServiceParent(self, parent)
        # twistd's AppLogger logs to the application's ILogObserver component when it has one.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:  # noqa: BLE001 - keep stopping the rest
                log.failure("stopping {service} failed", service=child)


_JSON_SCALARS = (str, int, float, bool, type(None))


def json_log_observer(out: TextIO | None = None) -> ILogObserver:
    """An observer writing each event as one JSON line: time, level, namespace, text and its simple fields."""
    stream = out if out is not None else sys.stdout  # captured now: twistd redirects sys.stdout into the log later

    def observe(event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(event.get("log_time") or 0, datetime.timezone.utc)
                    .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "text": formatEvent(event),
        }
        for k, v in event.items():
            if k.startswith("log_") or k in record or k in ("message", "format", "isError", "time", "system"):
                continue
            if isinstance(v, _JSON_SCALARS):
                record[k] = v
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["failure"] = failure.getTraceback()
            except Exception:  # noqa: BLE001
                record["failure"] = repr(failure)
        try:
            stream.write(json.dumps(record, default=str) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a log line must never break the service
            pass

    import zope.interface
    zope.interface.directlyProvides(observe, ILogObserver)
    return cast(ILogObserver, observe)


class ServiceExecutor(SpareExecutor, engine.CopyExecutor):
    """The service's file threads (widened while ended copies may hold stuck ones: SpareExecutor)
    and its copy worker processes (engine.CopyExecutor)."""


class ThreadPoolService(service.Service):
    """Starts and stops the thread pool that runs all blocking work."""

    def __init__(self, pool: threadpool.ThreadPool, executor: engine.CopyExecutor, reactor: IReactorThreads) -> None:
        self.pool = pool
        self.executor = executor
        self.reactor = reactor

    def startService(self) -> None:
        service.Service.startService(self)
        self.pool.start()

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        # Queued file batches dropped; file threads never joined (one may be stuck in a hung read).
        self.executor.shutdown(wait=False, cancel_futures=True)

        def stop() -> None:
            # The copy worker processes, if any were started: joined, so their queues
            # are released before exit (else multiprocessing warns of leaked semaphores).
            self.executor.processes.shutdown(wait=True)
            self.pool.stop()

        # ThreadPool.stop() joins its threads: do it off the reactor thread (a thread of its own).
        if not getattr(self.reactor, "running", False):
            stop()
            return None
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), stop)


class EngineLogService(service.Service):
    """The copy engine's log records (Python ``logging``, from its threads) into the Twisted log,
    each with the ``job_id`` of the job whose work logged it."""

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self.handler = _EngineLogHandler(reactor)
        self.logger = logging.getLogger("dtsbridge.engine")

    def startService(self) -> None:
        service.Service.startService(self)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False

    def stopService(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate = True
        service.Service.stopService(self)


class _EngineLogHandler(logging.Handler):
    _LEVELS = ((logging.ERROR, LogLevel.error), (logging.WARNING, LogLevel.warn), (logging.INFO, LogLevel.info))

    def __init__(self, reactor: IReactorFromThreads) -> None:
        super().__init__(logging.INFO)
        self.reactor = reactor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = next((lv for n, lv in self._LEVELS if record.levelno >= n), LogLevel.debug)
            job_id = engine.current_job_id()
            fields: dict[str, Any] = {"text": record.getMessage()}
            if job_id is not None:
                fields["job_id"] = job_id
            fmt = "{text}" if job_id is None else "job {job_id}: {text}"
            # Observers run on the reactor thread; the record may come from any thread.
            self.reactor.callFromThread(Logger(namespace=record.name).emit, level, fmt, **fields)
        except Exception:  # noqa: BLE001 - a log line must never break a copy
            self.handleError(record)


class AttachWhenReady(service.Service):
    """Connects the store to the embedded Redis once it answers; stops dtsbridge if it never does."""

    def __init__(self, embedded: EmbeddedRedis, store: Store, make_pool: Callable[[], Any], reactor: Reactor) -> None:
        self.embedded = embedded
        self.store = store
        self.make_pool = make_pool
        self.reactor = reactor

    def startService(self) -> None:
        service.Service.startService(self)
        assert self.embedded.ready is not None  # started before this service
        self.embedded.ready.addCallbacks(self._ready, self._failed)

    def _ready(self, _: object) -> None:
        self.store.attach(self.make_pool())

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return  # stopped before it was ready
        log.critical("dtsbridge: the embedded Redis did not start: {error}; stopping", error=failure.value)
        sys.stderr.write(f"dtsbridge: the embedded Redis did not start: {failure.value}\n")
        if self.reactor.running:
            # exit non-zero once the services have stopped, so a supervisor sees the failure
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()


class StoreService(service.Service):
    """Closes the store's connections on stop (after the worker, started after it, has drained)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return ensureDeferred(self.store.close())


class HaltWhenIdle(service.Service):
    """SIGUSR2 toggles "halt when idle": the worker takes no more jobs and the process stops once it runs none."""

    def __init__(self, worker: Worker, reactor: Reactor) -> None:
        self.worker = worker
        self.reactor = reactor

    def startService(self) -> None:
        service.Service.startService(self)

        def toggle(signum: int, frame: object) -> None:
            IReactorFromThreads(self.reactor).callFromThread(self.flip)

        try:
            signal.signal(signal.SIGUSR2, toggle)
        except ValueError:  # not the main thread (tests)
            pass

    def flip(self) -> None:
        w = self.worker
        w.halt_when_idle = not w.halt_when_idle
        log.info("SIGUSR2: halt when idle is now {state}", state="on" if w.halt_when_idle else "off")
        if not w.halt_when_idle:
            w.claim_soon()
        else:
            ensureDeferred(self._halt_when_idle())

    async def _halt_when_idle(self) -> None:
        from twisted.internet.task import deferLater
        w = self.worker
        while w.halt_when_idle and w.active:
            await deferLater(self.reactor, 0.2, lambda: None)
        if w.halt_when_idle:
            log.info("SIGUSR2: current jobs finished; halting")
            self.reactor.stop()


class EventHubService(service.Service):
    """Runs the process's one event reader; on stop, ends every open event stream."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    def startService(self) -> None:
        service.Service.startService(self)
        self.hub.start()

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return ensureDeferred(self.hub.stop())


def make_health(cfg: configmod.Config, store: Store, worker: Worker, run_in_thread: ThreadRunner,
                reactor: IReactorTime) -> Callable[[], Awaitable[list[str]]]:
    async def health() -> list[str]:
        problems: list[str] = []
        if worker.draining:
            problems.append("draining: the process is shutting down")
        elif not worker.recovered:
            problems.append("starting: the jobs of dead processes on this host are not yet back in the queue")
        stuck = worker.stuck()
        if stuck:
            now = time.monotonic()
            problems.append(f"{len(stuck)} copy thread(s) stuck in ended jobs (a hung read?): "
                            + ", ".join(f"{r.job_id} for {now - r.ended_at:.0f} s" for r in stuck))
            if len(worker.active) >= worker.max_threads():
                problems.append("no copy can start: the copy threads are all taken by stuck ones")
        try:
            await store.writable()  # a PING answers even while every write is refused
        except StoreUnavailable as e:
            problems.append(f"redis: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"redis: {e}")

        def roots() -> list[str]:
            out: list[str] = []
            for name, path in (("dts_root", cfg.dts_root), ("user_root", cfg.user_root)):
                if not os.path.isdir(path):
                    out.append(f"{name} {path} is not a reachable folder")
                elif not os.access(path, os.R_OK | os.X_OK):
                    out.append(f"{name} {path} is not readable")
            return out

        found = run_in_thread(roots)
        found.addTimeout(2, reactor)
        try:
            problems += await found
        except defer.TimeoutError:
            problems.append("the roots did not answer within 2 s")
        return problems

    return health


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    cfg: configmod.Config = options.config
    top = SequentialMultiService()
    if cfg.log_format == "json":
        top.log_observer = json_log_observer()

    # 2 * max_jobs + 4: the copies of jobs that ended while their thread is stuck (a hung read)
    # may hold up to max_jobs threads without keeping the next jobs from running (Worker.max_threads)
    pool = threadpool.ThreadPool(minthreads=2, maxthreads=2 * cfg.max_jobs + 4, name="dtsbridge-copy")
    # Threads for files (widened for stuck copies), and the copy worker processes (started on first use).
    executor = ServiceExecutor(max_workers=cfg.threads, thread_name_prefix="dtsbridge-file")
    threaded = IReactorThreads(reactor)
    EngineLogService(threaded).setServiceParent(top)  # before the threads: stops after them
    ThreadPoolService(pool, executor, threaded).setServiceParent(top)

    def run_in_thread(f: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_T]:
        return deferToThreadPool(threaded, pool, f, *args, **kwargs)

    redis_url = cfg.redis_url
    embedded: EmbeddedRedis | None = None
    if redis_url == "embedded":
        try:
            os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
            if not os.access(cfg.state_dir, os.W_OK | os.X_OK):
                raise OSError(f"{cfg.state_dir} is not writable")
        except OSError as e:
            sys.stderr.write(f"dtsbridge: configuration error: [state] dir: cannot use {cfg.state_dir}: {e}\n")
            raise SystemExit(2)
        try:
            embedded = EmbeddedRedis(cfg.state_dir, reactor=reactor)
        except RuntimeError as e:
            sys.stderr.write(f"dtsbridge: configuration error: [redis] url: {e}\n")
            raise SystemExit(2)
        embedded.setServiceParent(top)
        redis_url = embedded.url

    try:
        auth2 = auth.Auth2(cfg.kbase_url, reactor, timeout=cfg.auth_timeout) if cfg.kbase_url else None
        authenticator = _make_auth(cfg, reactor, run_in_thread, auth2)
        users = auth.make_user_checker(cfg.users_check, user_root=cfg.user_root, auth2=auth2,
                                       service_token=cfg.service_token, run_in_thread=run_in_thread)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"dtsbridge: configuration error: {e}\n")
        raise SystemExit(2)

    metrics = Metrics()
    poolsize = max(10, cfg.max_jobs * 2 + 4)
    # An embedded Redis is connected to once it answers (no storm of refused connects at start).
    store = Store(None if embedded else connect(redis_url, poolsize=poolsize),
                  prefix=cfg.key_prefix, timeout=cfg.redis_timeout, reactor=reactor,
                  retention_s=cfg.retention_seconds)
    policy = Users(cfg, users, run_in_thread)
    waiters = Waiters()
    # Test-only pauses at named points of a copy, read from the environment here, once.
    faults = engine.Faults.parse(os.environ.get("DTSBRIDGE_FAULT_PAUSE"))
    worker = Worker(cfg, store, policy, run_in_thread, reactor, metrics, on_ended=waiters.notify,
                    executor=executor, faults=faults)
    jobs = Jobs(cfg, store, policy, run_in_thread, worker, waiters, reactor, metrics)
    if isinstance(authenticator, auth.KBaseAuth):
        metrics.add_counter("dtsbridge_auth_cache_hits", "Token checks answered from the cache",
                            lambda: authenticator.cache_hits)
        metrics.add_counter("dtsbridge_auth_cache_misses", "Token checks that asked KBase auth2",
                            lambda: authenticator.cache_misses)

    from dtsbridge.openapi import spec
    from dtsbridge.web import Api
    # The event reader's own connection: its blocking XREAD must not hold one of the pool's.
    hub = EventHub(store, lambda: connect(redis_url, poolsize=1), reactor=reactor)
    metrics.add_gauge("dtsbridge_event_streams", "Open GET /events streams in this process",
                      lambda: len(hub.subscribers))
    api = Api(jobs, authenticator, metrics, health=make_health(cfg, store, worker, run_in_thread, reactor),
              openapi=spec(__version__, cfg.staging_max_timeout), events=hub)
    site = QuietSite(api.resource(), read_timeout=cfg.read_timeout)
    site.on_refuse = lambda route, code: metrics.requests.labels(route, str(code)).inc()
    site.displayTracebacks = False
    strports.service(cfg.listen, site).setServiceParent(top)

    if embedded is not None:
        AttachWhenReady(embedded, store, lambda: connect(redis_url, poolsize=poolsize),
                        reactor).setServiceParent(top)
    StoreService(store).setServiceParent(top)
    worker.setServiceParent(top)  # stops (drains) before the store closes
    HaltWhenIdle(worker, reactor).setServiceParent(top)
    EventHubService(hub).setServiceParent(top)
    if cfg.webhook_urls:
        from dtsbridge.notify import Notifier
        Notifier(cfg, store, worker.holder, metrics=metrics, reactor=reactor).setServiceParent(top)

    if cfg.watch_enabled:
        from dtsbridge.watch import WatchService
        WatchService(jobs, run_in_thread).setServiceParent(top)

    for key in cfg.unknown_keys:
        log.warn("config: {key} is not a dtsbridge setting; ignored", key=key)
    log.info("dtsbridge {version}: dts_root={dts}, user_root={users}, redis={redis}, listening on {listen}",
             version=__version__, dts=cfg.dts_root, users=cfg.user_root,
             redis=cfg.redis_url if cfg.redis_url != "embedded" else f"embedded ({redis_url})", listen=cfg.listen)
    return top


def _make_auth(cfg: configmod.Config, reactor: Reactor, run_in_thread: ThreadRunner,
               auth2: auth.Auth2 | None) -> Authenticator:
    if cfg.auth_backend == "tokens":
        if not os.path.isfile(cfg.tokens_file):
            raise ValueError(f"[auth] tokens_file: {cfg.tokens_file} does not exist "
                             f"(make one with: dtsbridge token new NAME >> {cfg.tokens_file})")
        return auth.TokenFileAuth(cfg.tokens_file, run_in_thread=run_in_thread, reactor=reactor)
    if auth2 is None:
        raise ValueError("[auth] backend = kbase needs [auth] kbase_url")
    return auth.KBaseAuth(auth2, cache_seconds=cfg.auth_cache_seconds)
