"""``[paths] delete_source``: only what was copied is removed (end to end, real twistd).

A file that lands in the DTS folder during the copy, or a folder that replaced the
copied one under its name, was never copied: it stays where it is, and the job says
the source was kept partially. The fault hook ``verify`` widens the window.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness import DtsBridge, leftovers, make_tree, tree_of
from tests.redis_fixture import RedisProcess

pytestmark = pytest.mark.timeout(120)


def test_delete_source_keeps_what_was_not_copied(tmp_path: Path, redis_proc: RedisProcess) -> None:
    s = DtsBridge(tmp_path / "svc", redis_proc.url, settings={"paths": {"delete_source": "true"}})
    s.extra_env["DTSBRIDGE_FAULT_PAUSE"] = "verify:2"
    s.start()
    try:
        make_tree(s.dts_root / "t", {"a": b"old", "sub": {"b": b"copied"}})
        make_tree(s.dts_root / "u", {"a": b"old"})
        make_tree(s.dts_root / "w", {"a": b"plain", "sub": {"b": b"x"}})
        jobs = {k: s.complete("alice", k, asynchronous=True) for k in "tu"}
        for k, r in jobs.items():
            assert r.status == 202, r
        deadline = time.monotonic() + 60
        while s.log_text().count("fault point verify reached") < 2:
            assert time.monotonic() < deadline, s.log_tail()
            time.sleep(0.05)
        # both jobs scanned and are copying: (a) a late file, (b) the folder replaced by a new one
        (s.dts_root / "t" / "late_file").write_bytes(b"arrived during the copy")
        (s.dts_root / "t" / "sub" / "late2").write_bytes(b"also late")
        os.rename(s.dts_root / "u", s.dts_root / "u-old")
        make_tree(s.dts_root / "u", {"new": b"new transfer"})
        st = {k: s.wait_status(r.json()["job_id"], {"SUCCESS", "ERROR"}, timeout=90) for k, r in jobs.items()}
        for k in "tu":
            assert st[k]["status"] == "SUCCESS", st[k]
            assert "kept" in st[k]["detailed_status"], st[k]
            assert st[k].get("source_deleted") is not True, st[k]
        # (a): the copied files are gone from the source, the late ones kept with their folders
        assert tree_of(s.user_root / "alice" / "t") == {"a": b"old", "sub/b": b"copied"}
        assert tree_of(s.dts_root / "t") == {"late_file": b"arrived during the copy", "sub/late2": b"also late"}
        # (b): the replacement folder is untouched; the copied one (renamed away) was not deleted by name
        assert tree_of(s.dts_root / "u") == {"new": b"new transfer"}
        assert tree_of(s.user_root / "alice" / "u") == {"a": b"old"}
        # an untouched folder still goes entirely
        r = s.complete("alice", "w")
        assert r.status == 201, r
        assert not (s.dts_root / "w").exists()
        assert s.status(r.json()["job_id"]).json().get("source_deleted") is True
        assert leftovers(s.user_root) == []
    finally:
        s.stop()
