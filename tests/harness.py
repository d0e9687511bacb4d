"""End-to-end harness: a real ``twistd -n dtsbridge`` process, configured as the spec shows.

``DtsBridge(tmp_path, redis_url)`` writes a config file and a tokens file,
starts the service on a free loopback port and waits for ``/healthz``;
``call()`` speaks HTTP to it; ``stop()`` (SIGTERM), ``kill()`` (SIGKILL) and
``start()`` drive its life. Nothing here is mocked.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent

DTS_TOKEN = "dts-token-0123456789abcdef"
NOROLE_TOKEN = "norole-token-0123456789abcdef"
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokens_ini() -> str:
    def sec(name: str, token: str, user: str, roles: str) -> str:
        return f"[{name}]\nsha256 = {hashlib.sha256(token.encode()).hexdigest()}\nuser = {user}\nroles = {roles}\n\n"
    return (sec("dts", DTS_TOKEN, "dts", "DTS_TRANSFER") + sec("norole", NOROLE_TOKEN, "somebody", "")
            + sec("alice", ALICE_TOKEN, "alice", "") + sec("bob", BOB_TOKEN, "bob", ""))


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


class DtsBridge:
    """One dtsbridge process and its folders under ``root``."""

    def __init__(self, root: Path, redis_url: str = "embedded", settings: dict[str, dict[str, Any]] | None = None,
                 name: str = "svc", shared_from: "DtsBridge | None" = None) -> None:
        self.root = Path(root)
        self.name = name
        self.port = free_port()
        self.etc = self.root / f"etc-{name}"
        self.etc.mkdir(parents=True, exist_ok=True)
        if shared_from is not None:  # a second process sharing folders (and Redis)
            self.dts_root, self.user_root = shared_from.dts_root, shared_from.user_root
        else:
            self.dts_root = self.root / "dts"
            self.user_root = self.root / "users"
        self.state_dir = self.root / f"state-{name}"
        self.dts_root.mkdir(parents=True, exist_ok=True)
        self.user_root.mkdir(parents=True, exist_ok=True)
        for user in ("alice", "bob"):
            (self.user_root / user).mkdir(exist_ok=True)
        (self.etc / "tokens.ini").write_text(tokens_ini())
        self.settings: dict[str, dict[str, Any]] = {
            "server": {"listen": f"tcp:{self.port}:interface=127.0.0.1"},
            "redis": {"url": redis_url},
            "state": {"dir": os.path.relpath(self.state_dir, self.etc)},
            "paths": {"dts_root": os.path.relpath(self.dts_root, self.etc),
                      "user_root": os.path.relpath(self.user_root, self.etc),
                      "target_subdir": "", "delete_source": "false"},
            "auth": {"backend": "tokens", "tokens_file": "tokens.ini", "transfer_role": "DTS_TRANSFER"},
            "users": {"check": "directory"},
            "ownership": {"mode": "none"},
            "copy": {"threads": "2", "max_jobs": "2", "lease_seconds": "4"},
        }
        for section, keys in (settings or {}).items():
            self.settings.setdefault(section, {}).update({k: str(v) for k, v in keys.items()})
        self.config_path = self.etc / "dtsbridge.ini"
        self.log_path = self.root / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.extra_env: dict[str, str] = {}  # added to the process environment by env() (e.g. fault hooks)
        self.write_config()

    # -- process ---------------------------------------------------------

    def write_config(self) -> None:
        lines = []
        for section, keys in self.settings.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {v}" for k, v in keys.items()]
            lines.append("")
        self.config_path.write_text("\n".join(lines))

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "-n", "--pidfile=", "dtsbridge", "--config", str(self.config_path)]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DTSBRIDGE_")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, wait: bool = True, timeout: float = 30, prefix: list[str] | None = None) -> "DtsBridge":
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen((prefix or []) + self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(self.root), env=self.env(), start_new_session=True)
        log.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"dtsbridge exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = self.call("GET", "/healthz", timeout=2)
                if r.status == 200:
                    return
                last = r
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise RuntimeError(f"dtsbridge not healthy in {timeout} s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the whole process group (twistd and its embedded Redis, if any)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP ------------------------------------------------------------

    def call(self, method: str, path: str, *, token: str | None = None, json_body: Any = None,
             form: dict[str, str] | None = None, raw: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60) -> Response:
        h = dict(headers or {})
        body: bytes | None = None
        if token is not None:
            h.setdefault("Authorization", token)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            h.setdefault("Content-Type", "application/json")
        elif form is not None:
            body = urllib.parse.urlencode(form).encode()
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif raw is not None:
            body = raw
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def complete(self, user: str, subdirectory: str, token: str = DTS_TOKEN, asynchronous: bool = False,
                 timeout: float = 120) -> Response:
        headers = {"Prefer": "respond-async"} if asynchronous else None
        return self.call("POST", "/complete_transfer", token=token,
                         json_body={"target_user": user, "subdirectory": subdirectory}, headers=headers,
                         timeout=timeout)

    def status(self, job_id: str, token: str = DTS_TOKEN) -> Response:
        return self.call("GET", "/transferStatus?" + urllib.parse.urlencode({"job_id": job_id}), token=token)

    def wait_status(self, job_id: str, statuses: set[str] | str, timeout: float = 60,
                    token: str = DTS_TOKEN) -> dict[str, Any]:
        want = {statuses} if isinstance(statuses, str) else set(statuses)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                r = self.status(job_id, token)
                if r.status == 200:
                    last = r.json()
                    if last["status"] in want:
                        return last
                else:
                    last = r
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not in {want} after {timeout} s: {last}\n{self.log_tail()}")


def wait_until(cond: Callable[[], Any], timeout: float, what: str, diag: Callable[[], str] = lambda: "",
               interval: float = 0.05) -> Any:
    """Poll ``cond`` until it is true (returning its value); fail with ``what`` and ``diag()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diag()}")
        time.sleep(interval)


def make_tree(root: Path, spec: dict[str, bytes | dict | None]) -> Path:
    """Make files (bytes) and folders (dict) under root; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in spec.items():
        p = root / name
        if isinstance(content, dict):
            make_tree(p, content)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content or b"")
    return root


def tree_of(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path → content), for comparing copies."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def leftovers(user_root: Path) -> list[str]:
    """Hidden temporary folders anywhere under user_root (there must be none after a job ends)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(user_root):
        for d in dirnames:
            if d.startswith(".dtsbridge-"):
                found.append(os.path.join(dirpath, d))
    return found
