"""Job events for ``GET /events``: one Redis reader per process, fanned out to every open stream.

The store's scripts append every job change to the Redis Stream ``P:events``
in the same script that makes the change (see :mod:`dtsbridge.store`). Here,
one :class:`EventHub` per process reads that stream with a blocking ``XREAD``
on a connection of its own (a blocking read on the shared pool would stall
every other command) and hands each new event to the :class:`Subscriber` s
that may see it. A stream that resumes from ``Last-Event-ID`` first replays
the stored events with ``XRANGE`` (the shared pool; non-blocking reads) while
the live ones wait in its buffer, so nothing is lost or sent twice.
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable

import txredisapi
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from dtsbridge.model import Job
from dtsbridge.store import Store, StoreUnavailable, parse_events

REPLAY_PAGE = 200  # events read and written at a time when a stream resumes
EVENT_ID = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")


class SlowClient(Exception):
    """An event stream's client stopped reading and was disconnected."""


def id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (``1700000000000-3`` → ``(1700000000000, 3)``)."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def frame(event_id: str, job: Job) -> bytes:
    """One Server-Sent Event: the stream id, ``event: job`` and the job's public record."""
    return f"id: {event_id}\nevent: job\ndata: {json.dumps(job.public(), separators=(',', ':'))}\n\n".encode()


class Subscriber:
    """One open ``/events`` stream: what it may see, and where it is in the stream."""

    def __init__(self, write: Callable[[bytes], None], visible_user: str | None = None,
                 user: str | None = None, job_id: str | None = None,
                 drained: Callable[[], Awaitable[None]] | None = None) -> None:
        self.write = write
        self.drained = drained  # waits until the client took what was written (replay pacing)
        self.visible_user = visible_user  # None: a transfer_role caller sees every job
        self.user = user
        self.job_id = job_id
        self.last: tuple[int, int] = (0, 0)  # the newest event id sent
        self.buffer: list[tuple[str, Job]] | None = []  # live events held back during a replay
        self.done: Deferred = Deferred()  # fires when the hub stops
        self.closed = False

    def wants(self, job: Job) -> bool:
        if self.visible_user is not None and job.target_user != self.visible_user:
            return False
        if self.user is not None and job.target_user != self.user:
            return False
        return self.job_id is None or job.job_id == self.job_id

    def send(self, event_id: str, job: Job, data: bytes | None = None) -> None:
        """Write one event unless already sent (a replayed event that the hub also delivered)."""
        if self.closed:
            return
        if self.buffer is not None:
            self.buffer.append((event_id, job))
            return
        key = id_key(event_id)
        if key <= self.last:
            return
        self.last = key
        if self.wants(job):
            self.write(data if data is not None else frame(event_id, job))

    def go_live(self) -> None:
        """The replay is done: send what arrived meanwhile, then every event as it comes."""
        held, self.buffer = self.buffer or [], None
        for event_id, job in held:
            self.send(event_id, job)


