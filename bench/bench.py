#!/usr/bin/env python3
"""dtsbridge benchmark: copy+verify throughput against the rsync pair, status latency, load, memory.

Run it from the repository with the project's Python (the one that has
Twisted, Klein, txredisapi, ... installed)::

    python bench/bench.py                      # defaults below; about 5-10 minutes
    python bench/bench.py --big-files 2 --big-mib 256 --many 5000 --rounds 1   # a quick look
    python bench/bench.py --skip-rsync --rounds 1                              # dtsbridge only

What it does, in one fresh folder (``--workdir``, default a new
``dtsbridge-bench-*`` folder under ``$TMPDIR``/``/var/tmp``, removed at the end
unless ``--keep``):

1. *Memory warm-up* (``--ballast``): on a VM whose guest memory the hypervisor
   backs lazily (this one: free-page reporting through virtio-balloon), the
   first write into never-touched memory runs at ~300-400 MB/s instead of
   several GB/s, whoever does it.  The benchmark fills the free memory with
   clean page cache once (it reads a sparse file, which writes nothing to
   disk), so both contenders then reuse warm pages.  ``--ballast 0`` skips it.
2. Makes two datasets in ``<workdir>/dts``: *big* = ``--big-files`` files of
   ``--big-mib`` MiB (one random 4 MiB block, rotated and stamped per chunk:
   incompressible, no two chunks alike) and *many* = ``--many`` files of 4-64
   KiB in nested folders (100 per folder, 10 folders per group).  Everything
   is read once so the source is in the page cache ("warm cache").
3. Starts a real ``twistd -n dtsbridge`` (``tests/harness.py``'s
   ``DtsBridge``) with its embedded private Redis and the shipped defaults
   (``[copy] threads = 4``, ``processes = auto``, ``max_jobs = 4``,
   ``checksum = xxh3``, ``fsync = true``; change them with ``--threads``,
   ``--processes``, ``--checksum``, ``--fsync``).  One small untimed job
   (301 files) first brings it to the state of a service that has run for a
   while (its copy worker processes started).
4. ``--rounds`` rounds; in each, for each dataset, alternately (dtsbridge
   first on even rounds, rsync first on odd ones): ``POST
   /complete_transfer`` timed from the call to its 201, and ``rsync -a src/
   dst/`` followed by ``rsync -anc src/ dst/`` timed together, then the
   ``sync`` that would give rsync's copy the durability dtsbridge's ``fsync``
   gives (timed apart).  Every run writes into a fresh folder (a new user per
   round for dtsbridge); nothing is deleted before the end, because this ext4
   creates files 5-15x slower for minutes after a mass delete.  A ``sync``
   (not timed) precedes every timed run so no one pays for another's dirty
   pages.  Reported: medians, MB/s, files/s and the ratio dtsbridge / rsync
   (below 1: dtsbridge is faster).
5. ``/transferStatus`` latency (p50/p95/p99/max) on one keep-alive
   connection while 4 copies of *big* run at once (``Prefer:
   respond-async``), and the aggregate rate of those 4 copies.
6. Status requests per second from a bounded local load generator:
   ``--load-conns`` asyncio keep-alive connections on loopback, for
   ``--load-seconds`` seconds (at most 10), each sending one request after the
   other.  The generator shares the machine's cores with the service.
7. Peak RSS (``VmHWM`` from ``/proc/PID/status``) of the twistd process over
   the whole run (it includes every copy above, several GB), and, reported
   apart, of its embedded redis-server child and of its copy worker
   processes (``[copy] processes``: the forkserver and its workers, summed).

The summary table at the end lists every figure with its target.  Timings on
a shared 2-core machine are noisy: run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import DTS_TOKEN, DtsBridge  # noqa: E402

BLOCK = 4 << 20
MiB = 1 << 20
RSYNC = shutil.which("rsync") or "/usr/bin/rsync"

TARGET_RATIO = 0.5
TARGET_P95_MS = 50.0
TARGET_RPS = 2000.0
TARGET_RSS_MB = 150.0


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# Machine helpers


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process, in bytes (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    out = []
    for c in children(pid):
        out.append(c)
        out += descendants(c)
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


# ---------------------------------------------------------------------------
# Datasets


def make_big(root: Path, nfiles: int, mib: int, seed: int = 1) -> tuple[int, int]:
    """``nfiles`` files of ``mib`` MiB: a random block rotated per chunk, with a unique stamp per chunk."""
    root.mkdir(parents=True, exist_ok=True)
    base = memoryview(os.urandom(BLOCK))
    rng = random.Random(seed)
    total = 0
    for i in range(nfiles):
        fd = os.open(root / f"big-{i:02d}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left = mib * MiB
            c = 0
            while left > 0:
                k = rng.randrange(BLOCK - 8)
                parts = [(i * 1_000_003 + c).to_bytes(8, "little"), base[k + 8:], base[:k]]
                if left >= BLOCK:
                    n = os.writev(fd, parts)
                    assert n == BLOCK
                else:
                    os.write(fd, b"".join(parts)[:left])
                left -= min(left, BLOCK)
                c += 1
        finally:
            os.close(fd)
        total += mib * MiB
    return nfiles, total


def make_many(root: Path, n: int, seed: int = 2) -> tuple[int, int]:
    """``n`` files of 4-64 KiB, 100 per folder, 10 folders per group (``dNN/sN/fNNNNN.dat``)."""
    base = memoryview(os.urandom(BLOCK))
    rng = random.Random(seed)
    total = 0
    for i in range(n):
        d = root / f"d{i // 1000:02d}" / f"s{(i // 100) % 10}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = rng.randrange(4096, 65537)
        off = rng.randrange(BLOCK - size)
        fd = os.open(d / f"f{i:05d}.dat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, base[off:off + size])
        finally:
            os.close(fd)
        total += size
    return n, total


def read_all(root: Path) -> int:
    """Read every file once (page cache warm-up); returns bytes read."""
    buf = bytearray(MiB)
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    total += n
    return total


def ballast(workdir: Path, gib: float | None) -> tuple[Path | None, float, float]:
    """Fill free memory with clean page cache (a sparse file, read through); returns (path, bytes, seconds)."""
    free = meminfo()["MemFree"]
    size = int(max(0, free - 1.5 * (1 << 30)) if gib is None else gib * (1 << 30))
    size -= size % MiB
    if size < 256 * MiB:
        return None, 0, 0
    path = workdir / "ballast.sparse"
    with open(path, "wb") as f:
        f.truncate(size)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        mm = bytearray(4 * MiB)
        while f.readinto(mm):
            pass
    return path, size, time.perf_counter() - t


# ---------------------------------------------------------------------------
# Timed runs


def sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def run_dtsbridge(svc: DtsBridge, user: str, folder: str, files: int, nbytes: int) -> float:
    (svc.user_root / user).mkdir(exist_ok=True)
    t = time.perf_counter()
    r = svc.complete(user, folder, timeout=1800)
    dt = time.perf_counter() - t
    if r.status != 201:
        raise SystemExit(f"POST /complete_transfer for {folder} answered {r.status}: {r.body[:500]!r}\n{svc.log_tail()}")
    body = r.json()
    if (body.get("files"), body.get("bytes")) != (files, nbytes):
        raise SystemExit(f"dtsbridge copied {body.get('files')} files / {body.get('bytes')} bytes, "
                         f"expected {files} / {nbytes}")
    return dt


def run_rsync(src: Path, dst: Path) -> float:
    dst.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run([RSYNC, "-a", f"{src}/", f"{dst}/"], check=True)
    out = subprocess.run([RSYNC, "-anc", "--out-format=%n", f"{src}/", f"{dst}/"], check=True,
                         capture_output=True, text=True).stdout
    dt = time.perf_counter() - t
    if out.strip():
        raise SystemExit(f"rsync -anc found differences after rsync -a: {out[:500]}")
    return dt


# ---------------------------------------------------------------------------
# Status latency while copies run, and the load generator


def status_path(job_id: str) -> str:
    return "/transferStatus?" + urllib.parse.urlencode({"job_id": job_id})


def latency_during_copies(svc: DtsBridge, folder: str, n: int, interval: float,
                          sample_rss: Callable[[], None]) -> dict[str, Any]:
    """Start ``n`` async copies of ``folder``; poll /transferStatus on one keep-alive connection until all end."""
    jobs = []
    t0 = time.perf_counter()
    for i in range(n):
        user = f"s{i}"
        (svc.user_root / user).mkdir(exist_ok=True)
        r = svc.complete(user, folder, asynchronous=True)
        if r.status != 202:
            raise SystemExit(f"async POST /complete_transfer answered {r.status}: {r.body[:300]!r}")
        jobs.append(r.json()["job_id"])
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60)
    headers = {"Authorization": DTS_TOKEN}
    lat: list[float] = []
    states: dict[str, str] = {j: "SUBMITTED" for j in jobs}
    seen_transferring = False
    i = 0
    last_rss = 0.0
    while any(s not in ("SUCCESS", "ERROR", "CANCELLED") for s in states.values()):
        job = jobs[i % n]
        i += 1
        t = time.perf_counter()
        conn.request("GET", status_path(job), headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        dt = time.perf_counter() - t
        if resp.status != 200:
            raise SystemExit(f"/transferStatus answered {resp.status}: {body[:300]!r}")
        states[job] = json.loads(body)["status"]
        running = sum(1 for s in states.values() if s == "TRANSFERRING")
        if states[job] == "TRANSFERRING":
            seen_transferring = True
        if running:
            lat.append(dt)
        now = time.perf_counter()
        if now - last_rss > 0.2:
            sample_rss()
            last_rss = now
        if now - t0 > 1800:
            raise SystemExit("the 4 copies did not end within 30 minutes")
        time.sleep(interval)
    elapsed = time.perf_counter() - t0
    conn.close()
    bad = {j: s for j, s in states.items() if s != "SUCCESS"}
    if bad:
        raise SystemExit(f"copies ended badly: {bad}\n{svc.log_tail()}")
    return {"samples": lat, "elapsed": elapsed, "seen": seen_transferring}


async def _load_conn(port: int, request: bytes, deadline: float, lat: list[float], errors: list[str]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    try:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            chunked = False
            status = int(head[9:12])
            for line in head.split(b"\r\n"):
                low = line.lower()
                if low.startswith(b"content-length:"):
                    length = int(line[15:])
                elif low.startswith(b"transfer-encoding:") and b"chunked" in low:
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(head[:100].decode(errors="replace"))
                break
            done += 1
    finally:
        writer.close()
    return done


async def _load(port: int, job_id: str, conns: int, seconds: float) -> tuple[int, float, list[float], list[str]]:
    request = (f"GET {status_path(job_id)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: {DTS_TOKEN}\r\n\r\n").encode()
    lat: list[float] = []
    errors: list[str] = []
    t = time.perf_counter()
    counts = await asyncio.gather(*(_load_conn(port, request, t + seconds, lat, errors) for _ in range(conns)))
    return sum(counts), time.perf_counter() - t, lat, errors


def load_generator(port: int, job_id: str, conns: int, seconds: float) -> dict[str, Any]:
    n, elapsed, lat, errors = asyncio.run(_load(port, job_id, conns, seconds))
    if errors:
        raise SystemExit(f"the load generator got errors: {errors[:3]}")
    return {"requests": n, "elapsed": elapsed, "rps": n / elapsed, "lat": lat}


# ---------------------------------------------------------------------------
# DTS transfers as DTS writes them (issue 10): ``--dts``


def md5_and_etag(path: Path, part: int = 8 * MiB) -> tuple[str, str]:
    """The file's md5 and the ETag S3 gives it when uploaded in ``part``-byte parts (one read)."""
    import hashlib
    whole = hashlib.md5()
    digests = bytearray()
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(part)
            if not chunk and digests:
                break
            whole.update(chunk)
            digests += hashlib.md5(chunk).digest()
            if len(chunk) < part:
                break
    n = len(digests) // 16
    etag = whole.hexdigest() if n == 1 else f"{hashlib.md5(bytes(digests)).hexdigest()}-{n}"
    return whole.hexdigest(), etag


