"""Browser tests of the dashboard: one headless Chromium per session, a fresh page per test.

A browser test is a plain `def` test that takes `browser_page` (or `chromium`, for contexts of
its own): Playwright's sync API cannot run inside an asyncio loop, so it cannot be `async def`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page

from tests.browser import Chromium, new_page, require_chromium


@pytest.fixture(scope="session")
def chromium_driver() -> Iterator[Chromium]:
    """Chromium and its Playwright, launched once: a launch takes about 0.6 s."""
    require_chromium()
    driver = Chromium.launch()
    yield driver
    driver.close()


@pytest.fixture(scope="session")
def chromium(chromium_driver: Chromium) -> Browser:
    """The session's headless Chromium."""
    return chromium_driver.browser


@pytest.fixture(autouse=True)
def _playwright_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let a browser test use Playwright, and park its loop afterwards (see `Chromium`), so
    that the async tests after it run."""
    if "chromium" not in request.fixturenames:
        yield
        return
    if inspect.iscoroutinefunction(request.function):
        pytest.fail("a browser test must be a plain `def` test: Playwright's sync API is used")
    driver: Chromium = request.getfixturevalue("chromium_driver")
    with driver.active():
        yield


@pytest.fixture
def browser_page(chromium: Browser) -> Iterator[Page]:
    """A page (1280x900) in a context of this test's own, closed after the test."""
    with new_page(chromium) as page:
        yield page
