"""A small local HTTP server that speaks the parts of KBase auth2 dtsbridge uses.

It serves, over loopback only:

- ``GET /api/V2/token`` and ``GET /api/V2/me`` with ``Authorization: <token>``;
- ``GET /api/V2/users/?list=a,b`` (needs a valid token) answering
  ``{name: display}`` for the names that exist;
- ``GET /_control`` (the state and request counters) and ``POST /_control``
  (change the state, see :meth:`FakeAuth2State.apply`). ``/_control`` always
  answers, whatever the mode.

Modes (``mode``): ``ok`` (normal), ``error`` (HTTP 500 with an auth2 error
body), ``hang`` (never answers), ``garbage`` (200 with a body that is not
JSON), ``drop`` (closes the connection without answering). ``delay_seconds``
(default 0) makes every auth2 answer wait that long first (a slow auth2). "Down" is a
stopped server: :meth:`FakeAuth2.stop` in-process, :meth:`FakeAuth2Process.stop`
for the subprocess (``start()`` again brings it back on the same port, with
the same state).

The fake does not check ``expires`` itself: a token stored with an expiry in
the past is answered with that expiry, so the client's own check is tested.

In-process (inside a running reactor)::

    fake = start_fake_auth2(reactor)
    fake.add_user("alice", roles=["DTS_TRANSFER"])
    fake.add_token("tok-alice", "alice")
    ... fake.url, fake.counts["/api/V2/token"] ...
    await fake.stop()

As a separate process (plain synchronous code, e.g. a pytest fixture)::

    proc = FakeAuth2Process(state={"users": {...}, "tokens": {...}})
    url = proc.start()
    proc.add_token("tok", "alice"); proc.set_mode("error"); proc.counts()
    proc.stop()

or from a shell: ``python -m tests.fakeauth2 --port-file PATH [--port N]
[--state FILE.json]`` (the state file is read at start and rewritten after
every change through ``POST /_control``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.internet import defer
from twisted.protocols.policies import WrappingFactory
from twisted.web import resource, server

API = "/api/V2"
MODES = ("ok", "error", "hang", "garbage", "drop")
DEFAULT_CACHEFOR_MS = 300_000
DEFAULT_LIFETIME_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


def auth2_error(httpcode: int, status: str, appcode: int | None, apperror: str | None, message: str) -> dict:
    err: dict[str, Any] = {
        "httpcode": httpcode,
        "httpstatus": status,
        "message": message,
        "callid": "%016x" % (time.monotonic_ns() & 0xFFFFFFFFFFFFFFFF),
        "time": now_ms(),
    }
    if appcode is not None:
        err["appcode"] = appcode
        err["apperror"] = apperror
    return {"error": err}


def invalid_token_error() -> dict:
    """auth2's answer to an unknown token or a missing header (with HTTP 401)."""
    return auth2_error(401, "Unauthorized", 10020, "Invalid token", "10020 Invalid token")