def make_dts_transfer(dts: Path, user: str, source: str, kind: str, args: argparse.Namespace,
                      seed: int) -> dict[str, Any]:
    """``<dts>/<user>/dts-<uuid>/`` as DTS writes it: payload at each resource's path, manifest.json last.

    ``source`` ``jdp``: ``img/submissions/<n>/…`` paths, md5 hashes, credit metadata;
    ``s3``: object keys, ETags (``<hex>-<parts>`` for the big files, uploaded in
    8 MiB parts as the AWS CLI does).  ``kind`` ``big`` or ``many``.  Returns the
    folder, its relative path, counts and the md5 checklist for ``md5sum -c``.
    """
    import uuid

    from tests import dts_fixtures as F
    transfer = str(uuid.uuid4())
    rel = f"{user}/dts-{transfer}"
    folder = dts / rel
    payload = folder / ("img/submissions/253630" if source == "jdp" else "runs/2026-11")
    if kind == "big":
        n, nbytes = make_big(payload, args.big_files, args.big_mib, seed=seed)
    else:
        n, nbytes = make_many(payload, args.many, seed=seed)
    resources = []
    checklist = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in sorted(files):
            p = Path(dirpath) / name
            r = str(p.relative_to(folder))
            md5, etag = md5_and_etag(p)
            size = p.stat().st_size
            if source == "jdp":
                resources.append(F.jdp_resource(r, size, md5, len(resources)))
            else:
                resources.append(F.s3_resource(r, size, etag))
            checklist.append(f"{md5}  {r}\n")
    body = F.manifest(transfer, user, resources)
    tmp = folder.parent / f".manifest-{transfer}.tmp"
    tmp.write_bytes(body)
    os.rename(tmp, folder / "manifest.json")
    sums = dts.parent / f"md5sums-{source}-{kind}.txt"
    sums.write_text("".join(checklist))
    multipart = sum(1 for r in resources if "-" in str(r.get("hash", "")))
    return {"folder": folder, "rel": rel, "files": n + 1, "bytes": nbytes + len(body), "sums": sums,
            "manifest_bytes": len(body), "resources": len(resources), "multipart": multipart}


