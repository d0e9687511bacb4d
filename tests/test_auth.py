"""Tests for dtsbridge.auth against a real (fake) auth2 over loopback; no mocks."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site

from dtsbridge.auth import (
    Auth2,
    AuthUnavailable,
    DirectoryUsers,
    Identity,
    KBaseAuth,
    KBaseUsers,
    PasswdUsers,
    TokenFileAuth,
    Unauthorized,
    hash_token,
    make_user_checker,
    new_token,
    token_from_header,
    token_id,
)

try:
    from tests.fakeauth2 import FakeAuth2Process, start_fake_auth2
except ImportError:  # tests/ not importable as a package in this layout
    from fakeauth2 import FakeAuth2Process, start_fake_auth2  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)

AWAIT_TIMEOUT = 10.0
TOKEN = "tok-alice-0123456789"


def _reactor():
    from twisted.internet import reactor

    return reactor


async def within(awaitable, seconds: float = AWAIT_TIMEOUT):
    """Await with a deadline so a Deferred that never fires cannot hang the session."""
    d = defer.ensureDeferred(awaitable) if not isinstance(awaitable, defer.Deferred) else awaitable
    d.addTimeout(seconds, _reactor())
    return await d


def sync_runner(f, *a, **k):
    return defer.maybeDeferred(f, *a, **k)


class FakeClock:
    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest_twisted.async_yield_fixture
async def fake():
    f = start_fake_auth2(_reactor())
    f.add_user("alice", roles=["DTS_TRANSFER", "OTHER"], display="Alice A.")
    f.add_user("bob", roles=[])
    f.add_token(TOKEN, "alice")
    f.add_token("tok-service", "bob")
    yield f
    await within(f.stop())


@pytest_twisted.async_yield_fixture
async def kbase(fake):
    clock = FakeClock()
    auth = KBaseAuth(Auth2(fake.url, reactor, timeout=2), cache_seconds=300, clock=clock)
    auth.test_clock = clock  # type: ignore[attr-defined]
    yield auth
    await within(auth.close())


# ---------------------------------------------------------------------------
# token_from_header / hashing / new_token
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("   ", None),
        (b"", None),
        ("abc", "abc"),
        ("  abc  ", "abc"),
        (b"abc", "abc"),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        (b"Bearer abc", "abc"),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Bearerabc", "Bearerabc"),  # a bare token that happens to start with "Bearer"
        (b"\xff\xfe", None),
    ],
)
def test_token_from_header(value, expected):
    assert token_from_header(value) == expected


def test_hash_token_and_token_id():
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert token_id("abc") == "ba7816bf"
    assert "abc" not in token_id("abc")


def test_new_token_round_trip(tmp_path):
    tok, text = new_token("dts", "dts", ["DTS_TRANSFER", "ADMIN"])
    tok2, _ = new_token("dts", "dts", ["DTS_TRANSFER"])
    assert tok != tok2 and len(tok) >= 40
    assert text.startswith("[dts]\n")
    assert f"sha256 = {hash_token(tok)}\n" in text
    assert "user = dts\n" in text
    assert tok not in text
    path = tmp_path / "tokens.ini"
    path.write_text(text)
    ident = TokenFileAuth(str(path)).lookup(tok)
    assert ident == Identity("dts", frozenset({"DTS_TRANSFER", "ADMIN"}), hash_token(tok)[:8])


def test_new_token_rejects_bad_section():
    with pytest.raises(ValueError):
        new_token("a]b", "dts", [])
    with pytest.raises(ValueError):
        new_token("dts", "", [])


# ---------------------------------------------------------------------------
# TokenFileAuth
# ---------------------------------------------------------------------------


def _tokens_file(tmp_path, sections: dict[str, tuple[str, str, str]]):
    path = tmp_path / "tokens.ini"
    text = "".join(
        f"[{name}]\nsha256 = {hash_token(tok)}\nuser = {user}\nroles = {roles}\n\n"
        for name, (tok, user, roles) in sections.items()
    )
    path.write_text(text)
    return path


@pytest_twisted.ensureDeferred
async def test_tokens_file_good_unknown_missing(tmp_path):
    path = _tokens_file(tmp_path, {
        "dts": ("secret-dts", "dts", "DTS_TRANSFER, OTHER"),
        "ops": ("secret-ops", "ops", "A B,C"),
        "norole": ("secret-none", "viewer", ""),
    })
    auth = TokenFileAuth(str(path))
    ident = await within(auth.authenticate("secret-dts"))
    assert ident.user == "dts"
    assert ident.roles == frozenset({"DTS_TRANSFER", "OTHER"})
    assert ident.token_id == hash_token("secret-dts")[:8]
    assert (await within(auth.authenticate("secret-ops"))).roles == frozenset({"A", "B", "C"})
    # a token with no roles is still an identity; the web layer decides what it may do
    ident = await within(auth.authenticate("secret-none"))
    assert ident.user == "viewer" and ident.roles == frozenset()
    for bad in ("nope", "secret-dts ", "", None):
        with pytest.raises(Unauthorized):
            await within(auth.authenticate(bad))


def test_tokens_file_hash_is_case_insensitive(tmp_path):
    path = tmp_path / "tokens.ini"
    path.write_text(f"[x]\nsha256 = {hash_token('t').upper()}\nuser = u\n")
    assert TokenFileAuth(str(path)).lookup("t").user == "u"


def test_tokens_file_reload_on_change(tmp_path):
    clock = FakeClock(1000.0)
    path = _tokens_file(tmp_path, {"one": ("tok-1", "u1", "R")})
    auth = TokenFileAuth(str(path), clock=clock)
    assert auth.lookup("tok-1").user == "u1"

    _tokens_file(tmp_path, {"two": ("tok-2", "u2", "R")})
    clock.advance(0.5)  # checked at most once a second
    assert auth.lookup("tok-1").user == "u1"
    with pytest.raises(Unauthorized):
        auth.lookup("tok-2")
    clock.advance(1.0)
    assert auth.lookup("tok-2").user == "u2"
    with pytest.raises(Unauthorized):
        auth.lookup("tok-1")

    # a broken file on reload keeps the old table and logs the problem
    path.write_text("[broken]\nuser = x\n")
    clock.advance(1.5)
    with capturedLogs() as events:
        assert auth.lookup("tok-2").user == "u2"
    texts = [formatEvent(e) for e in events]
    assert any("not reloaded" in t and "[broken]" in t for t in texts), texts
    # ... and keeps it until the file is fixed
    clock.advance(1.5)
    assert auth.lookup("tok-2").user == "u2"
    _tokens_file(tmp_path, {"three": ("tok-3", "u3", "")})
    clock.advance(1.5)
    assert auth.lookup("tok-3").user == "u3"

    # the file vanishing keeps the table too
    path.unlink()
    clock.advance(1.5)
    with capturedLogs():
        assert auth.lookup("tok-3").user == "u3"


@pytest_twisted.ensureDeferred
async def test_tokens_file_reload_through_a_runner_that_answers_at_once(tmp_path):
    """A thread runner whose Deferred has fired when it returns (a synchronous one) leaves no
    reload "in progress" behind: every later change of the file is still picked up."""
    clock = FakeClock(1000.0)
    path = _tokens_file(tmp_path, {"one": ("tok-1", "u1", "R")})
    auth = TokenFileAuth(str(path), clock=clock, run_in_thread=sync_runner, reactor=reactor)
    assert (await within(auth.authenticate("tok-1"))).user == "u1"
    for n, user in ((2, "u22"), (3, "u333"), (4, "u4444")):
        _tokens_file(tmp_path, {f"s{n}": (f"tok-{n}", user, "R")})
        clock.advance(1.5)
        assert (await within(auth.authenticate(f"tok-{n}"))).user == user
        with pytest.raises(Unauthorized):
            await within(auth.authenticate(f"tok-{n - 1}"))


def test_tokens_file_thread_runner_needs_the_reactor(tmp_path):
    """No silent fallback to the global reactor: a runner without the reactor (which bounds the
    wait for a slow reload) is refused when the authenticator is made."""
    path = _tokens_file(tmp_path, {"one": ("tok-1", "u1", "R")})
    with pytest.raises(TypeError, match="reactor"):
        TokenFileAuth(str(path), run_in_thread=sync_runner)


@pytest_twisted.ensureDeferred
async def test_tokens_file_reload_runs_in_a_thread(tmp_path):
    """Issue 9 item 10: authenticate() checks and reads a changed file in a pool thread, never the reactor's."""
    import threading

    clock = FakeClock(1000.0)
    path = _tokens_file(tmp_path, {"one": ("tok-1", "u1", "R")})
    calls: list[str] = []

    def runner(f, *a, **k):
        calls.append(f.__name__)
        return threads.deferToThread(f, *a, **k)

    auth = TokenFileAuth(str(path), clock=clock, run_in_thread=runner, reactor=reactor)
    main = threading.current_thread()
    seen: list[threading.Thread] = []
    real_stat = os.stat

    def spy_stat(p, *a, **k):
        if str(p) == str(path):
            seen.append(threading.current_thread())
        return real_stat(p, *a, **k)

    os.stat = spy_stat
    try:
        assert (await within(auth.authenticate("tok-1"))).user == "u1"  # not due: no file access at all
        assert calls == [] and seen == []
        _tokens_file(tmp_path, {"two": ("tok-2", "u2", "R")})
        clock.advance(1.5)
        assert (await within(auth.authenticate("tok-2"))).user == "u2"  # the request that finds it due waits
        with pytest.raises(Unauthorized):
            await within(auth.authenticate("tok-1"))
    finally:
        os.stat = real_stat
    assert calls == ["_read_if_changed"]
    assert seen and main not in seen, seen
    # a waiter that goes away does not lose the reload for the others
    gate = defer.Deferred()

    def slow_runner(f, *a, **k):
        return gate.addCallback(lambda _: f(*a, **k))

    auth._run = slow_runner
    _tokens_file(tmp_path, {"three": ("tok-3", "u3", "")})
    clock.advance(1.5)
    first = defer.ensureDeferred(auth.authenticate("tok-3"))
    second = defer.ensureDeferred(auth.authenticate("tok-3"))
    first.cancel()
    gate.callback(None)
    assert (await within(second)).user == "u3"
    with pytest.raises(defer.CancelledError):
        await within(first)
    # a reload that hangs (a stuck file system) delays requests by at most reload_wait
    auth._run = lambda f, *a, **k: defer.Deferred()
    auth.reload_wait = 0.2
    _tokens_file(tmp_path, {"four": ("tok-4", "u4", "")})
    clock.advance(1.5)
    assert (await within(auth.authenticate("tok-3"))).user == "u3"
    assert (await within(auth.authenticate("tok-3"), 1)).user == "u3"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[dts]\nuser = dts\n", "[dts] has no sha256"),
        (f"[dts]\nsha256 = {'a' * 64}\n", "[dts] has no user"),
        ("[dts]\nsha256 = xyz\nuser = dts\n", "[dts]: sha256 is not 64 hex digits"),
        (f"[dts]\nsha256 = {'g' * 64}\nuser = dts\n", "[dts]: sha256 is not 64 hex digits"),
        (f"[a]\nsha256 = {'a' * 64}\nuser = x\n[b]\nsha256 = {'A' * 64}\nuser = y\n", "[b] repeats"),
        ("sha256 = abc\n", "tokens file"),
        ("[a]\nuser = x\n[a]\nuser = y\n", "tokens file"),
    ],
)
def test_tokens_file_bad_file_raises_clearly(tmp_path, text, fragment):
    path = tmp_path / "tokens.ini"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        TokenFileAuth(str(path))
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_tokens_file_missing_file(tmp_path):
    path = tmp_path / "absent.ini"
    with pytest.raises(ValueError, match="absent.ini"):
        TokenFileAuth(str(path))