class FakeAuth2State:
    """Tokens, users, mode and per-path request counters; JSON-serialisable."""

    def __init__(self, state: dict | None = None) -> None:
        self.tokens: dict[str, dict] = {}
        self.users: dict[str, dict] = {}
        self.mode = "ok"
        self.delay_seconds = 0.0
        self.counts: dict[str, int] = {}
        if state:
            self.apply(state)

    # -- changes ---------------------------------------------------------
    def add_token(
        self,
        token: str,
        user: str,
        *,
        expires: int | None = None,
        cachefor: int = DEFAULT_CACHEFOR_MS,
        name: str | None = None,
    ) -> None:
        """``expires``: absolute, ms since the epoch (default: in an hour)."""
        created = now_ms()
        self.tokens[token] = {
            "user": user,
            "expires": created + DEFAULT_LIFETIME_MS if expires is None else int(expires),
            "cachefor": int(cachefor),
            "created": created,
            "name": name,
        }

    def add_user(self, name: str, roles: list[str] | tuple[str, ...] = (), display: str | None = None) -> None:
        self.users[name] = {"customroles": list(roles), "display": display or name.title()}

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        self.mode = mode

    def apply(self, change: dict) -> None:
        """Apply a control document. Keys (all optional), applied in this order:

        - ``replace``: true → forget all tokens and users first;
        - ``remove_tokens``, ``remove_users``: lists of keys to drop;
        - ``tokens``: ``{token: {"user", "expires" (ms, default now+1h),
          "cachefor" (ms, default 300000), "name"}}`` merged in;
        - ``users``: ``{name: {"customroles": [...], "display": ...}}`` merged in;
        - ``mode``: one of ``ok error hang garbage drop``;
        - ``delay_seconds``: every auth2 answer waits this long first (0: none);
        - ``reset_counts``: true → zero the request counters.
        """
        if not isinstance(change, dict):
            raise ValueError("control document must be a JSON object")
        if change.get("replace"):
            self.tokens.clear()
            self.users.clear()
        for t in change.get("remove_tokens", ()):
            self.tokens.pop(t, None)
        for u in change.get("remove_users", ()):
            self.users.pop(u, None)
        for token, info in (change.get("tokens") or {}).items():
            if isinstance(info, str):
                info = {"user": info}
            self.add_token(
                token,
                info["user"],
                expires=info.get("expires"),
                cachefor=info.get("cachefor", DEFAULT_CACHEFOR_MS),
                name=info.get("name"),
            )
        for name, info in (change.get("users") or {}).items():
            info = info or {}
            self.add_user(name, info.get("customroles", info.get("roles", ())), info.get("display"))
        if "mode" in change:
            self.set_mode(change["mode"])
        if "delay_seconds" in change:
            self.delay_seconds = max(0.0, float(change["delay_seconds"]))
        if change.get("reset_counts"):
            self.counts.clear()

    def snapshot(self, with_counts: bool = True) -> dict:
        doc: dict[str, Any] = {"tokens": self.tokens, "users": self.users, "mode": self.mode,
                               "delay_seconds": self.delay_seconds}
        if with_counts:
            doc["counts"] = self.counts
        return json.loads(json.dumps(doc))


def _json(request, code: int, doc: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc).encode()


