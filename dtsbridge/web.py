"""The HTTP API: authenticate, parse, hand over to :class:`~dtsbridge.jobs.Jobs`, answer.

A thin Klein class (tahoe-lafs style): each route is declared with who may call
it (:func:`caller`: a transfer service, any identified caller, or anyone), which
authenticates and parses the fields once. Every error is JSON,
``{"error": {"httpcode", "httpstatus", "message", …}}``, made in one place
(:meth:`Api.handle_errors`), which is also the only place that maps the domain
exceptions of :mod:`dtsbridge.errors` to HTTP statuses (:data:`STATUS_FOR`).

The connection itself (body size, read deadline) is guarded before any route
by :mod:`dtsbridge.http`.
"""

from __future__ import annotations

import fcntl
import functools
import json
import struct
import termios
import urllib.parse
from typing import Any, Awaitable, Callable, Mapping, cast

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from dtsbridge import auth, errors
from dtsbridge.events import EventHub, SlowClient, Subscriber, is_event_id
from dtsbridge.http import KNOWN_ROUTES, MAX_BODY, error_body
from dtsbridge.interfaces import Authenticator
from dtsbridge.jobs import Caller, Jobs
from dtsbridge.metrics import Metrics
from dtsbridge.model import Job, Status, looks_like_job_id
from dtsbridge.store import StoreUnavailable

# GET /ui/: the page's files, shipped in the package (dtsbridge/ui/), read once at start.
UI_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
            "app.css": "text/css; charset=utf-8"}