def test_tokens_file_never_logs_the_token(tmp_path):
    path = _tokens_file(tmp_path, {"dts": ("very-secret-token", "dts", "R")})
    auth = TokenFileAuth(str(path))
    with capturedLogs() as events:
        auth.lookup("very-secret-token")
        with pytest.raises(Unauthorized):
            auth.lookup("other-secret-token")
    blob = json.dumps([formatEvent(e) for e in events]) + repr(events)
    assert "very-secret-token" not in blob and "other-secret-token" not in blob


# ---------------------------------------------------------------------------
# KBaseAuth
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_kbase_good_token(fake, kbase):
    ident = await within(kbase.authenticate(TOKEN))
    assert ident == Identity("alice", frozenset({"DTS_TRANSFER", "OTHER"}), token_id(TOKEN))
    assert fake.counts["/api/V2/token"] == 1 and fake.counts["/api/V2/me"] == 1
    ident = await within(kbase.authenticate("tok-service"))
    assert ident.user == "bob" and ident.roles == frozenset()


@pytest_twisted.ensureDeferred
async def test_kbase_invalid_and_missing_token(fake, kbase):
    with pytest.raises(Unauthorized):
        await within(kbase.authenticate("not-a-token"))
    for missing in (None, ""):
        with pytest.raises(Unauthorized):
            await within(kbase.authenticate(missing))
    assert fake.counts["/api/V2/token"] == 1


