#!/usr/bin/env python3
"""Many ``GET /events?last_event_id=0-0`` replays at once, and what they cost ``/healthz``.

Run it from the repository with the project's Python::

    python bench/sse_replays.py                # about half a minute

It starts ``twistd -n dtsbridge`` (``tests/harness.py``, a private ``redis-server``),
completes ``--jobs`` jobs for user alice (8 clients at once), then opens ``--stuck``
streams with alice's token (no role) asking for a replay from ``0-0`` that never read
(4 KiB receive buffer) and ``--readers`` that read their replay whole, while ``/healthz``
is polled every 20 ms. It prints the ``/healthz`` latency (median, p99, max).
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import ALICE_TOKEN, DtsBridge, make_tree  # noqa: E402
from tests.redis_fixture import RedisProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--stuck", type=int, default=100)
    ap.add_argument("--readers", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dtsbridge-sse-"))
    redis = RedisProcess(root / "redis").start()
    svc = DtsBridge(root, redis.url)
    try:
        svc.start()
        for i in range(a.jobs):
            make_tree(svc.dts_root / f"t{i}", {"a": b"1"})

        def complete(k: int) -> None:
            for i in range(k, a.jobs, 8):
                svc.complete("alice", f"t{i}")
        ts = [threading.Thread(target=complete, args=(k,)) for k in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        time.sleep(2)

        def healthz() -> float:
            t = time.monotonic()
            svc.call("GET", "/healthz", timeout=60)
            return (time.monotonic() - t) * 1000

        def opened(n: int) -> list[socket.socket]:
            out = []
            for _ in range(n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", svc.port))
                s.sendall(f"GET /events?last_event_id=0-0 HTTP/1.1\r\nHost: x\r\nAuthorization: {ALICE_TOKEN}"
                          "\r\n\r\n".encode())
                out.append(s)
            return out

        idle = [healthz() for _ in range(50)]
        got = [0] * a.readers

        def read(i: int, s: socket.socket) -> None:
            s.settimeout(30)
            buf = bytearray()
            try:
                while b"\n: live\n" not in buf[-256:]:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except OSError:
                pass
            got[i] = buf.count(b"\nevent: job\n")

        stuck = opened(a.stuck)
        readers = opened(a.readers)
        rts = [threading.Thread(target=read, args=(i, s), daemon=True) for i, s in enumerate(readers)]
        [t.start() for t in rts]
        busy, end = [], time.monotonic() + a.seconds
        while time.monotonic() < end:
            busy.append(healthz())
            time.sleep(0.02)
        [t.join(30) for t in rts]
        for s in stuck + readers:
            s.close()
        q = lambda xs: f"median {statistics.median(xs):.1f} ms, p99 {sorted(xs)[int(len(xs) * 0.99) - 1]:.1f} ms, max {max(xs):.1f} ms"  # noqa: E731
        print(f"{a.jobs} jobs; /healthz idle: {q(idle)}")
        print(f"{a.stuck} stuck + {a.readers} reading replays from 0-0 ({len(busy)} probes): {q(busy)}")
        kept = len([x for x in redis.cli("XRANGE", "dtsbridge:events", "-", "+").splitlines()
                    if re.fullmatch(r"\d{10,}-\d+", x.strip())])
        print(f"events each reader got: {sorted(set(got))} (events kept in Redis: about {kept}); streams dropped as not reading: {svc.log_text().count('stopped reading')}")
    finally:
        svc.kill()
        redis.stop()


if __name__ == "__main__":
    main()
