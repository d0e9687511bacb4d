"""``[auth] backend = tokens``: an INI file holding only sha256 hashes of tokens.

One section per token: ``sha256``, ``user``, ``roles``. :func:`new_token`
makes a token and the section that accepts it (``dtsbridge token new``).
The file is reloaded when it changes, off the reactor thread.
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtsbridge.interfaces import Identity, ThreadRunner, Unauthorized

__all__ = ["hash_token", "token_id", "new_token", "TokenFileAuth"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

#: What a reload check found: the file's signature, the new table (None: unchanged or bad), the problem.
_Checked = tuple["tuple[int, int, int] | None", "dict[str, _TokenEntry] | None", "str | None"]


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
                 run_in_thread: ThreadRunner | None = None, reactor: IReactorTime | None = None) -> None:
        if run_in_thread is not None and reactor is None:
            raise TypeError("TokenFileAuth: a thread runner needs the reactor too (it bounds the wait for a reload)")
        self.path = path
        self._clock = clock
        self.check_interval = check_interval
        #: runs the reload check (stat, read, parse) off the reactor thread; None: inline (tests, CLI)
        self._run = run_in_thread
        self._reactor = reactor
        self._checking: defer.Deferred[None] | None = None
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
    def _read_if_changed(path: str, signature: tuple[int, int, int] | None) -> _Checked:
        """``(signature, new table or None, problem or None)``; blocking: run in a thread."""
        sig = _file_signature(path)
        if sig == signature:
            return sig, None, None
        try:
            return sig, _load_tokens_file(path), None
        except ValueError as e:
            return sig, None, str(e)

    def _apply(self, checked: _Checked) -> None:
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

    async def _refresh(self, run: ThreadRunner, reactor: IReactorTime) -> None:
        """Reload a changed file through the thread runner; callers wait on their own Deferred."""
        if self._checking is None:
            if not self._due():
                return

            def done(result: _Checked | Failure) -> None:
                self._checking = None
                if isinstance(result, Failure):
                    self.log.failure("checking the tokens file {path} failed", result, path=self.path)
                else:
                    self._apply(result)

            d = run(self._read_if_changed, self.path, self._signature).addBoth(done)
            self._checking = None if d.called else d  # (a runner may answer at once)
        if self._checking is not None:
            # A file system that hangs must not hang every request: after a while, answer
            # from the table in hand (the check goes on, and a later request sees its result).
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
        run, reactor = self._run, self._reactor
        if run is None or reactor is None:
            return self.lookup(token)
        if not token:
            raise Unauthorized("missing token")
        await self._refresh(run, reactor)
        return self._find(token)


def _shielded(d: defer.Deferred[None]) -> defer.Deferred[None]:
    """A Deferred that fires when ``d`` does; cancelling it does not cancel ``d``. ``d`` must end in None."""
    mine: defer.Deferred[None] = defer.Deferred()

    def fire(_: object) -> None:
        if not mine.called:
            mine.callback(None)

    d.addBoth(fire)
    return mine


