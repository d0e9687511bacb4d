"""The HTTP API: parse, authenticate, hand over to the :class:`~dtsbridge.core.Bridge`.

Every error is JSON, ``{"error": {"httpcode", "httpstatus", "message", …}}``,
made in one place (:meth:`Api.handle_errors`).

Before any of that, :class:`BoundedChannel` and :class:`BoundedRequest` (given
to the ``Site`` by ``tap``) guard the connection itself: a body over 64 KiB is
refused with 413 as soon as its size is known (never read, never written to a
temporary file, never parsed), and a client gets ``read_timeout`` seconds to
send a whole request (headers and body) before it gets 408.
"""

from __future__ import annotations

import fcntl
import http
import io
import json
import struct
import termios
import urllib.parse
from typing import Any

from klein import Klein
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http as twhttp
from twisted.web import server
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from dtsbridge import auth
from dtsbridge.core import Bridge, Draining, RequestError
from dtsbridge.errors import http_status_for
from dtsbridge.events import EVENT_ID, EventHub, SlowClient, Subscriber
from dtsbridge.model import Job, looks_like_job_id
from dtsbridge.store import StoreUnavailable

MAX_BODY = 64 * 1024
#: default seconds a client has to send a whole request, headers and body ([server] read_timeout_seconds)
READ_TIMEOUT = 20.0
#: after refusing a request, further bytes from the client are read and dropped for at most this long,
#: so that it can see the answer (closing with unread data would reset the connection and lose it)
LINGER_SECONDS = 5.0

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

    def __init__(self, request: IRequest) -> None:
        self.request = request
        self.paused = False
        self.behind = 0
        self.dropped = False
        self._waiting: list[Deferred] = []

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
            d = Deferred()
            self._waiting.append(d)
            await d

    def _in_kernel(self, transport) -> int:
        """Bytes the kernel holds for the client, not yet acknowledged (Linux ``SIOCOUTQ``)."""
        try:
            out = fcntl.ioctl(transport.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            return struct.unpack("i", out)[0]
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
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def _json(request: IRequest, code: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    for k, v in (headers or {}).items():
        request.setHeader(k.encode(), v.encode())
    return json.dumps(body).encode() + b"\n"


def error_body(code: int, message: str, **extra: Any) -> dict[str, Any]:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = "Error"
    err: dict[str, Any] = {"httpcode": code, "httpstatus": phrase, "message": message}
    err.update({k: v for k, v in extra.items() if v is not None})
    return {"error": err}


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
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the body is neither JSON nor a valid form") from None
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ApiError(400, f"{k} is given more than once")
        out[k] = v
    return out


def text_field(body: dict[str, Any], name: str, required: bool = True, limit: int = 4096) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name} is required")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    if value == "" or value.strip() == "":
        if required:
            raise ApiError(400, f"{name} must not be empty")
        return None
    if len(value) > limit or "\x00" in value:
        raise ApiError(400, f"{name} is too long or holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): it can be neither a file name here nor stored
        raise ApiError(400, f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if value is None:
        raise ApiError(400, f"{name} is required (true or false)")
    raise ApiError(400, f"{name} must be true or false")


def timeout_field(body: dict[str, Any], name: str = "timeout_seconds") -> float | None:
    """An optional positive, finite number of seconds (JSON number or numeric string); None when absent."""
    value = body.get(name)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        n = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, f"{name} must be a number of seconds greater than 0") from None
    if not (0 < n < float("inf")):  # also refuses NaN
        raise ApiError(400, f"{name} must be a number of seconds greater than 0")
    return n


def prefers_async(request: IRequest) -> bool:
    prefer = b",".join(request.requestHeaders.getRawHeaders(b"prefer", []))
    return any(p.strip().split(b";")[0].strip().lower() == b"respond-async" for p in prefer.split(b","))


class Api:
    """The Klein application over one :class:`Bridge`."""

    app = Klein()
    log = Logger()

    def __init__(self, bridge: Bridge, authenticator, health=None, openapi: dict | None = None,
                 events: EventHub | None = None) -> None:
        self.bridge = bridge
        self.auth = authenticator
        self.role = bridge.config.transfer_role
        self.health = health
        self.openapi = openapi
        self.events = events
        self.ui = load_ui()

    def resource(self):
        return self.app.resource()

    # -- errors ----------------------------------------------------------

    @app.handle_errors(Exception)
    def handle_errors(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        headers: dict[str, str] = {}
        extra: dict[str, Any] = {}
        if isinstance(e, ApiError):
            code, message, headers, extra = e.code, e.message, e.headers, e.extra
        elif isinstance(e, RequestError):
            code, message, extra = e.code, e.message, e.extra
        elif isinstance(e, auth.Unauthorized):
            code, message = 401, str(e) or "authentication required"
            headers = {"WWW-Authenticate": 'Bearer realm="dtsbridge"'}
        elif isinstance(e, auth.AuthUnavailable):
            code, message = 503, f"the authentication service is unavailable: {e}"
            headers = {"Retry-After": "5"}
        elif isinstance(e, StoreUnavailable):
            code, message = 503, f"the job store is unavailable: {e}"
            headers = {"Retry-After": "5"}
        elif isinstance(e, Draining):
            code, message = 503, "the service is shutting down and takes no new jobs"
            headers = {"Retry-After": "10"}
        elif isinstance(e, HTTPException):
            code = e.code or 500
            message = e.description or e.name
            if code == 405 and hasattr(e, "valid_methods") and e.valid_methods:
                headers = {"Allow": ", ".join(e.valid_methods)}
        else:
            self.log.failure("unexpected error answering {uri}", failure, uri=request.uri)
            code, message = 500, "internal error"
        self.bridge.metrics.requests.labels(_route(request), str(code)).inc()
        return _json(request, code, error_body(code, message, **extra), headers)

    # -- helpers ---------------------------------------------------------

    async def identify(self, request: IRequest) -> auth.Identity:
        token = auth.token_from_header(request.getHeader(b"authorization"))
        if token is None:
            raise auth.Unauthorized("an Authorization header with a token is required")
        return await self.auth.authenticate(token)

    async def require_role(self, request: IRequest) -> auth.Identity:
        ident = await self.identify(request)
        if self.role not in ident.roles:
            raise ApiError(403, f"the token lacks the {self.role} role")
        return ident

    def ok(self, request: IRequest, code: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
        self.bridge.metrics.requests.labels(_route(request), str(code)).inc()
        return _json(request, code, body, headers)

    def status_url(self, job_id: str) -> str:
        base = self.bridge.config.public_url
        return f"{base}/transferStatus?job_id={job_id}"

    def job_answer(self, request: IRequest, job: Job, created: bool) -> bytes:
        if job.status.value == "SUCCESS":
            return self.ok(request, 201 if created else 200, job.result_body())
        reason = job.reason or ("cancelled" if job.status.value == "CANCELLED" else None)
        code = http_status_for(reason)
        return self.ok(request, code, error_body(code, job.detailed_status or f"the job ended {job.status.value}",
                                                 reason=reason, job_id=job.job_id, status=job.status.value))

    # -- routes ----------------------------------------------------------

    @app.route("/complete_transfer", methods=["POST"])
    async def complete_transfer(self, request: IRequest) -> bytes:
        ident = await self.require_role(request)
        body = read_body(request)
        user = text_field(body, "target_user", limit=100)
        subdirectory = text_field(body, "subdirectory")
        timeout = timeout_field(body)
        job, created = await self.bridge.submit(user, subdirectory, ident.user, timeout=timeout)
        if job.status.value == "SUCCESS":
            return self.job_answer(request, job, created)
        if prefers_async(request):
            return self.ok(request, 202, {"job_id": job.job_id, "status": job.status.value},
                           {"Location": self.status_url(job.job_id), "Preference-Applied": "respond-async"})
        job = await self.bridge.wait(job.job_id)
        return self.job_answer(request, job, created)

    @app.route("/transferStatus", methods=["GET"])
    async def transfer_status(self, request: IRequest) -> bytes:
        ident = await self.identify(request)
        job_id = (request.args.get(b"job_id") or [b""])[0].decode("utf-8", "replace").strip()
        if not job_id:
            raise ApiError(400, "job_id is required")
        job = await self.bridge.store.get_job(job_id) if looks_like_job_id(job_id) else None
        if self.role not in ident.roles and (job is None or job.target_user != ident.user):
            if job is None:
                raise ApiError(404, f"no job {job_id}")
            raise ApiError(403, "only the target user or a transfer service may read this job")
        if job is None:
            raise ApiError(404, f"no job {job_id}")
        return self.ok(request, 200, job.public())

    @app.route("/submitTransfer", methods=["POST"])
    async def submit_transfer(self, request: IRequest) -> bytes:
        ident = await self.require_role(request)
        body = read_body(request)
        user = text_field(body, "target_user", limit=100)
        subdirectory = text_field(body, "subdirectory")
        job_timeout = timeout_field(body)
        timeout = body.get("staging_timeout")
        if timeout is not None and timeout != "":
            try:
                if isinstance(timeout, bool):
                    raise ValueError
                timeout = float(timeout)
                if timeout != timeout:  # NaN
                    raise ValueError
            except (TypeError, ValueError):
                raise ApiError(400, "staging_timeout must be a number of seconds") from None
        else:
            timeout = None
        job, code = await self.bridge.submit_staging(user, subdirectory, ident.user, timeout, job_timeout)
        return self.ok(request, 202, {"job_id": job.job_id, "authcode": code, "error": False,
                                      "status": job.status.value,
                                      "msg": "registered; the stager reports with /doneStaging"},
                       {"Location": self.status_url(job.job_id)})

    @app.route("/doneStaging", methods=["POST"])
    async def done_staging(self, request: IRequest) -> bytes:
        body = read_body(request)
        job_id = text_field(body, "job_id", limit=100)
        code = text_field(body, "authcode", limit=200)
        success = bool_field(body, "success")
        path = text_field(body, "path", required=False)
        staged_to = text_field(body, "staged_to", required=False)
        msg = text_field(body, "msg", required=False, limit=8192)
        job = await self.bridge.done_staging(job_id, code, success, path, staged_to, msg)
        return self.ok(request, 200, {"job_id": job.job_id, "status": job.status.value, "error": False,
                                      "msg": "accepted"})

    @app.route("/cancelTransfer", methods=["POST"])
    async def cancel_transfer(self, request: IRequest) -> bytes:
        await self.require_role(request)
        body = read_body(request)
        job_id = text_field(body, "job_id", limit=100)
        if not looks_like_job_id(job_id):
            raise ApiError(404, f"no job {job_id}")
        job = await self.bridge.cancel(job_id)
        return self.ok(request, 200, job.public())

    @app.route("/jobs", methods=["GET"])
    async def list_jobs(self, request: IRequest) -> bytes:
        ident = await self.identify(request)
        arg = lambda n: (request.args.get(n.encode()) or [b""])[0].decode("utf-8", "replace").strip() or None  # noqa: E731
        user, status = arg("user"), arg("status")
        try:
            limit = max(1, min(1000, int(arg("limit") or 100)))
        except ValueError:
            raise ApiError(400, "limit must be a whole number") from None
        if self.role not in ident.roles:
            if user not in (None, ident.user):
                raise ApiError(403, "you may list only your own jobs")
            user = ident.user
        if status is not None and status not in ("SUBMITTED", "STAGING", "TRANSFERRING", "SUCCESS", "ERROR", "CANCELLED"):
            raise ApiError(400, "status must be one of SUBMITTED, STAGING, TRANSFERRING, SUCCESS, ERROR, CANCELLED")
        jobs = await self.bridge.store.list_jobs(user=user, status=status, limit=limit)
        return self.ok(request, 200, {"jobs": [j.public() for j in jobs]})

    @app.route("/events", methods=["GET"])
    async def events_stream(self, request: IRequest) -> bytes:
        """Server-Sent Events of job changes (see :mod:`dtsbridge.events`)."""
        ident = await self.identify(request)
        arg = lambda n: (request.args.get(n.encode()) or [b""])[0].decode("utf-8", "replace").strip() or None  # noqa: E731
        user, job_id = arg("user"), arg("job_id")
        after = (request.getHeader(b"last-event-id") or b"").decode("latin-1").strip() or arg("last_event_id")
        if after is not None and not EVENT_ID.match(after):
            raise ApiError(400, "Last-Event-ID must be an event id such as 1767225600000-0")
        visible = None
        if self.role not in ident.roles:
            if user not in (None, ident.user):
                raise ApiError(403, "you may follow only your own jobs")
            visible = ident.user
        if self.events is None:
            raise ApiError(503, "events are not available")
        # Fail now (503) rather than after the headers when Redis does not answer.
        await self.events.wait_ready()
        if after is None:
            after = await self.bridge.store.last_event_id()
        self.bridge.metrics.requests.labels("/events", "200").inc()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx: pass each event at once
        pacer = StreamPacer(request)
        request.registerProducer(pacer, True)
        pacer.write(b": dtsbridge job events\nretry: 2000\n\n")
        sub = Subscriber(pacer.write, visible_user=visible, user=user, job_id=job_id, drained=pacer.drained)
        try:
            await self.events.stream(sub, after)
        except SlowClient:
            pass  # dropped: its connection is aborted
        finally:
            # also when the client was dropped (SlowClient): Twisted logs a producer left registered
            if request.producer is not None and request.channel is not None:
                request.unregisterProducer()
        return b""

    def ui_file(self, request: IRequest, name: str) -> bytes:
        self.bridge.metrics.requests.labels("/ui/", "200").inc()
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
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.bridge.metrics.render()

    @app.route("/openapi.json", methods=["GET"])
    def openapi_json(self, request: IRequest) -> bytes:
        return self.ok(request, 200, self.openapi or {})


# -- the connection: body size and read deadline -------------------------------------------


class BoundedRequest(server.Request):
    """A request whose body is kept in memory, counted, and never parsed by Twisted.

    The channel refuses a ``Content-Length`` over :data:`MAX_BODY` before this
    request sees any of the body; a chunked body is counted here and refused
    as soon as it passes the limit. Form bodies are parsed by :func:`read_body`
    in the handler, after the size check (``parsePOSTFormSubmission=False``).
    """

    def __init__(self, channel, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)
        self._body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        # Never a temporary file: the channel has refused anything over MAX_BODY already.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if getattr(self.channel, "refused", False):
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY:
            self.content = io.BytesIO()
            self.channel.refuse(413, f"the body is larger than {MAX_BODY} bytes")
            return
        self.content.write(data)


class BoundedChannel(twhttp.HTTPChannel):
    """An HTTP channel that refuses big bodies at once and bounds the time to send a request.

    ``read_timeout`` (seconds, 0 = none) runs from the connection, or from the
    end of the previous answer on a kept-alive connection, until the request's
    headers and body have all arrived; a client still sending then gets 408 and
    is disconnected (an idle kept-alive connection is just closed). A refused
    request (413, 408) is answered with ``Connection: close``; whatever the
    client still sends is dropped unread for at most :data:`LINGER_SECONDS`,
    then the connection is closed.
    """

    read_timeout: float = READ_TIMEOUT
    #: called with (route, code) for each refusal (the request counter of /metrics)
    on_refuse = None
    log = Logger()

    refused = False
    _deadline = None
    _linger = None

    # -- the read deadline

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def _start_deadline(self) -> None:
        self._stop_deadline()
        if self.read_timeout and self.read_timeout > 0:
            self._deadline = self.callLater(self.read_timeout, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._handlingRequest or self.refused or self.transport is None:
            return
        if self.requests:  # a request was begun but not finished
            self.log.info("client {peer} did not send its request within {seconds:g} s",
                          peer=str(self.transport.getPeer()), seconds=self.read_timeout)
            self.refuse(408, f"the request was not sent within {self.read_timeout:g} seconds")
        else:  # idle between requests
            self.transport.loseConnection()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self._stop_deadline()
        super().allContentReceived()

    def requestDone(self, request) -> None:
        if self.persistent and not self.refused:
            # The next request's deadline starts now (a pipelined one may be read at once,
            # inside super().requestDone, and stop it again).
            self._start_deadline()
        super().requestDone(request)

    # -- the body size

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > MAX_BODY:
            self.refuse(413, f"the body is larger than {MAX_BODY} bytes")
            return
        super().allHeadersReceived()

    # -- refusing

    def refuse(self, code: int, message: str) -> None:
        """Answer ``code`` with a JSON error now, read nothing more of the request, and close."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._stop_deadline()
        self.setTimeout(None)
        if code != 408:  # 408 was logged with its reason
            self.log.info("refused a request from {peer}: {code} {message}", peer=str(self.transport.getPeer()),
                          code=code, message=message)
        if self.on_refuse is not None:
            path = getattr(self, "_path", b"").split(b"?", 1)[0].decode("latin-1")
            self.on_refuse(path if path in _KNOWN_ROUTES else "other", code)
        body = json.dumps(error_body(code, message)).encode() + b"\n"
        head = (f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}\r\n"
                "Content-Type: application/json\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.transport.write(head + body)
        # Half-close: the answer and then FIN go out; bytes still coming are dropped unread
        # (dataReceived) until the client closes or LINGER_SECONDS pass.
        # Only on a plain socket: a TLS wrapper would pass the half-close to the raw socket below it.
        if isinstance(self.transport, FileDescriptor):
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()
        self._linger = self.callLater(LINGER_SECONDS, self._abort)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's bare "400 Bad Request" for a malformed request line, header or chunk:
        # the same JSON error as everything else, and never a second answer after a refusal.
        self.refuse(400, "malformed HTTP request")

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request or header line over 16 KiB (Twisted would just hang up).
        self.refuse(431, "a request line or header is too long")

    def _abort(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        super().rawDataReceived(data)

    def connectionLost(self, reason) -> None:
        self._stop_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)


_KNOWN_ROUTES = ("/complete_transfer", "/transferStatus", "/submitTransfer", "/doneStaging", "/cancelTransfer",
                 "/jobs", "/events", "/healthz", "/metrics", "/openapi.json")


def _route(request: IRequest) -> str:
    path = request.path.decode("latin-1") if request.path else "/"
    return path if path in _KNOWN_ROUTES else "other"

