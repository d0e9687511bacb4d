"""Reading ``manifest.json``: bounded, streamed, parse-bomb safe; its hashes (S3 multipart ETags included)."""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dtsbridge.errors import (BAD_REQUEST, MANIFEST_MISMATCH, SOURCE_CHANGED, SOURCE_NOT_FOUND, UNSAFE_ENTRY,
                              TransferError)
from dtsbridge.engine.data import Manifest, _FileEntry
from dtsbridge.engine.beneath import (_SRC_FLAGS, _as_transfer_error, _fd, _open_root, _open_source_dir,
                                      normalize_relpath, open_beneath)

log = logging.getLogger(__name__)
_V = TypeVar("_V")

MANIFEST_NAME = "manifest.json"
MANIFEST_MAX_BYTES = 64 * 1024 * 1024
MANIFEST_CHUNK = 1024 * 1024

_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_MANIFEST_ALGOS = frozenset(
    {
        "md5", "sha1", "sha224", "sha256", "sha384", "sha512",
        "sha3_224", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s",
    }
)

def _bad_manifest(msg: str) -> TransferError:
    return TransferError(MANIFEST_MISMATCH, f"manifest.json: {msg}")


#: The pseudo-algorithm of an S3 multipart ETag (``<32 hex>-<parts>``) in :attr:`Manifest.hashes`.
ETAG = "s3etag"
_ETAG_RE = re.compile(r"([0-9a-f]{32})-([1-9][0-9]{0,4})")
#: The most parts an S3 multipart upload may have.
ETAG_MAX_PARTS = 10_000
MiB = 1024 * 1024
#: Part sizes in common use, in the order they are tried: 8 MiB (AWS CLI and boto3's
#: default) first, then other tools' defaults, then boto3's doublings of 8 MiB (what it
#: switches to when a file would need more than 10,000 parts).
ETAG_COMMON_PART_MIB = (8, 5, 15, 16, 64, 100, 32, 128, 256, 512, 1024, 2048, 4096)
#: At most this many part sizes are tried for one ETag (each costs one md5 state in the read pass).
ETAG_MAX_CANDIDATES = 12


