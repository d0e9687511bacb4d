"""Who is calling, and does a target user exist.

Two token backends answer ``authenticate(token) -> Identity`` (the
:class:`~dtsbridge.interfaces.Authenticator` protocol):

- :class:`~dtsbridge.tokenfile.TokenFileAuth` (``[auth] backend = tokens``):
  an INI file holding only sha256 hashes of tokens;
- :class:`KBaseAuth` (``backend = kbase``): KBase auth2, with a cache.

Three user checkers answer ``exists(name) -> bool`` (``[users] check``):
:class:`DirectoryUsers`, :class:`KBaseUsers`, :class:`PasswdUsers`. Both
auth2 ones ask through one :class:`Auth2` client (one connection pool, the
reactor handed in).

:class:`Unauthorized` maps to HTTP 401, :class:`AuthUnavailable` to 503: an
auth2 that is down, slow, answers 5xx or garbage never produces a 401.
A token is never logged; only its :attr:`Identity.token_id`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from dtsbridge.interfaces import AuthUnavailable, Identity, ThreadRunner, Unauthorized, UserChecker
from dtsbridge.tokenfile import TokenFileAuth, hash_token, new_token, token_id

__all__ = [
    "Identity",
    "Unauthorized",
    "AuthUnavailable",
    "token_from_header",
    "hash_token",
    "token_id",
    "new_token",
    "TokenFileAuth",
    "Auth2",
    "KBaseAuth",
    "UserChecker",
    "DirectoryUsers",
    "KBaseUsers",
    "PasswdUsers",
    "make_user_checker",
]


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------

_BEARER = re.compile(r"^bearer(?:\s+|$)", re.IGNORECASE)


def token_from_header(value: str | bytes | None) -> str | None:
    """The token in an ``Authorization`` header value: ``Bearer <t>`` or the bare token.

    Surrounding spaces are stripped; an empty or absent value gives ``None``.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    m = _BEARER.match(value)
    if m:
        value = value[m.end():].strip()
    return value or None


# ---------------------------------------------------------------------------
# KBase auth2
# ---------------------------------------------------------------------------

# auth2 appcodes that mean "this token is not good" (10000-range: authentication).
_AUTH_APPCODES = range(10000, 11000)


def _error_appcode(body: Any) -> int | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("appcode")
        if isinstance(code, int):
            return code
    return None


def _was_cancelled(e: BaseException) -> bool:
    """treq's ``timeout=`` cancels the request: the Agent reports that as a failed response."""
    reasons = getattr(e, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(defer.CancelledError) for r in reasons)


class Auth2:
    """The KBase auth2 service at ``base_url``: GET-with-deadline, for :class:`KBaseAuth` and :class:`KBaseUsers`.

    ``client`` is anything with treq's ``get(url, headers=, timeout=, allow_redirects=)``
    (default: treq over a persistent connection pool of its own).
    """

    def __init__(self, base_url: str, reactor: IReactorTime, timeout: float = 10,
                 client: HTTPClient | None = None) -> None:
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        if client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 10
            self._pool.cachedConnectionTimeout = 60
            client = HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self._pool))
        self.client = client

    def close(self) -> defer.Deferred[None]:
        """Close idle connections to auth2 (for service shutdown and tests)."""
        if self._pool is not None:
            closed: defer.Deferred[None] = self._pool.closeCachedConnections()
            return closed
        return defer.succeed(None)

    async def _get(self, path: str, token: str) -> tuple[int, Any]:
        """``(status, decoded JSON or None)``; ``AuthUnavailable`` when nothing usable came back."""
        url = self.base_url + path
        headers: dict[bytes | str, list[bytes | str]] = {b"Authorization": [token.encode("utf-8")],
                                                         b"Accept": [b"application/json"]}
        try:
            resp = await self.client.get(
                url,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
            )
            body = await resp.content()
        except defer.CancelledError:
            raise AuthUnavailable("auth service did not answer in time") from None
        except Exception as e:  # connection refused, reset, DNS, TLS ...
            if _was_cancelled(e):
                raise AuthUnavailable("auth service did not answer in time") from None
            raise AuthUnavailable(f"auth service unreachable: {type(e).__name__}") from None
        code = resp.code
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        return code, doc

    async def get_json(self, path: str, token: str) -> tuple[int, Any]:
        """Like ``_get`` but under one overall deadline (request + body)."""
        d: defer.Deferred[tuple[int, Any]] = defer.ensureDeferred(self._get(path, token))
        d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise AuthUnavailable("auth service did not answer in time") from None


