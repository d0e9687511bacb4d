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

from tests.harness import DTS_TOKEN, DtsBridge, leftovers, make_tree, tree_of, wait_until
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


# -- 14: reserved names; cleanups by inode, never by name -----------------------------


def snapshot_tree(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mode, p.read_bytes() if p.is_file() else None)
    return out


def test_reserved_transfer_folder_name_is_400_and_changes_nothing(services: Any) -> None:
    """A DTS folder named like a job's temporary folder: 400 (relative, absolute, stager), nothing changes.

    Before: 201, published as ``/alice/.dtsbridge-<job>-1.tmp``, where job <job>'s
    cleanup later took it for its own temporary folder and removed it.
    """
    svc = services()
    name = ".dtsbridge-0b6c7b3e-8f9e-4c51-9d1e-2f3a4b5c6d7e-1.tmp"
    make_tree(svc.dts_root / name, {"data.txt": b"payload\n"})
    make_tree(svc.dts_root / "nested" / ".dtsbridge-x", {"data.txt": b"payload\n"})
    make_tree(svc.dts_root / "staged", {"ok.txt": b"ok\n", ".dtsbridge-y": {"in.txt": b"in\n"}})
    before_dts, before_users = snapshot_tree(svc.dts_root), snapshot_tree(svc.user_root)
    for sub in (name, str(svc.dts_root / name), "nested/.dtsbridge-x", f"{name}/"):
        r = svc.complete("alice", sub)
        assert r.status == 400, (sub, r)
        assert "reserved" in r.json()["error"]["message"], r
        r = svc.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "alice", "subdirectory": sub})
        assert r.status == 400, (sub, r)
    # A stager's path naming such a folder (inside the submitted one): 400 and the code stays usable.
    r = svc.call("POST", "/submitTransfer", token=DTS_TOKEN, json_body={"target_user": "alice", "subdirectory": "staged"})
    assert r.status == 202, r
    job_id, code = r.json()["job_id"], r.json()["authcode"]
    r = svc.call("POST", "/doneStaging", json_body={"job_id": job_id, "authcode": code, "success": True,
                                                    "path": "staged/.dtsbridge-y"})
    assert r.status == 400 and "reserved" in r.json()["error"]["message"], r
    assert snapshot_tree(svc.dts_root) == before_dts
    assert snapshot_tree(svc.user_root) == before_users
    r = svc.call("POST", "/doneStaging", json_body={"job_id": job_id, "authcode": code, "success": True})
    assert r.status == 200, r
    assert svc.wait_status(job_id, {"SUCCESS", "ERROR"})["status"] == "SUCCESS"
    assert sorted(os.listdir(svc.user_root / "alice")) == ["staged"]


def plant(folder: Path, content: bytes = b"the user's own files\n") -> Path:
    make_tree(folder, {"precious.txt": content, "sub": {"more.txt": content}})
    return folder


@pytest.mark.timeout(180)
def test_folders_named_like_a_jobs_temp_survive_its_cleanup_and_recovery(services: Any) -> None:
    """While job J copies, the user plants folders named like J's temporary folders, and swaps J's own
    temporary folder for a folder of theirs.  J's process is killed; the restarted service recovers J
    (removing J's dead attempt's folder) and finishes it.  Every folder of the user survives.

    Before: the recovery removed every ``.dtsbridge-J-*.tmp`` by name, the user's files with them.
    """
    from tests.test_faults import FAULT, payload, submit_async, temp_folders, wait_log
    svc = services({"copy": {"lease_seconds": "90"}}, env={FAULT: "copy:300"})
    tree = tree_of(make_tree(svc.dts_root / "run1", payload(1)))
    job_id = submit_async(svc, "run1")
    wait_log(svc, "fault point copy reached")
    [ours] = temp_folders(svc, job_id)
    alice = svc.user_root / "alice"
    planted = [plant(alice / f".dtsbridge-{job_id}-{a}.tmp") for a in ("1", "deadbeef00000000", "x_y")]
    svc.kill()
    # After the crash, the user also puts the dead attempt's folder aside and one of theirs at its name.
    os.rename(alice / ours, alice / "put-aside")
    planted.append(plant(alice / ours, b"swapped in\n"))
    before = {p.name: tree_of(p) for p in planted}

    svc.extra_env = {}
    svc.start()
    job = svc.wait_status(job_id, {"SUCCESS", "ERROR"}, timeout=90)
    assert job["status"] == "SUCCESS", job
    assert tree_of(alice / "run1") == tree
    assert {p.name: tree_of(p) for p in planted} == before, "a folder of the user was removed"

    # Now without the swap: the dead attempt's own folder is found by its inode and removed.
    svc.extra_env = {FAULT: "copy:300"}
    svc.stop()
    since = len(svc.log_text())
    svc.start()
    tree2 = tree_of(make_tree(svc.dts_root / "run2", payload(2)))
    job2 = submit_async(svc, "run2")
    wait_log(svc, "fault point copy reached", since=since)
    [ours2] = temp_folders(svc, job2)
    look_alike = plant(alice / f".dtsbridge-{job2}-0.tmp")
    svc.kill()
    svc.extra_env = {}
    svc.start()
    assert svc.wait_status(job2, {"SUCCESS", "ERROR"}, timeout=90)["status"] == "SUCCESS"
    assert tree_of(alice / "run2") == tree2
    assert not (alice / ours2).exists(), "the dead attempt's temporary folder was left behind"
    assert tree_of(look_alike) == {"precious.txt": b"the user's own files\n", "sub/more.txt": b"the user's own files\n"}
    assert sorted(n for n in os.listdir(alice) if n.startswith(".dtsbridge-")) == sorted(
        [p.name for p in planted] + [look_alike.name])


def test_user_root_inside_dts_root_stops_startup_naming_the_keys(services: Any, tmp_path: Path) -> None:
    """Overlapping roots would let a DTS token copy bob's datastore to alice (subdirectory=users/bob)."""
    area = tmp_path / "area"
    (area / "users" / "alice").mkdir(parents=True)
    (area / "users" / "bob").mkdir(parents=True)
    b = services(start=False)
    b.settings["paths"]["dts_root"] = os.path.relpath(area, b.etc)
    b.settings["paths"]["user_root"] = os.path.relpath(area / "users", b.etc)
    (area / "users" / "bob" / "private.txt").write_text("bob's")
    b.start(wait=False)
    assert b.proc is not None
    b.proc.wait(30)
    assert b.proc.returncode != 0, b.log_tail()
    lines = [ln for ln in b.log_text().splitlines() if "[paths] dts_root, user_root:" in ln]
    assert len(lines) == 1 and "is inside dts_root" in lines[0], b.log_tail()
    assert "Traceback" not in b.log_text(), b.log_tail()
    assert sorted(os.listdir(area / "users" / "alice")) == []
