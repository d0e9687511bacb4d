"""Why a job failed: stable reason codes shared by the engine, the job model and the API.

Also the domain exceptions the request side (:mod:`dtsbridge.jobs`) raises: each
kind of refusal is a class carrying a ``reason`` and extra fields, never an HTTP
status (only :mod:`dtsbridge.web` maps the classes to statuses, in one table).

This module imports nothing from Twisted so the copy engine can use it.
"""

from __future__ import annotations

from typing import Any

# Stable reasons recorded on a failed job (``reason``); :data:`REFUSAL_FOR_REASON` says
# which kind of refusal each is (what the synchronous ``/complete_transfer`` answers).
SOURCE_NOT_FOUND = "source_not_found"
OUTSIDE_DTS_AREA = "outside_dts_area"
UNSAFE_ENTRY = "unsafe_entry"
UNSAFE_DESTINATION = "unsafe_destination"
PAYLOAD_TOO_LARGE = "payload_too_large"
CHECKSUM_MISMATCH = "checksum_mismatch"
MANIFEST_MISMATCH = "manifest_mismatch"
SOURCE_CHANGED = "source_changed"
NO_SPACE = "no_space"
IO_ERROR = "io_error"
STAGING_FAILED = "staging_failed"
STAGING_TIMEOUT = "staging_timeout"
CANCELLED = "cancelled"
STALLED = "stalled"  # no byte moved for [copy] stall_seconds
TIMEOUT = "timeout"  # not finished within the request's timeout_seconds
BAD_REQUEST = "bad_request"
USER_NOT_FOUND = "user_not_found"
INTERNAL = "internal_error"


class TransferError(Exception):
    """A transfer cannot be done; ``reason`` is one of the stable codes above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"TransferError({self.reason!r}, {self.message!r})"


class Refused(Exception):
    """A request refused; the subclass says what kind of refusal, ``reason`` (if any) why.

    ``extra`` holds further fields of the answer (e.g. ``job_id``); ``None`` values are left out.
    """

    def __init__(self, message: str, reason: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.extra = extra

    def fields(self) -> dict[str, Any]:
        """``reason`` and the extra fields, as the answer shows them."""
        return {"reason": self.reason, **self.extra}


class Invalid(Refused):
    """A parameter is wrong (a bad name, a number out of range, a user that does not exist)."""


class Forbidden(Refused):
    """The caller may not do this, or the path leads somewhere it must not."""


class NotFound(Refused):
    """No such job or folder."""


class Conflict(Refused):
    """The job's state does not allow it (already ended, publishing, cancelled)."""


class TooLarge(Refused):
    """Over a size limit."""


class Internal(Refused):
    """The service failed (a record vanished, an I/O error): not the caller's fault."""


class Draining(Exception):
    """The process is shutting down and takes no new work."""


#: The kind of refusal each reason is (the rest are :class:`Internal`).
REFUSAL_FOR_REASON: dict[str, type[Refused]] = {
    BAD_REQUEST: Invalid,
    USER_NOT_FOUND: Invalid,
    OUTSIDE_DTS_AREA: Forbidden,
    UNSAFE_ENTRY: Forbidden,
    UNSAFE_DESTINATION: Forbidden,
    SOURCE_NOT_FOUND: NotFound,
    PAYLOAD_TOO_LARGE: TooLarge,
    # a waiting /complete_transfer whose job was cancelled: not a 5xx, which DTS would retry
    CANCELLED: Conflict,
}


def refusal_for(reason: str | None) -> type[Refused]:
    """The kind of refusal a failed job or check with ``reason`` is (:class:`Internal` by default)."""
    return REFUSAL_FOR_REASON.get(reason or "", Internal)


def refused(e: TransferError, message: str | None = None) -> Refused:
    """``e`` as the refusal its reason calls for."""
    return refusal_for(e.reason)(e.message if message is None else message, reason=e.reason)