UI_HEADERS = {
    # nothing from elsewhere, no inline script; the page talks only to this service
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                b"img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}


def load_ui() -> dict[str, bytes]:
    from importlib import resources
    base = resources.files("dtsbridge") / "ui"
    return {name: (base / name).read_bytes() for name in UI_FILES}


@implementer(IPushProducer)
class StreamPacer:
    """A push producer for one event stream: Twisted says when the client's socket is full.

    A client more than ``max_behind`` bytes behind (what the kernel still holds for it,
    plus what Twisted buffered since it paused us) is disconnected; it may come back
    with ``Last-Event-ID``. So a client that stops reading cannot make the process
    (or the kernel) hold an ever-growing buffer.
    """

    log = Logger()
    max_behind = 512 * 1024

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.paused = False
        self.behind = 0
        self.dropped = False
        self._waiting: list[Deferred[None]] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.behind = 0
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    def stopProducing(self) -> None:
        self.dropped = True

    async def drained(self) -> None:
        """Return once the client has taken what was written (a replay writes page by page)."""
        if self.paused and not self.dropped:
            d: Deferred[None] = Deferred()
            self._waiting.append(d)
            await d

    def _in_kernel(self, transport: Any) -> int:
        """Bytes the kernel holds for the client, not yet acknowledged (Linux ``SIOCOUTQ``)."""
        try:
            out = fcntl.ioctl(transport.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            return int(struct.unpack("i", out)[0])
        except (AttributeError, OSError, ValueError):
            return 0

    def write(self, data: bytes) -> None:
        if self.dropped:
            raise SlowClient("the stream is closed")
        if self.paused:
            self.behind += len(data)
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            behind = self.behind + self._in_kernel(transport)
            if behind > self.max_behind:
                self.dropped = True
                self.log.info("event stream: dropping a client that stopped reading ({n} bytes behind)", n=behind)
                transport.abortConnection()
                raise SlowClient("the client stopped reading")
        self.request.write(data)


class ApiError(Exception):
    """An HTTP answer other than success, decided by the web layer itself (a bad field, a missing token)."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


#: The HTTP status of each kind of refusal (:mod:`dtsbridge.errors`): the one place they meet.
STATUS_FOR: dict[type[errors.Refused], int] = {
    errors.Invalid: 400,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.Internal: 500,
}


def status_for(kind: type[errors.Refused]) -> int:
    return next((STATUS_FOR[c] for c in kind.__mro__ if c in STATUS_FOR), 500)


def _json(request: IRequest, code: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    for k, v in (headers or {}).items():
        request.setHeader(k.encode(), v.encode())
    return json.dumps(body).encode() + b"\n"


def read_body(request: IRequest) -> dict[str, Any]:
    """The request's fields from a JSON or form-encoded body (at most 64 KiB)."""
    length = request.getHeader(b"content-length")
    if length is not None:
        try:
            if int(length) > MAX_BODY:
                raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    stripped = raw.strip()
    if not stripped:
        return {}
    if ctype == b"application/json" or (ctype not in (b"application/x-www-form-urlencoded",) and stripped[:1] == b"{"):
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body
    try:
        text = raw.decode("utf-8")
        # errors=strict: a %-escape that is not UTF-8 (``a=%ff``) is no valid form, not U+FFFD.
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the body is neither JSON nor a valid form") from None
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ApiError(400, f"{k} is given more than once")
        out[k] = v
    return out


class Fields:
    """A request's fields (a JSON or form body, or the query string) and the checks each kind gets."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values

    @classmethod
    def of(cls, request: IRequest) -> "Fields":
        """A POST's body (at most 64 KiB), a GET's query string (each name's first value, stripped)."""
        if request.method == b"POST":
            return cls(read_body(request))
        args: dict[bytes, list[bytes]] = request.args or {}
        return cls({k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace").strip()
                    for k, v in args.items() if v})

    def arg(self, name: str) -> str | None:
        """A query argument; None when absent or empty."""
        value = self.values.get(name)
        return value or None if isinstance(value, str) else None

    def optional(self, name: str, limit: int = 4096) -> str | None:
        """A text field that may be absent or empty (None)."""
        value = self.values.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string")
        if value == "" or value.strip() == "":
            return None
        if len(value) > limit or "\x00" in value:
            raise ApiError(400, f"{name} is too long or holds a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): it can be neither a file name here nor stored
            raise ApiError(400, f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
        return value

    def text(self, name: str, limit: int = 4096) -> str:
        """A required, non-empty text field."""
        value = self.values.get(name)
        if value is None:
            raise ApiError(400, f"{name} is required")
        if isinstance(value, str) and value.strip() == "":
            raise ApiError(400, f"{name} must not be empty")
        text = self.optional(name, limit)
        assert text is not None
        return text

    def target(self) -> tuple[str, str]:
        """``target_user`` and ``subdirectory``: whose copy, of which folder."""
        return self.text("target_user", limit=100), self.text("subdirectory")

    def flag(self, name: str) -> bool:
        value = self.values.get(name)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        if value is None:
            raise ApiError(400, f"{name} is required (true or false)")
        raise ApiError(400, f"{name} must be true or false")

    def seconds(self, name: str = "timeout_seconds") -> float | None:
        """An optional positive, finite number of seconds (JSON number or numeric string); None when absent."""
        value = self.values.get(name)
        if value is None or value == "":
            return None
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            n = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, f"{name} must be a finite number of seconds greater than 0") from None
        if not (0 < n < float("inf")):  # also refuses NaN
            raise ApiError(400, f"{name} must be a finite number of seconds greater than 0")
        return n

    def number(self, name: str) -> float | None:
        """An optional number (range checked by the caller); None when absent; never NaN."""
        value = self.values.get(name)
        if value is None or value == "":
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            n = float(value)
            if n != n:  # NaN
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # (an integer beyond any float overflows)
            raise ApiError(400, f"{name} must be a number of seconds") from None
        return n


def prefers_async(request: IRequest) -> bool:
    prefer = b",".join(request.requestHeaders.getRawHeaders(b"prefer", []))
    return any(p.strip().split(b";")[0].strip().lower() == b"respond-async" for p in prefer.split(b","))


#: A route handler given the caller and the request's fields.
CallerRoute = Callable[["Api", IRequest, Caller, Fields], Awaitable[bytes]]
#: A route handler given only the request's fields (it authenticates by other means).
FieldsRoute = Callable[["Api", IRequest, Fields], Awaitable[bytes]]
Route = Callable[["Api", IRequest], Awaitable[bytes]]


def caller(role: bool) -> Callable[[CallerRoute], Route]:
    """The route needs an identified caller (401 without a valid token), with the transfer role if ``role``
    (403 without it); the handler gets the :class:`Caller` and the request's :class:`Fields`."""

    def wrap(handler: CallerRoute) -> Route:
        @functools.wraps(handler)
        async def route(self: Api, request: IRequest) -> bytes:
            ident = await self.identify(request)
            if role and self.role not in ident.roles:
                raise ApiError(403, f"the token lacks the {self.role} role")
            return await handler(self, request, Caller(ident.user, self.role in ident.roles), Fields.of(request))

        return route

    return wrap


def anyone(handler: FieldsRoute) -> Route:
    """The route needs no token (it checks something else, e.g. an authcode); the handler gets the fields."""

    @functools.wraps(handler)
    async def route(self: Api, request: IRequest) -> bytes:
        return await handler(self, request, Fields.of(request))

    return route


class Api:
    """The Klein application over :class:`~dtsbridge.jobs.Jobs`."""

    app = Klein()
    log = Logger()

    def __init__(self, jobs: Jobs, authenticator: Authenticator, metrics: Metrics,
                 health: Callable[[], Awaitable[list[str]]] | None = None,
                 openapi: dict[str, Any] | None = None, events: EventHub | None = None) -> None:
        self.jobs = jobs
        self.auth = authenticator
        self.metrics = metrics
        self.role = jobs.config.transfer_role
        self.health = health
        self.openapi = openapi
        self.events = events
        self.ui = load_ui()

    def resource(self) -> Any:
        return self.app.resource()

    # -- errors ----------------------------------------------------------

    @app.handle_errors(Exception)
    def handle_errors(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        headers: dict[str, str] = {}
        extra: dict[str, Any] = {}
        if isinstance(e, ApiError):
            code, message, headers, extra = e.code, e.message, e.headers, e.extra
        elif isinstance(e, errors.Refused):
            code, message, extra = status_for(type(e)), e.message, e.fields()
        elif isinstance(e, auth.Unauthorized):
            code, message = 401, str(e) or "authentication required"
            headers = {"WWW-Authenticate": 'Bearer realm="dtsbridge"'}
        elif isinstance(e, auth.AuthUnavailable):
            code, message = 503, f"the authentication service is unavailable: {e}"
            headers = {"Retry-After": "5"}
        elif isinstance(e, StoreUnavailable):
            code, message = 503, f"the job store is unavailable: {e}"
            headers = {"Retry-After": "5"}
        elif isinstance(e, errors.Draining):
            code, message = 503, "the service is shutting down and takes no new jobs"
            headers = {"Retry-After": "10"}
        elif isinstance(e, HTTPException):
            code = e.code or 500
            message = e.description or e.name
            allowed: list[str] | None = getattr(e, "valid_methods", None)
            if code == 405 and allowed:
                headers = {"Allow": ", ".join(allowed)}
        else:
            self.log.failure("unexpected error answering {uri}", failure, uri=request.uri)
            code, message = 500, "internal error"
        self.metrics.requests.labels(_route(request), str(code)).inc()
        return _json(request, code, error_body(code, message, **extra), headers)

    # -- helpers ---------------------------------------------------------

    async def identify(self, request: IRequest) -> auth.Identity:
        token = auth.token_from_header(request.getHeader(b"authorization"))
        if token is None:
            raise auth.Unauthorized("an Authorization header with a token is required")
        ident: auth.Identity = await self.auth.authenticate(token)
        return ident

    def ok(self, request: IRequest, code: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
        self.metrics.requests.labels(_route(request), str(code)).inc()
        return _json(request, code, body, headers)

    def status_url(self, job_id: str) -> str:
        return f"{self.jobs.config.public_url}/transferStatus?job_id={job_id}"

    def job_answer(self, request: IRequest, job: Job, created: bool) -> bytes:
        if job.status == Status.SUCCESS:
            return self.ok(request, 201 if created else 200, job.result_body())
        reason = job.reason or (errors.CANCELLED if job.status == Status.CANCELLED else None)
        code = status_for(errors.refusal_for(reason))
        return self.ok(request, code, error_body(code, job.detailed_status or f"the job ended {job.status.value}",
                                                 reason=reason, job_id=job.job_id, status=job.status.value))

    # -- routes ----------------------------------------------------------

    @app.route("/complete_transfer", methods=["POST"])
    @caller(role=True)
    async def complete_transfer(self, request: IRequest, who: Caller, fields: Fields) -> bytes:
        user, subdirectory = fields.target()
        job, created = await self.jobs.submit(user, subdirectory, who.user, timeout=fields.seconds())
        if job.status == Status.SUCCESS:
            return self.job_answer(request, job, created)
        if prefers_async(request):
            return self.ok(request, 202, {"job_id": job.job_id, "status": job.status.value},
                           {"Location": self.status_url(job.job_id), "Preference-Applied": "respond-async"})
        job = await self.jobs.wait(job.job_id)
        return self.job_answer(request, job, created)

    @app.route("/transferStatus", methods=["GET"])
    @caller(role=False)
    async def transfer_status(self, request: IRequest, who: Caller, fields: Fields) -> bytes:
        job_id = fields.arg("job_id")
        if job_id is None:
            raise ApiError(400, "job_id is required")
        return self.ok(request, 200, (await self.jobs.read(job_id, who)).public())

    @app.route("/submitTransfer", methods=["POST"])
    @caller(role=True)
    async def submit_transfer(self, request: IRequest, who: Caller, fields: Fields) -> bytes:
        user, subdirectory = fields.target()
        job_timeout = fields.seconds()
        timeout = fields.number("staging_timeout")
        job, code = await self.jobs.submit_staging(user, subdirectory, who.user, timeout, job_timeout)
        return self.ok(request, 202, {"job_id": job.job_id, "authcode": code, "error": False,
                                      "status": job.status.value,
                                      "msg": "registered; the stager reports with /doneStaging"},
                       {"Location": self.status_url(job.job_id)})

    @app.route("/doneStaging", methods=["POST"])
    @anyone
    async def done_staging(self, request: IRequest, fields: Fields) -> bytes:
        job_id = fields.text("job_id", limit=100)
        code = fields.text("authcode", limit=200)
        success = fields.flag("success")
        path, staged_to = fields.optional("path"), fields.optional("staged_to")
        msg = fields.optional("msg", limit=8192)
        job = await self.jobs.done_staging(job_id, code, success, path, staged_to, msg)
        return self.ok(request, 200, {"job_id": job.job_id, "status": job.status.value, "error": False,
                                      "msg": "accepted"})

    @app.route("/cancelTransfer", methods=["POST"])
    @caller(role=True)
    async def cancel_transfer(self, request: IRequest, who: Caller, fields: Fields) -> bytes:
        job_id = fields.text("job_id", limit=100)
        if not looks_like_job_id(job_id):
            raise ApiError(404, f"no job {job_id}")
        job = await self.jobs.cancel(job_id)
        return self.ok(request, 200, job.public())

    @app.route("/jobs", methods=["GET"])
    @caller(role=False)
    async def list_jobs(self, request: IRequest, who: Caller, fields: Fields) -> bytes:
        try:
            limit = max(1, min(1000, int(fields.arg("limit") or 100)))
        except ValueError:
            raise ApiError(400, "limit must be a whole number") from None
        jobs = await self.jobs.listing(who, fields.arg("user"), fields.arg("status"), limit)
        return self.ok(request, 200, {"jobs": [j.public() for j in jobs]})

    @app.route("/events", methods=["GET"])
    @caller(role=False)
    async def events_stream(self, request: IRequest, who: Caller, fields: Fields) -> bytes:
        """Server-Sent Events of job changes (see :mod:`dtsbridge.events`)."""
        user, job_id = fields.arg("user"), fields.arg("job_id")
        after = (request.getHeader(b"last-event-id") or b"").decode("latin-1").strip() or fields.arg("last_event_id")
        if after is not None and not is_event_id(after):
            raise ApiError(400, "Last-Event-ID must be an event id such as 1767225600000-0 "
                                "(each part at most 18446744073709551615)")
        visible = None if who.transfer else who.scope(user, "you may follow only your own jobs")
        if self.events is None:
            raise ApiError(503, "events are not available")
        # Fail now (503) rather than after the headers when Redis does not answer.
        await self.events.wait_ready()
        if after is None:
            after = await self.jobs.store.last_event_id()
        self.metrics.requests.labels("/events", "200").inc()
        stream = cast(server.Request, request)
        stream.setResponseCode(200)
        stream.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        stream.setHeader(b"Cache-Control", b"no-store")
        stream.setHeader(b"X-Accel-Buffering", b"no")  # nginx: pass each event at once
        pacer = StreamPacer(stream)
        stream.registerProducer(pacer, True)
        pacer.write(b": dtsbridge job events\nretry: 2000\n\n")
        sub = Subscriber(pacer.write, visible_user=visible, user=user, job_id=job_id, drained=pacer.drained)
        try:
            await self.events.stream(sub, after)
        except SlowClient:
            pass  # dropped: its connection is aborted
        finally:
            # also when the client was dropped (SlowClient): Twisted logs a producer left registered
            if stream.producer is not None and stream.channel is not None:
                stream.unregisterProducer()
        return b""

    def ui_file(self, request: IRequest, name: str) -> bytes:
        self.metrics.requests.labels("/ui/", "200").inc()
        request.setHeader(b"Content-Type", UI_FILES[name].encode())
        for k, v in UI_HEADERS.items():
            request.setHeader(k, v)
        return self.ui[name]

    @app.route("/ui", methods=["GET"])
    def ui_redirect(self, request: IRequest) -> bytes:
        request.setResponseCode(301)
        request.setHeader(b"Location", b"ui/")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return b'<a href="ui/">the dtsbridge page</a>\n'

    @app.route("/ui/", methods=["GET"])
    def ui_index(self, request: IRequest) -> bytes:
        return self.ui_file(request, "index.html")

    @app.route("/ui/app.js", methods=["GET"])
    def ui_js(self, request: IRequest) -> bytes:
        return self.ui_file(request, "app.js")

    @app.route("/ui/app.css", methods=["GET"])
    def ui_css(self, request: IRequest) -> bytes:
        return self.ui_file(request, "app.css")

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        problems = await self.health() if self.health else []
        if problems:
            return self.ok(request, 503, {"status": "unhealthy", "problems": problems})
        return self.ok(request, 200, {"status": "ok"})

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render()

    @app.route("/openapi.json", methods=["GET"])
    def openapi_json(self, request: IRequest) -> bytes:
        return self.ok(request, 200, self.openapi or {})


def _route(request: IRequest) -> str:
    path = request.path.decode("latin-1") if request.path else "/"
    return path if path in KNOWN_ROUTES else "other"
