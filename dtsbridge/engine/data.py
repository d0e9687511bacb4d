"""What the engine hands back and forth: sources, plans, options, results and temporary-folder records."""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
import re
import sys
import time

from collections.abc import Callable
from typing import Any, TypeVar

import attrs


log = logging.getLogger(__name__)

#: The job the current thread works for, for log records (see :func:`current_job_id`).
_JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("dtsbridge_engine_job_id", default=None)

_F = TypeVar("_F", bound=Callable[..., Any])


def current_job_id() -> str | None:
    """The job whose work logged the record being handled (None outside a job): for a log handler."""
    return _JOB_ID.get()


def for_job(f: _F) -> _F:
    """Run ``f`` (which takes a ``job_id`` argument) with that job as :func:`current_job_id`.

    Threads ``f`` hands work to get it too when submitted with ``contextvars.copy_context().run``.
    """
    sig = inspect.signature(f)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _JOB_ID.set(sig.bind_partial(*args, **kwargs).arguments.get("job_id"))
        try:
            return f(*args, **kwargs)
        finally:
            _JOB_ID.reset(token)

    return wrapper  # type: ignore[return-value]  # wraps(f) keeps f's signature, which mypy cannot see

CHUNK = 256 * 1024

#: A job's result names at most this many files whose multipart ETag could not be verified.
UNVERIFIED_NAMES = 10

_ATTEMPT_RE = re.compile(r"[A-Za-z0-9_]{1,64}")

#: The verification hashes a copy may use (``[copy] checksum``).
CHECKSUMS = ("xxh3", "blake3", "sha256", "md5")

# --------------------------------------------------------------------------
# Data classes


@attrs.frozen
class Source:
    """A resolved DTS folder: ``rel`` is its canonical path below dts_root."""

    rel: str
    name: str


@attrs.frozen
class Manifest:
    """What a ``manifest.json`` asks for.

    ``hashes`` maps a file's relative path to ``(algorithm, lowercase hex)``
    pairs that must hold for it; ``size_only`` counts resources with no hash.
    """

    resources: int
    size_only: int
    hashes: dict[str, tuple[tuple[str, str], ...]] = attrs.field(factory=dict, repr=False)


@attrs.frozen
class _FileEntry:
    rel: str
    size: int
    ino: int
    mode: int
    mtime_ns: int


@attrs.frozen
class _DirEntry:
    rel: str
    mode: int
    atime_ns: int
    mtime_ns: int


@attrs.frozen
class Plan:
    """Result of the scan: totals (``dirs`` excludes the top folder) and manifest.

    ``file_list``/``dir_list``/``top`` carry what the copy needs; they are not
    part of equality or repr.
    """

    files: int
    bytes: int
    dirs: int
    manifest: Manifest | None
    file_list: tuple[_FileEntry, ...] = attrs.field(default=(), eq=False, repr=False)
    dir_list: tuple[_DirEntry, ...] = attrs.field(default=(), eq=False, repr=False)
    top: _DirEntry | None = attrs.field(default=None, eq=False, repr=False)
    dev: int = attrs.field(default=0, eq=False, repr=False)
    #: The source folder's inode (with ``dev``): what ``delete_source`` may remove is that folder only.
    ino: int = attrs.field(default=0, eq=False, repr=False)


@attrs.frozen
class Faults:
    """Test-only pauses at named points of a copy, so fault-injection tests can ``kill -9`` there.

    Parsed once, when the service starts (the engine is imported), from
    ``DTSBRIDGE_FAULT_PAUSE`` (``point:seconds``, several separated by commas,
    e.g. ``verify:30``), and carried to the copy in :attr:`CopyOptions.faults`
    (to worker processes too): the copy path never reads the environment.  A
    pause writes ``fault point <point> reached (pid <pid>)`` to stderr and sleeps.  Points:
    ``copy`` (after the first chunk of a job's first file is written),
    ``verify`` (after a job's first file is written, before it is re-read),
    ``publish`` (right before the publish fence and rename), ``published``
    (right after the rename, before the job's final state is recorded) and
    ``half`` (once the job's journal has recorded at least half of its bytes
    as verified: resume tests kill there).  Empty (the default): no effect.
    """

    pauses: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> "Faults":
        pauses = []
        for item in (spec or "").split(","):
            point, _, seconds = item.strip().partition(":")
            if point:
                pauses.append((point, float(seconds or 30)))
        return cls(tuple(pauses))

    def __bool__(self) -> bool:
        return bool(self.pauses)

    def only(self, points: set[str]) -> "Faults":
        """These faults, restricted to ``points``."""
        return Faults(tuple(p for p in self.pauses if p[0] in points))

    def pause(self, name: str) -> None:
        """Pause at ``name`` if asked to (the first pause given for it)."""
        for point, seconds in self.pauses:
            if point == name:
                sys.stderr.write(f"dtsbridge: fault point {name} reached (pid {os.getpid()})\n")
                sys.stderr.flush()
                time.sleep(seconds)
                return


