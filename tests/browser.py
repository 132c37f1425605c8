"""Headless Chromium for tests, benchmarks and screenshots: Debian's `chromium` driven by
Playwright (no browser download). `scripts/ensure-chromium` installs it; without it the
browser tests skip locally and fail in CI (`tests.conftest.require`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

VIEWPORT = {"width": 1280, "height": 900}


def chromium_path() -> str | None:
    """Debian's chromium (or `SQUISH_CHROMIUM`), if it is installed."""
    wanted = os.environ.get("SQUISH_CHROMIUM")
    for candidate in (wanted, "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_chromium() -> str:
    """The chromium executable; skips the test (fails it in CI) when it or Playwright is missing."""
    from tests.conftest import require, require_module

    require_module("playwright.sync_api")
    path = chromium_path()
    require("chromium", path is not None, "run scripts/ensure-chromium (apt-get install chromium)")
    assert path is not None
    return path


@contextmanager
def launch(executable: str | None = None) -> Iterator[Any]:
    """A headless Chromium browser (playwright `Browser`), closed on exit."""
    from playwright.sync_api import sync_playwright

    path = executable or chromium_path()
    if path is None:
        raise RuntimeError("chromium is not installed: run scripts/ensure-chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path,
            headless=True,
            # Containers: no setuid sandbox as root, small /dev/shm.
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def page(browser: Any, **context: Any) -> Iterator[Any]:
    """A page in a fresh context (its own sessionStorage); console errors are collected in
    ``page.console_errors`` and page crashes in ``page.page_errors``."""
    options: dict[str, Any] = {"viewport": VIEWPORT, "accept_downloads": True} | context
    ctx = browser.new_context(**options)
    try:
        pg = ctx.new_page()
        pg.console_errors = []
        pg.page_errors = []
        pg.on(
            "console",
            lambda msg: pg.console_errors.append(msg.text) if msg.type == "error" else None,
        )
        pg.on("pageerror", lambda exc: pg.page_errors.append(str(exc)))
        yield pg
    finally:
        ctx.close()


def screenshot(pg: Any, out: Path, *, full_page: bool = True, selector: str | None = None) -> Path:
    """A PNG of the page (or of one element) at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    target = pg.locator(selector) if selector else pg
    if selector:
        target.screenshot(path=str(out))
    else:
        pg.screenshot(path=str(out), full_page=full_page)
    return out


def screenshot_html(
    html: Path, out: Path, *, width: int = 1100, full_page: bool = True, offline: bool = True
) -> Path:
    """A PNG of a local HTML file (e.g. a compression card), opened with the network cut
    off when ``offline``, so that anything it would fetch shows as missing."""
    with launch() as browser, page(browser, viewport={"width": width, "height": 900}) as pg:
        if offline:
            pg.context.set_offline(True)
            pg.route(
                "**/*",
                lambda route: (
                    route.continue_() if route.request.url.startswith("file:") else route.abort()
                ),
            )
        pg.goto(html.resolve().as_uri())
        pg.wait_for_load_state("load")
        return screenshot(pg, out, full_page=full_page)
