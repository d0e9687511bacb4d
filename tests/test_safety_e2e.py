"""End to end, against real ``twistd dtsbridge`` processes: issue 9 items 14-16.

- 14: names beginning with ``.dtsbridge-`` are reserved (400, nothing changes),
  and no cleanup removes a folder it did not make, even one named exactly like
  a job's temporary folder (checked by owner, device and inode, never by name);
- 15: a file bind-mounted into a DTS folder is refused (403 ``unsafe_entry``);
- 16: copies never get world-writable bits nor setuid/setgid/sticky.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DtsBridge, leftovers, make_tree, tree_of, wait_until
from tests.test_engine import bind_mount, umount

pytestmark = pytest.mark.timeout(150)


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.lstat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


# -- 16: modes --------------------------------------------------------------------


def test_published_modes_never_world_writable_nor_special(services: Any) -> None:
    """A 3777 transfer folder with a 0666 file and a 6755 program: 0775, 0664, 0755 in the datastore.

    Before: the folder came out 0777 (sticky dropped, world-writable kept), the file 0666.
    """
    svc = services()
    src = make_tree(svc.dts_root / "modes", {"ww.txt": b"anyone could write me\n", "prog": b"#!/bin/sh\n",
                                              "sub": {"f": b"f"}})
    os.chmod(src / "ww.txt", 0o666)
    os.chmod(src / "prog", 0o6755)
    os.chmod(src / "sub", 0o1777)
    os.chmod(src, 0o3777)
    r = svc.complete("alice", "modes")
    assert r.status == 201, r
    dst = svc.user_root / "alice" / "modes"
    assert modes(dst) == {".": 0o775, "ww.txt": 0o664, "prog": 0o755, "sub": 0o775, "sub/f": 0o644}
    assert tree_of(dst) == tree_of(src)


# -- 15: bind-mounted files -------------------------------------------------------------


def test_bind_mounted_file_in_the_transfer_is_403_unsafe_entry(services: Any, tmp_path: Path) -> None:
    """A file from outside the DTS area (same filesystem) bind-mounted into a transfer: 403, nothing published.

    Before: 201, and the outside file was delivered to the user.
    """
    svc = services()
    secret = tmp_path / "outside-secret.txt"
    secret.write_bytes(b"not for alice\n")
    src = make_tree(svc.dts_root / "bound", {"ok.txt": b"fine\n", "sub": {"looks_normal.txt": b""}})
    assert os.stat(secret).st_dev == os.stat(src).st_dev
    bind_mount(secret, src / "sub" / "looks_normal.txt")
    try:
        r = svc.complete("alice", "bound")
        assert r.status == 403, r
        assert "mount" in r.json()["error"]["message"], r
        r = svc.complete("alice", "bound", asynchronous=True)
        job = svc.wait_status(r.json()["job_id"], {"SUCCESS", "ERROR"})
    finally:
        umount(src / "sub" / "looks_normal.txt")
    assert (job["status"], job["reason"]) == ("ERROR", "unsafe_entry"), job
    assert os.listdir(svc.user_root / "alice") == []
    assert leftovers(svc.user_root) == []
