"""Browser tests: Playwright's Python API driving Debian's Chromium against the whole ASGI
application (gateway + Django, static files served) on a real loopback HTTP server.

Playwright's bundled browsers are not installed; the system's Chromium is used
(``apt-get install -y chromium``; another binary through ``SWITCHYARD_CHROMIUM``). Without
it these tests fail with that instruction instead of being skipped.

Every page records its console: a console error, an uncaught exception or a server error
fails the test. ``Shooter`` saves a screenshot of a page at desktop width and at 390 px
(a phone) into ``var/screenshots/`` and checks that nothing overflows the phone's width.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import RunningServer, start_asgi_server

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOTS = ROOT / "var" / "screenshots"
CHROMIUM = os.environ.get("SWITCHYARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium under Playwright, one per test module."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}. The browser tests need it: "
            "`apt-get install -y chromium` (Debian/Ubuntu package), or point "
            "SWITCHYARD_CHROMIUM at a Chromium binary.",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an asyncio loop in the test's thread, and Django refuses
    # ORM calls from a thread with a loop (the tests' factories, ingest, and the database
    # flush after each test). The test thread shares no connection with the server's
    # threads, so allow it while the browser lives.
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def live_app(transactional_db) -> Iterator[RunningServer]:  # type: ignore[no-untyped-def]
    """The whole ASGI application behind a real HTTP server, with /static/ served (the
    project serves static files itself only in DEBUG)."""
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
    from django.db import connections

    from marketplace.asgi import build_application

    static = ROOT / "static" / "vendor" / "htmx.org" / "dist" / "htmx.min.js"
    if not static.is_file():
        pytest.fail(
            "static/vendor/ is empty: run `.venv/bin/python scripts/fetch_assets.py` "
            "(make install does it).",
            pytrace=False,
        )
    # Each request runs in a thread of its own: close its database connection when the
    # request ends, so no session outlives the test (and the test database can be dropped).
    database = connections.settings["default"]
    conn_max_age = database.get("CONN_MAX_AGE", 0)
    database["CONN_MAX_AGE"] = 0
    app = build_application()
    served = ASGIStaticFilesHandler(app)
    served.gateway = app.gateway  # type: ignore[attr-defined]
    running = start_asgi_server(served)
    try:
        yield running
    finally:
        running.server.should_exit = True
        running.thread.join(timeout=10)
        database["CONN_MAX_AGE"] = conn_max_age


@pytest.fixture
def ingest_worker(live_app) -> Iterator[threading.Thread]:  # type: ignore[no-untyped-def]
    """Usage ingest running beside the server, as the Celery worker does in production: it
    drains the usage stream in batches and publishes each batch to the live dashboards."""
    from django.db import connection

    from billing.usage import usage_ingest_batch

    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                usage_ingest_batch(count=1000, block_ms=100)
        finally:
            connection.close()

    worker = threading.Thread(target=run, name="ingest-worker", daemon=True)
    worker.start()
    try:
        yield worker
    finally:
        stop.set()
        worker.join(timeout=10)


@dataclass
class PageProblems:
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)

    def watch(self, page) -> None:  # type: ignore[no-untyped-def]
        page.on(
            "console",
            lambda msg: (
                msg.type == "error" and self.console_errors.append(f"{page.url}: {msg.text}")
            ),
        )
        page.on("pageerror", lambda exc: self.page_errors.append(f"{page.url}: {exc}"))
        page.on(
            "response",
            lambda response: (
                response.status >= 500
                and self.server_errors.append(f"{response.status} {response.url}")
            ),
        )

    def assert_none(self) -> None:
        assert self.page_errors == [], self.page_errors
        assert self.console_errors == [], self.console_errors
        assert self.server_errors == [], self.server_errors


@pytest.fixture
def problems() -> Iterator[PageProblems]:
    found = PageProblems()
    yield found
    found.assert_none()


class Browsing:
    """New browser contexts (each a separate person) whose pages are watched."""

    def __init__(self, browser, base_url: str, problems: PageProblems) -> None:  # type: ignore[no-untyped-def]
        self.browser, self.base_url, self.problems = browser, base_url, problems
        self.contexts: list[object] = []

    def new_page(self):  # type: ignore[no-untyped-def]
        context = self.browser.new_context(viewport=DESKTOP, base_url=self.base_url)
        context.set_default_timeout(15_000)
        self.contexts.append(context)
        page = context.new_page()
        self.problems.watch(page)
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()  # type: ignore[attr-defined]


@pytest.fixture
def browsing(browser, live_app, problems) -> Iterator[Browsing]:  # type: ignore[no-untyped-def]
    session = Browsing(browser, live_app.url, problems)
    try:
        yield session
    finally:
        session.close()


# The outermost elements that stick out to the right of the viewport (for the message).
WIDEST_ELEMENTS = """() => {
  const width = document.documentElement.clientWidth;
  const out = [];
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if (box.right > width + 1 && !(el.parentElement && out.includes(el.parentElement))) {
      out.push(el);
    }
  }
  return out.slice(0, 5).map(el => el.tagName.toLowerCase()
    + (el.className ? "." + el.className : "")
    + " right=" + Math.round(el.getBoundingClientRect().right));
}"""


class Shooter:
    """Screenshots at desktop and phone width; fails if the phone layout overflows."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.taken: list[Path] = []

    def __call__(self, page, name: str) -> None:  # type: ignore[no-untyped-def]
        slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
        original = page.viewport_size or DESKTOP
        try:
            page.set_viewport_size(DESKTOP)
            path = self.directory / f"{slug}-desktop.png"
            page.screenshot(path=str(path), full_page=True)
            self.taken.append(path)
            page.set_viewport_size(PHONE)
            page.wait_for_timeout(100)  # let charts resize
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            path = self.directory / f"{slug}-phone.png"
            page.screenshot(path=str(path), full_page=True)
            self.taken.append(path)
            if overflow > 1:
                culprits = page.evaluate(WIDEST_ELEMENTS)
                raise AssertionError(
                    f"{name}: the page is {overflow}px wider than a 390px phone: {culprits}"
                )
        finally:
            page.set_viewport_size(original)


@pytest.fixture
def shoot() -> Shooter:
    return Shooter(SCREENSHOTS)