class FakeAuth2Resource(resource.Resource):
    isLeaf = True

    def __init__(self, state: FakeAuth2State, on_change=None) -> None:
        super().__init__()
        self.state = state
        self.on_change = on_change
        self.hanging: list = []

    def render(self, request):
        path = request.path.decode("latin-1")
        if path == "/_control":
            return self._control(request)
        key = path.rstrip("/") or "/"
        self.state.counts[key] = self.state.counts.get(key, 0) + 1
        if self.state.delay_seconds > 0:
            from twisted.internet import reactor

            def answer() -> None:
                if request.finished or request._disconnected:
                    return
                body = self._answer(request, key)
                if body is not server.NOT_DONE_YET:
                    request.write(body)
                    request.finish()

            request.notifyFinish().addErrback(lambda _: None)
            reactor.callLater(self.state.delay_seconds, answer)
            return server.NOT_DONE_YET
        return self._answer(request, key)

    def _answer(self, request, key: str):
        mode = self.state.mode
        if mode == "hang":
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        if mode == "drop":
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        if mode == "error":
            return _json(request, 500, auth2_error(500, "Internal Server Error", None, None, "database went away"))
        if mode == "garbage":
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body>502 Bad Gateway (nginx)</body></html>"
        if request.method != b"GET":
            return _json(request, 405, auth2_error(405, "Method Not Allowed", None, None, "HTTP 405 Method Not Allowed"))
        if key not in (f"{API}/token", f"{API}/me", f"{API}/users"):
            return _json(request, 404, auth2_error(404, "Not Found", None, None, "HTTP 404 Not Found"))
        raw = request.getHeader(b"authorization")
        token = raw.decode("latin-1").strip() if raw else ""
        info = self.state.tokens.get(token)
        if info is None:
            return _json(request, 401, invalid_token_error())
        user = info["user"]
        if key == f"{API}/token":
            return _json(request, 200, {
                "type": "Login",
                "id": hashlib.sha256(b"id:" + token.encode()).hexdigest()[:32],
                "expires": info["expires"],
                "created": info["created"],
                "name": info.get("name"),
                "user": user,
                "custom": {},
                "cachefor": info["cachefor"],
            })
        if key == f"{API}/me":
            u = self.state.users.get(user, {"customroles": [], "display": user})
            return _json(request, 200, {
                "user": user,
                "display": u.get("display"),
                "email": f"{user}@example.org",
                "customroles": list(u.get("customroles", [])),
                "roles": [],
                "idents": [],
                "policyids": [],
                "created": info["created"],
                "lastlogin": info["created"],
                "local": False,
            })
        # users list
        names = [n for n in (request.args.get(b"list", [b""])[0].decode("utf-8", "replace")).split(",") if n.strip()]
        found = {n.strip(): self.state.users[n.strip()].get("display") for n in names if n.strip() in self.state.users}
        return _json(request, 200, found)

    def _control(self, request):
        if request.method == b"POST":
            try:
                change = json.loads(request.content.read() or b"{}")
                self.state.apply(change)
            except (ValueError, KeyError, TypeError) as e:
                return _json(request, 400, {"error": str(e)})
            if self.on_change is not None:
                self.on_change(self.state)
            if self.state.mode != "hang":
                self.release_hanging()
        return _json(request, 200, self.state.snapshot())

    def release_hanging(self) -> None:
        """Drop the connections of requests left hanging (they never get an answer)."""
        hanging, self.hanging = self.hanging, []
        for req in hanging:
            if req.transport is not None:
                req.transport.abortConnection()