def run_rsync_md5sum(src: Path, dst: Path, sums: Path) -> float:
    """``rsync -a src/ dst/`` then ``md5sum -c`` of the copy against the manifest's md5s: what an operator runs."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run([RSYNC, "-a", f"{src}/", f"{dst}/"], check=True)
    subprocess.run(["md5sum", "-c", "--quiet", str(sums)], check=True, cwd=dst)
    return time.perf_counter() - t


def make_manifest_stress(dts: Path, user: str, resources: int, mib: float) -> dict[str, Any]:
    """A transfer of ``resources`` tiny files whose manifest is ``mib`` MiB (padded descriptions)."""
    import hashlib
    import uuid

    from tests import dts_fixtures as F
    transfer = str(uuid.uuid4())
    rel = f"{user}/dts-{transfer}"
    folder = dts / rel
    res = []
    h = hashlib.md5(b"x").hexdigest()
    for i in range(resources):
        d = folder / "img" / "submissions" / f"{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        name = f"Ga{i:07d}.fna"
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x")
        os.close(fd)
        res.append({"id": f"JDP:{i:024x}", "name": f"ga{i:07d}", "path": f"img/submissions/{i // 1000:04d}/{name}",
                    "format": "fasta", "mediatype": "text/plain", "bytes": 1, "hash": h, "description": ""})
    base = len(F.manifest(transfer, user, res[:1000])) / 1000
    pad = max(0, int((mib * MiB - 2000) / resources - base))
    for r in res:
        r["description"] = "d" * pad
    body = F.manifest(transfer, user, res)
    (folder / "manifest.json").write_bytes(body)
    return {"rel": rel, "files": resources + 1, "manifest_bytes": len(body)}


def manifest_latency(svc: DtsBridge, stress: dict[str, Any], poll: float) -> dict[str, Any]:
    """Status latency (one keep-alive connection) and twistd's peak RSS while the stress transfer runs."""
    pid = svc.proc.pid  # type: ignore[union-attr]
    before = proc_status(pid)
    r = svc.complete(stress["rel"].split("/")[0], stress["rel"], asynchronous=True)
    if r.status != 202:
        raise SystemExit(f"async POST /complete_transfer answered {r.status}: {r.body[:300]!r}")
    job = r.json()["job_id"]
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60)
    headers = {"Authorization": DTS_TOKEN}
    lat: dict[str, list[float]] = {"scan": [], "all": []}
    t0 = time.perf_counter()
    st: dict[str, Any] = {}
    scan_end = None
    rss_scan = 0
    while True:
        t = time.perf_counter()
        conn.request("GET", status_path(job), headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        dt = time.perf_counter() - t
        if resp.status != 200:
            raise SystemExit(f"/transferStatus answered {resp.status}: {body[:300]!r}")
        st = json.loads(body)
        if st["status"] in ("SUCCESS", "ERROR", "CANCELLED"):
            break
        lat["all"].append(dt)
        if st.get("files_total") is None:  # the scan and the manifest check (no plan yet)
            lat["scan"].append(dt)
            rss_scan = max(rss_scan, proc_status(pid).get("VmRSS", 0))
        elif scan_end is None:
            scan_end = time.perf_counter() - t0
        if time.perf_counter() - t0 > 1800:
            raise SystemExit("the manifest stress job did not end within 30 minutes")
        time.sleep(poll)
    elapsed = time.perf_counter() - t0
    conn.close()
    after = proc_status(pid)
    if st["status"] != "SUCCESS":
        raise SystemExit(f"the manifest stress job ended {st}\n{svc.log_tail()}")
    return {"lat": lat, "elapsed": elapsed, "scan": scan_end, "status": st,
            "rss_before": before.get("VmRSS", 0), "hwm_before": before.get("VmHWM", 0),
            "hwm_after": after.get("VmHWM", 0), "rss_scan": rss_scan}


def write_cost(work: Path, n: int = 1000, size: int = 36 * 1024, tries: int = 3) -> float:
    """Microseconds to create, write and close one new ``size``-byte file on ``work``'s filesystem, on one
    core (best of ``tries`` × ``n`` files, each try in a new folder, left in place); also printed.

    Both contenders pay this for every file they write.  On the VMs measured here it is most of a
    *many* job's kernel time and moved 2x with the memory state (the page cache's new pages), so it
    is printed next to the *many* ratios, which move with it.
    """
    data = os.urandom(size)
    best = float("inf")
    for t in range(tries):
        d = work / f"write-probe-{t}"
        d.mkdir()
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            t0 = time.perf_counter()
            for i in range(n):
                fd = os.open(f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
                os.write(fd, data)
                os.close(fd)
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        finally:
            os.close(dfd)
    sync()
    say(f"new-file write on this filesystem: {best:.0f} us per {size // 1024} KiB file (create + write + close, one core)")
    return best


def md5_rate(mib: int = 64, tries: int = 3) -> float:
    """MB/s of md5 (hashlib, what the engine uses) on one core, from memory: best of ``tries``."""
    import hashlib
    buf = os.urandom(mib * MiB)
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        hashlib.md5(buf).digest()
        best = max(best, len(buf) / (time.perf_counter() - t) / 1e6)
    return best


def run_dts(args: argparse.Namespace, work: Path) -> int:
    say(f"dtsbridge benchmark, DTS transfers (--dts), in {work}")
    say(f"machine: {os.cpu_count()} CPUs, {meminfo()['MemTotal'] / (1 << 30):.1f} GiB RAM, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    md5 = md5_rate()
    say(f"md5 on one core, from memory: {md5:.0f} MB/s")
    if args.ballast != 0:
        path, size, dt = ballast(work, args.ballast)
        if path is not None:
            say(f"memory warm-up: {size / (1 << 30):.1f} GiB in {dt:.1f} s")
    wcost = write_cost(work)
    sets = [(s, k) for s in ("jdp", "s3") for k in ("big", "many")]
    per = 2 * (args.big_files * args.big_mib * MiB + args.many * 36 * 1024)
    need = int(per * (1 + 2 * args.rounds) * 1.1) + args.manifest_resources * 8192 + (1 << 30)
    st = os.statvfs(work)
    have = st.f_bavail * st.f_frsize
    if have < need:
        raise SystemExit(f"{work} has {have / 1e9:.1f} GB free; this run writes about {need / 1e9:.1f} GB")
    say(f"disk: {have / 1e9:.0f} GB free, this run writes about {need / 1e9:.1f} GB")
    dts = work / "dts"
    data: dict[tuple[str, str], dict[str, Any]] = {}
    t = time.perf_counter()
    for i, (source, kind) in enumerate(sets):
        data[(source, kind)] = make_dts_transfer(dts, "dtsuser", source, kind, args, seed=10 + i)
    sync()
    read_all(dts)
    read_all(dts)
    for (source, kind), d in data.items():
        say(f"  {source:4s} {kind:4s}: {d['files']} files, {d['bytes'] / 1e6:.0f} MB, manifest "
            f"{d['manifest_bytes'] / 1e6:.1f} MB ({d['resources']} resources, {d['multipart']} multipart ETags)")
    say(f"datasets made and read twice in {time.perf_counter() - t:.0f} s")
    stress = None
    if args.manifest_resources:
        t = time.perf_counter()
        stress = make_manifest_stress(dts, "stress", args.manifest_resources, args.manifest_mib)
        sync()
        say(f"manifest stress transfer: {stress['files']} files, manifest {stress['manifest_bytes'] / MiB:.1f} MiB "
            f"({args.manifest_resources} resources), made in {time.perf_counter() - t:.0f} s")

    copy = {"max_jobs": "4", "lease_seconds": "30", "threads": str(args.threads or 4),
            "processes": args.processes or "auto", "checksum": args.checksum or "xxh3", "fsync": args.fsync or "true"}
    svc = DtsBridge(work, "embedded", settings={"copy": copy}, name="bench")
    svc.start(timeout=60)
    pid = svc.proc.pid  # type: ignore[union-attr]
    rows: list[tuple[str, str, str, str]] = []
    try:
        warm = dts / "warm" / "dts-warmup"
        make_many(warm, 300, seed=3)
        (svc.user_root / "warm").mkdir(exist_ok=True)
        r = svc.complete("warm", "warm/dts-warmup", timeout=300)
        if r.status != 201:
            raise SystemExit(f"warm-up job answered {r.status}: {r.body[:300]!r}\n{svc.log_tail()}")
        say(f"service: twistd pid {pid}, [copy] {', '.join(f'{k} = {v}' for k, v in copy.items())}; "
            f"RSS after warm-up {proc_status(pid).get('VmRSS', 0) / 1e6:.0f} MB")

        # The manifest stress first, so that VmHWM is this job's peak, not a big copy's.
        if stress is not None:
            sync()
            (svc.user_root / "stress").mkdir(exist_ok=True)
            m = manifest_latency(svc, stress, args.poll_ms / 1000)
            s_all, s_scan = m["lat"]["all"], m["lat"]["scan"]
            extra = m["hwm_after"] - m["rss_before"]
            say(f"manifest stress: job took {m['elapsed']:.1f} s (scan + manifest check {m['scan'] or 0:.1f} s); "
                f"{len(s_all)} status requests, {len(s_scan)} during the scan and check; "
                f"twistd RSS {m['rss_before'] / 1e6:.0f} MB before, peak {m['hwm_after'] / 1e6:.0f} MB")
            rows.append((f"status p50 / p99 / max (ms) during the scan + check of the "
                         f"{stress['manifest_bytes'] / MiB:.1f} MiB manifest",
                         f"{pct(s_scan, 50) * 1000:.1f} / {pct(s_scan, 99) * 1000:.1f} / "
                         f"{max(s_scan, default=float('nan')) * 1000:.1f}", "p99 < 100",
                         "MET" if s_scan and pct(s_scan, 99) < 0.1 else "NOT MET"))
            rows.append(("status p50 / p99 / max (ms) over the whole stress job",
                         f"{pct(s_all, 50) * 1000:.1f} / {pct(s_all, 99) * 1000:.1f} / "
                         f"{max(s_all, default=float('nan')) * 1000:.1f}", "p99 < 100",
                         "MET" if s_all and pct(s_all, 99) < 0.1 else "NOT MET"))
            scan_extra = m["rss_scan"] - m["rss_before"]
            rows.append(("twistd RSS during the scan + check, highest sample, over RSS before (MB; x manifest)",
                         f"{scan_extra / 1e6:.0f} ({scan_extra / stress['manifest_bytes']:.1f}x)", "< 4x",
                         "MET" if scan_extra < 4 * stress["manifest_bytes"] else "NOT MET"))
            rows.append(("twistd peak RSS (VmHWM, whole job: scan, check, copy) over RSS before (MB; x manifest)",
                         f"{extra / 1e6:.0f} ({extra / stress['manifest_bytes']:.1f}x)", "< 4x",
                         "MET" if extra < 4 * stress["manifest_bytes"] else "NOT MET"))

        times: dict[tuple[str, str, str], list[float]] = {}
        for rnd in range(args.rounds):
            for source, kind in sets:
                d = data[(source, kind)]
                order = ["dtsbridge", "rsync"] if rnd % 2 == 0 else ["rsync", "dtsbridge"]
                for who in order:
                    sync()  # untimed: nobody pays for another's dirty pages
                    if who == "dtsbridge":
                        user = f"r{rnd}"
                        (svc.user_root / user).mkdir(exist_ok=True)
                        t = time.perf_counter()
                        r = svc.complete(user, d["rel"], timeout=1800)
                        dt = time.perf_counter() - t
                        if r.status != 201:
                            raise SystemExit(f"{d['rel']}: {r.status} {r.body[:300]!r}\n{svc.log_tail()}")
                        st = svc.status(r.json()["job_id"]).json()
                        note = (f"hashed {st.get('manifest_hashed')}, unverified {st.get('manifest_unverified')}")
                        if st.get("manifest_hashed") != d["resources"]:
                            raise SystemExit(f"not every resource was checked by hash: {st}")
                    else:
                        dt = run_rsync_md5sum(d["folder"], work / "rsync" / f"r{rnd}" / f"{source}-{kind}", d["sums"])
                        ds_sync = sync()  # timed apart: the same durability as fsync = true
                        times.setdefault((source, kind, "sync"), []).append(dt + ds_sync)
                        note = f"md5sum -c: all OK; + sync {ds_sync:.2f} s"
                    times.setdefault((source, kind, who), []).append(dt)
                    say(f"round {rnd + 1}/{args.rounds} {source:4s} {kind:4s} {who:9s} {dt:7.2f} s "
                        f"{d['bytes'] / dt / 1e6:7.0f} MB/s {d['files'] / dt:8.0f} files/s  ({note})")
        for source, kind in (sets if args.rounds else []):
            a = statistics.median(times[(source, kind, "dtsbridge")])
            b = statistics.median(times[(source, kind, "rsync")])
            rows.append((f"{source} {kind}: dtsbridge {a:.2f} s / (rsync -a + md5sum -c) {b:.2f} s", f"{a / b:.2f}",
                         f"<= {TARGET_RATIO}", "MET" if a / b <= TARGET_RATIO else "NOT MET"))
            c = statistics.median(times[(source, kind, "sync")])
            rows.append((f"{source} {kind}: dtsbridge {a:.2f} s / (rsync -a + md5sum -c + sync) {c:.2f} s", f"{a / c:.2f}",
                         "(same durability)", ""))
        cpus = os.cpu_count() or 1
        for source, kind in (sets if args.rounds else []):
            rate = data[(source, kind)]["bytes"] / statistics.median(times[(source, kind, "dtsbridge")]) / 1e6
            rows.append((f"{source} {kind}: dtsbridge {rate:.0f} MB/s (an md5 of every byte) / md5 limit "
                         f"({cpus} cores x {md5:.0f} MB/s)", f"{rate / (cpus * md5) * 100:.0f}%", "(reported)", ""))
    finally:
        svc.stop()
    say("")
    say("=" * 100)
    say(f"SUMMARY --dts (big = {args.big_files} x {args.big_mib} MiB, many = {args.many} files of 4-64 KiB; "
        f"medians of {args.rounds}; warm page cache; new-file write {wcost:.0f} us; "
        f"[copy] {', '.join(f'{k} = {v}' for k, v in copy.items())})")
    say("-" * 100)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for row in rows:
        say(f"{row[0]:<{w0}}  {row[1]:>{w1}}  {row[2]:<10}  {row[3]}")
    say("=" * 100)
    return 0


# ---------------------------------------------------------------------------
# Report


def fmt_s(x: float) -> str:
    return f"{x:7.2f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (python -m pydoc bench/bench.py) or bench/README.md.")
    p.add_argument("--big-files", type=int, default=4, help="files in the big dataset (default 4)")
    p.add_argument("--big-mib", type=int, default=512, help="size of each big file in MiB (default 512)")
    p.add_argument("--many", type=int, default=20000, help="files of 4-64 KiB in the many dataset (default 20000)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per dataset and contender (default 3)")
    p.add_argument("--skip-rsync", action="store_true", help="time dtsbridge only")
    p.add_argument("--copies", type=int, default=4, help="concurrent copies of big during the latency test (default 4)")
    p.add_argument("--poll-ms", type=float, default=5.0, help="pause between status requests while copies run")
    p.add_argument("--load-conns", type=int, default=8, help="load generator connections (default 8)")
    p.add_argument("--load-seconds", type=float, default=5.0, help="load generator duration, at most 10 (default 5)")
    p.add_argument("--threads", type=int, default=None, help="[copy] threads (default: the shipped default, 4)")
    p.add_argument("--processes", default=None,
                   help="[copy] processes: auto | N | 0 (default: the shipped default, auto = one per CPU)")
    p.add_argument("--checksum", default=None, help="[copy] checksum (default: the shipped default, xxh3)")
    p.add_argument("--fsync", choices=("true", "false"), default=None,
                   help="[copy] fsync (default: the shipped default, true)")
    p.add_argument("--ballast", type=float, default=None,
                   help="GiB of free memory to warm up first (default: all free memory but 1.5 GiB; 0: none)")
    p.add_argument("--workdir", type=Path, default=None, help="where to make the fresh benchmark folder")
    p.add_argument("--keep", action="store_true", help="keep the benchmark folder")
    p.add_argument("--reflink", action="store_true",
                   help="only the reflink scenario: big and many on a loop-mounted XFS (root) vs the rsync pair there")
    p.add_argument("--resume", action="store_true",
                   help="only the resume scenario: a job killed (-9) at --resume-kill-at of its bytes, then restarted")
    p.add_argument("--resume-files", type=int, default=80, help="files in the resume dataset (default 80)")
    p.add_argument("--resume-mib", type=int, default=25, help="size of each resume file in MiB (default 25)")
    p.add_argument("--resume-warmup", type=int, default=1,
                   help="untimed rounds (a full copy and a kill + resume) before the timed ones, so that the "
                        "disk has written back the freshly made dataset (default 1)")
    p.add_argument("--resume-kill-at", type=float, default=0.75,
                   help="fraction of the bytes copied when the process is killed (default 0.75)")
    p.add_argument("--dts", action="store_true",
                   help="only the DTS scenario: DTS transfers (JDP md5 and S3 multipart-ETag manifests, big and many) against "
                        "rsync -a + md5sum -c, and the status latency and RSS while a big manifest is checked")
    p.add_argument("--manifest-resources", type=int, default=200_000,
                   help="with --dts: resources of the manifest stress transfer (default 200000; 0: skip it)")
    p.add_argument("--manifest-mib", type=float, default=63.5,
                   help="with --dts: size of its manifest in MiB (default 63.5; the limit is 64)")
    args = p.parse_args(argv)
    args.load_seconds = min(args.load_seconds, 10.0)
    if not args.skip_rsync and not os.access(RSYNC, os.X_OK):
        raise SystemExit("rsync is not installed (apt-get install rsync), or pass --skip-rsync")

    base = args.workdir or Path(os.environ.get("TMPDIR") or "/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dtsbridge-bench-", dir=base))
    started = time.perf_counter()
    try:
        if args.reflink:
            return _run_reflink(args, work)
        if args.resume:
            return _run_resume(args, work)
        if args.dts:
            return run_dts(args, work)
        return _run(args, work)
    finally:
        if not args.keep:
            t = time.perf_counter()
            shutil.rmtree(work, ignore_errors=True)
            say(f"removed {work} in {time.perf_counter() - t:.1f} s; total run time {time.perf_counter() - started:.0f} s")
        else:
            say(f"kept {work}; total run time {time.perf_counter() - started:.0f} s")


def _run(args: argparse.Namespace, work: Path) -> int:
    say(f"dtsbridge benchmark in {work}")
    say(f"machine: {os.cpu_count()} CPUs, {meminfo()['MemTotal'] / (1 << 30):.1f} GiB RAM, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"rsync: {subprocess.run([RSYNC, '--version'], capture_output=True, text=True).stdout.split(chr(10))[0] if not args.skip_rsync else 'skipped'}")

    # 1. memory warm-up
    if args.ballast != 0:
        path, size, dt = ballast(work, args.ballast)
        if path is not None:
            say(f"memory warm-up: read {size / (1 << 30):.1f} GiB of a sparse file into the page cache "
                f"in {dt:.1f} s ({size / dt / 1e6:.0f} MB/s)")
    wcost = write_cost(work)

    # 2. datasets (check the disk first: nothing is deleted before the end)
    per_copy = args.big_files * args.big_mib * MiB + args.many * 36 * 1024
    copies = 1 + args.rounds * (1 if args.skip_rsync else 2) + args.copies
    need = int(per_copy * copies * 1.1) + (1 << 30)
    st = os.statvfs(work)
    have = st.f_bavail * st.f_frsize
    if have < need:
        raise SystemExit(f"{work} has {have / 1e9:.1f} GB free; this run writes about {need / 1e9:.1f} GB "
                         "(the datasets, every round's copies and the concurrent copies, deleted only at the end)")
    say(f"disk: {have / 1e9:.0f} GB free, this run writes about {need / 1e9:.1f} GB")
    dts = work / "dts"
    t = time.perf_counter()
    big = make_big(dts / "big", args.big_files, args.big_mib)
    t_big = time.perf_counter() - t
    t = time.perf_counter()
    many = make_many(dts / "many", args.many)
    t_many = time.perf_counter() - t
    t_sync = sync()
    t = time.perf_counter()
    read_all(dts)
    read_all(dts)
    say(f"datasets: big = {big[0]} x {args.big_mib} MiB ({big[1] / 1e6:.0f} MB, made in {t_big:.1f} s); "
        f"many = {many[0]} files, {many[1] / 1e6:.0f} MB (made in {t_many:.1f} s); "
        f"sync {t_sync:.1f} s, read twice in {time.perf_counter() - t:.1f} s")
    data = {"big": big, "many": many}

    # 3. the service
    copy = {"max_jobs": str(max(4, args.copies)), "lease_seconds": "15"}
    if args.threads is not None:
        copy["threads"] = str(args.threads)
    else:
        copy["threads"] = "4"
    copy["processes"] = args.processes or "auto"
    copy["checksum"] = args.checksum or "xxh3"
    copy["fsync"] = args.fsync or "true"
    svc = DtsBridge(work, "embedded", settings={"copy": copy}, name="bench")
    svc.start(timeout=60)
    pid = svc.proc.pid  # type: ignore[union-attr]
    redis_pids = [c for c in children(pid) if "redis" in comm(c)]
    base_rss = proc_status(pid)
    say(f"service: twistd pid {pid} on port {svc.port}, embedded redis pid {redis_pids or '?'}; "
        f"[copy] {', '.join(f'{k} = {v}' for k, v in copy.items())}; RSS at start {base_rss.get('VmRSS', 0) / 1e6:.0f} MB")
    peak = {"twistd": 0, "redis": 0, "workers": 0}
    workers: dict[int, int] = {}  # copy worker processes (forkserver and its children) -> VmHWM

    def sample_rss() -> None:
        peak["twistd"] = max(peak["twistd"], proc_status(pid).get("VmHWM", 0))
        for rp in redis_pids:
            peak["redis"] = max(peak["redis"], proc_status(rp).get("VmHWM", 0))
        for wp in descendants(pid):
            if wp not in redis_pids:
                workers[wp] = max(workers.get(wp, 0), proc_status(wp).get("VmHWM", 0))
        peak["workers"] = max(peak["workers"], sum(workers.values()))

    def service_cpu() -> float:
        """twistd + its copy worker processes (not Redis)."""
        return cpu_seconds(pid) + sum(cpu_seconds(w) for w in descendants(pid) if w not in redis_pids)

    try:
        # A service that has run for a while has its copy worker processes up: one small untimed
        # job brings this one to that state (rsync has no such start-up cost to pay in advance).
        warm = dts / "warmup"
        make_many(warm, 300, seed=3)
        (warm / "one-big.bin").write_bytes(os.urandom(8 * MiB))
        t = time.perf_counter()
        (svc.user_root / "warm").mkdir(exist_ok=True)
        r = svc.complete("warm", "warmup", timeout=300)
        if r.status != 201:
            raise SystemExit(f"warm-up job answered {r.status}: {r.body[:300]!r}\n{svc.log_tail()}")
        say(f"warm-up job (301 files, untimed): {time.perf_counter() - t:.2f} s")

        # 4. alternating rounds
        times: dict[tuple[str, str], list[float]] = {}
        syncs: dict[str, list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for ds in ("big", "many"):
                files, nbytes = data[ds]
                order = ["dtsbridge", "rsync"] if r % 2 == 0 else ["rsync", "dtsbridge"]
                if args.skip_rsync:
                    order = ["dtsbridge"]
                for who in order:
                    sync()
                    if who == "dtsbridge":
                        c0 = service_cpu()
                        dt = run_dtsbridge(svc, f"r{r}", ds, files, nbytes)
                        cpu = service_cpu() - c0
                        extra = ""
                    else:
                        c0 = children_cpu()
                        dt = run_rsync(dts / ds, work / "rsync" / f"r{r}" / ds)
                        cpu = children_cpu() - c0
                        ds_sync = sync()
                        syncs.setdefault(ds, []).append(ds_sync)
                        extra = f" (+ sync {ds_sync:.2f} s)"
                    times.setdefault((ds, who), []).append(dt)
                    cpus.setdefault((ds, who), []).append(cpu)
                    sample_rss()
                    say(f"round {r + 1}/{args.rounds} {ds:4s} {who:9s} {dt:7.2f} s  "
                        f"{nbytes / dt / 1e6:7.0f} MB/s {files / dt:9.0f} files/s  cpu {cpu:6.2f} s{extra}")

        # 5. status latency while copies run
        sync()
        lat = latency_during_copies(svc, "big", args.copies, args.poll_ms / 1000, sample_rss)
        sample_rss()
        samples = lat["samples"]
        copied = args.copies * big[1]
        say(f"{args.copies} concurrent copies of big ({copied / 1e9:.1f} GB) took {lat['elapsed']:.1f} s "
            f"({copied / lat['elapsed'] / 1e6:.0f} MB/s); {len(samples)} status requests while they ran")

        # 6. load generator (on a finished job)
        job_id = svc.complete("r0", "big").json()["job_id"]  # 200: the round-1 job, already done
        c0 = cpu_seconds(pid) + sum(cpu_seconds(rp) for rp in redis_pids)
        load = load_generator(svc.port, job_id, args.load_conns, args.load_seconds)
        load_cpu = cpu_seconds(pid) + sum(cpu_seconds(rp) for rp in redis_pids) - c0
        sample_rss()
        say(f"load generator: {load['requests']} status requests in {load['elapsed']:.1f} s on "
            f"{args.load_conns} connections = {load['rps']:.0f} req/s "
            f"(p50 {pct(load['lat'], 50) * 1000:.1f} ms, p99 {pct(load['lat'], 99) * 1000:.1f} ms); "
            f"service + redis CPU {load_cpu / max(1, load['requests']) * 1e6:.0f} us per request")
    finally:
        sample_rss()
        svc.stop()

    # 7. summary
    say("")
    say("=" * 100)
    say(f"SUMMARY  (big = {big[0]} x {args.big_mib} MiB, many = {many[0]} files of 4-64 KiB; medians of "
        f"{args.rounds}; warm page cache; new-file write {wcost:.0f} us; dtsbridge [copy] checksum = {copy['checksum']}, fsync = {copy['fsync']}, "
        f"threads = {copy['threads']}, processes = {copy['processes']})")
    say("=" * 100)
    rows: list[tuple[str, str, str, str]] = []
    for ds in ("big", "many"):
        files, nbytes = data[ds]
        d = statistics.median(times[(ds, "dtsbridge")])
        say(f"{ds:4s} dtsbridge POST /complete_transfer -> 201   {fmt_s(d)}  {nbytes / d / 1e6:7.0f} MB/s "
            f"{files / d:9.0f} files/s   runs: {', '.join(f'{x:.2f}' for x in times[(ds, 'dtsbridge')])}; "
            f"cpu {statistics.median(cpus[(ds, 'dtsbridge')]):.2f} s")
        if not args.skip_rsync:
            rs = statistics.median(times[(ds, "rsync")])
            rss = statistics.median([a + b for a, b in zip(times[(ds, "rsync")], syncs[ds])])
            say(f"{ds:4s} rsync -a + rsync -anc                  {fmt_s(rs)}  {nbytes / rs / 1e6:7.0f} MB/s "
                f"{files / rs:9.0f} files/s   runs: {', '.join(f'{x:.2f}' for x in times[(ds, 'rsync')])}; "
                f"cpu {statistics.median(cpus[(ds, 'rsync')]):.2f} s")
            say(f"{ds:4s} rsync -a + rsync -anc + sync           {fmt_s(rss)}  {nbytes / rss / 1e6:7.0f} MB/s "
                f"{files / rss:9.0f} files/s   (same durability as fsync = true)")
            ratio = d / rs
            rows.append((f"{ds}: time ratio dtsbridge / rsync pair", f"{ratio:.2f}", f"<= {TARGET_RATIO}",
                         "MET" if ratio <= TARGET_RATIO else "NOT MET"))
            rows.append((f"{ds}: ratio dtsbridge / (rsync pair + sync)", f"{d / rss:.2f}", "(same durability)", ""))
    p95 = pct(samples, 95) * 1000
    rows.append((f"status latency while {args.copies} copies run: p50 / p95 / p99 / max (ms)",
                 f"{pct(samples, 50) * 1000:.1f} / {p95:.1f} / {pct(samples, 99) * 1000:.1f} / "
                 f"{max(samples) * 1000 if samples else float('nan'):.1f}",
                 f"p95 < {TARGET_P95_MS:.0f}", "MET" if samples and p95 < TARGET_P95_MS else "NOT MET"))
    rows.append((f"status requests/s ({args.load_conns} keep-alive connections, {args.load_seconds:.0f} s)",
                 f"{load['rps']:.0f}", f">= {TARGET_RPS:.0f}", "MET" if load["rps"] >= TARGET_RPS else "NOT MET"))
    rows.append(("peak RSS of twistd (VmHWM, whole run incl. multi-GB copies)", f"{peak['twistd'] / 1e6:.0f} MB",
                 f"< {TARGET_RSS_MB:.0f} MB", "MET" if peak["twistd"] / 1e6 < TARGET_RSS_MB else "NOT MET"))
    rows.append(("peak RSS of its embedded redis-server (VmHWM)", f"{peak['redis'] / 1e6:.0f} MB", "(reported apart)", ""))
    rows.append((f"peak RSS of its copy worker processes, summed ({len(workers)} processes)",
                 f"{peak['workers'] / 1e6:.0f} MB", "(reported apart)", ""))
    say("-" * 100)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    for r in rows:
        say(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:<{w2}}  {r[3]}")
    say("=" * 100)
    if not lat["seen"]:
        say("note: no status answer showed a job in TRANSFERRING; the copies ended too fast for the latency test "
            "to mean much (use bigger --big-mib)")
    return 0


# ---------------------------------------------------------------------------
# Faster than copying (issue 13): --reflink and --resume scenarios


TARGET_REFLINK = 0.2
TARGET_RESUME = 0.4


def proc_write_bytes(pid: int) -> int:
    """``write_bytes`` of /proc/PID/io: bytes this process caused to be written to storage (0 if gone)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def service_copy_settings(args: argparse.Namespace) -> dict[str, str]:
    return {"max_jobs": "4", "lease_seconds": "15", "threads": str(args.threads or 4),
            "processes": args.processes or "auto", "checksum": args.checksum or "xxh3",
            "fsync": args.fsync or "true"}


def _summary(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    say("")
    say("=" * 100)
    say(title)
    say("=" * 100)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    for r in rows:
        say(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:<{w2}}  {r[3]}")
    say("=" * 100)


def _run_reflink(args: argparse.Namespace, work: Path) -> int:
    """dtsbridge with [copy] reflink = auto on a loop-mounted XFS (reflink=1) against the rsync pair there."""
    from tests.fsmount import loop_xfs, loop_xfs_unavailable, shared_bytes

    why = loop_xfs_unavailable()
    if why:
        raise SystemExit(f"--reflink needs a loop-mounted XFS: {why}")
    per_copy = args.big_files * args.big_mib * MiB + args.many * 36 * 1024
    gib = int(per_copy * (1 + args.rounds) * 1.3 / (1 << 30)) + 2  # the sources, one rsync copy a round
    st = os.statvfs(work)
    if st.f_bavail * st.f_frsize < gib * (1 << 30):
        raise SystemExit(f"{work} has too little space for a {gib} GiB XFS image")
    if args.ballast != 0:
        path, size, dt = ballast(work, args.ballast)
        if path is not None:
            say(f"memory warm-up: {size / (1 << 30):.1f} GiB in {dt:.1f} s")
    say(f"reflink benchmark: a {gib} GiB XFS image (mkfs.xfs -m reflink=1), mounted with -o loop in {work}/xfs")
    with loop_xfs(work / "xfs", f"{gib}G", reflink=True) as mnt:
        dts = mnt / "dts"
        big = make_big(dts / "big", args.big_files, args.big_mib)
        many = make_many(dts / "many", args.many)
        sync()
        read_all(dts)
        read_all(dts)
        data = {"big": big, "many": many}
        say(f"datasets on XFS: big = {big[0]} x {args.big_mib} MiB, many = {many[0]} files ({many[1] / 1e6:.0f} MB)")
        copy = service_copy_settings(args)
        svc = DtsBridge(mnt, "embedded", settings={"copy": copy}, name="bench")
        svc.start(timeout=60)
        times: dict[tuple[str, str], list[float]] = {}
        try:
            (svc.user_root / "warm").mkdir(exist_ok=True)
            make_many(dts / "warmup", 300, seed=3)
            svc.complete("warm", "warmup", timeout=300)
            for r in range(args.rounds):
                for ds in ("big", "many"):
                    files, nbytes = data[ds]
                    order = ["dtsbridge", "rsync"] if r % 2 == 0 else ["rsync", "dtsbridge"]
                    for who in order:
                        sync()
                        if who == "dtsbridge":
                            dt = run_dtsbridge(svc, f"r{r}", ds, files, nbytes)
                            job = svc.complete(f"r{r}", ds).json()  # 200: the same job's record
                            status = svc.status(job["job_id"]).json()
                            cloned = status.get("files_cloned", 0)
                            if cloned != files:
                                raise SystemExit(f"dtsbridge cloned {cloned} of {files} files: {status}")
                            extra = f"  ({cloned} files cloned)"
                        else:
                            dt = run_rsync(dts / ds, mnt / "rsync" / f"r{r}" / ds)
                            extra = ""
                        times.setdefault((ds, who), []).append(dt)
                        say(f"round {r + 1}/{args.rounds} {ds:4s} {who:9s} {dt:7.2f} s  "
                            f"{nbytes / dt / 1e6:7.0f} MB/s {files / dt:9.0f} files/s{extra}")
            sample = svc.user_root / "r0" / "big" / "big-00.bin"
            shared = shared_bytes(sample)
            say(f"FIEMAP of {sample.relative_to(mnt)}: {shared / MiB:.0f} MiB of {sample.stat().st_size / MiB:.0f} MiB "
                "in shared extents")
        finally:
            svc.stop()
    rows = []
    for ds in ("big", "many"):
        files, nbytes = data[ds]
        d = statistics.median(times[(ds, "dtsbridge")])
        rs = statistics.median(times[(ds, "rsync")])
        say(f"{ds:4s} dtsbridge (clones) {fmt_s(d)}  runs {', '.join(f'{x:.2f}' for x in times[(ds, 'dtsbridge')])}; "
            f"rsync -a + rsync -anc {fmt_s(rs)}  runs {', '.join(f'{x:.2f}' for x in times[(ds, 'rsync')])}")
        label = f"reflink XFS, {ds}: time ratio dtsbridge / rsync pair ({fmt_s(d).strip()} / {fmt_s(rs).strip()})"
        if ds == "big":
            rows.append((label, f"{d / rs:.3f}", f"<= {TARGET_REFLINK}", "MET" if d / rs <= TARGET_REFLINK else "NOT MET"))
        else:  # small files: per-file metadata work, not data, is the cost; a clone saves little of it
            rows.append((label, f"{d / rs:.3f}", "(reported)", ""))
    _summary(f"SUMMARY --reflink (big = {big[0]} x {args.big_mib} MiB, many = {many[0]} files; medians of "
             f"{args.rounds}; loop-mounted XFS with reflink; [copy] reflink = auto, checksum = {copy['checksum']}, "
             f"fsync = {copy['fsync']})", rows)
    return 0


def _service_writes(pid: int, redis_pids: list[int]) -> int:
    """write_bytes of twistd and its copy worker processes (not Redis)."""
    return proc_write_bytes(pid) + sum(proc_write_bytes(c) for c in descendants(pid) if c not in redis_pids)


def _temp_bytes(parent: Path, job_id: str) -> int:
    """Bytes written so far in a job's temporary folder(s) under ``parent``."""
    total = 0
    try:
        tops = [e for e in os.scandir(parent) if e.name.startswith(f".dtsbridge-{job_id}-")]
    except OSError:
        return 0
    for top in tops:
        for dirpath, _dirs, names in os.walk(top.path):
            for n in names:
                try:
                    total += os.stat(os.path.join(dirpath, n), follow_symlinks=False).st_size
                except OSError:
                    pass
    return total


def _wait_job(svc: DtsBridge, job_id: str, until: Callable[[dict[str, Any]], bool], poll: float = 0.005,
              timeout: float = 1800) -> dict[str, Any]:
    deadline = time.perf_counter() + timeout
    while True:
        try:
            r = svc.status(job_id)
            if r.status == 200:
                st = r.json()
                if until(st):
                    return st
                if st["status"] in ("ERROR", "CANCELLED"):
                    raise SystemExit(f"job {job_id} ended {st['status']}: {st}\n{svc.log_tail()}")
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise SystemExit(f"job {job_id} did not get there in {timeout} s\n{svc.log_tail()}")
        time.sleep(poll)


def _label(r: int, args: argparse.Namespace) -> str:
    return f"round {r + 1}/{args.rounds}" if r >= 0 else f"warm-up {r + args.resume_warmup + 1} (untimed)"


def _run_resume(args: argparse.Namespace, work: Path) -> int:
    """A multi-file job killed (-9) at --resume-kill-at of its bytes, restarted; against a full copy, same run."""
    if args.ballast != 0:
        path, size, dt = ballast(work, args.ballast)
        if path is not None:
            say(f"memory warm-up: {size / (1 << 30):.1f} GiB in {dt:.1f} s")
    n, mib = args.resume_files, args.resume_mib
    need = int(n * mib * MiB * (1 + 2 * args.rounds) * 1.1) + (1 << 30)
    st = os.statvfs(work)
    if st.f_bavail * st.f_frsize < need:
        raise SystemExit(f"{work} has too little space: this run writes about {need / 1e9:.1f} GB")
    dts = work / "dts"
    files, nbytes = make_big(dts / "multi", n, mib)
    sync()
    read_all(dts)
    read_all(dts)
    say(f"dataset: multi = {files} x {mib} MiB ({nbytes / 1e6:.0f} MB)")
    copy = service_copy_settings(args)
    svc = DtsBridge(work, "embedded", settings={"copy": copy}, name="bench")
    svc.start(timeout=60)
    full_t: list[float] = []
    full_w: list[int] = []
    res_t: list[float] = []
    res_w: list[int] = []
    res_wall: list[float] = []
    killed_at: list[float] = []
    kept: list[tuple[int, int]] = []
    try:
        (svc.user_root / "warm").mkdir(exist_ok=True)
        make_many(dts / "warmup", 300, seed=3)
        svc.complete("warm", "warmup", timeout=300)
        # Rounds below 0 are untimed warm-ups: the first rounds after the dataset was made ran
        # ~2x slower on both sides here (the disk still busy with it, whatever sync said).
        for r in range(-args.resume_warmup, args.rounds):
            order = ["full", "resume"] if r % 2 == 0 else ["resume", "full"]
            for who in order:
                assert svc.proc is not None
                pid = svc.proc.pid
                redis_pids = [c for c in children(pid) if "redis" in comm(c)]
                if who == "full":
                    read_all(dts / "multi")  # untimed: the source warm for both, as in the main benchmark
                    sync()
                    w0 = _service_writes(pid, redis_pids)
                    dt = run_dtsbridge(svc, f"f{r}" if r >= 0 else f"fw{-r}", "multi", files, nbytes)
                    w = _service_writes(pid, redis_pids) - w0
                    if r >= 0:
                        full_t.append(dt)
                        full_w.append(w)
                    say(f"{_label(r, args)} full copy   {dt:7.2f} s  {nbytes / dt / 1e6:7.0f} MB/s  "
                        f"wrote {w / 1e6:7.0f} MB")
                    continue
                # The crash: an async job, killed with its whole process group at kill-at of its bytes.
                cu = f"c{r}" if r >= 0 else f"cw{-r}"  # a user of its own (a valid username)
                (svc.user_root / cu).mkdir(exist_ok=True)
                resp = svc.complete(cu, "multi", asynchronous=True)
                if resp.status != 202:
                    raise SystemExit(f"async POST answered {resp.status}: {resp.body[:300]!r}")
                job_id = resp.json()["job_id"]
                # bytes_done in Redis moves once a second: watch the temporary folder itself instead.
                deadline = time.perf_counter() + 600
                while (got := _temp_bytes(svc.user_root / cu, job_id)) < args.resume_kill_at * nbytes:
                    if time.perf_counter() > deadline or (svc.user_root / cu / "multi").exists():
                        raise SystemExit(f"the job ended or stalled before it could be killed\n{svc.log_tail()}")
                    time.sleep(0.002)
                svc.kill()
                killed_at.append(got / nbytes)
                read_all(dts / "multi")
                sync()
                # The restart: timed from the process being up (healthy) to SUCCESS; write_bytes over its life.
                t0 = time.perf_counter()
                svc.start(timeout=60)
                t1 = time.perf_counter()
                assert svc.proc is not None
                pid = svc.proc.pid
                redis_pids = [c for c in children(pid) if "redis" in comm(c)]
                done = _wait_job(svc, job_id, lambda s: s["status"] == "SUCCESS")
                t2 = time.perf_counter()
                w = _service_writes(pid, redis_pids)
                if r >= 0:
                    res_t.append(t2 - t1)
                    res_wall.append(t2 - t0)
                    res_w.append(w)
                kept.append((done.get("files_resumed", 0), done.get("bytes_resumed", 0)))
                say(f"{_label(r, args)} resumed      {t2 - t1:7.2f} s  (restart to SUCCESS {t2 - t0:.2f} s) "
                    f"wrote {w / 1e6:7.0f} MB; killed at {killed_at[-1]:.0%} of the bytes; kept "
                    f"{kept[-1][0]} files, {kept[-1][1] / 1e6:.0f} MB")
    finally:
        svc.stop()
    ft, fw = statistics.median(full_t), statistics.median(full_w)
    rt, rw = statistics.median(res_t), statistics.median(res_w)
    say(f"full copy: runs {', '.join(f'{x:.2f}' for x in full_t)} s, wrote {', '.join(f'{x / 1e6:.0f}' for x in full_w)} MB")
    say(f"resumed:   runs {', '.join(f'{x:.2f}' for x in res_t)} s (restart to SUCCESS "
        f"{', '.join(f'{x:.2f}' for x in res_wall)} s), wrote {', '.join(f'{x / 1e6:.0f}' for x in res_w)} MB")
    rows = [
        (f"resume: restarted attempt's time / full copy's ({rt:.2f} s / {ft:.2f} s)", f"{rt / ft:.3f}",
         f"<= {TARGET_RESUME}", "MET" if rt / ft <= TARGET_RESUME else "NOT MET"),
        (f"resume: bytes written by the restarted process / full copy's ({rw / 1e6:.0f} MB / {fw / 1e6:.0f} MB)",
         f"{rw / fw:.3f}", f"<= {TARGET_RESUME}", "MET" if rw / fw <= TARGET_RESUME else "NOT MET"),
        ("killed at (bytes in its temporary folder / total, median)", f"{statistics.median(killed_at[-args.rounds:]):.2f}", ">= 0.70",
         "MET" if statistics.median(killed_at[-args.rounds:]) >= 0.7 else "NOT MET"),
    ]
    _summary(f"SUMMARY --resume (multi = {files} x {mib} MiB; medians of {args.rounds}; kill -9 of the process group; "
             f"[copy] threads = {copy['threads']}, checksum = {copy['checksum']}, fsync = {copy['fsync']})", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
