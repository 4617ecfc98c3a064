"""Headless Chromium for the web page tests (test_serve_web.py, test_arena_web.py), driven by
Playwright for Python through the Debian `chromium` executable (no browser download). Without it
the tests skip, unless VICUNA_REQUIRE_BROWSER is set (CI sets it), in which case they fail.
Import the fixtures into a test module: `from web_browser import browser, page`."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
UI_TIMEOUT = 60_000  # ms; a busy 2-core box


def chromium_path() -> str | None:
    return os.environ.get("VICUNA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("VICUNA_REQUIRE_BROWSER"):
            pytest.fail("VICUNA_REQUIRE_BROWSER is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()  # fresh localStorage for every test
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
        assert errors == [], f"JavaScript errors on the page: {errors}"
    finally:
        context.close()
