"""The dashboard as an on-call engineer uses it, in headless Chromium against a real uvicorn
server and a real worker on the embedded SQLite default.

Sign in; watch a failing run appear on the runs page without reloading; open its traceback;
replay it from the dead-letter page, first with an argument that does not fit (the page says
which), then with a good one; watch the replay turn green. Every page is screenshotted into
test-artifacts/dashboard/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser import VIEWPORT, screenshot
from tests.support import Server, WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PASSWORD = "correct-horse-battery"


@dataclass
class Site:
    server: Server
    worker: WorkerProcess

    @property
    def dashboard(self) -> str:
        return f"{self.server.url}/offload"

    def defer(self, path: str) -> str:
        answer = httpx.post(f"{self.server.url}{path}", timeout=10)
        assert answer.status_code == 202, answer.text
        run_id: str = answer.json()["id"]
        return run_id


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {
        "OFFLOAD_DATA_DIR": str(data_dir),
        "OFFLOAD_DASHBOARD_PASSWORD": PASSWORD,
        "OFFLOAD_WORKER_PROCESSES": "1",
    }
    worker = WorkerProcess("tests.apps.dashboard_app:jobs", env, tmp_path / "worker.log")
    server = Server("tests.apps.dashboard_app:app", data_dir, env)
    try:
        server.start()
        worker.start().wait_ready()
        yield Site(server, worker)
    finally:
        worker.stop()
        server.stop()


@pytest.fixture
def signed_in(chromium: Browser) -> Iterator[Page]:
    """A page whose browser context sends the dashboard's Basic credentials."""
    context = chromium.new_context(
        viewport=VIEWPORT, http_credentials={"username": "admin", "password": PASSWORD}
    )
    try:
        yield context.new_page()
    finally:
        context.close()


def test_without_credentials_the_browser_is_asked_to_sign_in(
    site: Site, browser_page: Page
) -> None:
    # A headless browser cannot show the sign-in prompt: ask as it would, and read the answer.
    answer = browser_page.request.get(f"{site.dashboard}/")
    assert answer.status == 401
    assert answer.headers["www-authenticate"].startswith("Basic")
    assert "Sign in to see this page." in answer.text()
    wrong = browser_page.request.get(
        f"{site.dashboard}/",
        headers={"authorization": "Basic YWRtaW46d3Jvbmc="},  # admin:wrong
    )
    assert wrong.status == 401


def test_a_failure_appears_live_and_its_replay_with_a_fixed_argument_turns_green(
    site: Site, signed_in: Page
) -> None:
    page = signed_in
    page.goto(f"{site.dashboard}/runs")
    expect(page.locator("h1")).to_have_text("Runs")
    page.evaluate("window.notReloaded = true")

    failed = site.defer("/charge?amount=-5")
    row = page.locator(f"tr[data-run='{failed}']")
    expect(row.locator(".state-dead")).to_be_visible(timeout=30_000)
    expect(row.locator(".error")).to_contain_text("amount must not be negative, got -5")
    assert page.evaluate("window.notReloaded"), "the page reloaded instead of updating"
    screenshot(page, "runs")

    row.locator("a").first.click()
    expect(page.locator("h1")).to_contain_text("charge")
    page.get_by_text("Traceback").first.click()
    traceback = page.locator("#traceback-1 pre")
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text('raise ValueError(f"amount must not be negative')
    page.wait_for_timeout(2500)  # a refresh of the live region must keep it open
    expect(traceback).to_be_visible()
    screenshot(page, "run-failed")

    page.get_by_role("link", name="Dead letters").click()
    expect(page.locator(".counts")).to_contain_text("1 dead run(s): charge 1")
    screenshot(page, "dead-letters")
    page.locator(f"tr[data-run='{failed}']").get_by_role("link", name="Replay…").click()
    arguments = page.locator("textarea[name=args]")
    assert '"amount": -5' in arguments.input_value()

    arguments.fill('{"amount": "five"}')
    page.get_by_role("button", name="Replay").click()
    expect(page.locator(".problems")).to_contain_text("amount: Input should be a valid integer")
    screenshot(page, "replay-refused")

    page.locator("textarea[name=args]").fill('{"amount": 5}')
    page.get_by_role("button", name="Replay").click()
    expect(page.locator(".done")).to_contain_text(f"Replay of run {failed} started.")
    replay = re.sub(r".*/runs/([0-9a-f]+).*", r"\1", page.url)
    assert replay != failed
    page.evaluate("window.notReloaded = true")
    expect(page.locator("h1 .state")).to_have_text("SUCCESS", timeout=30_000)
    expect(page.locator("pre.json").last).to_contain_text('"charged 5"')
    expect(page.locator("dl.facts")).to_contain_text(f"Replays{failed}")
    assert page.evaluate("window.notReloaded"), "the page reloaded instead of updating"
    screenshot(page, "run-replayed")

    page.goto(f"{site.dashboard}/runs/{failed}")
    expect(page.locator("dl.facts")).to_contain_text(f"Replayed by{replay}")


def test_overview_queues_and_schedules_show_the_work(site: Site, signed_in: Page) -> None:
    page = signed_in
    page.goto(f"{site.dashboard}/")
    running = site.defer("/crunch?steps=40")
    now_running = page.locator("section", has_text="Running now")
    expect(now_running.locator(f"a[href$='/runs/{running}']")).to_be_visible(timeout=30_000)
    expect(page.locator("progress").first).to_be_visible(timeout=10_000)
    workers = page.locator("section", has_text="Workers")
    expect(workers).to_contain_text("thread \N{MULTIPLICATION SIGN} 4")
    expect(workers.locator(f"a[href$='/runs/{running}']")).to_be_visible()  # its current run
    screenshot(page, "overview")
    site.defer("/charge?amount=3")
    expect(page.locator(".count[data-state=SUCCESS]")).not_to_have_text("0", timeout=30_000)

    page.get_by_role("link", name="Queues").click()
    queue = page.locator("tr[data-queue='default']")
    expect(queue).to_contain_text("io0-")  # the live worker that consumes it
    queue.get_by_role("button", name="Pause").click()
    expect(page.locator(".done")).to_contain_text("Queue default paused")
    held = site.defer("/charge?amount=7")
    expect(queue.locator("td").nth(2)).to_have_text("1", timeout=30_000)  # held, live
    screenshot(page, "queues")
    queue.get_by_role("button", name="Resume").click()
    expect(page.locator(".done")).to_contain_text("Queue default resumed")
    page.goto(f"{site.dashboard}/runs/{held}")
    expect(page.locator("h1 .state")).to_have_text("SUCCESS", timeout=30_000)

    page.get_by_role("link", name="Schedules").click()
    row = page.locator("tr[data-schedule='hourly_cleanup']")
    expect(row).to_contain_text("every 3600s")
    row.get_by_role("button", name="Pause").click()
    expect(page.locator(".done")).to_have_text("Schedule hourly_cleanup paused.")
    expect(row).to_contain_text("paused")
    row.get_by_role("button", name="Run now").click()
    expect(row.locator(".state")).not_to_have_count(0)
    screenshot(page, "schedules")

    answer = page.goto(f"{site.dashboard}/runs/{'0' * 32}")
    assert answer is not None
    assert answer.status == 404
    expect(page.locator("h1")).to_have_text("Not found")
    screenshot(page, "not-found")
