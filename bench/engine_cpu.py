#!/usr/bin/env python3
"""The copy engine alone, one job at a time: wall time and CPU seconds, for A/B work on the engine.

``bench/bench.py`` times the service end to end against rsync; this times
``copy_tree`` itself (no twistd, no Redis, no HTTP) on the same kind of data,
and says where the CPU went: the job's own process (scan, manifest, handing
out batches, journal) and the whole machine (worker processes and the
kernel's writeback included, read from ``/proc/stat``).  On two cores a
change that only moves work around shows as the same machine CPU; only less
CPU makes the *many* cases faster.  Run two checkouts alternately, each with
its own virtualenv (an editable install wins over ``sys.path``)::

    for i in 1 2 3; do for v in a b; do /tmp/venv-$v/bin/python bench/engine_cpu.py --rounds 2; done; done

The dataset (``--kind``: a DTS transfer with a ``jdp`` md5 manifest or ``s3``
ETags, or ``plain``: no manifest; 20,000 files of 4-64 KiB by default) is made
once in ``--workdir`` and kept for later runs; every round copies it into a
fresh folder there, and nothing is deleted (``rm -r`` the workdir when done).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def machine_cpu() -> float:
    """CPU seconds spent by the whole machine so far (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        v = f.readline().split()[1:]
    return (int(v[0]) + int(v[1]) + int(v[2]) + int(v[5]) + int(v[6])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    import bench
    from dtsbridge.engine import CopyOptions, CopyExecutor, Plan, Source, copy_tree

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=("jdp", "s3", "plain"), default="jdp")
    ap.add_argument("--many", type=int, default=20000, help="files of 4-64 KiB (default 20000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--fsync", choices=("true", "false"), default="true")
    ap.add_argument("--workdir", default="/var/tmp/dtsbridge-engine-cpu")
    a = ap.parse_args()

    work = Path(a.workdir)
    meta = work / f"{a.kind}-{a.many}.json"
    if not meta.exists():
        work.mkdir(parents=True, exist_ok=True)
        if a.kind == "plain":
            rel = f"u/plain-{a.many}"
            bench.make_many(work / "dts" / rel, a.many)
        else:
            sizes = argparse.Namespace(big_files=0, big_mib=0, many=a.many)
            rel = bench.make_dts_transfer(work / "dts", "u", a.kind, "many", sizes, seed=11)["rel"]
        meta.write_text(json.dumps({"rel": rel}))
        os.sync()
        bench.read_all(work / "dts")
    rel = json.loads(meta.read_text())["rel"]
    opts = CopyOptions(processes=a.processes, workers=a.threads, fsync=a.fsync == "true", reflink="never")
    executor = CopyExecutor(a.threads, thread_name_prefix="copy")
    scanned: list[float] = []
    try:
        for r in range(a.rounds):
            dest = work / "out" / f"r{time.time_ns()}"
            dest.mkdir(parents=True)
            os.sync()  # untimed: nobody pays for another's dirty pages
            m0, p0, t0 = machine_cpu(), time.process_time(), time.perf_counter()

            def on_plan(plan: Plan) -> None:
                scanned.append(time.perf_counter() - t0)

            res = copy_tree(str(work / "dts"), Source(rel, rel.rsplit("/", 1)[-1]), str(work / "out"), [dest.name],
                            f"job{time.time_ns()}", "1", opts, on_plan=on_plan, executor=executor)
            wall = time.perf_counter() - t0
            print(f"round {r + 1}/{a.rounds}: {wall:.3f} s; scan {scanned[-1]:.3f} s; {res.files} files, "
                  f"{res.hashed} checked by hash; CPU: this process {time.process_time() - p0:.2f} s, "
                  f"machine {machine_cpu() - m0:.2f} s", flush=True)
    finally:
        executor.shutdown(wait=True)
    return 0


if __name__ == "__main__":  # the worker processes import this file again: only run when asked
    sys.exit(main())