@pytest_twisted.ensureDeferred
async def test_kbase_expired_token(fake, kbase):
    fake.add_token("tok-old", "alice", expires=int((kbase.test_clock() - 60) * 1000))
    with pytest.raises(Unauthorized, match="expired"):
        await within(kbase.authenticate("tok-old"))


@pytest.mark.parametrize("mode", ["error", "garbage", "drop"])
@pytest_twisted.ensureDeferred
async def test_kbase_broken_auth2_is_unavailable_not_unauthorized(fake, kbase, mode):
    fake.set_mode(mode)
    for tok in (TOKEN, "not-a-token"):
        with pytest.raises(AuthUnavailable):
            await within(kbase.authenticate(tok))
    # nothing bad was cached: once auth2 recovers the token works at once
    fake.set_mode("ok")
    assert (await within(kbase.authenticate(TOKEN))).user == "alice"


@pytest_twisted.ensureDeferred
async def test_kbase_wrong_url_is_unavailable(fake):
    auth = KBaseAuth(Auth2(fake.url + "/services/nothing", reactor, timeout=2))
    try:
        with pytest.raises(AuthUnavailable, match="404"):
            await within(auth.authenticate(TOKEN))
    finally:
        await within(auth.close())


class _Canned(Resource):
    """A real HTTP server giving one canned answer to every request."""

    isLeaf = True

    def __init__(self, code: int, doc) -> None:
        super().__init__()
        self.code, self.doc = code, doc

    def render_GET(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.doc).encode()


