"""After a job ends, no process of the service (twistd, its copy worker processes) holds a descriptor
on the job's folders: the user's volume can be unmounted while the service is idle (real twistd)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness import DtsBridge, make_tree
from tests.redis_fixture import RedisProcess

pytestmark = pytest.mark.timeout(120)


def _descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it (the forkserver's workers included)."""
    parents: dict[int, int] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parents[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    out = {pid}
    grew = True
    while grew:
        grew = False
        for p, pp in parents.items():
            if pp in out and p not in out:
                out.add(p)
                grew = True
    return out


def _held(pids: set[int], roots: tuple[Path, ...]) -> list[tuple[int, str]]:
    held = []
    for p in pids:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if any(target == str(r) or target.startswith(f"{r}/") for r in roots):
                held.append((p, target))
    return held


def test_no_descriptor_on_job_folders_after_the_job(tmp_path: Path, redis_proc: RedisProcess) -> None:
    s = DtsBridge(tmp_path / "svc", redis_proc.url, settings={"copy": {"processes": "2"}})
    s.start()
    try:
        roots = (s.dts_root, s.user_root)
        for name in ("t", "u"):  # small files: batches go to the worker processes
            make_tree(s.dts_root / name, {f"f{i}": os.urandom(100) for i in range(40)} | {"d": {"g": b"x"}})
            r = s.complete("alice", name)
            assert r.status == 201, r
        assert s.proc is not None
        pids = _descendants(s.proc.pid)
        assert len(pids) > 1, "no copy worker process started: this test would prove nothing"
        time.sleep(0.5)
        held = _held(_descendants(s.proc.pid), roots)
        assert held == [], f"descriptors still open on the jobs' folders after they ended: {held}"
    finally:
        s.stop()
