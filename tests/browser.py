"""Browser tests: Debian's Chromium driven by Playwright's sync API, one browser per session.

The browser is `/usr/bin/chromium` from Debian's packages (`scripts/services` installs it),
never a browser that `playwright install` downloads: this machine reaches no download host.
The fixtures that use this module live in `tests/dashboard/conftest.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Browser, Page, Playwright, ViewportSize, sync_playwright

from tests.support import ROOT, unavailable

CHROMIUM = Path("/usr/bin/chromium")

# Without the background-networking flags Chromium keeps opening connections of its own
# (component updates, sync, QUIC probes), which this closed network refuses. There is no
# sandbox to use as root in a container, and no GPU.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

VIEWPORT: ViewportSize = {"width": 1280, "height": 900}

# Screenshots a test takes, kept after the run for a person to look at (git ignores them).
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"


def require_chromium() -> None:
    """Skip locally, fail under CI=true, when Chromium is not installed."""
    if os.access(CHROMIUM, os.X_OK):
        return
    unavailable(f"Chromium is not installed at {CHROMIUM}; run scripts/services")


@dataclass
class Chromium:
    """One Chromium and the Playwright that drives it, shared by a session's browser tests.

    Playwright's sync API runs an asyncio loop of its own in a greenlet, and between two calls
    it leaves that loop marked as the thread's running loop. While it is so marked, every
    async test after it fails ("Runner.run() cannot be called from a running event loop"), and
    so does `asyncio.run`. So the loop is marked only while a browser test runs (`active`), and
    unmarked ("parked") between them; nothing else touches it meanwhile, so Playwright finds it
    as it left it.
    """

    playwright: Playwright
    browser: Browser
    loop: asyncio.AbstractEventLoop

    @classmethod
    def launch(cls) -> Chromium:
        """Start Playwright and Chromium headless, and park Playwright's loop."""
        playwright = sync_playwright().start()
        try:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS)
            )
        except BaseException:
            playwright.stop()
            raise
        loop = asyncio._get_running_loop()
        assert loop is not None, "Playwright's sync API left no running loop to park"
        asyncio._set_running_loop(None)
        return cls(playwright, browser, loop)

    @contextlib.contextmanager
    def active(self) -> Iterator[Browser]:
        """The browser, usable until the block ends; then Playwright's loop is parked again."""
        running = asyncio._get_running_loop()
        if running is not None and running is not self.loop:
            raise RuntimeError(
                "Playwright's sync API cannot run inside an asyncio loop: "
                "write browser tests as plain `def` tests"
            )
        asyncio._set_running_loop(self.loop)
        try:
            yield self.browser
        finally:
            asyncio._set_running_loop(None)

    def close(self) -> None:
        """Close Chromium and stop Playwright (which closes its loop)."""
        with self.active():
            try:
                self.browser.close()
            finally:
                self.playwright.stop()


@contextlib.contextmanager
def new_page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh context (no cookies or storage from other tests), closed afterwards."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        yield context.new_page()
    finally:
        context.close()


def screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG of `page` as `test-artifacts/dashboard/NAME.png`; return its path."""
    path = ARTIFACTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path, full_page=True)
    return path
