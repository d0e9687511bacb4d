#!/usr/bin/env python3
"""Attack a real ``twistd dtsbridge`` the way an anonymous client could, and print what it costs.

Run it from the repository with the project's Python::

    python bench/web_attack.py                 # about one minute

It starts ``twistd -n dtsbridge`` (``tests/harness.py``, embedded Redis, a private
``TMPDIR``) and, while polling ``/healthz`` every 20 ms, runs:

1. *slowloris*: 300 connections that send one header line every 5 s (they are
   cut off at ``[server] read_timeout_seconds``, default 20);
2. *blasters*: 10 clients streaming a body at full speed for 8 s, first with
   ``Content-Length: 1 GiB``, then chunked (each gets 413 at once);
3. *blind senders*: ``http.client`` posting 20 and 300 MiB bodies before
   reading any answer (they still read the 413).

For each it prints the ``/healthz`` latency (median, max), the service's open
descriptors, and any file the service holds open in its temporary folder.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import DtsBridge  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="dtsbridge-attack-"))
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    svc = DtsBridge(root, "embedded")
    svc.extra_env["TMPDIR"] = str(tmpdir)
    svc.start()
    pid = svc.proc.pid  # type: ignore[union-attr]

    def fds() -> list[str]:
        out = []
        for f in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{f}"))
            except OSError:
                pass
        return out

    def probe(seconds: float) -> list[float]:
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            r = svc.call("GET", "/healthz", timeout=30)
            assert r.status == 200, r
            out.append(time.monotonic() - t)
            time.sleep(0.02)
        return out

    def report(name: str, lat: list[float]) -> None:
        spooled = [f for f in fds() if f.startswith(str(tmpdir))]
        print(f"{name:<34} healthz median {statistics.median(lat) * 1000:6.1f} ms, max {max(lat) * 1000:6.1f} ms;"
              f" open fds {len(fds())}; temp files {spooled}", flush=True)

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", svc.port))

    try:
        report("idle", probe(1))

        socks = [connect() for _ in range(300)]
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(5):
                for s in socks:
                    try:
                        s.sendall(b"X-Slow: y\r\n")
                    except OSError:
                        pass

        threading.Thread(target=drip, daemon=True).start()
        report("slowloris, 300 connections", probe(3))
        t0 = time.monotonic() - 3
        while len(fds()) > 100 and time.monotonic() - t0 < 90:
            time.sleep(0.5)
        print(f"{'slowloris':<34} all cut off after {time.monotonic() - t0:.1f} s; open fds {len(fds())}", flush=True)
        stop.set()
        for s in socks:
            s.close()

        def blast(chunked: bool) -> None:
            s = connect()
            try:
                if chunked:
                    s.sendall(b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                    piece = b"10000\r\n" + b"a" * 65536 + b"\r\n"
                else:
                    s.sendall(b"POST /complete_transfer HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
                    piece = b"a&" * 32768
                end = time.monotonic() + 8
                while time.monotonic() < end:
                    s.sendall(piece)
            except OSError:
                pass
            finally:
                s.close()

        for chunked in (False, True):
            threads = [threading.Thread(target=blast, args=(chunked,)) for _ in range(10)]
            for t in threads:
                t.start()
            report(f"10 blasters, {'chunked' if chunked else 'Content-Length 1 GiB'}", probe(6))
            for t in threads:
                t.join()

        for mib in (20, 300):
            answer: dict[str, object] = {}

            def blind() -> None:
                t = time.monotonic()
                r = svc.call("POST", "/complete_transfer", raw=b"a&" * (mib * 512 * 1024),
                             headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
                answer.update(status=r.status, seconds=time.monotonic() - t)

            sender = threading.Thread(target=blind)
            sender.start()
            lat = probe(2)
            sender.join()
            report(f"blind sender, {mib} MiB `a&a&...`", lat)
            print(f"{'':<34} its answer: {answer['status']} after {answer['seconds']:.2f} s", flush=True)
    finally:
        svc.stop()
        svc.kill()


if __name__ == "__main__":
    main()
