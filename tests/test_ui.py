"""GET /ui/ in a real browser: headless Chromium driven by Playwright against a real twistd.

Needs ``/usr/bin/chromium`` (Debian's ``chromium``) and the ``playwright`` Python
package (in the ``test`` extra; its own browser download is not used). Without
them the tests are skipped, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.harness import ALICE_TOKEN, DTS_TOKEN, REPO, make_tree

CHROMIUM = os.environ.get("DTSBRIDGE_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[test]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which("chromium"):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run under CI: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    exe = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _row(page, job_id: str):
    return page.locator(f'tr[data-job-id="{job_id}"]')


def _wait(cond, timeout: float, what: str, diag=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diag()}")


def _ids(page) -> list[str]:
    return page.eval_on_selector_all("#rows tr", "els => els.map(e => e.dataset.jobId)")


def _sign_in(page, base: str, token: str) -> None:
    page.goto(base + "/ui/")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("#jobs:not([hidden])", timeout=10_000)
    page.wait_for_selector("#live.on", timeout=10_000)


def test_the_page_follows_filters_details_and_cancels_jobs_live(services, browser):
    # Every copy pauses after its first chunk, after its first file, and before publishing:
    # long enough to watch its bar move.
    b = services(env={"DTSBRIDGE_FAULT_PAUSE": "copy:2,verify:2,publish:3"})
    base = f"http://127.0.0.1:{b.port}"
    make_tree(b.dts_root / "first_run", {"a.bin": os.urandom(300_000), "b.bin": os.urandom(200_000)})
    make_tree(b.dts_root / "bad_manifest", {"data.bin": b"x", "manifest.json": b"{not json"})
    make_tree(b.dts_root / "genomes", {f"part{i}.fna": os.urandom(2_000_000 + i) for i in range(6)})
    make_tree(b.dts_root / "tape_recall", {"x.txt": b"x"})
    done = b.complete("alice", "first_run").json()["job_id"]
    bad = b.complete("bob", "bad_manifest").json()["error"]["job_id"]
    staged = b.call("POST", "/submitTransfer", token=DTS_TOKEN,
                    json_body={"target_user": "bob", "subdirectory": "tape_recall"}).json()["job_id"]

    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    requests: list = []
    page.on("request", lambda r: requests.append(r))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 and "not-a-token" not in (r.request.all_headers().get("authorization") or "") else None)

    def scenario() -> None:
        # -- sign in: the token is typed once and kept for this tab only
        page.goto(base + "/ui/")
        assert page.is_visible("#login") and not page.is_visible("#jobs")
        page.fill("#token", "not-a-token")
        page.click("#login button[type=submit]")
        page.wait_for_function("document.querySelector('#login-error').textContent.length > 0")
        assert "not valid" in page.text_content("#login-error")
        page.fill("#token", DTS_TOKEN)
        page.press("#token", "Enter")
        page.wait_for_selector("#live.on", timeout=10_000)
        assert page.evaluate("sessionStorage.getItem('dtsbridge.token')") == DTS_TOKEN
        assert page.input_value("#token") == ""
        for jid in (done, bad, staged):
            page.wait_for_selector(f'tr[data-job-id="{jid}"]', timeout=10_000)
        assert _row(page, done).locator(".badge").text_content() == "SUCCESS"
        assert _row(page, bad).locator(".badge").text_content() == "ERROR"
        assert _row(page, staged).locator(".badge").text_content() == "STAGING"
        # a reload keeps the session (sessionStorage), without typing the token again
        page.reload()
        page.wait_for_selector("#live.on", timeout=10_000)
        page.wait_for_selector(f'tr[data-job-id="{done}"]', timeout=10_000)

        # -- a running job appears by itself and its bar moves until SUCCESS (no polling)
        n_jobs_calls = sum(1 for r in requests if "/jobs" in r.url)
        running = b.complete("alice", "genomes", asynchronous=True).json()["job_id"]
        row = _row(page, running)
        row.wait_for(timeout=10_000)
        seen: list[tuple[str, float, str]] = []
        # the README's picture: DTSBRIDGE_UI_SCREENSHOT=docs/ui.png makes this run refresh it
        shot = Path(os.environ.get("DTSBRIDGE_UI_SCREENSHOT") or (Path(b.root) / "ui.png"))
        if not shot.is_absolute():
            shot = REPO / shot
        shot_taken = False

        def sample():
            nonlocal shot_taken
            status = row.locator(".badge").text_content()
            pct = float(row.locator(".bar").get_attribute("aria-valuenow") or 0)
            rate = row.locator(".rate").text_content()
            seen.append((status, pct, rate))
            # the picture: a bar part-way (or, on a machine too busy to catch one, the publishing step)
            if status == "TRANSFERRING" and not shot_taken and (0 < pct < 100 or (pct == 100 and seen[0][1] == 0)):
                box = page.locator("table.jobs").bounding_box()
                page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1280,
                                                      "height": min(800, box["y"] + box["height"] + 24)})
                shot_taken = True
            return status == "SUCCESS"

        _wait(sample, 60, "the running job to end in SUCCESS", lambda: f"{seen[-5:]}\n{b.log_tail()}")
        moving = [pct for status, pct, _ in seen if status == "TRANSFERRING"]
        assert len(set(moving)) >= 2 and moving == sorted(moving), seen  # it moved, forwards, while running
        assert any("/s" in rate for status, _, rate in seen if status == "TRANSFERRING"), seen  # throughput shown
        assert float(row.locator(".bar").get_attribute("aria-valuenow")) == 100
        assert shot_taken and shot.stat().st_size > 10_000
        assert sum(1 for r in requests if "/jobs" in r.url) == n_jobs_calls  # fed by /events, not by polling

        # -- filters
        page.select_option("#f-status", "ERROR")
        _wait(lambda: _ids(page) == [bad], 10, "one ERROR row", lambda: str(_ids(page)))
        page.select_option("#f-status", "")
        page.fill("#f-user", "bob")
        page.press("#f-user", "Enter")
        _wait(lambda: set(_ids(page)) == {bad, staged}, 10, "bob's two jobs", lambda: str(_ids(page)))
        page.click("#f-clear")
        _wait(lambda: len(_ids(page)) == 4, 10, "all four jobs")
        assert _ids(page) == [running, staged, bad, done]  # newest first

        # -- a job's detail: every timestamp, the reason, from the keyboard
        _row(page, bad).locator("button.details").focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#detail[open]")
        page.wait_for_selector('#detail-fields dd[data-field="reason"]')
        assert page.text_content('#detail-fields dd[data-field="reason"]') == "manifest_mismatch"
        fields = page.eval_on_selector_all("#detail-fields dd", "els => els.map(e => e.dataset.field)")
        status = b.status(bad).json()
        assert {k for k in status if k.startswith("time_")} <= set(fields)
        assert "detailed_status" in fields and "not valid JSON" in page.text_content('#detail-fields dd[data-field="detailed_status"]')
        page.keyboard.press("Escape")
        page.wait_for_selector("#detail", state="hidden")
        _row(page, running).locator("button.details").click()
        page.wait_for_selector('#detail-fields dd[data-field="manifest_resources"], #detail-fields dd[data-field="files_total"]')
        assert page.text_content('#detail-fields dd[data-field="files_total"]') == "6"
        page.click("#detail-close")

        # -- cancel (two steps), as a transfer_role token
        assert not _row(page, done).locator("button.cancel").is_visible()  # ended: nothing to cancel
        cancel = _row(page, staged).locator("button.cancel")
        cancel.click()
        assert cancel.text_content() == "Confirm cancel"
        assert b.status(staged).json()["status"] == "STAGING"
        cancel.click()
        _wait(lambda: _row(page, staged).locator(".badge").text_content() == "CANCELLED", 10, "CANCELLED in the page")
        assert b.status(staged).json()["status"] == "CANCELLED"

        # -- the token never travelled in a URL, always in the Authorization header; nothing from elsewhere
        for r in requests:
            assert DTS_TOKEN not in r.url and r.url.startswith(base), r.url
        api_calls = [r for r in requests if any(p in r.url for p in ("/jobs", "/events", "/transferStatus", "/cancelTransfer"))]
        assert api_calls and all(r.all_headers().get("authorization") in (DTS_TOKEN, "not-a-token") for r in api_calls)
        assert any("/events" in r.url and r.all_headers().get("authorization") == DTS_TOKEN for r in api_calls)
        assert DTS_TOKEN not in page.url
        # (the one failed load is the wrong token's 401 at sign-in)
        assert [e for e in errors if "401 (Unauthorized)" not in e] == [], errors

    try:
        scenario()
    except BaseException:
        # what the page looked like, for a failure on a loaded machine
        page.screenshot(path=str(Path(b.root) / "failure.png"))
        (Path(b.root) / "failure.html").write_text(page.content())
        print(f"page: {Path(b.root) / 'failure.png'}; console: {errors}\n{b.log_tail()}")
        raise
    ctx.close()


def test_a_user_token_sees_only_its_own_jobs_on_a_phone(services, browser):
    b = services(env={"DTSBRIDGE_FAULT_PAUSE": "copy:2"})
    base = f"http://127.0.0.1:{b.port}"
    make_tree(b.dts_root / "<b>mine", {"f.txt": b"alice's"})
    make_tree(b.dts_root / "theirs", {"f.txt": b"bob's"})
    mine = b.complete("alice", "<b>mine").json()["job_id"]
    theirs = b.complete("bob", "theirs").json()["job_id"]
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    _sign_in(page, base, ALICE_TOKEN)
    page.wait_for_selector(f'tr[data-job-id="{mine}"]', timeout=10_000)
    assert page.locator("#rows tr").count() == 1
    # a folder name is shown as text, never as markup
    assert _row(page, mine).locator("td.folder").text_content() == "/alice/<b>mine"
    assert _row(page, mine).locator("td.folder b").count() == 0
    assert not page.is_visible("#user-filter-label")  # a user cannot ask for others' jobs
    assert not _row(page, mine).locator("button.cancel").is_visible()
    # live: alice's new job appears, bob's does not
    make_tree(b.dts_root / "mine2", {"f.txt": b"more"})
    make_tree(b.dts_root / "theirs2", {"f.txt": b"more"})
    theirs2 = b.complete("bob", "theirs2", asynchronous=True).json()["job_id"]
    mine2 = b.complete("alice", "mine2", asynchronous=True).json()["job_id"]
    _row(page, mine2).wait_for(timeout=10_000)
    b.wait_status(theirs2, "SUCCESS")
    b.wait_status(mine2, "SUCCESS")
    _wait(lambda: _row(page, mine2).locator(".badge").text_content() == "SUCCESS", 10, "mine2 SUCCESS")
    assert _row(page, theirs).count() == 0 and _row(page, theirs2).count() == 0
    # readable on a phone: nothing wider than the screen, each job a card with labels
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.evaluate("getComputedStyle(document.querySelector('#rows tr')).display") == "block"
    page.screenshot(path=str(Path(b.root) / "phone.png"))
    # signing out forgets the token
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('dtsbridge.token')") is None
    ctx.close()
