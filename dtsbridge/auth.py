"""Who is calling, and does a target user exist.

Two token backends answer ``authenticate(token) -> Identity``:

- :class:`TokenFileAuth` (``[auth] backend = tokens``): an INI file holding
  only sha256 hashes of tokens;
- :class:`KBaseAuth` (``backend = kbase``): KBase auth2, with a cache.

Three user checkers answer ``exists(name) -> bool`` (``[users] check``):
:class:`DirectoryUsers`, :class:`KBaseUsers`, :class:`PasswdUsers`.

:class:`Unauthorized` maps to HTTP 401, :class:`AuthUnavailable` to 503: an
auth2 that is down, slow, answers 5xx or garbage never produces a 401.
A token is never logged; only its :attr:`Identity.token_id`.
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
import urllib.parse
from collections import OrderedDict
from typing import Any, Callable, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "Identity",
    "Unauthorized",
    "AuthUnavailable",
    "token_from_header",
    "hash_token",
    "token_id",
    "new_token",
    "TokenFileAuth",
    "KBaseAuth",
    "UserChecker",
    "DirectoryUsers",
    "KBaseUsers",
    "PasswdUsers",
    "make_user_checker",
]


@attrs.frozen
class Identity:
    """An authenticated caller."""

    user: str
    roles: frozenset[str]
    #: a non-secret id of the token for logs and caches (never the token)
    token_id: str


class Unauthorized(Exception):
    """The token is missing, unknown, invalid or expired (HTTP 401). The message is safe to show."""


class AuthUnavailable(Exception):
    """The authority could not answer (HTTP 503): down, slow, 5xx, garbage."""


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------

_BEARER = re.compile(r"^bearer(?:\s+|$)", re.IGNORECASE)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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


def hash_token(token: str) -> str:
    """The hex sha256 of ``token`` (UTF-8)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_id(token: str) -> str:
    """A short, non-secret id for logs: the first 8 hex chars of the token's sha256."""
    return hash_token(token)[:8]


def _split_roles(text: str) -> frozenset[str]:
    return frozenset(r for r in re.split(r"[,\s]+", text or "") if r)


def new_token(section: str, user: str, roles: list[str]) -> tuple[str, str]:
    """A new random token and the tokens-file section that accepts it.

    Returns ``(token, ini_section_text)``; only the hash goes in the file.
    """
    if not section or any(c in section for c in "[]\r\n") or section.strip() != section:
        raise ValueError(f"bad section name {section!r}")
    if not user or any(c.isspace() for c in user):
        raise ValueError(f"bad user name {user!r}")
    for r in roles:
        if not r or any(c.isspace() or c == "," for c in r):
            raise ValueError(f"bad role {r!r}")
    token = secrets.token_urlsafe(32)
    text = f"[{section}]\nsha256 = {hash_token(token)}\nuser = {user}\nroles = {', '.join(roles)}\n"
    return token, text


@attrs.frozen
class _TokenEntry:
    sha256: str
    user: str
    roles: frozenset[str]
    section: str


