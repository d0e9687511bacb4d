"""A small Server-Sent Events client for tests: reads a real ``GET /events`` stream in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable


class SseStream:
    """Opens ``path`` on 127.0.0.1:``port`` and collects events (and comment lines) as they come."""

    def __init__(self, port: int, path: str = "/events", token: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        h = {"Host": f"127.0.0.1:{port}", "Accept": "text/event-stream", **(headers or {})}
        if token is not None:
            h["Authorization"] = token
        req = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        self.sock.sendall(req.encode())
        self.file = self.sock.makefile("rb")
        status_line = self.file.readline().decode()
        self.status = int(status_line.split()[1])
        self.headers: dict[str, str] = {}
        while True:
            line = self.file.readline().decode().rstrip("\r\n")
            if not line:
                break
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.events: list[dict[str, Any]] = []
        self.comments: list[tuple[float, str]] = []
        self.closed = False
        self._lock = threading.Lock()
        self.body = b""
        if self.status != 200:
            self.body = self.file.read1(65536) if hasattr(self.file, "read1") else b""
            self.close()
            return
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _lines(self):
        chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        buf = b""
        while True:
            if chunked:
                size_line = self.file.readline()
                if not size_line:
                    return
                size = int(size_line.strip() or b"0", 16)
                if size == 0:
                    return
                data = self.file.read(size)
                self.file.readline()
            else:
                data = self.file.read1(65536)
                if not data:
                    return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode().rstrip("\r")

    def _read(self) -> None:
        event: dict[str, Any] = {}
        try:
            for line in self._lines():
                if line.startswith(":"):
                    with self._lock:
                        self.comments.append((time.monotonic(), line[1:].strip()))
                elif line == "":
                    if "data" in event:
                        event["job"] = json.loads(event["data"])
                        with self._lock:
                            self.events.append(event)
                    event = {}
                else:
                    k, _, v = line.partition(":")
                    event[k] = v[1:] if v.startswith(" ") else v
        except (OSError, ValueError):
            pass
        finally:
            self.closed = True

    def wait(self, cond: Callable[[list[dict[str, Any]]], Any], timeout: float = 30, what: str = "events") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                v = cond(list(self.events))
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {[(e.get('id'), e['job'].get('status')) for e in self.events]}")

    def wait_comment(self, text: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for t, c in self.comments:
                    if c == text:
                        return t
            time.sleep(0.05)
        raise AssertionError(f"no comment {text!r} in {timeout} s: {self.comments}")

    def of(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["job"]["job_id"] == job_id]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
