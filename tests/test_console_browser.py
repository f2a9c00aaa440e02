"""The console in a real browser: Debian's Chromium driven by Playwright, no mocks.

An operator's first session, end to end: log in, create an account and a key (read
from the page that shows it once, and copied with the Copy button), top up, send
requests with that key through the official openai SDK, then see them in the usage
chart and table, in the account's balance, and on the live view. Every page is checked
for horizontal overflow at 1280x800 and at a phone's 390x844, for script errors
(a Content-Security-Policy violation is one), and saved as a screenshot under
``$BASTION_ARTIFACTS/console/`` (default ``tests/artifacts/console/``).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import Gateway
from test_admin import chat, sdk

from bastion.money import format_usd, parse_usd

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
TOKEN = "test-admin-token"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 10_000
T = TypeVar("T")


def artifacts() -> Path:
    base = os.environ.get("BASTION_ARTIFACTS")
    path = (Path(base) if base else Path(__file__).parent / "artifacts") / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package "
                    "(apt-get install chromium) for this test.", pytrace=False)  # fmt: skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `make test` installs the test extra.", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def off_loop(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` on a thread: Playwright's sync API keeps an event loop running on this
    one, and the conftest store helpers start their own with asyncio.run."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def no_overflow(page: object, where: str) -> None:
    """The page is no wider than the window: wide tables scroll in their own box."""
    widths = page.evaluate(  # type: ignore[attr-defined]
        "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
    )
    assert max(widths[:2]) <= widths[2], f"{where}: content {widths[:2]} wider than {widths[2]}"


def test_an_operator_session(gateway: Gateway, browser: object) -> None:
    shots = artifacts()
    errors: list[str] = []
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[attr-defined]
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gateway.root)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def visit(path: str, shot: str = "") -> None:
        page.goto(gateway.root + path)
        no_overflow(page, f"{path} at 1280")
        if shot:
            page.screenshot(path=shots / f"{shot}.png")

    # not logged in: the login form, then back where we were going
    visit("/console/keys", "login")
    assert "/console/login" in page.url
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url("**/console/keys")

    # a new account with 1.00 USD
    name = "web-" + uuid.uuid4().hex[:8]
    visit("/console/accounts")
    page.fill("form[action='/console/accounts'] input[name=name]", name)
    page.fill("input[name=credit]", "1.00")
    page.click("text=Create account")
    page.wait_for_url(f"**/console/accounts/{name}?ok=created")
    assert page.inner_text("#balance") == "1.00"

    # a key for it: shown once, copied with the Copy button
    visit(f"/console/keys?account={name}")
    page.fill("form[action='/console/keys'] input[name=name]", "browser test")
    page.click("text=Create key")
    key = page.inner_text("#new-key")
    assert re.fullmatch(r"qbt_[A-Za-z0-9_-]{32,}", key)
    page.click("button[data-copy=new-key]")
    page.wait_for_selector("#new-key-copied", state="visible")
    assert page.evaluate("navigator.clipboard.readText()") == key
    no_overflow(page, "new key at 1280")
    page.screenshot(path=shots / "key-created.png")
    visit("/console/keys", "keys")
    assert key not in page.content()

    # top up 4.00: the balance is 5.00
    page.goto(f"{gateway.root}/console/accounts/{name}")
    page.fill("input[name=amount]", "4.00")
    page.click("text=Apply")
    page.wait_for_url("**?ok=credited")
    assert page.inner_text("#balance") == "5.00"
    visit("/console/accounts", "accounts")

    # three requests with the key, through the official SDK
    gateway.wait_for_key(key)
    client = sdk(gateway, key)
    for _ in range(3):
        chat(client)
    rows = off_loop(gateway.settled, name, 3)
    assert len(rows) == 3
    cost = sum(r.cost for r in rows)

    # the usage page: a chart with columns, and today's row with the numbers
    visit(f"/console/usage?account={name}", "usage")
    assert page.locator("svg.chart").count() == 5
    heights = page.eval_on_selector_all(
        "svg.chart rect.tone-0", "rs => rs.map(r => parseFloat(r.getAttribute('height')))"
    )
    assert any(h > 0 for h in heights), "no visible column in the charts"
    today = page.locator("table.usage tbody tr").last.locator("td")
    assert today.nth(1).inner_text() == "3"
    assert parse_usd(today.nth(5).inner_text()) == cost

    # the account page: the balance after the spend, the same day in its table
    visit(f"/console/accounts/{name}", "account")
    balance = page.inner_text("#balance")
    assert parse_usd(balance) == off_loop(gateway.account, name).balance == parse_usd("5.00") - cost
    assert balance == format_usd(parse_usd("5.00") - cost)

    # the live view polls and counts what this replica served
    def number(selector: str) -> float | None:
        text = page.inner_text(selector).replace(",", "")
        return None if text == "—" else float(text)

    def within(what: str, check: Callable[[], bool]) -> None:
        """Wait for the page's polling (a predicate evaluated in the page would need
        'unsafe-eval', which the console's CSP rightly refuses)."""
        for _ in range(WAIT_MS // 100):
            if check():
                return
            page.wait_for_timeout(100)
        raise AssertionError(f"the live view never showed {what}")

    visit("/console/live")
    within("a rate", lambda: number("#requests_per_s") is not None)  # its script polled
    before = number("#requests_total")
    assert before is not None and before >= 3
    for _ in range(3):  # while the page polls
        chat(client)
    within("the new requests", lambda: (number("#requests_total") or 0) >= before + 3)
    within("a rate above 0", lambda: (number("#requests_per_s") or 0) > 0)
    assert number("#overhead_p50_ms") is not None
    assert page.locator("#upstreams tr").count() >= 3
    assert page.locator("#upstreams .badge.up").count() >= 1
    page.screenshot(path=shots / "live.png")

    # a phone: the same pages fit, the navigation folds behind a Menu button
    phone = browser.new_context(  # type: ignore[attr-defined]
        viewport=PHONE, is_mobile=True, has_touch=True, storage_state=context.storage_state()
    )
    small = phone.new_page()
    small.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    for path, shot in (("/console/accounts", "accounts"), (f"/console/accounts/{name}", "account"),
                       ("/console/keys", "keys"), (f"/console/usage?account={name}", "usage"),
                       ("/console/live", "live")):  # fmt: skip
        small.goto(gateway.root + path)
        no_overflow(small, f"{path} at 390")
        small.screenshot(path=shots / f"phone-{shot}.png")
    assert not small.is_visible("header nav")
    small.click("label.menu-button")
    assert small.is_visible("header nav a[href='/console/usage']")
    phone.close()
    context.close()
    assert errors == [], errors
