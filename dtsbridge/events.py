"""Job events for ``GET /events``: one Redis reader per process, fanned out to every open stream.

The store's scripts append every job change to the Redis Stream ``P:events``
in the same script that makes the change (see :mod:`dtsbridge.store`). Here,
one :class:`EventHub` per process reads that stream with a blocking ``XREAD``
on a connection of its own (a blocking read on the shared pool would stall
every other command) and hands each new event to the :class:`Subscriber` s
that may see it. A stream that resumes from ``Last-Event-ID`` first replays
the stored events with ``XRANGE`` (the shared pool; non-blocking reads) while
the live ones wait in its buffer, so nothing is lost or sent twice.

Replays are cheap for the reactor (many clients resuming from ``0-0`` at once
must not stall it): pages of :data:`REPLAY_PAGE` events are read once and
shared by every stream at the same place (complete pages are kept in a small
cache); a stream is filtered by the entry's ``target_user``/``job_id`` fields
without parsing the job, and each event's frame is made at most once per page
read, whichever stream needs it first; at most :data:`REPLAY_WORKERS` pages are
worked on at once per process (the others queue, first come first served), and
a replay gives the reactor back every :data:`REPLAY_SLICE` seconds.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import txredisapi
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dtsbridge.model import Job
from dtsbridge.store import Store, StoreUnavailable, parse_events

REPLAY_PAGE = 200  # events read and written at a time when a stream resumes
REPLAY_WORKERS = 4  # replay pages worked on at once per process; other replays wait their turn
REPLAY_SLICE = 0.004  # seconds of reactor time a replay uses before letting the reactor run
REPLAY_CACHE = 32  # complete replay pages kept, shared by streams resuming from the same place
EVENT_ID = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")
_ID_MAX = 2**64 - 1  # each part of a Redis stream id is an unsigned 64-bit number


def is_event_id(text: str) -> bool:
    """Whether ``text`` is an event id a stream can resume after: ``ms`` or ``ms-seq``, each part
    at most 2**64-1 (Redis refuses larger ones), and not the largest id of all (nothing comes after it)."""
    if not EVENT_ID.match(text):
        return False
    ms, _, seq = text.partition("-")
    parts = (int(ms), int(seq or 0))
    return max(parts) <= _ID_MAX and parts != (_ID_MAX, _ID_MAX)


class SlowClient(Exception):
    """An event stream's client stopped reading and was disconnected."""


def id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (``1700000000000-3`` → ``(1700000000000, 3)``)."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def frame(event_id: str, job: Job) -> bytes:
    """One Server-Sent Event: the stream id, ``event: job`` and the job's public record."""
    return f"id: {event_id}\nevent: job\ndata: {json.dumps(job.public(), separators=(',', ':'))}\n\n".encode()


class Entry:
    """One stored event of a replay page: filterable without parsing; its job and frame made once, on demand."""

    __slots__ = ("event_id", "key", "job_id", "target_user", "_fields", "_frame")

    def __init__(self, event_id: str, job_id: str, fields: dict[str, str]) -> None:
        self.event_id = event_id
        self.key = id_key(event_id)
        self.job_id = job_id
        self.target_user = fields.get("target_user", "")
        self._fields: dict[str, str] | None = fields
        self._frame: bytes | None = None

    def frame(self) -> bytes | None:
        """The SSE frame (None: an entry that is not a job, e.g. an unknown status)."""
        if self._fields is not None:
            fields, self._fields = self._fields, None
            try:
                self._frame = frame(self.event_id, Job.from_hash(self.job_id, fields))
            except ValueError:
                self._frame = None
        return self._frame


def entries(raw: Any) -> list[Entry]:
    """Raw ``XRANGE`` entries as :class:`Entry` s (those without a job id or status are skipped)."""
    out: list[Entry] = []
    for entry_id, flat in raw or []:
        h = dict(zip(flat[::2], flat[1::2]))
        job_id = h.pop("job_id", None)
        if job_id and "status" in h:
            out.append(Entry(entry_id, job_id, h))
    return out


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
        self.buffer: list[tuple[str, Job, bytes | None]] | None = []  # live events held back during a replay
        self.done: Deferred[None] = Deferred()  # fires when the hub stops
        self.closed = False

    def wants(self, job: Job | Entry) -> bool:
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
            self.buffer.append((event_id, job, data))
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
        for event_id, job, data in held:
            self.send(event_id, job, data)