@pytest.mark.parametrize(
    "code, doc, expected",
    [
        (400, {"error": {"httpcode": 400, "appcode": 10010, "message": "10010 No authentication token"}}, Unauthorized),
        (403, {"error": {"httpcode": 403, "appcode": 10011, "message": "10011 Invalid token"}}, Unauthorized),
        (400, {"error": {"httpcode": 400, "appcode": 30010, "message": "30010 Illegal input"}}, AuthUnavailable),
        (403, {"error": "forbidden by proxy"}, AuthUnavailable),
        (302, {}, AuthUnavailable),
        (200, {"unexpected": True}, AuthUnavailable),
        (200, [1, 2], AuthUnavailable),
    ],
)
@pytest_twisted.ensureDeferred
async def test_kbase_other_answers(code, doc, expected):
    port = _reactor().listenTCP(0, Site(_Canned(code, doc)), interface="127.0.0.1")
    auth = KBaseAuth(Auth2(f"http://127.0.0.1:{port.getHost().port}", reactor, timeout=2))
    try:
        with pytest.raises(expected):
            await within(auth.authenticate(TOKEN))
    finally:
        await within(auth.close())
        await within(defer.maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_kbase_hanging_auth2_times_out(fake):
    fake.set_mode("hang")
    auth = KBaseAuth(Auth2(fake.url, reactor, timeout=0.5))
    try:
        start = time.monotonic()
        with pytest.raises(AuthUnavailable, match="in time"):
            await within(auth.authenticate(TOKEN), 5)
        assert time.monotonic() - start < 3
    finally:
        await within(auth.close())


@pytest_twisted.ensureDeferred
async def test_kbase_down_is_unavailable():
    auth = KBaseAuth(Auth2(closed_port_url(), reactor, timeout=2))
    try:
        with pytest.raises(AuthUnavailable):
            await within(auth.authenticate(TOKEN))
    finally:
        await within(auth.close())


@pytest_twisted.ensureDeferred
async def test_kbase_stopped_fake_is_unavailable(fake, kbase):
    assert (await within(kbase.authenticate(TOKEN))).user == "alice"
    await within(fake.stop())
    with pytest.raises(AuthUnavailable):
        await within(kbase.authenticate("tok-service"))


@pytest_twisted.ensureDeferred
async def test_kbase_cache_honours_cachefor(fake, kbase):
    fake.add_token("tok-short", "alice", cachefor=60_000)
    clock = kbase.test_clock
    await within(kbase.authenticate("tok-short"))
    assert (fake.counts["/api/V2/token"], kbase.cache_misses, kbase.cache_hits) == (1, 1, 0)
    clock.advance(59)
    assert (await within(kbase.authenticate("tok-short"))).user == "alice"
    assert fake.counts["/api/V2/token"] == 1 and fake.counts["/api/V2/me"] == 1
    assert (kbase.cache_misses, kbase.cache_hits) == (1, 1)
    clock.advance(2)  # past cachefor: ask again
    await within(kbase.authenticate("tok-short"))
    assert fake.counts["/api/V2/token"] == 2 and fake.counts["/api/V2/me"] == 2
    assert kbase.cache_misses == 2


@pytest_twisted.ensureDeferred
async def test_kbase_cache_capped_by_cache_seconds(fake):
    clock = FakeClock()
    auth = KBaseAuth(Auth2(fake.url, reactor, timeout=2), cache_seconds=5, clock=clock)
    try:
        fake.add_token("tok-long", "alice", cachefor=3_600_000)
        await within(auth.authenticate("tok-long"))
        clock.advance(4)
        await within(auth.authenticate("tok-long"))
        assert fake.counts["/api/V2/token"] == 1
        clock.advance(2)
        await within(auth.authenticate("tok-long"))
        assert fake.counts["/api/V2/token"] == 2
    finally:
        await within(auth.close())


@pytest_twisted.ensureDeferred
async def test_kbase_cache_not_past_expiry(fake, kbase):
    clock = kbase.test_clock
    fake.add_token("tok-dying", "alice", expires=int((clock() + 3) * 1000), cachefor=300_000)
    await within(kbase.authenticate("tok-dying"))
    clock.advance(2)
    await within(kbase.authenticate("tok-dying"))
    assert fake.counts["/api/V2/token"] == 1
    clock.advance(2)
    with pytest.raises(Unauthorized):
        await within(kbase.authenticate("tok-dying"))
    assert fake.counts["/api/V2/token"] == 2


@pytest_twisted.ensureDeferred
async def test_kbase_rejections_cached_briefly(fake, kbase):
    clock = kbase.test_clock
    with pytest.raises(Unauthorized):
        await within(kbase.authenticate("tok-later"))
    with pytest.raises(Unauthorized):
        await within(kbase.authenticate("tok-later"))
    assert fake.counts["/api/V2/token"] == 1
    fake.add_token("tok-later", "bob")
    clock.advance(11)
    assert (await within(kbase.authenticate("tok-later"))).user == "bob"
    assert fake.counts["/api/V2/token"] == 2


@pytest_twisted.ensureDeferred
async def test_kbase_cache_size_is_bounded(fake):
    auth = KBaseAuth(Auth2(fake.url, reactor, timeout=2), max_cache_entries=2)
    try:
        for t in ("t1", "t2", "t3"):
            fake.add_token(t, "alice")
            await within(auth.authenticate(t))
        assert len(auth._cache) == 2
        await within(auth.authenticate("t3"))
        assert fake.counts["/api/V2/token"] == 3
        await within(auth.authenticate("t1"))  # the oldest was dropped
        assert fake.counts["/api/V2/token"] == 4
    finally:
        await within(auth.close())


@pytest_twisted.ensureDeferred
async def test_kbase_concurrent_checks_share_one_request(fake, kbase):
    results = await within(defer.gatherResults(
        [defer.ensureDeferred(kbase.authenticate(TOKEN)) for _ in range(5)]
    ))
    assert {r.user for r in results} == {"alice"}
    assert fake.counts["/api/V2/token"] == 1


@pytest_twisted.ensureDeferred
async def test_kbase_cancelled_waiter_does_not_cancel_the_shared_check(fake, kbase):
    """Issue 9 item 11: the first caller going away (cancelled) leaves the others their answer."""
    fake.control(delay_seconds=0.5)
    first = defer.ensureDeferred(kbase.authenticate(TOKEN))
    second = defer.ensureDeferred(kbase.authenticate(TOKEN))
    third = defer.ensureDeferred(kbase.authenticate(TOKEN))
    first.cancel()
    with pytest.raises(defer.CancelledError):
        await within(first)
    third.cancel()
    ident = await within(second)
    assert ident.user == "alice"
    with pytest.raises(defer.CancelledError):
        await within(third)
    assert fake.counts["/api/V2/token"] == 1
    # the answer was cached: no second round trip
    assert (await within(kbase.authenticate(TOKEN))).user == "alice"
    assert fake.counts["/api/V2/token"] == 1
    # every caller cancelled: the shared check still completes (and a rejection is remembered)
    lone = defer.ensureDeferred(kbase.authenticate("no-such-token"))
    lone.cancel()
    with pytest.raises(defer.CancelledError):
        await within(lone)
    await within(deferLater(0.8))
    fake.control(delay_seconds=0)
    with pytest.raises(Unauthorized):
        await within(kbase.authenticate("no-such-token"))
    assert fake.counts["/api/V2/token"] == 2


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task
    return task.deferLater(_reactor(), seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_kbase_never_logs_the_token(fake, kbase):
    with capturedLogs() as events:
        await within(kbase.authenticate(TOKEN))
        with pytest.raises(Unauthorized):
            await within(kbase.authenticate("sneaky-secret"))
        fake.set_mode("error")
        with pytest.raises(AuthUnavailable):
            await within(kbase.authenticate("another-secret"))
    blob = json.dumps([formatEvent(e) for e in events]) + repr(events)
    for secret in (TOKEN, "sneaky-secret", "another-secret"):
        assert secret not in blob


# ---------------------------------------------------------------------------
# User checkers
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_directory_users(tmp_path):
    root = tmp_path / "users"
    root.mkdir()
    (root / "alice").mkdir()
    (root / "afile").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(root / "alice", root / "alias")
    users = DirectoryUsers(str(root), sync_runner)
    assert await within(users.exists("alice")) is True
    for name in ("bob", "afile", "linked", "alias", "", ".", "..", "../users", "alice/..", "a\0b", "x" * 5000, "é"):
        assert await within(users.exists(name)) is False, name


@pytest_twisted.ensureDeferred
async def test_directory_users_in_a_real_thread(tmp_path):
    (tmp_path / "alice").mkdir()
    users = DirectoryUsers(str(tmp_path), threads.deferToThread)
    assert await within(users.exists("alice")) is True
    assert await within(users.exists("bob")) is False


@pytest_twisted.ensureDeferred
async def test_passwd_users():
    users = PasswdUsers(sync_runner)
    assert await within(users.exists("root")) is True
    for name in ("no_such_user_xq7", "", "a\0b", "../root", "x" * 300):
        assert await within(users.exists(name)) is False


@pytest_twisted.ensureDeferred
async def test_kbase_users(fake):
    users = KBaseUsers(Auth2(fake.url, reactor, timeout=2), "tok-service")
    try:
        assert await within(users.exists("alice")) is True
        assert await within(users.exists("carol")) is False
        # odd names never crash, and cannot smuggle a second name into the list
        for name in ("alice,bob", "alice bob", "a&list=alice", "a%2Calice", "é", "", " alice", "a/../b"):
            assert await within(users.exists(name)) is False, name
        # positive answers are cached
        before = fake.counts["/api/V2/users"]
        assert await within(users.exists("alice")) is True
        assert fake.counts["/api/V2/users"] == before
        # a user created later is found (negatives are not cached)
        fake.add_user("carol")
        assert await within(users.exists("carol")) is True
    finally:
        await within(users.close())


@pytest_twisted.ensureDeferred
async def test_kbase_users_failures_are_unavailable(fake):
    bad = KBaseUsers(Auth2(fake.url, reactor, timeout=2), "wrong-service-token")
    users = KBaseUsers(Auth2(fake.url, reactor, timeout=0.5), "tok-service")
    down = KBaseUsers(Auth2(closed_port_url(), reactor, timeout=2), "tok-service")
    try:
        with pytest.raises(AuthUnavailable):
            await within(bad.exists("alice"))
        with pytest.raises(AuthUnavailable):
            await within(down.exists("alice"))
        for mode in ("error", "garbage", "hang"):
            fake.set_mode(mode)
            with pytest.raises(AuthUnavailable):
                await within(users.exists("bob"), 5)
    finally:
        for u in (bad, users, down):
            await within(u.close())


def test_make_user_checker(tmp_path):
    kw = dict(user_root=str(tmp_path), auth2=Auth2("http://127.0.0.1:1", reactor), service_token="s",
              run_in_thread=sync_runner)
    assert isinstance(make_user_checker("directory", **kw), DirectoryUsers)
    assert isinstance(make_user_checker("passwd", **kw), PasswdUsers)
    assert isinstance(make_user_checker("kbase", **kw), KBaseUsers)
    with pytest.raises(ValueError):
        make_user_checker("ldap", **kw)
    with pytest.raises(ValueError):
        make_user_checker("kbase", **{**kw, "service_token": ""})
    with pytest.raises(ValueError, match="kbase_url"):
        make_user_checker("kbase", **{**kw, "auth2": None})


# ---------------------------------------------------------------------------
# The fake itself, as a separate process (what end-to-end tests use)
# ---------------------------------------------------------------------------


def _get(url: str, token: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": token} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_fake_auth2_process():
    proc = FakeAuth2Process(state={"users": {"alice": {"customroles": ["R"]}}, "tokens": {"t1": {"user": "alice"}}})
    try:
        url = proc.start()
        code, doc = _get(url + "/api/V2/token", "t1")
        assert code == 200 and doc["user"] == "alice" and doc["cachefor"] == 300_000
        code, doc = _get(url + "/api/V2/me", "t1")
        assert code == 200 and doc["customroles"] == ["R"]
        code, doc = _get(url + "/api/V2/me")
        assert code == 401 and doc["error"]["appcode"] == 10020
        code, doc = _get(url + "/api/V2/users/?list=alice,zed", "t1")
        assert (code, doc) == (200, {"alice": "Alice"})

        proc.add_user("zed", roles=["X"], display="Zed")
        proc.add_token("t2", "zed", cachefor=1000)
        assert _get(url + "/api/V2/me", "t2")[1]["customroles"] == ["X"]
        assert proc.counts()["/api/V2/me"] == 3
        proc.set_mode("error")
        assert _get(url + "/api/V2/token", "t1")[0] == 500
        proc.set_mode("ok")
        proc.reset_counts()
        assert proc.counts()["/api/V2/token"] == 0

        proc.stop()  # down: connection refused
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/api/V2/token", timeout=5)
        assert proc.start() == url  # same port, same state
        assert _get(url + "/api/V2/token", "t2")[1]["user"] == "zed"
    finally:
        proc.close()
