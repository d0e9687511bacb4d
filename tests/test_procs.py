"""dtsbridge.procs.pid_alive: the one check of "is that process still running" (lease recovery,
a stale embedded redis-server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dtsbridge.procs import pid_alive


def test_a_running_process_is_alive_an_ended_one_is_not_even_as_a_zombie() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped yet: a zombie, which holds no lease and serves no Redis.
        deadline = time.monotonic() + 10
        while pid_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_alive(child.pid)
        assert os.waitpid(child.pid, os.WNOHANG)[0] == child.pid  # (it was a zombie until now)
        assert not pid_alive(child.pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_another_users_process_is_alive() -> None:
    assert pid_alive(1)  # init: alive whether or not this test may signal it
