"""The collaborators a library class is handed, as types.

The assembly (:mod:`dtsbridge.tap`) makes the reactor, the thread pool, the
authenticator and the user checker and hands them to the classes that need
them; no library class reaches for the global reactor itself. Tests hand in
a :class:`twisted.internet.task.Clock`, a synchronous thread runner or a
local auth2 server instead.

- the reactor: Twisted's own interfaces (``IReactorTime`` where only time is
  needed; :data:`Reactor`, the type of the reactor Twisted installs, where
  processes or connections are made too);
- :class:`ThreadRunner`: runs blocking work off the reactor thread;
- :class:`Authenticator`: ``authenticate(token) -> Identity``, raising
  :class:`Unauthorized` (HTTP 401) or :class:`AuthUnavailable` (503);
- :class:`UserChecker`: ``exists(name) -> bool``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeAlias, TypeVar

import attrs
from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    # Twisted's type of the reactor it installs (core, time, file descriptors, TCP, processes);
    # a name for annotations only.
    from twisted.internet import _IReactorCommon

    Reactor: TypeAlias = _IReactorCommon

__all__ = ["Identity", "Unauthorized", "AuthUnavailable", "Authenticator", "UserChecker", "ThreadRunner"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


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


class Authenticator(Protocol):
    """Who holds a token: ``[auth] backend = tokens`` or ``kbase``."""

    def authenticate(self, token: str | None) -> Awaitable[Identity]:
        """The caller holding ``token``; :class:`Unauthorized` or :class:`AuthUnavailable`."""
        ...


class UserChecker(Protocol):
    """Whether a target user exists (``[users] check``)."""

    def exists(self, name: str) -> Awaitable[bool]:
        """Whether ``name`` is a user; may raise :class:`AuthUnavailable`."""
        ...


class ThreadRunner(Protocol):
    """Runs ``f(*args, **kwargs)`` in a thread pool; its result (or error) fires in the reactor thread."""

    def __call__(self, f: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        ...