class FakeAuth2:
    """An in-process fake auth2 on 127.0.0.1. Build it with :func:`start_fake_auth2`."""

    def __init__(self, reactor, port: int = 0, state: dict | None = None, interface: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.state = FakeAuth2State(state)
        self.resource = FakeAuth2Resource(self.state)
        self.site = server.Site(self.resource)
        self.site.displayTracebacks = False
        self.site.noisy = False
        # WrappingFactory remembers open connections, so stop() can close them all
        self._factory = WrappingFactory(self.site)
        self._factory.noisy = False
        self._port = reactor.listenTCP(port, self._factory, interface=interface)
        self.port = self._port.getHost().port
        self.url = f"http://{interface}:{self.port}"

    # state helpers (same names as FakeAuth2Process)
    def add_token(self, token: str, user: str, **kw) -> None:
        self.state.add_token(token, user, **kw)

    def add_user(self, name: str, roles=(), display: str | None = None) -> None:
        self.state.add_user(name, roles, display)

    def set_mode(self, mode: str) -> None:
        self.state.set_mode(mode)
        if mode != "hang":
            self.resource.release_hanging()

    def control(self, **change) -> dict:
        self.state.apply(change)
        return self.state.snapshot()

    @property
    def counts(self) -> dict[str, int]:
        """Requests per path, e.g. ``counts["/api/V2/token"]`` (0 when never asked)."""
        return _Counts(self.state.counts)

    def reset_counts(self) -> None:
        self.state.counts.clear()

    def stop(self) -> defer.Deferred:
        """Stop listening and close every open connection (hanging ones too)."""
        d = defer.maybeDeferred(self._port.stopListening)
        self.resource.hanging = []
        for proto in list(self._factory.protocols):
            if proto.transport is not None:
                proto.transport.abortConnection()
        return d


class _Counts(dict):
    def __missing__(self, key):
        return 0


def start_fake_auth2(reactor, port: int = 0, state: dict | None = None) -> FakeAuth2:
    """Start an in-process fake auth2 listening on 127.0.0.1 (``port=0``: any free port)."""
    return FakeAuth2(reactor, port=port, state=state)


# ----------------------------------------------------------------------------
# The subprocess form
# ----------------------------------------------------------------------------

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeAuth2Process:
    """Run the fake in a child process, driven from synchronous code.

    ``FakeAuth2Process(state=None, port=0, workdir=None)``; ``start()`` returns
    the URL (also ``.url``); ``stop()`` kills the child (then the port is
    closed: auth2 is "down"); ``start()`` again restarts it on the same port
    with the last state. Also usable as a context manager.
    """

    def __init__(self, state: dict | None = None, port: int = 0, workdir: str | None = None, start_timeout: float = 15.0) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="fakeauth2-")
        self.state_file = os.path.join(self.workdir, "fakeauth2-state.json")
        self.port_file = os.path.join(self.workdir, "fakeauth2.port")
        self.log_file = os.path.join(self.workdir, "fakeauth2.log")
        self.port = port
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        with open(self.state_file, "w") as f:
            json.dump(FakeAuth2State(state).snapshot(with_counts=False), f)

    def start(self) -> str:
        if self.proc is not None:
            return self.url  # type: ignore[return-value]
        try:
            os.unlink(self.port_file)
        except FileNotFoundError:
            pass
        env = dict(os.environ)
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fakeauth2", "--port", str(self.port),
                 "--port-file", self.port_file, "--state", self.state_file],
                cwd=_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                with open(self.log_file, errors="replace") as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"fake auth2 did not start; log:\n{tail}")
            time.sleep(0.02)
        with open(self.port_file) as f:
            self.port = int(f.read().strip())
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        """Stop the child; the port is then closed (connection refused)."""
        self._kill()

    def close(self) -> None:
        """Stop and remove the work folder if this object made it."""
        self._kill()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "FakeAuth2Process":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- control --------------------------------------------------------
    def _call(self, method: str, doc: dict | None = None) -> dict:
        if self.url is None or self.proc is None:
            raise RuntimeError("fake auth2 process is not running")
        data = None if doc is None else json.dumps(doc).encode()
        req = urllib.request.Request(self.url + "/_control", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def control(self, **change) -> dict:
        """POST /_control with ``change`` (see :meth:`FakeAuth2State.apply`); returns the new state."""
        return self._call("POST", change)

    def get_state(self) -> dict:
        return self._call("GET")

    def add_token(self, token: str, user: str, *, expires: int | None = None,
                  cachefor: int = DEFAULT_CACHEFOR_MS, name: str | None = None) -> None:
        self.control(tokens={token: {"user": user, "expires": expires, "cachefor": cachefor, "name": name}})

    def add_user(self, name: str, roles=(), display: str | None = None) -> None:
        self.control(users={name: {"customroles": list(roles), "display": display}})

    def set_mode(self, mode: str) -> None:
        self.control(mode=mode)

    def counts(self) -> dict[str, int]:
        return _Counts(self.get_state()["counts"])

    def reset_counts(self) -> None:
        self.control(reset_counts=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakeauth2", description="fake KBase auth2 for tests")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--port-file", help="write the listening port here once ready")
    p.add_argument("--state", help="JSON state file: read at start, rewritten after each /_control change")
    args = p.parse_args(argv)

    from twisted.internet import reactor

    initial = None
    if args.state and os.path.exists(args.state):
        with open(args.state) as f:
            initial = json.load(f)
    fake = FakeAuth2(reactor, port=args.port, state=initial, interface=args.interface)

    def save(state: FakeAuth2State) -> None:
        if not args.state:
            return
        tmp = args.state + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state.snapshot(with_counts=False), f)
        os.replace(tmp, args.state)

    fake.resource.on_change = save
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(fake.port))
        os.replace(tmp, args.port_file)
    print(f"fake auth2 listening on {fake.url}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
