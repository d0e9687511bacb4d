"""Loop-mounted filesystems for tests and the benchmark, and FIEMAP to see shared (cloned) extents.

``loop_xfs(dir, reflink=True)`` makes an image file, ``mkfs.xfs -m reflink=1``
on it and mounts it with ``-o loop`` (root only); leaving the context unmounts
it and removes the image.  ``shared_extents(path)`` reads the file's extent
map with the ``FS_IOC_FIEMAP`` ioctl and says how many bytes of it are in
extents flagged ``FIEMAP_EXTENT_SHARED`` (blocks shared with another file:
a clone).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQI12x")  # fe_logical, fe_physical, fe_length, reserved64[2], fe_flags, reserved[3]


def loop_xfs_unavailable() -> str | None:
    """Why a reflink XFS cannot be loop-mounted here (None when it can be tried)."""
    if os.geteuid() != 0:
        return "mounting a loop device needs root"
    if shutil.which("mkfs.xfs") is None:
        return "mkfs.xfs is not installed (apt-get install xfsprogs)"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop devices (/dev/loop-control)"
    return None


@contextmanager
def loop_xfs(where: Path, size: str = "1G", reflink: bool = True) -> Iterator[Path]:
    """Mount a fresh XFS (with or without reflink) at ``where/mnt``; unmounted and removed on exit."""
    where.mkdir(parents=True, exist_ok=True)
    img = where / "xfs.img"
    mnt = where / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", f"reflink={1 if reflink else 0}", str(img)], check=True,
                   capture_output=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        img.unlink()
        raise RuntimeError(f"mount -o loop {img} failed: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            subprocess.run(["sync"])
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        try:
            img.unlink()
        except OSError:
            pass


def extents(path: str | os.PathLike[str]) -> list[tuple[int, int, int]]:
    """The file's extents as ``(logical offset, length, flags)``, read with FS_IOC_FIEMAP."""
    out: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = 0
        count = 64
        while True:
            buf = bytearray(_FIEMAP_HEAD.size + count * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, count, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
            mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
            last = False
            for i in range(mapped):
                logical, _phys, length, _r1, _r2, flags = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
                out.append((logical, length, flags))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if mapped < count or last or mapped == 0:
                return out
    finally:
        os.close(fd)


def shared_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the file in extents that share their blocks with another file (FIEMAP_EXTENT_SHARED)."""
    return sum(length for _, length, flags in extents(path) if flags & FIEMAP_EXTENT_SHARED)


__all__ = ["FIEMAP_EXTENT_SHARED", "extents", "loop_xfs", "loop_xfs_unavailable", "shared_bytes"]