class KBaseAuth:
    """``backend = kbase``: check tokens with KBase auth2, caching the answers.

    ``GET {base_url}/api/V2/token`` and ``/api/V2/me`` are asked together with
    ``Authorization: <token>``. Good answers are cached (keyed by the token's
    sha256) for ``min(cachefor, cache_seconds)`` and never past the token's
    expiry; rejections for ``negative_cache_seconds``. ``clock`` is wall-clock
    seconds (``expires`` is wall-clock ms).
    """

    log = Logger()

    def __init__(self, auth2: Auth2, cache_seconds: float = 300, clock: Callable[[], float] = time.time,
                 negative_cache_seconds: float = 10, max_cache_entries: int = 10000) -> None:
        self._http = auth2
        self.base_url = auth2.base_url
        self.timeout = auth2.timeout
        self.cache_seconds = cache_seconds
        self.negative_cache_seconds = negative_cache_seconds
        self.max_cache_entries = max_cache_entries
        self._clock = clock
        # sha256 -> (deadline, Identity | Unauthorized message)
        self._cache: OrderedDict[str, tuple[float, Identity | str]] = OrderedDict()
        self._inflight: dict[str, list[defer.Deferred[Identity]]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def close(self) -> defer.Deferred[None]:
        """Close idle connections to auth2 (for service shutdown and tests)."""
        return self._http.close()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _remember(self, key: str, deadline: float, value: Identity | str) -> None:
        if deadline <= self._clock():
            return
        self._cache[key] = (deadline, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cache_entries:
            self._cache.popitem(last=False)

    async def authenticate(self, token: str | None) -> Identity:
        if not token:
            raise Unauthorized("missing token")
        key = hash_token(token)
        hit = self._cache.get(key)
        if hit is not None:
            deadline, value = hit
            if self._clock() < deadline:
                self.cache_hits += 1
                if isinstance(value, str):
                    raise Unauthorized(value)
                return value
            del self._cache[key]
        # Concurrent checks of one token share one round trip to auth2. Each caller waits on
        # its own Deferred: a caller that goes away (its client hung up, which cancels it)
        # never cancels the shared call that the others wait for.
        mine: defer.Deferred[Identity] = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            self.cache_hits += 1
            waiters.append(mine)
        else:
            self.cache_misses += 1
            waiters = self._inflight[key] = [mine]
            defer.ensureDeferred(self._ask(token, key)).addBoth(self._settled, key, waiters)
        return await mine

    def _settled(self, result: Identity | Failure, key: str, waiters: list[defer.Deferred[Identity]]) -> None:
        """The shared call ended: remember a rejection, hand the result to every waiter still waiting."""
        if self._inflight.get(key) is waiters:
            del self._inflight[key]
        if isinstance(result, Failure) and result.check(Unauthorized):
            self._remember(key, self._clock() + min(self.negative_cache_seconds, self.cache_seconds),
                           str(result.value))
        for w in waiters:
            if not w.called:  # a cancelled waiter has been called already
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

    async def _ask(self, token: str, key: str) -> Identity:
        tid = key[:8]
        # Both asked at once; each answer (or failure) is taken.
        asks = [defer.ensureDeferred(self._http.get_json(path, token)) for path in ("/api/V2/token", "/api/V2/me")]
        answers: list[tuple[int, Any]] = []
        failures: list[Failure] = []
        for ask in asks:
            try:
                answers.append(await ask)
            except Exception:  # noqa: BLE001 - sorted below
                failures.append(Failure())
        for f in failures:
            if not f.check(AuthUnavailable):
                self.log.failure("unexpected error asking auth2 about token {token_id}", f, token_id=tid)
                raise AuthUnavailable("auth service error")
        if failures:
            msg = str(failures[0].value)
            self.log.warn("auth2 unavailable checking token {token_id}: {problem}", token_id=tid, problem=msg)
            raise AuthUnavailable(msg)
        (tcode, tdoc), (mcode, mdoc) = answers
        rejected = False
        for code, doc in ((tcode, tdoc), (mcode, mdoc)):
            if code == 200:
                continue
            if code == 401 or (code in (400, 403) and _error_appcode(doc) in _AUTH_APPCODES):
                rejected = True
                continue
            self.log.warn("auth2 answered HTTP {code} checking token {token_id}", code=code, token_id=tid)
            raise AuthUnavailable(f"auth service answered HTTP {code}")
        if rejected:
            self.log.info("auth2 rejected token {token_id}", token_id=tid)
            raise Unauthorized("invalid token")
        try:
            user = tdoc["user"]
            expires = tdoc.get("expires")
            cachefor = tdoc.get("cachefor")
            me_user = mdoc["user"]
            roles = mdoc.get("customroles") or []
            if not isinstance(user, str) or not user or me_user != user:
                raise ValueError("user")
            if expires is not None and not isinstance(expires, (int, float)):
                raise ValueError("expires")
            if cachefor is not None and not isinstance(cachefor, (int, float)):
                raise ValueError("cachefor")
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ValueError("customroles")
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            self.log.warn("auth2 gave an unusable answer for token {token_id} ({field})", token_id=tid, field=str(e))
            raise AuthUnavailable("auth service gave an unusable answer") from None
        now = self._clock()
        if expires is not None and expires / 1000.0 <= now:
            self.log.info("expired token {token_id} for {user}", token_id=tid, user=user)
            raise Unauthorized("token expired")
        ident = Identity(user=user, roles=frozenset(roles), token_id=tid)
        lifetime = self.cache_seconds if cachefor is None else min(cachefor / 1000.0, self.cache_seconds)
        deadline = now + lifetime
        if expires is not None:
            deadline = min(deadline, expires / 1000.0)
        self._remember(key, deadline, ident)
        return ident


# ---------------------------------------------------------------------------
# Does a user exist?
# ---------------------------------------------------------------------------



def _plain_name(name: Any) -> bool:
    """A name that can be a single path component / account name at all."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
        and len(name) <= 255
    )


class DirectoryUsers:
    """A user exists when ``user_root/<name>`` is a real folder (a symlink is not a user)."""

    log = Logger()

    def __init__(self, user_root: str, run_in_thread: ThreadRunner) -> None:
        self.user_root = user_root
        self._run = run_in_thread

    def _check(self, name: str) -> bool:
        try:
            st = os.lstat(os.path.join(self.user_root, name))
        except (FileNotFoundError, NotADirectoryError):
            return False
        except (ValueError, UnicodeEncodeError):
            return False
        except OSError as e:
            raise AuthUnavailable(f"cannot check the user folder: {e.strerror or e}") from None
        return stat.S_ISDIR(st.st_mode)

    async def exists(self, name: str) -> bool:
        if not _plain_name(name):
            return False
        return await self._run(self._check, name)


class PasswdUsers:
    """A user exists when the system user database knows ``name``."""

    def __init__(self, run_in_thread: ThreadRunner) -> None:
        self._run = run_in_thread

    @staticmethod
    def _check(name: str) -> bool:
        import pwd

        try:
            pwd.getpwnam(name)
        except (KeyError, ValueError, UnicodeEncodeError):
            return False
        except OSError as e:
            raise AuthUnavailable(f"cannot read the user database: {e.strerror or e}") from None
        return True

    async def exists(self, name: str) -> bool:
        if not _plain_name(name):
            return False
        return await self._run(self._check, name)


class KBaseUsers:
    """A user exists when auth2's ``/api/V2/users/?list=<name>`` names it.

    Asked with the service's own token. Positive answers are cached for
    ``cache_seconds`` (accounts are not deleted often); negative ones are not.
    """

    log = Logger()

    def __init__(self, auth2: Auth2, service_token: str, cache_seconds: float = 300,
                 clock: Callable[[], float] = time.monotonic, max_cache_entries: int = 10000) -> None:
        if not service_token:
            raise ValueError("[users] check = kbase needs [auth] service_token")
        self._http = auth2
        self.base_url = auth2.base_url
        self._token = service_token
        self.cache_seconds = cache_seconds
        self.max_cache_entries = max_cache_entries
        self._clock = clock
        self._known: OrderedDict[str, float] = OrderedDict()

    def close(self) -> defer.Deferred[None]:
        return self._http.close()

    async def exists(self, name: str) -> bool:
        if not isinstance(name, str) or not name or "," in name or name != name.strip():
            return False
        deadline = self._known.get(name)
        if deadline is not None:
            if self._clock() < deadline:
                return True
            del self._known[name]
        path = "/api/V2/users/?list=" + urllib.parse.quote(name, safe="")
        code, doc = await self._http.get_json(path, self._token)
        if code != 200:
            if code in (400, 401, 403):
                self.log.error("auth2 refused the service token looking up a user (HTTP {code})", code=code)
            else:
                self.log.warn("auth2 answered HTTP {code} looking up a user", code=code)
            raise AuthUnavailable(f"auth service answered HTTP {code}")
        if not isinstance(doc, dict):
            raise AuthUnavailable("auth service gave an unusable answer")
        found = name in doc
        if found and self.cache_seconds > 0:
            self._known[name] = self._clock() + self.cache_seconds
            while len(self._known) > self.max_cache_entries:
                self._known.popitem(last=False)
        return found


def make_user_checker(
    kind: str,
    *,
    user_root: str | None = None,
    auth2: Auth2 | None = None,
    service_token: str | None = None,
    run_in_thread: ThreadRunner | None = None,
    **kbase_options: Any,
) -> UserChecker:
    """The ``[users] check`` named ``kind``: ``directory``, ``kbase`` (asking ``auth2``) or ``passwd``."""
    kind = (kind or "").strip().lower()
    if kind == "directory":
        if not user_root or run_in_thread is None:
            raise ValueError("[users] check = directory needs [paths] user_root")
        return DirectoryUsers(user_root, run_in_thread)
    if kind == "kbase":
        if auth2 is None:
            raise ValueError("[users] check = kbase needs [auth] kbase_url")
        return KBaseUsers(auth2, service_token or "", **kbase_options)
    if kind == "passwd":
        if run_in_thread is None:
            raise ValueError("[users] check = passwd needs a thread runner")
        return PasswdUsers(run_in_thread)
    raise ValueError(f"[users] check must be directory, kbase or passwd, not {kind!r}")