class EventHub:
    """Reads the event stream once per process and fans each event out to the open streams."""

    log = Logger()

    def __init__(self, store: Store, make_connection: Callable[[], Any], reactor=None,
                 keepalive: float = 15.0, block_ms: int = 2000) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811
        self.store = store
        self.make_connection = make_connection
        self.reactor = reactor
        self.keepalive = keepalive
        self.block_ms = block_ms
        self.subscribers: set[Subscriber] = set()
        self.position: str | None = None  # the newest event id read
        self.events_read = 0
        self._conn = None
        self._running = False
        self._loop: Deferred | None = None
        self._ping: task.LoopingCall | None = None
        self._wake: Deferred | None = None
        self._ready: list[Deferred] = []  # streams waiting for the reader's first position

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._loop = ensureDeferred(self._read_forever())
        self._ping = task.LoopingCall(self._keepalive)
        self._ping.clock = self.reactor
        self._ping.start(self.keepalive, now=False)

    async def stop(self) -> None:
        self._running = False
        if self._ping is not None and self._ping.running:
            self._ping.stop()
        for sub in list(self.subscribers):
            self.unsubscribe(sub)
            if not sub.done.called:
                sub.done.callback(None)
        await self._drop_connection()
        if self._wake is not None and not self._wake.called:
            self._wake.cancel()
        if self._loop is not None:
            try:
                await self._loop
            except Exception:  # noqa: BLE001 - stopping
                pass

    def subscribe(self, sub: Subscriber) -> Subscriber:
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        self.subscribers.discard(sub)

    # -- the reader ------------------------------------------------------------

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    async def _pause(self, seconds: float) -> None:
        self._wake = task.deferLater(self.reactor, seconds, lambda: None)
        try:
            await self._wake
        except defer.CancelledError:
            pass

    async def _read_forever(self) -> None:
        while self._running:
            try:
                await self._read_once()
            except Exception as e:  # noqa: BLE001 - never stop for good: reconnect and go on
                if not self._running:
                    return
                if not isinstance(e, (StoreUnavailable, defer.TimeoutError, defer.CancelledError,
                                      txredisapi.ConnectionError, ConnectionError)):
                    self.log.failure("reading job events failed; retrying")
                await self._drop_connection()
                await self._pause(1.0)

    async def _read_once(self) -> None:
        if self.position is None:
            try:
                self.position = await self.store.last_event_id()
            except StoreUnavailable:
                await self._pause(0.5)
                return
            waiting, self._ready = self._ready, []
            for d in waiting:
                if not d.called:
                    d.callback(None)
        if self._conn is None:
            try:
                self.store.redis  # noqa: B018 - an embedded Redis that is still starting raises
            except StoreUnavailable:
                await self._pause(0.5)
                return
            self._conn = self.make_connection()
        d = self._conn.execute_command("XREAD", "COUNT", "500", "BLOCK", str(self.block_ms),
                                       "STREAMS", self.store.events_key, self.position)
        # A reply that never comes (Redis gone) must not hang the reader: after the deadline the
        # connection is dropped (its reply queue would be out of step) and a new one made.
        d.addTimeout(self.block_ms / 1000 + self.store.timeout, self.reactor)
        r = await d
        if not r:
            return
        entries = r[0][1] if isinstance(r, list) else next(iter(r.values()))
        if not entries:
            return
        self.position = entries[-1][0]
        self.dispatch(parse_events(entries))

    def dispatch(self, events: list[tuple[str, Job]]) -> None:
        for event_id, job in events:
            self.events_read += 1
            data = frame(event_id, job)
            for sub in list(self.subscribers):
                try:
                    sub.send(event_id, job, data)
                except SlowClient:
                    self.unsubscribe(sub)
                except Exception:  # noqa: BLE001 - one broken stream never stops the others
                    self.log.failure("writing an event to a stream failed")
                    self.unsubscribe(sub)

    def _keepalive(self) -> None:
        for sub in list(self.subscribers):
            try:
                sub.write(b": keepalive\n\n")
            except Exception:  # noqa: BLE001
                self.unsubscribe(sub)

    # -- one stream ----------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Wait until the reader knows where it reads from (:class:`StoreUnavailable` if it cannot).

        A stream must not subscribe before: the events up to the reader's position come
        from the stream's replay, the later ones from the reader.
        """
        if self.position is not None:
            return
        d = Deferred()
        self._ready.append(d)
        d.addTimeout(self.store.timeout * 2, self.reactor)
        try:
            await d
        except defer.TimeoutError:
            raise StoreUnavailable("the event reader has not reached Redis yet") from None

    async def stream(self, sub: Subscriber, after: str | None) -> None:
        """Replay what came after ``after`` (none: start with the next change), then follow live.

        Returns when the hub stops; a client hanging up cancels it (Klein cancels the
        route's Deferred), which takes the subscriber out of the hub.
        """
        await self.wait_ready()
        self.subscribe(sub)
        try:
            if after is None:
                after = await self.store.last_event_id()
            sub.last = id_key(after)
            cursor = after
            while True:
                page = await self.store.events_after(cursor, count=REPLAY_PAGE)
                for event_id, job in page:
                    key = id_key(event_id)
                    if key > sub.last:
                        sub.last = key
                        if sub.wants(job):
                            sub.write(frame(event_id, job))
                if len(page) < REPLAY_PAGE:
                    break
                cursor = page[-1][0]
                if sub.drained is not None:
                    await sub.drained()
            sub.go_live()
            sub.write(b": live\n\n")
            await sub.done
        finally:
            self.unsubscribe(sub)
