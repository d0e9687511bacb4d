"""A short soak (bench/soak.py): a few hundred jobs through one real twistd leave no descriptors or keys behind.

Half the jobs come through ``POST /complete_transfer``, half through the
watcher (``[watch] enabled``); retention is a few seconds, so once every job
has ended and been forgotten, the service's open descriptors and the private
Redis's keys must be back where they were after the warm-up (one leaked
descriptor or key per job would show as hundreds).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("dtsbridge_bench_soak",
                                               Path(__file__).resolve().parent.parent / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


@pytest.mark.timeout(300)
def test_a_few_hundred_jobs_leave_descriptors_and_redis_keys_flat(tmp_path: Path) -> None:
    s = soak.Soak(tmp_path, jobs=300, retention_s=4, clients=4, round_size=50)
    try:
        s.start()
        r = s.run(report=False)
    finally:
        s.stop()
    start, middle, end, run = r["start"], r["middle"], r["end"], r["run"]
    assert s.failures == []
    assert run["success"] == run["jobs"] == 300
    # Descriptors: the same at the middle and the end as after the warm-up (a little slack
    # for a connection or a worker pipe that happens to be open at one moment).
    assert middle["fds"] - start["fds"] <= 4, r
    assert end["fds"] - start["fds"] <= 4, r
    # Redis: every job, folder key and watcher mark forgotten after retention.
    assert end["redis_keys"] <= start["redis_keys"] + 5, r
    assert end["redis_keys"] < 20, r
    # Memory: no growth in proportion to the jobs (generous: allocator noise on a busy machine).
    assert end["rss_mib"] - start["rss_mib"] < 25, r
    assert end["redis_used_mib"] - start["redis_used_mib"] < 1, r