#: The faults asked for by this process's environment, read once at start-up: the
#: default of :attr:`CopyOptions.faults`.
STARTUP_FAULTS = Faults.parse(os.environ.get("DTSBRIDGE_FAULT_PAUSE"))


@attrs.frozen
class CopyOptions:
    """How to copy: verification hash, owner, limits, durability, parallelism."""

    checksum: str = "xxh3"
    uid: int | None = None
    gid: int | None = None
    max_bytes: int | None = None
    fsync: bool = True
    workers: int = 4
    #: Worker processes for batches of small files (0: threads only); see :class:`~dtsbridge.engine.workers.WorkerPool`.
    processes: int = 0
    #: ``auto``: clone files (``FICLONE``) when source and destination share a filesystem that can;
    #: ``never``: always copy.  See :func:`_clone`.
    reflink: str = "auto"
    #: Test-only pauses (see :class:`Faults`).
    faults: Faults = STARTUP_FAULTS


@attrs.frozen
class TempRecord:
    """What an attempt made: its temporary folder, identified by device, inode, birth time and owners.

    A cleanup removes a temporary folder only when the folder now at its name is
    this very one (device, inode and, where the filesystem records it, birth
    time, so a reused inode number does not pass) and belongs to one of ``uids``
    (the service, and the owner the copy gives it before publishing): never on
    the strength of its name.  A record with ``ino == 0`` is *pending*: written
    before the folder was made, so a crash between ``mkdir`` and recording the
    inode leaves a folder the cleanup still knows; such a folder is only ever
    removed while empty, 0700 and the service's (nothing is written into a
    temporary folder before its inode is recorded).

    ``encode()``/``decode()`` give the one-word form kept in the job's Redis record.
    """

    attempt: str
    dev: int = 0
    ino: int = 0
    btime_ns: int = 0
    uids: tuple[int, ...] = ()

    @property
    def pending(self) -> bool:
        return self.ino == 0

    def encode(self) -> str:
        if self.pending:
            return self.attempt
        return f"{self.attempt}:{self.dev}:{self.ino}:{self.btime_ns}:{','.join(str(u) for u in self.uids)}"

    @classmethod
    def decode(cls, word: str) -> "TempRecord":
        """One record; raises ValueError for a malformed one."""
        attempt, *rest = word.split(":")
        if not _ATTEMPT_RE.fullmatch(attempt):
            raise ValueError(f"bad temporary folder record {word!r}")
        if not rest:
            return cls(attempt)
        dev, ino, btime, uids = rest
        return cls(attempt, int(dev), int(ino), int(btime), tuple(int(u) for u in uids.split(",") if u))

    @classmethod
    def decode_all(cls, text: str | None) -> list["TempRecord"]:
        """Every well-formed record of a space-separated list (malformed words are skipped)."""
        out = []
        for word in (text or "").split():
            try:
                out.append(cls.decode(word))
            except ValueError:
                log.warning("ignoring a malformed temporary folder record %r", word)
        return out


@attrs.frozen
class Result:
    """A published copy.

    With a manifest (``has_manifest``): ``hashed`` files were checked by a hash it
    gives, ``size_only`` resources by size alone (no hash), and ``unverified``
    files carry a multipart ETag that no likely part size matched (checked by size;
    ``unverified_names`` lists the first :data:`UNVERIFIED_NAMES` of them).
    """

    name: str
    files: int
    bytes: int
    size_only: int
    manifest_resources: int
    ino: int
    dev: int
    #: Files (and their bytes) cloned with FICLONE instead of copied.
    files_cloned: int = 0
    bytes_cloned: int = 0
    has_manifest: bool = False
    hashed: int = 0
    unverified: int = 0
    unverified_names: tuple[str, ...] = ()
    #: Files (and their bytes) kept from an earlier attempt's temporary folder (``resume_from``).
    files_resumed: int = 0
    bytes_resumed: int = 0


