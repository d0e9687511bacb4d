"""The job: its fields, its statuses and the moves allowed between them.

A job is stored as one Redis hash (see :mod:`dtsbridge.store`); this module
turns that hash into a :class:`Job` and back, and decides what the public
``/transferStatus`` answer shows. It has no I/O.
"""

from __future__ import annotations

import datetime
import enum
import uuid
from typing import Any, Mapping

import attrs


class Status(enum.StrEnum):
    """A job's status; ``str(status)`` is its name as stored and shown."""

    SUBMITTED = "SUBMITTED"  # queued, waiting for a worker
    STAGING = "STAGING"  # waiting for a stager's /doneStaging
    TRANSFERRING = "TRANSFERRING"  # copying, verifying, publishing
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({Status.SUCCESS, Status.ERROR, Status.CANCELLED})
#: A job in one of these no longer owns its folder: a new request for the folder makes a new
#: job (a successful one keeps it: a repeat of its request answers with it).
FOLDER_FREED = frozenset({Status.ERROR, Status.CANCELLED})
#: A job in one of these is (back) in the queue or held by a worker: a worker may take it.
CLAIMABLE = frozenset({Status.SUBMITTED, Status.TRANSFERRING})

# The moves the state machine allows. The Redis scripts enforce the same
# rules atomically; this table documents them and guards the Python side.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.STAGING: frozenset({Status.SUBMITTED, Status.ERROR, Status.CANCELLED}),
    Status.SUBMITTED: frozenset({Status.TRANSFERRING, Status.ERROR, Status.CANCELLED}),
    # A worker that loses its lease hands the job back to the queue.
    Status.TRANSFERRING: frozenset({Status.SUBMITTED, Status.SUCCESS, Status.ERROR, Status.CANCELLED}),
    Status.SUCCESS: frozenset(),
    Status.ERROR: frozenset(),
    Status.CANCELLED: frozenset(),
}


def can_move(old: Status, new: Status) -> bool:
    return new in TRANSITIONS[old]


def exact(seconds: float) -> str:
    """A number as stored in a job's record: exactly the float given (``repr``; ``:g`` kept 6 digits,
    and the deadline scripts read the stored text), a whole one below 2**53 without ``.0``."""
    n = float(seconds)
    return str(int(n)) if n.is_integer() and abs(n) < 2**53 else repr(n)


def now_iso() -> str:
    """The current time as ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T14:18:57.123Z``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FieldType(enum.Enum):
    """How a public field is stored (a string in the hash) and shown (JSON)."""

    STR = "string"
    INT = "integer"
    FLOAT = "number"
    BOOL = "boolean"
    TIME = "date-time"  # ISO 8601 UTC, a string


#: The fields /transferStatus (and every event and webhook) shows, by an explicit allow-list:
#: a field the store keeps for itself (the claim, publish record, folder key, temporary
#: folders, …) is never shown unless added here. Documented by the API's Job schema
#: (:mod:`dtsbridge.openapi` derives it from this table).
PUBLIC_FIELDS: dict[str, FieldType] = {
    "job_id": FieldType.STR,
    "status": FieldType.STR,
    "detailed_status": FieldType.STR,
    "reason": FieldType.STR,
    "target_user": FieldType.STR,
    "subdirectory": FieldType.STR,
    "path": FieldType.STR,
    "submitter": FieldType.STR,
    "kind": FieldType.STR,
    "files_total": FieldType.INT,
    "files_done": FieldType.INT,
    "bytes_total": FieldType.INT,
    "bytes_done": FieldType.INT,
    "staged_to": FieldType.STR,
    "stager_msg": FieldType.STR,
    "stager_path": FieldType.STR,
    "stager_success": FieldType.BOOL,
    "staging_timeout": FieldType.FLOAT,
    "timeout_seconds": FieldType.FLOAT,
    "manifest_resources": FieldType.INT,
    "manifest_size_only": FieldType.INT,
    "manifest_hashed": FieldType.INT,
    "manifest_unverified": FieldType.INT,
    "attempts": FieldType.INT,
    "files_cloned": FieldType.INT,
    "bytes_cloned": FieldType.INT,
    "files_resumed": FieldType.INT,
    "bytes_resumed": FieldType.INT,
    "source_deleted": FieldType.BOOL,
    # a time_<status> for each status the job entered, and when its stager reported
    **{f"time_{s.value.lower()}": FieldType.TIME for s in Status},
    "time_staged": FieldType.TIME,
}

INT_FIELDS = frozenset(k for k, t in PUBLIC_FIELDS.items() if t is FieldType.INT)
BOOL_FIELDS = frozenset(k for k, t in PUBLIC_FIELDS.items() if t is FieldType.BOOL)
FLOAT_FIELDS = frozenset(k for k, t in PUBLIC_FIELDS.items() if t is FieldType.FLOAT)


@attrs.define
class Job:
    """One transfer: what to copy, for whom, and how far it got."""

    job_id: str
    status: Status
    target_user: str = ""
    subdirectory: str = ""
    submitter: str = ""
    kind: str = "complete"  # complete | staged | watch
    source_rel: str = ""  # the folder beneath dts_root, canonical
    dest_parts: str = ""  # "user/target_subdir" beneath user_root
    path: str | None = None  # as the user sees it: /<user>/<name>
    detailed_status: str | None = None
    reason: str | None = None
    files_total: int | None = None
    files_done: int | None = None
    bytes_total: int | None = None
    bytes_done: int | None = None
    extra: dict[str, Any] = attrs.Factory(dict)

    @classmethod
    def from_hash(cls, job_id: str, h: Mapping[str, str]) -> "Job":
        known = {a.name for a in attrs.fields(cls)} - {"extra", "status", "job_id"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in h.items():
            if k in ("status", "job_id"):
                continue
            if k in INT_FIELDS:
                try:
                    value: Any = int(v)
                except (TypeError, ValueError):
                    value = None
            elif k in FLOAT_FIELDS:
                try:
                    value = float(v)
                    if value.is_integer():
                        value = int(value)  # 30, as asked, not 30.0
                except (TypeError, ValueError, OverflowError):
                    value = None
            elif k in BOOL_FIELDS:
                value = v in ("1", "true", "True")
            else:
                value = v
            if k in known:
                kwargs[k] = value
            else:
                extra[k] = value
        return cls(job_id=job_id, status=Status(h["status"]), extra=extra, **kwargs)

    def public(self) -> dict[str, Any]:
        """The /transferStatus body: every non-null field of :data:`PUBLIC_FIELDS`."""
        out: dict[str, Any] = {}
        for a in attrs.fields(type(self)):
            if a.name in PUBLIC_FIELDS:
                value = getattr(self, a.name)
                if isinstance(value, Status):
                    value = value.value
                if value is not None and value != "":
                    out[a.name] = value
        for k, v in self.extra.items():
            if k in PUBLIC_FIELDS and v is not None and v != "":
                out[k] = v
        return out

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def result_body(self) -> dict[str, Any]:
        """The /complete_transfer success body."""
        return {"path": self.path, "job_id": self.job_id, "files": self.files_total or 0,
                "bytes": self.bytes_total or 0}


def looks_like_job_id(job_id: str) -> bool:
    """Job ids are UUIDs; anything else is no job (answered without asking Redis)."""
    try:
        uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def user_path(user: str, target_subdir: tuple[str, ...], name: str) -> str:
    """The published folder as the user sees it in their datastore."""
    return "/" + "/".join((user, *target_subdir, name))
