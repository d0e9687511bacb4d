"""A private Redis Sentinel set for tests: a primary, a replica and three sentinels on free local ports.

``SentinelSet(tmpdir).start()`` starts them (``redis-server`` twice, then
``redis-sentinel`` — or ``redis-server --sentinel`` — three times, each with its
own config file, which Sentinel rewrites) and waits until every sentinel knows
the primary, the replica and the other sentinels. ``url`` is the
``redis+sentinel://`` URL dtsbridge takes; ``primary()`` asks a sentinel which
server is the primary now. Only processes started here are ever signalled.

The ``sentinel_set`` fixture skips with a reason when no Sentinel binary is
installed, except under ``CI=true``, where a missing Sentinel is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from dtsbridge.redis_server import deathsig_argv, find_redis_server
from tests.redis_fixture import RedisProcess, _free_port, find_redis_cli

MASTER = "dtsmaster"


def find_sentinel() -> list[str] | None:
    """argv prefix that runs a Sentinel: ``redis-sentinel``, else ``redis-server --sentinel``."""
    found = shutil.which("redis-sentinel")
    if found:
        return [found]
    try:
        server = find_redis_server()
    except Exception:  # noqa: BLE001
        return None
    # redis-server runs as a sentinel when asked (same binary).
    return [server, "--sentinel"] if server else None


class SentinelProcess:
    def __init__(self, root: Path, primary_port: int, quorum: int = 2) -> None:
        self.port = _free_port()
        self.dir = root / f"sentinel-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 4000\n"
            f"sentinel parallel-syncs {MASTER} 1\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, argv0: list[str]) -> None:
        if argv0[1:] == ["--sentinel"]:
            argv = deathsig_argv(argv0[0], str(self.conf), "--sentinel")
        else:
            argv = deathsig_argv(argv0[0], str(self.conf))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def cli(self, *args: str) -> str:
        res = subprocess.run([find_redis_cli(), "-h", "127.0.0.1", "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=10, check=False)
        return res.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.dir / "sentinel.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class SentinelSet:
    """One primary, one replica, three sentinels (quorum 2)."""

    def __init__(self, root: Path, argv0: list[str]) -> None:
        self.root = Path(root)
        self.argv0 = argv0
        self.primary_proc = RedisProcess(self.root / "primary")
        self.replica_proc = RedisProcess(self.root / "replica",
                                         extra_args=("--replicaof", "127.0.0.1", str(self.primary_proc.port)))
        self.sentinels = [SentinelProcess(self.root, self.primary_proc.port) for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}"

    @property
    def servers(self) -> list[RedisProcess]:
        return [self.primary_proc, self.replica_proc]

    def start(self, timeout: float = 30) -> "SentinelSet":
        self.primary_proc.start()
        self.replica_proc.start()
        self._wait(lambda: "master_link_status:up" in self.replica_proc.cli("INFO", "replication", check=False),
                   timeout, "the replica to sync")
        for s in self.sentinels:
            s.start(self.argv0)

        def settled() -> bool:
            for s in self.sentinels:
                info = s.cli("SENTINEL", "MASTER", MASTER)
                fields = info.split("\n")
                kv = dict(zip(fields[::2], fields[1::2]))
                if kv.get("num-slaves") != "1" or kv.get("num-other-sentinels") != "2":
                    return False
            return True
        self._wait(settled, timeout, "the sentinels to know the primary, the replica and each other")
        return self

    def primary(self) -> int | None:
        """The port of the primary as a sentinel sees it now."""
        for s in self.sentinels:
            out = s.cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER).split("\n")
            if len(out) == 2 and out[1].isdigit():
                return int(out[1])
        return None

    def server(self, port: int) -> RedisProcess:
        return next(r for r in self.servers if r.port == port)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}\n" + "\n".join(s.log_tail() for s in self.sentinels))

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for r in self.servers:
            r.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    argv0 = find_sentinel()
    if argv0 is None or not os.access(argv0[0], os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("redis-sentinel (or a redis-server that can run --sentinel) is required under CI")
        pytest.skip("no redis-sentinel or redis-server to run Sentinel with (apt-get install redis-sentinel)")
    ss = SentinelSet(tmp_path / "sentinel", argv0)
    try:
        ss.start()
        yield ss
    finally:
        ss.stop()
