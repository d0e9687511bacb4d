"""The HTTP connection, before any route: body size, read deadline, JSON refusals, a quiet access log.

:class:`BoundedChannel` and :class:`BoundedRequest` (given to the :class:`QuietSite`
by ``tap``) guard the connection itself: a body over 64 KiB is refused with 413 as
soon as its size is known (never read, never written to a temporary file, never
parsed), and a client gets ``read_timeout`` seconds to send a whole request
(headers and body) before it gets 408. Every refusal is the same JSON error body
as the API's (:func:`error_body`).
"""

from __future__ import annotations

import http
import io
import json
from typing import Any, Callable, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.web import http as twhttp
from twisted.web import server
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

MAX_BODY = 64 * 1024
#: default seconds a client has to send a whole request, headers and body ([server] read_timeout_seconds)
READ_TIMEOUT = 20.0
#: after refusing a request, further bytes from the client are read and dropped for at most this long,
#: so that it can see the answer (closing with unread data would reset the connection and lose it)
LINGER_SECONDS = 5.0

KNOWN_ROUTES = ("/complete_transfer", "/transferStatus", "/submitTransfer", "/doneStaging", "/cancelTransfer",
                "/jobs", "/events", "/healthz", "/metrics", "/openapi.json")


def error_body(code: int, message: str, **extra: Any) -> dict[str, Any]:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = "Error"
    err: dict[str, Any] = {"httpcode": code, "httpstatus": phrase, "message": message}
    err.update({k: v for k, v in extra.items() if v is not None})
    return {"error": err}


class BoundedRequest(server.Request):
    """A request whose body is kept in memory, counted, and never parsed by Twisted.

    The channel refuses a ``Content-Length`` over :data:`MAX_BODY` before this
    request sees any of the body; a chunked body is counted here and refused
    as soon as it passes the limit. Form bodies are parsed by :func:`dtsbridge.web.read_body`
    in the handler, after the size check (``parsePOSTFormSubmission=False``).
    """

    def __init__(self, channel: BoundedChannel, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        server.Request.__init__(self, channel, *args, **kwargs)
        self.bounded = channel
        self._body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        # Never a temporary file: the channel has refused anything over MAX_BODY already.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.bounded.refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY:
            self.content = io.BytesIO()
            self.bounded.refuse(413, f"the body is larger than {MAX_BODY} bytes")
            return
        assert self.content is not None
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
    on_refuse: Callable[[str, int], None] | None = None
    log = Logger()

    refused = False
    _deadline: IDelayedCall | None = None
    _linger: IDelayedCall | None = None

    # -- the read deadline

    def connectionMade(self) -> None:
        twhttp.HTTPChannel.connectionMade(self)
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
        twhttp.HTTPChannel.allContentReceived(self)

    def requestDone(self, request: twhttp.Request) -> None:
        if self.persistent and not self.refused:
            # The next request's deadline starts now (a pipelined one may be read at once,
            # inside super().requestDone, and stop it again).
            self._start_deadline()
        twhttp.HTTPChannel.requestDone(self, request)

    # -- the body size

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > MAX_BODY:
            self.refuse(413, f"the body is larger than {MAX_BODY} bytes")
            return
        twhttp.HTTPChannel.allHeadersReceived(self)

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
            self.on_refuse(path if path in KNOWN_ROUTES else "other", code)
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
            cast(ITCPTransport, self.transport).abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        twhttp.HTTPChannel.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        twhttp.HTTPChannel.lineReceived(self, line)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        twhttp.HTTPChannel.rawDataReceived(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        twhttp.HTTPChannel.connectionLost(self, reason)


class QuietSite(Site):
    """A Site that leaves successful polls (status, health, metrics GETs) out of the access log.

    Pollers ask ``/transferStatus`` and ``/healthz`` many times a second; writing
    an access-log line for each costs about a quarter of the request's time and
    buries the lines that matter.  Every other request, and every poll that
    fails (4xx/5xx), is logged as usual.
    """

    QUIET_PATHS = frozenset({b"/transferStatus", b"/healthz", b"/metrics"})

    def __init__(self, resource: IResource, read_timeout: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("requestFactory", BoundedRequest)
        Site.__init__(self, resource, parsePOSTFormSubmission=False, **kwargs)
        self.read_timeout = READ_TIMEOUT if read_timeout is None else read_timeout
        #: called with (route, code) for each request refused before any route ran
        self.on_refuse: Callable[[str, int], None] | None = None

    def protocol(self) -> BoundedChannel:  # type: ignore[override]  # Site's is a class; called alike
        # A plain HTTP/1.1 channel that refuses big bodies at once and bounds slow clients
        # (BoundedChannel), instead of Twisted's generic HTTP/1.1-or-2 wrapper.
        channel = BoundedChannel()
        channel.read_timeout = self.read_timeout
        channel.on_refuse = self.on_refuse
        return channel

    def log(self, request: twhttp.Request) -> None:
        if request.method == b"GET" and request.code < 400 and request.path in self.QUIET_PATHS:
            return
        Site.log(self, request)
