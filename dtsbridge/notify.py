"""Webhooks: job events POSTed, signed, to ``[notify] webhook_urls``, retried until ``retry_hours``.

How a delivery travels (all state in Redis, so it survives restarts and is
shared by every process on the same Redis):

1. The event stream's consumer group ``webhooks`` hands each new event to one
   process (``XREADGROUP``); an event that process never acknowledged (it died)
   is taken over by another after a minute (``XAUTOCLAIM``).
2. For an event that matches ``[notify] events`` (``end``: the job ended;
   ``all``: every change), one delivery per URL is queued and the event is
   acknowledged in one Lua script (:meth:`HookQueue.add <dtsbridge.hooks.HookQueue.add>`).
3. Due deliveries are leased to one process at a time (``P:hooks`` scores are
   the next attempt; taking one moves its score past the lease) and POSTed
   with treq: JSON ``{"event_id", "job"}`` and ``X-Dtsbridge-Signature:
   sha256=<hex HMAC-SHA256 of the body>``. A 2xx ends it; anything else, a
   refused connection or no answer in 10 s is retried, first after at most
   ``retry_first_seconds`` (10), then at doubling intervals (with jitter) of at
   most 10 minutes, for ``retry_hours`` after the first attempt.

A receiver gets each event at least once; ``event_id`` lets it drop repeats.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import time

import txredisapi
from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse

from dtsbridge.config import Config
from dtsbridge.metrics import Metrics
from dtsbridge.model import FINAL, Job
from dtsbridge.store import Store, StoreUnavailable

GROUP = "webhooks"
SEND_TIMEOUT = 10.0  # no answer in this long: a failed attempt
LEASE_MS = 60_000  # a taken delivery is not taken again for this long (> SEND_TIMEOUT)
MAX_INTERVAL = 600.0  # at most 10 minutes between attempts
STALE_MS = 60_000  # an event read but not acknowledged for this long goes to another process
IN_FLIGHT = 32  # deliveries sent at once by one process
MAX_ANSWER = 64 * 1024  # at most this much of a receiver's answer body is read; then the connection is dropped


def signature(secret: str, body: bytes) -> str:
    """The ``X-Dtsbridge-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay(attempts: int, first: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after ``attempts`` failed ones: doubling, with jitter, at most 10 min."""
    base = min(MAX_INTERVAL, first * (1 << max(0, attempts - 1)))
    draw = rng.random() if rng is not None else random.random()
    return base * (0.5 + 0.5 * draw)


class Notifier(service.Service):
    """Turns events into deliveries and sends the due ones, every half second."""

    log = Logger()

    def __init__(self, config: Config, store: Store, holder: str, *, reactor: IReactorTime,
                 metrics: Metrics | None = None, client: HTTPClient | None = None, interval: float = 0.5) -> None:
        self.config = config
        self.store = store
        self.holder = holder
        self.reactor = reactor
        self.interval = interval
        self.token = f"{holder}:{secrets.token_hex(6)}"
        # The first process ever to send webhooks starts the group at its own start (a minute
        # early, for clock skew), not at "now": events of jobs made before its first tick count.
        self.start_id = f"{max(0, int(time.time() * 1000) - 60_000)}-0"
        self._client = client
        self._pool: HTTPConnectionPool | None = None
        self._loop: task.LoopingCall | None = None
        self._group_ready = False
        self._last_stale_check = 0.0
        self._busy = False
        self.in_flight: dict[str, Deferred[None]] = {}
        self.delivered = 0
        self.failed_attempts = 0
        self.dropped = 0
        self.pending = 0
        if metrics is not None:
            metrics.add_counter("dtsbridge_webhooks_delivered", "Webhook deliveries answered 2xx", lambda: self.delivered)
            metrics.add_counter("dtsbridge_webhooks_failed_attempts", "Webhook attempts that failed (retried)",
                                lambda: self.failed_attempts)
            metrics.add_counter("dtsbridge_webhooks_dropped", "Webhook deliveries given up after retry_hours",
                                lambda: self.dropped)
            metrics.add_gauge("dtsbridge_webhooks_pending", "Webhook deliveries waiting (all processes; as of the last tick)",
                              lambda: self.pending)

    # -- life ------------------------------------------------------------

    @property
    def client(self) -> HTTPClient:
        if self._client is None:
            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._pool.maxPersistentPerHost = 4
            self._client = HTTPClient(Agent(self.reactor, connectTimeout=SEND_TIMEOUT, pool=self._pool))
        return self._client

    def startService(self) -> None:
        service.Service.startService(self)
        if not self.config.webhook_secret:
            self.log.warn("[notify] webhook_secret is empty: webhooks are sent unsigned")
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # deliveries in flight go back to the queue, due at once (for this process's restart or another)
        flying = list(self.in_flight.values())
        for d in flying:
            d.cancel()
        if flying:
            waiting = defer.DeferredList(flying, consumeErrors=True)
            waiting.addTimeout(5, self.reactor)
            try:
                await waiting
            except defer.TimeoutError:
                pass
        if self._pool is not None:
            try:
                await self._pool.closeCachedConnections()
            except Exception:  # noqa: BLE001
                pass

    def _tick(self) -> Deferred[None]:
        # never stops for good: every error is logged and the next tick runs
        return ensureDeferred(self._safe_tick())

    async def _safe_tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            await self.tick()
        except StoreUnavailable as e:
            self.log.debug("webhooks: Redis unavailable ({e}); trying again", e=e)
        except Exception:  # noqa: BLE001
            self.log.failure("webhooks: a round failed; trying again")
        finally:
            self._busy = False

    # -- work --------------------------------------------------------------

    def wanted(self, job: Job) -> bool:
        return self.config.webhook_events == "all" or job.status in FINAL

    async def tick(self) -> None:
        if not self._group_ready:
            await self.store.hooks.group(GROUP, self.start_id)
            self._group_ready = True
        await self.intake()
        await self.send_due()
        self.pending = await self.store.hooks.pending()

    async def intake(self) -> None:
        now = time.monotonic()
        batches: list[list[tuple[str, Job | None]]] = []
        if now - self._last_stale_check > 10:
            self._last_stale_check = now
            batches.append(await self._read(stale_ms=STALE_MS))
        batches.append(await self._read())
        for batch in batches:
            for event_id, job in batch:
                urls: list[str] = []
                body = ""
                if job is not None and self.wanted(job):
                    urls = list(self.config.webhook_urls)
                    body = json.dumps({"event_id": event_id, "job": job.public()}, separators=(",", ":"))
                await self.store.hooks.add(GROUP, event_id, body, urls)

    async def _read(self, stale_ms: int | None = None) -> list[tuple[str, Job | None]]:
        try:
            return await self.store.hooks.read(GROUP, self.holder, count=200, stale_ms=stale_ms)
        except txredisapi.ResponseError as e:
            if "NOGROUP" in str(e):  # the stream was removed: make the group again
                self._group_ready = False
                return []
            raise

    async def send_due(self) -> None:
        room = IN_FLIGHT - len(self.in_flight)
        if room <= 0:
            return
        for member, url, body, attempts, first_ms in await self.store.hooks.take(self.token, LEASE_MS, room):
            if member in self.in_flight:
                continue
            d = ensureDeferred(self._deliver(member, url, body.encode(), attempts, first_ms))
            self.in_flight[member] = d
            d.addBoth(self._landed, member)

    def _landed(self, result: Failure | None, member: str) -> None:
        """A delivery ended (it records its own outcome): it is no longer in flight."""
        self.in_flight.pop(member, None)
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            self.log.failure("webhook: delivery {member} failed", result, member=member)

    async def _deliver(self, member: str, url: str, body: bytes, attempts: int, first_ms: int) -> None:
        event_id = member.split(" ", 1)[0]
        headers: dict[bytes | str, list[bytes | str]] = {"Content-Type": ["application/json"], "User-Agent": ["dtsbridge-webhook"],
                   "X-Dtsbridge-Event-Id": [event_id]}
        if self.config.webhook_secret:
            headers["X-Dtsbridge-Signature"] = [signature(self.config.webhook_secret, body)]
        error = ""
        try:
            # unbuffered: treq would otherwise collect the whole answer body in memory
            resp = await self.client.post(url, data=body, headers=headers, timeout=SEND_TIMEOUT,
                                          unbuffered=True)
            await self._discard_body(resp)
            if 200 <= resp.code < 300:
                await self.store.hooks.done(member, self.token)
                self.delivered += 1
                self.log.info("webhook: event {event_id} delivered to {url}", event_id=event_id, url=url)
                return
            error = f"HTTP {resp.code}"
        except defer.CancelledError:
            if not self.running:  # stopping: hand it back, due at once
                await self._retry(member, 0, "interrupted by shutdown")
                return
            error = f"no answer in {SEND_TIMEOUT:g} s"
        except Exception as e:  # noqa: BLE001 - refused, reset, DNS, TLS, timeout…
            error = _describe(e)
        self.failed_attempts += 1
        attempts += 1
        elapsed = time.time() * 1000 - first_ms
        remaining = self.config.webhook_retry_hours * 3600_000 - elapsed
        if remaining <= 0:
            self.dropped += 1
            self.log.warn("webhook: event {event_id} to {url} given up after {attempts} attempts ({error})",
                          event_id=event_id, url=url, attempts=attempts, error=error)
            await self._retry(member, -1, error)
            return
        delay = min(retry_delay(attempts, self.config.webhook_retry_first), remaining / 1000)
        self.log.info("webhook: event {event_id} to {url} failed ({error}); attempt {n} in {delay:.1f} s",
                      event_id=event_id, url=url, error=error, n=attempts + 1, delay=delay)
        await self._retry(member, int(delay * 1000), error)

    async def _discard_body(self, resp: IResponse) -> None:
        """Read and drop the answer's body: at most :data:`MAX_ANSWER` bytes for at most
        :data:`SEND_TIMEOUT` seconds, then the connection is dropped. Only the status counts."""
        done: Deferred[None] = Deferred()
        sink = _Discard(done, MAX_ANSWER)
        resp.deliverBody(sink)

        def too_slow(result: None | Failure, timeout: float) -> None:
            sink.drop()

        done.addTimeout(SEND_TIMEOUT, self.reactor, onTimeoutCancel=too_slow)
        try:
            await done
        except Exception:  # noqa: BLE001 - the status is what counts (cancelled: stopping)
            sink.drop()

    async def _retry(self, member: str, delay_ms: int, error: str) -> None:
        try:
            await self.store.hooks.retry(member, self.token, delay_ms, error)
        except StoreUnavailable:
            pass  # its lease lapses and it is taken again


class _Discard(Protocol):
    """Counts and drops a webhook answer's body; past ``limit`` bytes it drops the connection."""

    def __init__(self, done: Deferred[None], limit: int) -> None:
        self.done = done
        self.limit = limit
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            self.drop()

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()  # not reused by the pool: its body was not read to the end
        if not self.done.called:
            self.done.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        inner = reasons[0]
        value = getattr(inner, "value", inner)
        if isinstance(value, defer.CancelledError):
            return f"no answer in {SEND_TIMEOUT:g} s"
        return f"{type(value).__name__}: {value}"
    if isinstance(e, defer.TimeoutError):
        return f"no answer in {SEND_TIMEOUT:g} s"
    return f"{type(e).__name__}: {e}"
