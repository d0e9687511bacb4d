#!/usr/bin/env python3
"""dtsbridge soak benchmark: many small jobs, and the resources they leave behind.

Run it from the repository with the project's Python::

    python bench/soak.py                 # 10,000 jobs: half through the API, half through the watcher
    python bench/soak.py --jobs 300      # a quick look

It starts a private ``redis-server`` (on a free loopback port, no
persistence) and a real ``twistd -n dtsbridge`` on it (``tests/harness.py``)
with ``[watch] enabled = true``, ``[paths] delete_source = true`` (so the DTS
area stays small) and a short ``[state] retention_days`` (``--retention-s``,
default 60 s), then runs ``--jobs`` small jobs (one file of ~200 bytes plus a
DTS ``manifest.json`` each): half by ``POST /complete_transfer`` from
``--clients`` keep-alive clients, half by writing
``<dts_root>/<user>/dts-<uuid>/`` folders for the watcher, alternating in
rounds of ``--round`` jobs. It prints, at start (after a warm-up of one
round), middle and end (after every job has ended and ``retention`` has
passed):

* open descriptors of the service (``/proc/<pid>/fd``),
* RSS of the service and of its worker processes (its descendants),
* Redis ``used_memory`` and key count (``DBSIZE``),

and a line at every tenth of the run between them: while jobs keep coming,
Redis holds the jobs of the last ``retention`` (a plateau, not a slope).

Target: flat — the end is where the start was (a leak of one descriptor or
one key per job shows as thousands). Exits 1 if a job failed or the end is
not flat (``--fd-slack``, ``--key-slack``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import DTS_TOKEN, DtsBridge  # noqa: E402
from tests.redis_fixture import RedisProcess, start_private_redis  # noqa: E402

USERS = ("alice", "bob")


def say(msg: str) -> None:
    print(msg, flush=True)


# -- measuring ----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (worker processes, the forkserver)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def redis_stats(redis: RedisProcess) -> tuple[int, int]:
    info = redis.cli("INFO", "memory")
    used = next(int(line.split(":")[1]) for line in info.splitlines() if line.startswith("used_memory:"))
    return used, int(redis.cli("DBSIZE"))


def sample(svc: DtsBridge, redis: RedisProcess) -> dict[str, Any]:
    pid = svc.proc.pid
    workers = descendants(pid)
    used, keys = redis_stats(redis)
    return {"fds": open_fds(pid), "rss_mib": rss_kib(pid) / 1024,
            "workers": len(workers), "workers_rss_mib": sum(rss_kib(p) for p in workers) / 1024,
            "redis_used_mib": used / 2**20, "redis_keys": keys}


def show(label: str, s: dict[str, Any], done: int) -> None:
    say(f"{label:<6} jobs={done:>6}  fds={s['fds']:>4}  rss={s['rss_mib']:7.1f} MiB  "
        f"workers={s['workers']} ({s['workers_rss_mib']:6.1f} MiB)  "
        f"redis used_memory={s['redis_used_mib']:6.2f} MiB  keys={s['redis_keys']:>6}")


# -- driving --------------------------------------------------------------------


def metric_total(svc: DtsBridge, name: str, status: str | None = None) -> int:
    """Sum of a counter's samples from /metrics (optionally one ``status`` label)."""
    text = svc.call("GET", "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "_total") and not line.startswith(name + "{"):
            continue
        if status is not None and f'status="{status}"' not in line:
            continue
        total += float(line.rsplit(" ", 1)[1])
    return int(total)


def manifest(user: str, tid: str, payload: bytes) -> bytes:
    import hashlib
    return json.dumps({
        "name": "manifest", "profile": "data-package", "username": user,
        "contributors": [{"id": tid}], "instructions": {"protocol": "KBase narrative import", "objects": []},
        "resources": [{"id": "r", "name": "r", "path": "data.txt", "bytes": len(payload),
                       "hash": hashlib.md5(payload).hexdigest()}],
    }).encode()


def make_transfer(dts_root: Path, user: str, watched: bool) -> str:
    """A DTS transfer folder for ``user``: ``<user>/dts-<uuid>/`` with its manifest for the watcher,
    or ``api/<uuid>/`` without one (only a call completes it)."""
    tid = str(uuid.uuid4())
    rel = f"{user}/dts-{tid}" if watched else f"api/{tid}"
    folder = dts_root / rel
    folder.mkdir(parents=True)
    payload = f"transfer {tid}\n".encode() * 4
    (folder / "data.txt").write_bytes(payload)
    if watched:
        tmp = folder / ".manifest.json.part"
        tmp.write_bytes(manifest(user, tid, payload))
        os.rename(tmp, folder / "manifest.json")  # arrives whole, last
    return rel


class Client(threading.Thread):
    """One keep-alive HTTP client doing synchronous /complete_transfer calls from a shared list."""

    def __init__(self, port: int, work: list[tuple[str, str]], lock: threading.Lock, failures: list[str]) -> None:
        super().__init__(daemon=True)
        self.port, self.work, self.lock, self.failures = port, work, lock, failures

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while True:
            with self.lock:
                if not self.work:
                    break
                user, folder = self.work.pop()
            body = json.dumps({"target_user": user, "subdirectory": folder})
            try:
                conn.request("POST", "/complete_transfer", body=body,
                             headers={"Authorization": DTS_TOKEN, "Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                self.failures.append(f"{folder}: {e!r}")
                continue
            if r.status != 201:
                self.failures.append(f"{folder}: {r.status} {data[:200]!r}")
        conn.close()


class Soak:
    def __init__(self, workdir: Path, jobs: int, retention_s: float, clients: int, round_size: int,
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        self.workdir = workdir
        self.jobs = jobs
        self.retention_s = retention_s
        self.clients = clients
        self.round = round_size
        self.failures: list[str] = []
        self.redis = start_private_redis(workdir)
        base = {
            "watch": {"enabled": "true", "interval_seconds": "0.5", "settle_seconds": "0.3"},
            "paths": {"delete_source": "true"},
            "state": {"retention_days": f"{retention_s / 86400:.10f}"},
            "copy": {"max_jobs": "4", "threads": "2", "fsync": "false"},
        }
        for section, keys in (settings or {}).items():
            base.setdefault(section, {}).update(keys)
        self.svc = DtsBridge(workdir, self.redis.url, settings=base)
        self.done = 0
        self.samples: dict[str, dict[str, Any]] = {}

    def start(self) -> None:
        self.svc.start()

    def stop(self) -> None:
        try:
            self.svc.stop()
        finally:
            self.svc.kill()
            self.redis.stop()

    def _finished(self) -> int:
        return metric_total(self.svc, "dtsbridge_jobs_finished")

    def api_round(self, n: int) -> None:
        work = []
        for i in range(n):
            user = USERS[i % len(USERS)]
            work.append((user, make_transfer(self.svc.dts_root, user, watched=False)))
        lock = threading.Lock()
        threads = [Client(self.svc.port, work, lock, self.failures) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def watch_round(self, n: int) -> None:
        for i in range(n):
            make_transfer(self.svc.dts_root, USERS[i % len(USERS)], watched=True)

    def wait_all(self, target: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._finished() >= target and self._dts_empty():
                return
            time.sleep(0.2)
        raise RuntimeError(f"only {self._finished()} of {target} jobs ended in {timeout} s\n{self.svc.log_tail()}")

    def _dts_empty(self) -> bool:
        for user in (*USERS, "api"):
            d = self.svc.dts_root / user
            if d.is_dir() and any(d.iterdir()):
                return False
        return True

    def run(self, report: bool = True) -> dict[str, dict[str, Any]]:
        t0 = time.monotonic()
        warm = min(self.round, max(2, self.jobs // 10))
        self.api_round(warm // 2)
        self.watch_round(warm - warm // 2)
        self.wait_all(warm)
        self.done = warm
        self.samples["start"] = sample(self.svc, self.redis)
        if report:
            show("start", self.samples["start"], self.done)
        api_turn = True
        half_reported = False
        next_tenth = 1
        while self.done < self.jobs:
            n = min(self.round, self.jobs - self.done)
            if api_turn:
                self.api_round(n)
            else:
                self.watch_round(n)
            api_turn = not api_turn
            self.done += n
            self.wait_all(self.done)
            if not half_reported and self.done >= self.jobs // 2:
                self.samples["middle"] = sample(self.svc, self.redis)
                half_reported = True
                if report:
                    show("middle", self.samples["middle"], self.done)
            elif report and self.done < self.jobs and self.done * 10 >= next_tenth * self.jobs:
                show(f"{10 * (self.done * 10 // self.jobs)}%", sample(self.svc, self.redis), self.done)
            while self.done * 10 >= next_tenth * self.jobs:
                next_tenth += 1
        elapsed = time.monotonic() - t0
        # Let retention forget every job (plus a few housekeeping ticks), then look again.
        time.sleep(self.retention_s + 5)
        self.samples["end"] = sample(self.svc, self.redis)
        if report:
            show("end", self.samples["end"], self.done)
        self.samples["run"] = {"seconds": elapsed, "jobs": self.done,
                               "success": metric_total(self.svc, "dtsbridge_jobs_finished", "SUCCESS")}
        return self.samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs in all (half API, half watcher)")
    ap.add_argument("--round", type=int, default=200, help="jobs per round (API and watcher rounds alternate)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent API clients")
    ap.add_argument("--retention-s", type=float, default=60.0, help="[state] retention_days, in seconds")
    ap.add_argument("--fd-slack", type=int, default=8, help="allowed growth of open descriptors, end vs start")
    ap.add_argument("--key-slack", type=int, default=50, help="allowed growth of Redis keys, end vs start")
    ap.add_argument("--workdir", help="folder for everything (default: a new temporary folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if args.jobs < 4:
        ap.error("--jobs must be at least 4")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dtsbridge-soak-",
                                                                            dir=os.environ.get("TMPDIR", "/var/tmp")))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"soak: {args.jobs} jobs (half API with {args.clients} clients, half watcher), rounds of {args.round}, "
        f"retention {args.retention_s:g} s, in {workdir}")
    soak = Soak(workdir, args.jobs, args.retention_s, args.clients, args.round)
    try:
        soak.start()
        s = soak.run()
    finally:
        soak.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    run = s["run"]
    say(f"ran {run['jobs']} jobs in {run['seconds']:.0f} s ({run['jobs'] / run['seconds']:.1f} jobs/s); "
        f"{run['success']} SUCCESS; {len(soak.failures)} failed requests")
    for f in soak.failures[:10]:
        say(f"  failed: {f}")
    start, end = s["start"], s["end"]
    flat = (end["fds"] - start["fds"] <= args.fd_slack and end["redis_keys"] - start["redis_keys"] <= args.key_slack)
    say(f"flat: {'yes' if flat else 'NO'} (fds {start['fds']} -> {end['fds']}, "
        f"redis keys {start['redis_keys']} -> {end['redis_keys']}, "
        f"rss {start['rss_mib']:.1f} -> {end['rss_mib']:.1f} MiB)")
    return 0 if flat and not soak.failures and run["success"] == run["jobs"] else 1


if __name__ == "__main__":
    sys.exit(main())