def etag_part_sizes(size: int, parts: int) -> list[int]:
    """Part sizes (bytes) an S3 upload of ``size`` bytes in ``parts`` parts may have used, likeliest first.

    The sizes in common use that give exactly ``parts`` parts, then the whole-MiB sizes
    that do (smallest first: a tool splitting a file evenly rounds up); a size the
    part count rules out is never tried.  At most :data:`ETAG_MAX_CANDIDATES`.
    """
    if parts < 1 or parts > ETAG_MAX_PARTS or size < 0:
        return []
    if parts == 1:  # every part size >= size gives the same ETag: md5 of the file's md5
        return [max(size, 1)]
    if size < parts:  # not enough bytes for that many non-empty parts
        return []

    def fits(ps: int) -> bool:
        return ps > 0 and -(-size // ps) == parts

    out: list[int] = []
    for mib in ETAG_COMMON_PART_MIB:
        if fits(mib * MiB):
            out.append(mib * MiB)
    # ceil(size / ps) == parts  <=>  size/parts <= ps <= (size-1)/(parts-1)
    lo = -(-(-(-size // parts)) // MiB)
    hi = (size - 1) // (parts - 1) // MiB
    m = max(lo, 1)
    while m <= hi and len(out) < ETAG_MAX_CANDIDATES:
        if m * MiB not in out and fits(m * MiB):
            out.append(m * MiB)
        m += 1
    return out[:ETAG_MAX_CANDIDATES]


class _ETagCheck:
    """Checks an S3 multipart ETag in the copy's single read pass.

    One md5 state per candidate part size (see :func:`etag_part_sizes`): it hashes
    the part being read, and at each part boundary its 16-byte digest is kept and
    the state starts again.  At the end, the md5 of the kept digests, ``-<parts>``,
    is compared with the manifest's; any candidate matching verifies the file.
    """

    __slots__ = ("want", "parts", "cands")

    def __init__(self, etag: str, size: int) -> None:
        hexd, _, n = etag.partition("-")
        self.want = hexd
        self.parts = int(n)
        self.cands = [_PartSize(ps) for ps in etag_part_sizes(size, self.parts)]

    def update(self, chunk: memoryview) -> None:
        n = len(chunk)
        for c in self.cands:
            ps, filled, h = c.size, c.filled, c.md5
            off = 0
            while off < n:
                take = min(n - off, ps - filled)
                h.update(chunk[off:off + take] if take != n else chunk)
                filled += take
                off += take
                if filled == ps:
                    c.digests += h.digest()
                    h = c.md5 = hashlib.md5()
                    filled = 0
            c.filled = filled

    def matches(self) -> bool:
        for c in self.cands:
            digests = c.digests
            if c.filled or not digests:
                digests = digests + c.md5.digest()
            if len(digests) // 16 == self.parts and hashlib.md5(digests).hexdigest() == self.want:
                return True
        return False


class _PartSize:
    """One candidate part size of an :class:`_ETagCheck`: the part being hashed and the digests so far."""

    __slots__ = ("size", "filled", "md5", "digests")

    def __init__(self, size: int) -> None:
        self.size = size
        #: bytes of the current part hashed so far
        self.filled = 0
        self.md5 = hashlib.md5()
        self.digests = bytearray()


def _parse_hash(value: Any, path: str) -> tuple[str, str] | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad_manifest(f"hash of {path!r} is not a string")
    if ":" in value:
        algo, hexd = value.split(":", 1)
        algo = algo.strip().lower().replace("-", "")
        algo = {"sha3224": "sha3_224", "sha3256": "sha3_256", "sha3384": "sha3_384", "sha3512": "sha3_512"}.get(algo, algo)
    else:
        algo, hexd = "md5", value
        etag = _ETAG_RE.fullmatch(value.strip().lower())
        if etag is not None:
            if int(etag.group(2)) > ETAG_MAX_PARTS:
                raise _bad_manifest(f"hash of {path!r} is an S3 ETag of more than {ETAG_MAX_PARTS} parts")
            return ETAG, etag.group(0)
    hexd = hexd.strip().lower()
    if algo not in _MANIFEST_ALGOS:
        raise _bad_manifest(f"unknown hash algorithm {algo!r} for {path!r}")
    if not _HEX_RE.fullmatch(hexd) or len(hexd) != _hex_length(algo):
        raise _bad_manifest(f"hash of {path!r} is not a valid {algo} digest")
    return algo, hexd


@functools.cache
def _hex_length(algo: str) -> int:
    """Hex digits in a digest of ``algo`` (asked of hashlib once per algorithm, not per resource)."""
    return 2 * hashlib.new(algo).digest_size


def _open_manifest(dirfd: int, ino: int | None = None) -> int:
    """Open ``manifest.json`` in ``dirfd``: a regular file with one link (the scan's inode when given)."""
    try:
        fd = open_beneath(dirfd, MANIFEST_NAME, _SRC_FLAGS)
    except OSError as exc:
        raise TransferError(SOURCE_CHANGED, f"manifest.json cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (ino is not None and st.st_ino != ino) or st.st_nlink > 1:
            raise TransferError(SOURCE_CHANGED if ino is not None else UNSAFE_ENTRY,
                                "manifest.json changed during the scan" if ino is not None
                                else "manifest.json is not a regular file with one link")
        if st.st_size > MANIFEST_MAX_BYTES:
            raise _bad_manifest(f"larger than {MANIFEST_MAX_BYTES} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _manifest_text(fd: int) -> Iterator[str]:
    """The manifest's text, decoded :data:`MANIFEST_CHUNK` bytes at a time.

    Stops with ``manifest_mismatch`` past :data:`MANIFEST_MAX_BYTES` read (whatever
    the size said), at bytes that are not UTF-8, and as soon as what was read is a
    parse bomb: ``[[],[],…`` costs ~30x its size as Python objects, while a real
    manifest has an object or two per resource of a few hundred bytes, so more than
    one ``[`` or ``{`` per 16 bytes (beyond 10,000) is refused before it is parsed.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = containers = 0
    while True:
        b = os.read(fd, min(MANIFEST_CHUNK, MANIFEST_MAX_BYTES + 1 - size))
        if not b:
            break
        size += len(b)
        if size > MANIFEST_MAX_BYTES:
            raise _bad_manifest(f"larger than {MANIFEST_MAX_BYTES} bytes")
        containers += b.count(b"[") + b.count(b"{")
        if containers > size // 16 + 10_000:
            raise _bad_manifest(f"holds {containers} JSON objects and lists in its first {size} bytes; "
                                "not a manifest")
        try:
            yield decoder.decode(b)
        except UnicodeDecodeError as exc:
            raise _bad_manifest(f"not valid JSON (not UTF-8 near byte {size - len(b) + exc.start})") from None
    try:
        yield decoder.decode(b"", True)
    except UnicodeDecodeError:
        raise _bad_manifest("not valid JSON (it ends inside a UTF-8 character)") from None


class _Window:
    """A window on text arriving in chunks, for a JSON parse that holds only what it still needs.

    ``s`` is the text from some point on; :meth:`more` appends chunks (at least
    doubling what lies after ``i``, so re-parsing a value that did not fit costs
    O(n) in all); :meth:`drop` forgets what was parsed.
    """

    __slots__ = ("s", "chunks", "done")

    def __init__(self, chunks: Iterator[str]) -> None:
        self.s = ""
        self.chunks = chunks
        self.done = False

    def more(self, i: int) -> bool:
        if self.done:
            return False
        want = max(len(self.s) - i, MANIFEST_CHUNK)
        got = []
        n = 0
        for c in self.chunks:
            got.append(c)
            n += len(c)
            if n >= want:
                break
        else:
            self.done = True
        if got:
            self.s = self.s[i:] + "".join(got) if i else self.s + "".join(got)
        return bool(got) or not self.done

    def drop(self, i: int) -> int:
        """Forget the text before ``i``; returns ``i``'s new index (0)."""
        if i:
            self.s = self.s[i:]
        return 0

    def ws(self, i: int) -> int:
        """Index of the next non-blank character (``len(s)`` at the end of the text)."""
        while True:
            m = _WS.match(self.s, i)  # always matches (maybe nothing)
            i = m.end() if m else i
            if i < len(self.s) or self.done:
                return i
            i = self.drop(i)
            self.more(0)

    def value(self, i: int, scan: Callable[[str, int], tuple[_V, int]]) -> tuple[_V, int]:
        """``scan(s, i)`` (a JSON value, or a string after its quote), fetching text until it fits."""
        while True:
            try:
                v, end = scan(self.s, i)
                # A value reaching the end of the window may go on (a number cut in two).
                if end < len(self.s) or self.done:
                    return v, end
            except ValueError:
                if self.done:
                    raise
            i = self.drop(i)
            self.more(0)

    def separator(self, i: int) -> tuple[str, int]:
        """The character after a value at ``i`` (past blanks: ``,`` or a closing bracket), and the index
        of what follows it (past blanks)."""
        i = self.ws(i)
        return self.s[i:i + 1], self.ws(i + 1)

    def member(self, i: int, where: str = "") -> tuple[str, int]:
        """The member name whose quote is at ``i``, and the index of its value (past the ``:``)."""
        if self.s[i:i + 1] != '"':
            raise ValueError(f"expected a member name{where}")
        key, i = self.value(i + 1, _scanstring)
        i = self.ws(i)
        if self.s[i:i + 1] != ":":
            raise ValueError(f"expected ':' after {key!r}")
        return key, self.ws(i + 1)


#: The json module's reader of a string's text after its opening quote (not in its type stubs).
_scanstring: Callable[[str, int], tuple[str, int]] = getattr(json.decoder, "scanstring")
_JSON = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")

#: Containers outside ``resources`` nested deeper than this: refused (as json's own recursion limit would).
SKIP_MAX_DEPTH = 500
_STR = r'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"'
_SCALAR = rf'(?:{_STR}|-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?|true|false|null)'
_W = r'[ \t\n\r]*+'
#: Runs of ``scalar,`` (in a list) and ``"name": scalar,`` (in an object) skipped in one regex step:
#: a member of millions of small values costs no Python-level step per value.
_LIST_RUN = re.compile(rf'(?:{_W}{_SCALAR}{_W},)++')
_OBJ_RUN = re.compile(rf'(?:{_W}{_STR}{_W}:{_W}{_SCALAR}{_W},)++')


_TOKEN = re.compile(r'[^,\]} \t\n\r]*+')


def _scalar(w: _Window, i: int) -> tuple[Any, int]:
    """The string, number or literal at ``i``, its text wholly in the window first (``1.5e3`` cut
    after ``1.`` must not read as ``1``)."""
    while not w.done and (m := _TOKEN.match(w.s, i)) is not None and m.end() == len(w.s):
        i = w.drop(i)
        w.more(0)
    return w.value(i, _JSON.raw_decode)


def _skip_key(w: _Window, i: int) -> int:
    return w.member(w.ws(i))[1]


def _skip_value(w: _Window, i: int) -> int:
    """Read past the JSON value at ``i`` without building it (checked as strictly as ``json`` would);
    returns the index after it.  What it skips is forgotten as it goes: its cost in memory is the window's."""
    stack: list[str] = []
    while True:
        # a value is expected at i
        i = w.ws(i)
        c = w.s[i:i + 1]
        if c == "{" or c == "[":
            i = w.ws(i + 1)
            if w.s[i:i + 1] == ("}" if c == "{" else "]"):
                i += 1
            else:
                stack.append(c)
                if len(stack) > SKIP_MAX_DEPTH:
                    raise _bad_manifest("nested too deeply")
                if c == "{":
                    i = _skip_key(w, i)
                continue
        elif c == '"':
            _, i = w.value(i + 1, _scanstring)
        else:
            _, i = _scalar(w, i)
        # after a value: ',' (then the next one) or the end of containers
        while stack:
            i = w.ws(i)
            c = w.s[i:i + 1]
            if c == ",":
                i += 1
                run = (_OBJ_RUN if stack[-1] == "{" else _LIST_RUN).match(w.s, i)
                if run is not None:
                    i = run.end()  # a run of small values, each ending with its ',' in the window's text
                if stack[-1] == "{":
                    i = _skip_key(w, i)
                break
            if c == ("}" if stack[-1] == "{" else "]"):
                stack.pop()
                i += 1
                continue
            raise ValueError("expected ',' or the end of a list or object")
        if not stack:
            return i


#: The members of a resource that are read; any other (``credit``, ``format``, …) is skipped unbuilt.
_RESOURCE_KEYS = ("path", "bytes", "hash")


#: A resource whose text ends within this many characters of its start is decoded whole by
#: json's C decoder, first from an 8 KiB slice, then from one this long (a DTS resource with
#: its credit metadata is ~2 KB): ~7x faster than the streaming reader, and what it builds
#: is bounded by the slice.  A longer resource, or any error, goes to the streaming reader,
#: which alone decides what is refused and why.
RESOURCE_FAST_CHARS = 64 * 1024


def _decode_small(w: _Window, i: int) -> tuple[dict[str, Any] | None, int]:
    """The object resource at ``i`` as :func:`_read_resource` reads it, and the index after it,
    when its text fits a slice; else None and ``i`` (moved if the window moved)."""
    while not w.done and len(w.s) - i < RESOURCE_FAST_CHARS:
        i = w.drop(i)
        w.more(0)
    for n in (8192, RESOURCE_FAST_CHARS):
        try:
            obj, end = _JSON.raw_decode(w.s[i:i + n])
        except (ValueError, RecursionError):
            if i + n >= len(w.s):
                break
            continue
        # json allows deeper nesting than the streaming reader (SKIP_MAX_DEPTH): let that reader
        # judge any resource that opens more containers than that (strings included: conservative).
        if isinstance(obj, dict) and w.s.count("[", i, i + end) + w.s.count("{", i, i + end) <= SKIP_MAX_DEPTH:
            return {k: [] if isinstance(v, (list, dict)) else v
                    for k, v in obj.items() if k in _RESOURCE_KEYS}, i + end
        break
    return None, i


def _read_resource(w: _Window, i: int) -> tuple[Any, int]:
    """The resource at ``i`` with only its ``path``, ``bytes`` and ``hash`` (a list or object given
    for one of them reads as ``[]``, which the checks refuse); a resource that is no object, as
    read (a list as ``[]``, skipped)."""
    c = w.s[i:i + 1]
    if c == "{":
        fast, i = _decode_small(w, i)
        if fast is not None:
            return fast, i
    if c == "[":
        return [], _skip_value(w, i)
    if c != "{":
        return _scalar(w, i)
    res: dict[str, Any] = {}
    i = w.ws(i + 1)
    if w.s[i:i + 1] == "}":
        return res, i + 1
    while True:
        key, i = w.member(i, " in a resource")
        if w.s[i:i + 1] in ("[", "{"):
            i = _skip_value(w, i)
            if key in _RESOURCE_KEYS:
                res[key] = []
        elif key in _RESOURCE_KEYS:
            res[key], i = _scalar(w, i)
        else:
            i = _skip_value(w, i)
        i = w.ws(i)
        c = w.s[i:i + 1]
        if c == "}":
            return res, i + 1
        if c != ",":
            raise ValueError(f"expected ',' or '}}' after {key!r} in a resource")
        i = w.ws(i + 1)


def _walk_manifest(chunks: Iterator[str], on_resource: Callable[[int, Any], None]) -> dict[str, Any] | None:
    """Parse a manifest's top-level object as its text arrives, handing each element of ``resources``
    to ``on_resource`` as soon as it is read; None for an empty (0-byte) manifest.

    Streaming: the text is read a chunk at a time and forgotten once parsed, and
    resources are decoded one at a time (``raw_decode``) and dropped once handled,
    so the cost in memory is a chunk and one resource, not the document (whose
    Python objects would take ~5-10x its size); and the parse is many short steps,
    never one long call that holds the GIL.  Returns the other top-level members,
    and ``resources`` as the number of resources.  Bad JSON, nesting too deep, no
    object, no ``resources`` list: ``manifest_mismatch``.
    """
    w = _Window(chunks)
    decode = _JSON.raw_decode
    out: dict[str, Any] = {}
    count = None
    try:
        w.more(0)
        if w.done and not w.s:
            return None
        i = w.ws(0)
        if w.s[i:i + 1] != "{":
            w.value(i, decode)  # tells bad JSON (or nesting too deep) from JSON that is no object
            raise _bad_manifest("not a JSON object")
        i = w.ws(i + 1)
        if w.s[i:i + 1] == "}":
            i += 1
        else:
            while True:
                i = w.drop(i)
                key, i = w.member(i)
                if key == "resources" and w.s[i:i + 1] == "[":
                    if count is not None:
                        raise _bad_manifest("'resources' is given twice")
                    count = 0
                    i = w.ws(i + 1)
                    if w.s[i:i + 1] == "]":
                        i += 1
                    else:
                        while True:
                            if i > MANIFEST_CHUNK:
                                i = w.drop(i)
                            res, i = _read_resource(w, i)
                            on_resource(count, res)
                            count += 1
                            c, i = w.separator(i)
                            if c == "]":
                                break
                            if c != ",":
                                raise ValueError(f"expected ',' or ']' after resource #{count - 1}")
                    out[key] = count
                elif key == "resources":
                    raise _bad_manifest("'resources' is missing or not a list")
                elif w.s[i:i + 1] in ("[", "{"):
                    i = _skip_value(w, i)  # read past, never built (``username`` is a string)
                    out[key] = None
                else:
                    out[key], i = _scalar(w, i)
                c, i = w.separator(i)
                if c == "}":
                    break
                if c != ",":
                    raise ValueError(f"expected ',' or '}}' after {key!r}")
        if w.ws(i) != len(w.s):
            raise ValueError("extra data after the object")
    except RecursionError:  # "[[[[…" nested past the interpreter's limit: not a manifest
        raise _bad_manifest("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a number too long to convert, …
        raise _bad_manifest(f"not valid JSON ({exc})") from None
    if count is None:
        raise _bad_manifest("'resources' is missing or not a list")
    return out


def _read_manifest(srcfd: int, files: dict[str, _FileEntry]) -> Manifest | None:
    entry = files.get(MANIFEST_NAME)
    if entry is None:
        return None
    if entry.size > MANIFEST_MAX_BYTES:
        raise _bad_manifest(f"larger than {MANIFEST_MAX_BYTES} bytes")
    hashes: dict[str, Any] = {}
    seen: dict[str, tuple[Any, tuple[str, str] | None]] = {}
    size_only = 0

    def on_resource(i: int, res: Any) -> None:
        nonlocal size_only
        if not isinstance(res, dict):
            raise _bad_manifest(f"resource #{i} is not an object")
        raw = res.get("path")
        if not isinstance(raw, str) or not raw:
            raise _bad_manifest(f"resource #{i} has no path")
        try:
            path = normalize_relpath(raw)
        except TransferError as exc:
            raise _bad_manifest(f"resource path {raw!r} is outside the folder ({exc.message})") from None
        if not path:
            raise _bad_manifest(f"resource path {raw!r} names the folder itself")
        f = files.get(path)
        if f is None:
            raise _bad_manifest(f"resource {raw!r} is missing from the folder (or is not a regular file)")
        nbytes = res.get("bytes")
        if nbytes is not None:
            if isinstance(nbytes, bool) or not isinstance(nbytes, int):
                raise _bad_manifest(f"bytes of {raw!r} is not an integer")
            if nbytes != f.size:
                raise _bad_manifest(f"resource {raw!r} has {f.size} bytes, the manifest says {nbytes}")
        h = _parse_hash(res.get("hash"), raw)
        # A path listed again is checked once if the entry is the same, else refused at once.
        listed = (nbytes, h)
        earlier = seen.get(f.rel)
        if earlier is not None:
            if earlier != listed:
                raise _bad_manifest(f"resource {raw!r} is listed more than once, with different bytes or hash")
            return
        seen[f.rel] = listed  # keyed by the scan's own string: no second copy of each path
        if h is None:
            size_only += 1
            return
        hashes[f.rel] = (h,)

    with _fd(_open_manifest(srcfd, entry.ino)) as fd:
        doc = _walk_manifest(_manifest_text(fd), on_resource)
    if doc is None:  # 0 bytes: a transfer with no resources
        return Manifest(resources=0, size_only=0, hashes={})
    return Manifest(resources=doc["resources"], size_only=size_only, hashes=hashes)


def read_manifest_username(dts_root: str, rel: str) -> str | None:
    """The ``username`` that the ``manifest.json`` of folder ``rel`` (below dts_root) names, or None.

    The same reader as the copy's (size bound, parse-bomb and nesting guards,
    streaming parse), without checking the resources against the folder (the job
    does).  A 0-byte manifest names nobody.  A manifest that cannot be parsed
    raises :class:`TransferError` (``manifest_mismatch``); a folder or manifest
    that cannot be opened safely raises it with the opening's reason.
    """
    rel = normalize_relpath(rel)
    if not rel:
        raise TransferError(BAD_REQUEST, "the folder names the DTS area itself")
    try:
        with _fd(_open_root(dts_root, SOURCE_NOT_FOUND, "DTS area")) as rootfd:
            with _fd(_open_source_dir(rootfd, rel)) as dirfd:
                with _fd(_open_manifest(dirfd)) as fd:
                    doc = _walk_manifest(_manifest_text(fd), lambda i, res: None)
    except OSError as exc:
        raise _as_transfer_error(exc, "reading manifest.json failed") from None
    if doc is None:
        return None
    user = doc.get("username")
    return user if isinstance(user, str) and user else None