class EventHub:
    """Reads the event stream once per process and fans each event out to the open streams."""

    log = Logger()

    def __init__(self, store: Store, make_connection: Callable[[], Any], reactor: IReactorTime,
                 keepalive: float = 15.0, block_ms: int = 2000) -> None:
        self.store = store
        self.make_connection = make_connection
        self.reactor = reactor
        self.keepalive = keepalive
        self.block_ms = block_ms
        self.subscribers: set[Subscriber] = set()
        self.position: str | None = None  # the newest event id read
        self.events_read = 0
        self._conn: Any = None  # the reader's own txredisapi connection
        self._running = False
        self._loop: Deferred[None] | None = None
        self._ping: task.LoopingCall | None = None
        self._wake: Deferred[None] | None = None
        self._ready: list[Deferred[None]] = []  # streams waiting for the reader's first position
        self._replays = defer.DeferredSemaphore(REPLAY_WORKERS)
        self._pages: OrderedDict[str, list[Entry]] = OrderedDict()  # cursor -> a complete page
        self._fetching: dict[str, list[Deferred[list[Entry]]]] = {}  # cursor -> streams waiting for that page
        self.pages_read = 0

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
        d: Deferred[None] = Deferred()
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
                page = await self._page(cursor)
                await self._replays.acquire()
                try:
                    await self._replay_page(sub, page)
                finally:
                    self._replays.release()
                if len(page) < REPLAY_PAGE:
                    break
                cursor = page[-1].event_id
                if sub.drained is not None:
                    await sub.drained()
            sub.go_live()
            sub.write(b": live\n\n")
            await sub.done
        finally:
            self.unsubscribe(sub)

    # -- replay pages ----------------------------------------------------------------

    async def _page(self, cursor: str) -> list[Entry]:
        """The :data:`REPLAY_PAGE` events after ``cursor``: one ``XRANGE`` shared by the streams asking at once.

        Only a complete page is shared with a stream that asked after the read began, or kept:
        a shorter one (the stream's end) may lack events added since, which the hub delivers
        only to streams that subscribed before it read them; such a stream reads its own.
        The read runs on its own, so a client hanging up cancels only its own wait.
        """
        page = self._pages.get(cursor)
        if page is not None:
            self._pages.move_to_end(cursor)
            return page
        if cursor in self._fetching:
            page = await self._wait(cursor)
            if len(page) >= REPLAY_PAGE:
                return page
            return await self._own_page(cursor)
        self._fetching[cursor] = []
        mine = self._wait(cursor)
        ensureDeferred(self._fetch(cursor))
        return await mine

    def _own_page(self, cursor: str) -> Deferred[list[Entry]]:
        """A stream's own read of the page after ``cursor``, run on its own like a shared one: a
        client hanging up cancels only the wait (a cancelled Redis call would be an error)."""
        mine: Deferred[list[Entry]] = Deferred()
        ensureDeferred(self._fetch(cursor, [mine]))
        return mine

    def _wait(self, cursor: str) -> Deferred[list[Entry]]:
        d: Deferred[list[Entry]] = Deferred()
        self._fetching[cursor].append(d)
        return d

    async def _fetch(self, cursor: str, own: list[Deferred[list[Entry]]] | None = None) -> None:
        """Read the page after ``cursor`` for the streams waiting on the shared read (or for ``own``
        waits: a stream's own read); a complete page is kept either way."""
        try:
            page = entries(await self.store.event_entries(cursor, count=REPLAY_PAGE))
        except Exception as e:  # noqa: BLE001 - handed to every stream waiting for this page
            for d in self._fetching.pop(cursor, []) if own is None else own:
                if not d.called:
                    d.errback(e)
            return
        self.pages_read += 1
        if len(page) >= REPLAY_PAGE:
            self._pages[cursor] = page
            while len(self._pages) > REPLAY_CACHE:
                self._pages.popitem(last=False)
        for d in self._fetching.pop(cursor, []) if own is None else own:
            if not d.called:  # (a cancelled wait: its client hung up)
                d.callback(page)

    async def _replay_page(self, sub: Subscriber, page: list[Entry]) -> None:
        """Write one page's events that ``sub`` may see, giving the reactor back every REPLAY_SLICE seconds."""
        out: list[bytes] = []
        started = time.monotonic()
        for entry in page:
            if sub.closed:
                return
            if entry.key <= sub.last:
                continue
            sub.last = entry.key
            if sub.wants(entry):
                data = entry.frame()
                if data is not None:
                    out.append(data)
            if time.monotonic() - started > REPLAY_SLICE:
                if out:
                    sub.write(b"".join(out))
                    out = []
                await task.deferLater(self.reactor, 0, lambda: None)
                started = time.monotonic()
        if out and not sub.closed:
            sub.write(b"".join(out))
