"""The copy engine: verified, link-safe copies of a DTS folder into a datastore.

Synchronous code meant to run in worker threads; it imports nothing from
Twisted.  Read this first: it is the safety argument, and the map of the
modules that carry it out.

Every path that comes from a request or a manifest is untrusted:

* the source is resolved beneath ``dts_root`` with ``openat2`` and
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
  RESOLVE_NO_XDEV`` (or, when the kernel lacks it, a component-by-component
  ``O_NOFOLLOW | O_DIRECTORY`` walk from held directory descriptors that also
  refuses mount crossings by device and mount id) -- :mod:`.beneath`;
* every open, mkdir, chown and rename in both trees is relative to a held
  directory descriptor and never follows a symbolic link -- :mod:`.beneath`;
* the scan walks the source through descriptors and refuses links, devices,
  FIFOs, sockets, hard-linked files and mounts inside it; each file is opened
  again for the copy (``O_NOFOLLOW | O_NONBLOCK``, beneath its folder), checked
  to be the very file scanned (inode, size) and unchanged while copied (size,
  time) -- :mod:`.scanner`, :mod:`.copyfile`;
* ``manifest.json`` is read bounded (:data:`~.manifest.MANIFEST_MAX_BYTES`),
  streamed and parse-bomb safe; its paths are normalised like any request's
  and only ever looked up among the scanned files; its hashes are checked in
  the copy's own pass -- :mod:`.manifest`;
* the copy is built in a hidden temporary folder (mode 0700, owned by the
  service) beside its final place, recorded (device, inode, birth time) before
  anything is written into it, and published with
  ``renameat2(..., RENAME_NOREPLACE)``, so nothing existing is ever replaced --
  :mod:`.tree`;
* removal goes by recorded identity, never by name alone, and never follows a
  link nor opens a non-folder -- :mod:`.remove`;
* a crashed attempt's verified files are kept only when its journal, the
  folder's recorded identity and the files themselves all still agree --
  :mod:`.journal`;
* worker processes (for batches of small files) re-open the job's folders
  with the same resolution and check they are the very folders the job holds
  -- :mod:`.workers`.

On any failure everything made for the job is removed (the temporary folder
and all it holds) and a :class:`~dtsbridge.errors.TransferError` is raised.
Missing ``target_subdir`` folders that the engine created stay: they are
empty, belong to the user (when an owner is configured) and are harmless.

Speed, by design (see docs/performance.md): each source chunk is read once
into a reused buffer, written and hashed while it is there (xxh3-128 by
default; the manifest's own hash in the same pass when it gives one, an S3
multipart ETag for each likely part size), then the whole copy is read back
and hashed again; big files go to threads, largest first; batches of small
files go to a few worker processes (``CopyOptions.processes``, a
:class:`~.workers.WorkerPool` started once through a ``forkserver`` and owned
by the service's :class:`~.workers.CopyExecutor`), because their per-file
Python work would otherwise serialise the threads on the GIL.  When the DTS
area and the datastore are one filesystem that can share blocks
(``CopyOptions.reflink = "auto"``: XFS with reflink, btrfs), each file is
cloned with ``ioctl(FICLONE)`` instead, through the very descriptors a copy
would use, and the clone is read and hashed once (against the manifest's
hashes when it gives some); the first "cannot clone here" answer
(``EOPNOTSUPP``, ``EXDEV``, ``EINVAL``, ``ENOTTY``) makes the rest of the job copy.
A copy is never judged by the manifest alone: copying with ``copy_file_range``
and hashing only the copy was measured no faster here (md5 is the cost, and it
is one pass either way), so every byte is read from the source (hashed as
read) and again from the copy, which must hash the same.

Modules, in the order a job uses them:

=================  ==========================================================
:mod:`.data`       Source, Plan, Manifest, CopyOptions, Faults, Result, TempRecord
:mod:`.beneath`    openat2/renameat2/statx (ctypes), resolution beneath a descriptor,
                   request paths, destination folders
:mod:`.scanner`    the source walk (:func:`scan`)
:mod:`.manifest`   ``manifest.json``: bounded streaming reader, hashes, S3 ETags
:mod:`.copyfile`   one file: copy + hash + read-back, or clone; the job's shared state
:mod:`.workers`    batches over threads and the worker-process pool
:mod:`.journal`    the resume journal and the salvage of a crashed attempt
:mod:`.remove`     temporary-folder names, cleanup by recorded inode, source removal
:mod:`.tree`       :func:`copy_tree`: the order of one job's operations, publish
=================  ==========================================================

Test-only hook: :class:`~.data.Faults` (``DTSBRIDGE_FAULT_PAUSE``, read once
at start-up) pauses a copy at named points so fault-injection tests can
``kill -9`` the process at a known moment.
"""

from __future__ import annotations

from dtsbridge.errors import TransferError
from dtsbridge.engine.data import (
    CHECKSUMS,
    CHUNK,
    STARTUP_FAULTS,
    UNVERIFIED_NAMES,
    CopyOptions,
    Faults,
    Manifest,
    Plan,
    Result,
    Source,
    TempRecord,
    _DirEntry,
    _FileEntry,
    current_job_id,
)
from dtsbridge.engine.beneath import (
    RESERVED_PREFIX,
    _btime_ns,
    _openat2,
    check_not_reserved,
    ensure_dir,
    normalize_relpath,
    open_beneath,
    resolve_source,
    valid_username,
)
from dtsbridge.engine.manifest import (
    ETAG,
    ETAG_MAX_CANDIDATES,
    MANIFEST_CHUNK,
    MANIFEST_MAX_BYTES,
    MANIFEST_NAME,
    _ETagCheck,
    _read_manifest,
    _walk_manifest,
    etag_part_sizes,
    read_manifest_username,
)
from dtsbridge.engine.scanner import scan
from dtsbridge.engine.copyfile import FICLONE, MODE_MASK
from dtsbridge.engine.journal import CHECKPOINT_BYTES, JOURNAL_NAME, _hash_fd, _Journal, _read_journal
from dtsbridge.engine.workers import CopyExecutor, WorkerPool
from dtsbridge.engine.remove import _temp_name, cleanup_temp, find_published, remove_source, temp_exists
from dtsbridge.engine.tree import _make_temp, _temp_record, copy_tree

__all__ = [
    "CHECKSUMS",
    "CHUNK",
    "CopyExecutor",
    "CopyOptions",
    "Faults",
    "MANIFEST_MAX_BYTES",
    "Manifest",
    "Plan",
    "Result",
    "STARTUP_FAULTS",
    "Source",
    "TempRecord",
    "TransferError",
    "WorkerPool",
    "check_not_reserved",
    "cleanup_temp",
    "copy_tree",
    "current_job_id",
    "ensure_dir",
    "etag_part_sizes",
    "find_published",
    "normalize_relpath",
    "open_beneath",
    "read_manifest_username",
    "remove_source",
    "resolve_source",
    "scan",
    "temp_exists",
    "valid_username",
]
