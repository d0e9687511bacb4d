"""Why a job failed: stable reason codes shared by the engine, the job model and the API.

This module imports nothing from Twisted so the copy engine can use it.
"""

from __future__ import annotations

# Stable reasons recorded on a failed job (``reason``) and how the synchronous
# ``/complete_transfer`` answer maps them to an HTTP status.
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

HTTP_FOR_REASON: dict[str, int] = {
    BAD_REQUEST: 400,
    USER_NOT_FOUND: 400,
    OUTSIDE_DTS_AREA: 403,
    UNSAFE_ENTRY: 403,
    UNSAFE_DESTINATION: 403,
    SOURCE_NOT_FOUND: 404,
    PAYLOAD_TOO_LARGE: 413,
    # a waiting /complete_transfer whose job was cancelled: not a 5xx, which DTS would retry
    CANCELLED: 409,
}


def http_status_for(reason: str | None) -> int:
    """The HTTP status a failed job with ``reason`` answers with (500 by default)."""
    return HTTP_FOR_REASON.get(reason or "", 500)


class TransferError(Exception):
    """A transfer cannot be done; ``reason`` is one of the stable codes above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def http_status(self) -> int:
        return http_status_for(self.reason)

    def __repr__(self) -> str:
        return f"TransferError({self.reason!r}, {self.message!r})"
