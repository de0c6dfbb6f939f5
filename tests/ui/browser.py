"""Debian's headless Chromium driven by Playwright, for the admin page tests.

The browser is never downloaded: the tests use /usr/bin/chromium, and if it
cannot start the test fails with the reason (a missing browser must not
turn into a quietly skipped test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, async_playwright
from playwright.async_api import Error as PlaywrightError

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Ignored by git; screenshots are for people to look at, never committed.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        try:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except PlaywrightError as exc:
            pytest.fail(f"Chromium could not start from {CHROMIUM}: {exc}")
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watch:
    """What the page did that a test must notice: script errors, CSP
    violations, and any alert() (which would mean injected markup ran)."""

    errors: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        # A 401 from a wrong key is logged by Chromium as a failed load;
        # that is the page working, not a fault.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    async def dialog(self, dialog: Dialog) -> None:
        self.alerts.append(dialog.message)
        await dialog.dismiss()


async def open_page(browser: Browser, url: str, *, width: int = 1280,
                    height: int = 900) -> tuple[Page, Watch]:
    context = await browser.new_context(viewport={"width": width, "height": height})
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = await context.new_page()
    watch = Watch()
    page.on("console", watch.console)
    page.on("pageerror", lambda error: watch.errors.append(str(error)))
    page.on("dialog", watch.dialog)
    await page.goto(url + "/ui")
    return page, watch


async def sign_in(page: Page, master_key: str) -> None:
    await page.locator("#master-key").fill(master_key)
    await page.get_by_role("button", name="Sign in").click()
    await page.locator("#app").wait_for(state="visible")
    await page.locator("#keys-summary").filter(has_text="key").wait_for()


async def scroll_width(page: Page) -> int:
    return int(await page.evaluate("document.documentElement.scrollWidth"))


async def screenshot(page: Page, selector: str, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.locator(selector).screenshot(path=str(path))
    return path
