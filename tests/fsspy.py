"""A tiny inotify spy for tests: proves nothing opened, read or changed a folder.

``with FsSpy(folder) as spy: ...; assert spy.events() == []`` watches the
folder and every folder below it (inotify is not recursive) for opens,
reads, writes, creations, attribute changes, deletions and moves.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

IN_ACCESS = 0x001
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_OPEN = 0x020
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (IN_OPEN | IN_ACCESS | IN_MODIFY | IN_CREATE | IN_ATTRIB | IN_CLOSE_WRITE
        | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO)

_NAMES = {IN_ACCESS: "ACCESS", IN_MODIFY: "MODIFY", IN_ATTRIB: "ATTRIB", IN_CLOSE_WRITE: "CLOSE_WRITE",
          IN_OPEN: "OPEN", IN_MOVED_FROM: "MOVED_FROM", IN_MOVED_TO: "MOVED_TO", IN_CREATE: "CREATE",
          IN_DELETE: "DELETE"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_HDR = struct.Struct("iIII")


class FsSpy:
    """Watch ``root`` (recursively, as it is when started) with inotify."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fd = -1
        self.wds: dict[int, str] = {}

    def __enter__(self) -> "FsSpy":
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        dirs = [dirpath for dirpath, _, _ in os.walk(self.root)]  # os.walk does not follow links
        for dirpath in dirs:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(dirpath), MASK)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", dirpath)
            self.wds[wd] = dirpath
        self.events()  # nothing should be queued yet; start clean
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def events(self) -> list[tuple[str, str, str]]:
        """Drain pending events as ``(folder, name, "OPEN|ACCESS…")``."""
        out: list[tuple[str, str, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return out
                raise
            off = 0
            while off < len(data):
                wd, mask, _cookie, length = _HDR.unpack_from(data, off)
                name = data[off + _HDR.size: off + _HDR.size + length].rstrip(b"\0").decode(errors="replace")
                off += _HDR.size + length
                kinds = "|".join(v for k, v in _NAMES.items() if mask & k)
                if kinds:
                    out.append((self.wds.get(wd, "?"), name, kinds))


def snapshot(root: str) -> dict[str, tuple]:
    """Every entry below ``root`` (not following links) with type, mode, owner and content."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    out[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, f.read())
            else:
                out[rel] = ("other", st.st_mode, st.st_uid, st.st_gid)
    return out