def _load_tokens_file(path: str) -> dict[str, _TokenEntry]:
    """Parse a tokens file; ``ValueError`` naming the file (and section) when it is bad."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0no-defaults\0")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ValueError(f"tokens file {path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"tokens file {path}: not UTF-8 text") from e
    except configparser.Error as e:
        raise ValueError(f"tokens file {path}: {e.message if hasattr(e, 'message') else e}") from e
    table: dict[str, _TokenEntry] = {}
    for name in parser.sections():
        sec = parser[name]
        digest = (sec.get("sha256") or "").strip().lower()
        user = (sec.get("user") or "").strip()
        if not digest:
            raise ValueError(f"tokens file {path}: section [{name}] has no sha256")
        if not _HEX64.match(digest):
            raise ValueError(f"tokens file {path}: section [{name}]: sha256 is not 64 hex digits")
        if not user:
            raise ValueError(f"tokens file {path}: section [{name}] has no user")
        if digest in table:
            raise ValueError(
                f"tokens file {path}: section [{name}] repeats the sha256 of section [{table[digest].section}]"
            )
        table[digest] = _TokenEntry(digest, user, _split_roles(sec.get("roles", "")), name)
    return table


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TokenFileAuth:
    """``backend = tokens``: an INI file, one section per token: ``sha256``, ``user``, ``roles``.

    Roles are separated by commas and/or spaces. The file is loaded now (a bad
    file raises ``ValueError``) and reloaded when it changes (checked at most
    once every ``check_interval`` seconds); a broken file on reload keeps the
    old table and logs the problem.
    """

    log = Logger()

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic, check_interval: float = 1.0,
                 run_in_thread: Callable[..., defer.Deferred] | None = None) -> None:
        self.path = path
        self._clock = clock
        self.check_interval = check_interval
        #: runs the reload check (stat, read, parse) off the reactor thread; None: inline (tests, CLI)
        self._run = run_in_thread
        self._checking: defer.Deferred | None = None
        #: how long a request waits for a reload in progress before using the tokens in hand
        self.reload_wait = 2.0
        self._signature = _file_signature(path)
        self._table = _load_tokens_file(path)
        self._last_check = clock()

    def __len__(self) -> int:
        return len(self._table)

    def _due(self) -> bool:
        now = self._clock()
        if now - self._last_check < self.check_interval:
            return False
        self._last_check = now
        return True

    def _maybe_reload(self) -> None:
        if self._due():
            self._apply(self._read_if_changed(self.path, self._signature))

    @staticmethod
    def _read_if_changed(path: str, signature: tuple[int, int, int] | None
                         ) -> tuple[tuple[int, int, int] | None, dict[str, _TokenEntry] | None, str | None]:
        """``(signature, new table or None, problem or None)``; blocking: run in a thread."""
        sig = _file_signature(path)
        if sig == signature:
            return sig, None, None
        try:
            return sig, _load_tokens_file(path), None
        except ValueError as e:
            return sig, None, str(e)

    def _apply(self, checked: tuple[tuple[int, int, int] | None, dict[str, _TokenEntry] | None, str | None]) -> None:
        sig, table, problem = checked
        if sig == self._signature:
            return
        # Remember what we looked at, so a broken file is reported once per change.
        self._signature = sig
        if problem is not None:
            self.log.error("tokens file not reloaded, keeping the previous {count} tokens: {problem}",
                           count=len(self._table), problem=problem)
            return
        if table is not None:
            self._table = table
            self.log.info("tokens file {path} reloaded: {count} tokens", path=self.path, count=len(table))

    async def _refresh(self) -> None:
        """Reload a changed file through the thread runner; callers wait on their own Deferred."""
        if self._checking is None:
            if not self._due():
                return
            d = self._run(self._read_if_changed, self.path, self._signature)  # type: ignore[misc]

            def done(result: Any) -> Any:
                self._checking = None
                if isinstance(result, Failure):
                    self.log.failure("checking the tokens file {path} failed", result, path=self.path)
                else:
                    self._apply(result)
                return None

            self._checking = d
            d.addBoth(done)
        if self._checking is not None:
            # A file system that hangs must not hang every request: after a while, answer
            # from the table in hand (the check goes on, and a later request sees its result).
            from twisted.internet import reactor

            mine = _shielded(self._checking)
            mine.addTimeout(self.reload_wait, reactor)
            try:
                await mine
            except defer.TimeoutError:
                self.log.warn("the tokens file {path} is slow to read; using the tokens in hand", path=self.path)

    def reload(self) -> None:
        """Reload now (``ValueError`` on a bad file, keeping the old table)."""
        sig = _file_signature(self.path)
        self._table = _load_tokens_file(self.path)
        self._signature = sig
        self._last_check = self._clock()

    def lookup(self, token: str | None) -> Identity:
        """The synchronous check (reloading a changed file inline); :meth:`authenticate` reloads in a thread."""
        if not token:
            raise Unauthorized("missing token")
        self._maybe_reload()
        return self._find(token)

    def _find(self, token: str) -> Identity:
        digest = hash_token(token)
        entry = self._table.get(digest)
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            self.log.info("unknown token {token_id}", token_id=digest[:8])
            raise Unauthorized("invalid token")
        return Identity(user=entry.user, roles=entry.roles, token_id=digest[:8])

    async def authenticate(self, token: str | None) -> Identity:
        if self._run is None:
            return self.lookup(token)
        if not token:
            raise Unauthorized("missing token")
        await self._refresh()
        return self._find(token)


def _shielded(d: defer.Deferred) -> defer.Deferred:
    """A Deferred that fires when ``d`` does; cancelling it does not cancel ``d``. ``d`` must end in None."""
    mine: defer.Deferred = defer.Deferred()

    def fire(_: Any) -> None:
        if not mine.called:
            mine.callback(None)

    d.addBoth(fire)
    return mine


# ---------------------------------------------------------------------------
# KBase auth2
# ---------------------------------------------------------------------------

# auth2 appcodes that mean "this token is not good" (10000-range: authentication).
_AUTH_APPCODES = range(10000, 11000)


def _default_client(reactor, timeout: float):
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 10
    pool.cachedConnectionTimeout = 60
    agent = Agent(reactor, connectTimeout=timeout, pool=pool)
    return HTTPClient(agent), pool


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


class _Http:
    """GET-with-deadline shared by the auth2 clients."""

    log = Logger()

    def __init__(self, base_url: str, timeout: float, client, reactor) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._pool = None
        if client is None:
            client, self._pool = _default_client(reactor, timeout)
        self.client = client

    def close(self) -> defer.Deferred:
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return defer.succeed(None)

    async def _get(self, path: str, token: str) -> tuple[int, Any]:
        """``(status, decoded JSON or None)``; ``AuthUnavailable`` when nothing usable came back."""
        url = self.base_url + path
        try:
            resp = await self.client.get(
                url,
                headers={b"Authorization": [token.encode("utf-8")], b"Accept": [b"application/json"]},
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
        d = defer.ensureDeferred(self._get(path, token))
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
    seconds (``expires`` is wall-clock ms). ``client`` is anything with treq's
    ``get(url, headers=, timeout=, allow_redirects=)``.
    """

    log = Logger()

    def __init__(
        self,
        base_url: str,
        cache_seconds: float = 300,
        timeout: float = 10,
        client=None,
        reactor=None,
        clock: Callable[[], float] | None = None,
        negative_cache_seconds: float = 10,
        max_cache_entries: int = 10000,
    ) -> None:
        self._http = _Http(base_url, timeout, client, reactor)
        self.base_url = self._http.base_url
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.negative_cache_seconds = negative_cache_seconds
        self.max_cache_entries = max_cache_entries
        self._clock = clock or time.time
        # sha256 -> (deadline, Identity | Unauthorized message)
        self._cache: OrderedDict[str, tuple[float, Identity | str]] = OrderedDict()
        self._inflight: dict[str, list[defer.Deferred]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def close(self) -> defer.Deferred:
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
        mine: defer.Deferred = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            self.cache_hits += 1
            waiters.append(mine)
        else:
            self.cache_misses += 1
            waiters = self._inflight[key] = [mine]
            defer.ensureDeferred(self._ask(token, key)).addBoth(self._settled, key, waiters)
        return await mine

    def _settled(self, result: Any, key: str, waiters: list[defer.Deferred]) -> None:
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
        results = await defer.DeferredList(
            [
                defer.ensureDeferred(self._http.get_json("/api/V2/token", token)),
                defer.ensureDeferred(self._http.get_json("/api/V2/me", token)),
            ],
            consumeErrors=True,
        )
        failures = [r for ok, r in results if not ok]
        for f in failures:
            if not f.check(AuthUnavailable):
                self.log.failure("unexpected error asking auth2 about token {token_id}", f, token_id=tid)
                raise AuthUnavailable("auth service error")
        if failures:
            msg = str(failures[0].value)
            self.log.warn("auth2 unavailable checking token {token_id}: {problem}", token_id=tid, problem=msg)
            raise AuthUnavailable(msg)
        (tcode, tdoc), (mcode, mdoc) = results[0][1], results[1][1]
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


class UserChecker(Protocol):
    async def exists(self, name: str) -> bool:
        """Whether ``name`` is a user; may raise :class:`AuthUnavailable`."""
        ...


RunInThread = Callable[..., defer.Deferred]


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

    def __init__(self, user_root: str, run_in_thread: RunInThread) -> None:
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

    def __init__(self, run_in_thread: RunInThread) -> None:
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

    def __init__(
        self,
        base_url: str,
        service_token: str,
        timeout: float = 10,
        cache_seconds: float = 300,
        client=None,
        reactor=None,
        clock: Callable[[], float] | None = None,
        max_cache_entries: int = 10000,
    ) -> None:
        if not service_token:
            raise ValueError("[users] check = kbase needs [auth] service_token")
        self._http = _Http(base_url, timeout, client, reactor)
        self.base_url = self._http.base_url
        self._token = service_token
        self.cache_seconds = cache_seconds
        self.max_cache_entries = max_cache_entries
        self._clock = clock or time.monotonic
        self._known: OrderedDict[str, float] = OrderedDict()

    def close(self) -> defer.Deferred:
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
    base_url: str | None = None,
    service_token: str | None = None,
    run_in_thread: RunInThread | None = None,
    **kbase_options: Any,
) -> UserChecker:
    """The ``[users] check`` named ``kind``: ``directory``, ``kbase`` or ``passwd``."""
    kind = (kind or "").strip().lower()
    if kind == "directory":
        if not user_root or run_in_thread is None:
            raise ValueError("[users] check = directory needs [paths] user_root")
        return DirectoryUsers(user_root, run_in_thread)
    if kind == "kbase":
        if not base_url:
            raise ValueError("[users] check = kbase needs [auth] kbase_url")
        return KBaseUsers(base_url, service_token or "", **kbase_options)
    if kind == "passwd":
        if run_in_thread is None:
            raise ValueError("[users] check = passwd needs a thread runner")
        return PasswdUsers(run_in_thread)
    raise ValueError(f"[users] check must be directory, kbase or passwd, not {kind!r}")
