"""The operator console over HTTP, against the real gateway process from conftest.

An httpx client plays the browser: it logs in with the admin token, keeps the session
cookie, and sends the forms with the CSRF token read from the page, as a browser
would. Every change is checked in the store, and every refusal is checked to have
changed nothing. The browser itself is in test_console_browser.py.
"""

from __future__ import annotations

import html
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import Gateway
from test_admin import chat, sdk

from bastion.app import create_app
from bastion.config import Config
from bastion.console.live import bucket_delta, histogram_quantile
from bastion.console.session import COOKIE, Sessions
from bastion.console.usage import parse_period
from bastion.money import parse_usd
from bastion.store import ApiKey

TOKEN = "test-admin-token"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
KEY = re.compile(r'<code id="new-key">(qbt_[A-Za-z0-9_-]+)</code>')


@contextmanager
def login(gateway: Gateway) -> Iterator[httpx.Client]:
    """A client holding a fresh session, as a browser after the login form."""
    with httpx.Client(base_url=gateway.root, timeout=10, follow_redirects=False) as client:
        response = client.post("/console/login", data={"token": TOKEN})
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/console/accounts"
        yield client


@pytest.fixture(scope="module")
def console(gateway: Gateway) -> Iterator[httpx.Client]:
    with login(gateway) as client:
        yield client


@pytest.fixture(scope="module")
def _bare(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.root, timeout=10, follow_redirects=False) as client:
        yield client


@pytest.fixture
def anonymous(_bare: httpx.Client) -> httpx.Client:
    """A browser with no session (one client for all: making one costs ~0.1 s)."""
    _bare.cookies.clear()
    return _bare


def csrf(client: httpx.Client, page: str = "/console/accounts") -> str:
    response = client.get(page)
    assert response.status_code == 200, response.text
    found = CSRF.search(response.text)
    assert found, "no CSRF field on the page"
    return found.group(1)


def send(client: httpx.Client, path: str, data: dict[str, object], **headers: str):
    """A form post as the console's own page would send it."""
    return client.post(path, data={"csrf": csrf(client), **data}, headers=headers)


def new_account(gateway: Gateway, credit: str = "5.00", name: str = "") -> str:
    name = name or "con-" + uuid.uuid4().hex[:10]
    gateway.store_call("create_account", name, parse_usd(credit))
    return name


def shown_error(response: httpx.Response) -> str:
    found = re.search(r'<p class="error" role="alert">(.*?)</p>', response.text, re.S)
    assert found, f"no error shown: {response.status_code}"
    return html.unescape(found.group(1))


def keys_of(gateway: Gateway, account: str) -> list[ApiKey]:
    return gateway.store_call("list_keys", account)


# ---- login, session, logout -----------------------------------------------------------


def test_login_sets_a_strict_http_only_cookie(anonymous: httpx.Client) -> None:
    client = anonymous
    page = client.get("/console/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    response = client.post("/console/login", data={"token": TOKEN, "next": "/console/keys"})
    assert response.status_code == 303
    assert response.headers["location"] == "/console/keys"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    flags = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
    assert "httponly" in flags and "secure" not in flags  # plain http here
    assert flags["samesite"].strip() == "SameSite=Strict"
    assert flags["path"].strip() == "Path=/console"
    assert int(flags["max-age"].split("=")[1]) == 12 * 3600
    # over https (as a TLS-terminating proxy says) the cookie is Secure
    proxied = client.post("/console/login", data={"token": TOKEN},
                          headers={"X-Forwarded-Proto": "https"})  # fmt: skip
    assert "secure" in proxied.headers["set-cookie"].lower()


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/v1/models"])
def test_login_goes_back_only_into_the_console(anonymous: httpx.Client, target: str) -> None:
    response = anonymous.post("/console/login", data={"token": TOKEN, "next": target})
    assert response.status_code == 303
    assert response.headers["location"] == "/console/accounts"


def test_a_wrong_token_is_refused_after_a_delay_and_sets_nothing(anonymous: httpx.Client) -> None:
    """One wrong try costs the guesser the fixed delay (1 s); no cookie, an error shown."""
    started = time.monotonic()
    response = anonymous.post("/console/login", data={"token": TOKEN + "x"})
    assert time.monotonic() - started >= 0.9
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert shown_error(response) == "That is not the admin token."


def test_pages_redirect_to_login_without_a_session(anonymous: httpx.Client) -> None:
    """No cookie, a forged one, one of another admin token, an expired one: the login form."""
    other = Sessions("another-token").issue()[0]
    expired = Sessions(TOKEN, clock=lambda: time.time() - 13 * 3600).issue()[0]
    valid = Sessions(TOKEN).issue()[0]
    forged = valid.rsplit(".", 1)[0] + ".AAAA"
    client = anonymous
    for cookie in (None, "garbage", other, expired, forged):
        client.cookies.clear()
        if cookie:
            client.cookies.set(COOKIE, cookie)
        response = client.get("/console/usage?since=2026-01-01")
        assert response.status_code == 303, cookie
        assert response.headers["location"] == (
            "/console/login?next=" + quote("/console/usage?since=2026-01-01", safe="")
        )
        assert client.get("/console/live.json").status_code == 401
    # a cookie signed with the admin token is a session on any replica, no login needed
    client.cookies.set(COOKIE, valid)
    assert client.get("/console/accounts").status_code == 200


def test_logout_clears_the_cookie(gateway: Gateway) -> None:
    with login(gateway) as client:
        token = csrf(client)
        response = client.post("/console/logout", data={"csrf": token})
        assert response.status_code == 303 and response.headers["location"] == "/console/login"
        assert "Max-Age=0" in response.headers["set-cookie"]
        assert client.get("/console/accounts").status_code == 303


def test_logout_needs_the_csrf_token(gateway: Gateway) -> None:
    with login(gateway) as client:
        response = client.post("/console/logout", data={})
        assert response.status_code == 403
        assert "set-cookie" not in response.headers
        assert client.get("/console/accounts").status_code == 200


# ---- CSRF and origin --------------------------------------------------------------------


def test_a_post_without_a_valid_csrf_token_changes_nothing(
    gateway: Gateway, console: httpx.Client
) -> None:
    name = "con-" + uuid.uuid4().hex[:10]
    own = csrf(console)
    with login(gateway) as other:  # another session's token is not this session's
        foreign = csrf(other)
    for data in ({}, {"csrf": ""}, {"csrf": own + "x"}, {"csrf": foreign}):
        response = console.post("/console/accounts", data={**data, "name": name, "credit": "1"})
        assert response.status_code == 403, data
        assert "Nothing was changed" in response.text
    assert name not in {a.name for a in gateway.store_call("list_accounts")}
    # and a top-up of an existing account, likewise
    existing = new_account(gateway, "5.00")
    response = console.post(f"/console/accounts/{existing}/credit", data={"amount": "100"})
    assert response.status_code == 403
    assert gateway.account(existing).balance == parse_usd("5.00")


def test_a_post_from_another_origin_is_refused(gateway: Gateway, console: httpx.Client) -> None:
    name = "con-" + uuid.uuid4().hex[:10]
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
        response = send(console, "/console/accounts", {"name": name}, Origin=origin)
        assert response.status_code == 403, origin
        assert "another site" in response.text
    assert name not in {a.name for a in gateway.store_call("list_accounts")}
    # the console's own origin passes
    response = send(console, "/console/accounts", {"name": name}, Origin=gateway.root)
    assert response.status_code == 303
    assert gateway.account(name).balance == 0


def test_a_post_without_a_session_is_refused(
    gateway: Gateway, console: httpx.Client, anonymous: httpx.Client
) -> None:
    token = csrf(console)
    name = "con-" + uuid.uuid4().hex[:10]
    response = anonymous.post("/console/accounts", data={"csrf": token, "name": name})
    assert response.status_code == 403
    assert name not in {a.name for a in gateway.store_call("list_accounts")}


# ---- pages and headers -----------------------------------------------------------------


def test_every_page_renders_with_security_headers(gateway: Gateway, console: httpx.Client) -> None:
    key, name = gateway.new_key("3.00")
    key_id = keys_of(gateway, name)[0].id
    pages = [
        "/console/accounts", f"/console/accounts/{name}", "/console/keys",
        f"/console/keys?account={name}", f"/console/keys/{key_id}",
        f"/console/keys/{key_id}/revoke", "/console/usage", f"/console/usage?account={name}",
        "/console/usage?since=2026-01-01&until=2026-01-31", "/console/live",
    ]  # fmt: skip
    for page in pages:
        response = console.get(page)
        assert response.status_code == 200, (page, response.text[:500])
        assert response.headers["content-type"].startswith("text/html")
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "same-origin"
        assert response.headers["cache-control"] == "no-store"
        assert '<meta name="viewport"' in response.text
        assert "<script>" not in response.text and " style=" not in response.text, page
        assert key not in response.text  # the key itself appears on no page
    assert console.get("/console").headers["location"] == "/console/accounts"
    assert console.get("/console/keys/key_nope").status_code == 404
    assert console.get("/console/accounts/nobody-" + uuid.uuid4().hex).status_code == 404


def test_static_files_are_versioned_and_cached(
    console: httpx.Client, anonymous: httpx.Client
) -> None:
    page = console.get("/console/accounts").text
    urls = re.findall(r'(?:href|src)="(/console/static/[0-9a-f]{12}/[\w.]+)"', page)
    assert {u.rsplit("/", 1)[1] for u in urls} == {"console.css", "favicon.svg", "console.js"}
    for url in urls:
        response = anonymous.get(url)  # no session needed: the login page uses them
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers["x-content-type-options"] == "nosniff"
    css = next(u for u in urls if u.endswith(".css"))
    assert anonymous.get(css).headers["content-type"].startswith("text/css")
    stale = css.replace(css.split("/")[3], "0" * 12)
    assert anonymous.get(stale).status_code == 404
    assert anonymous.get("/console/static/x/../session.py").status_code == 404


# ---- accounts ---------------------------------------------------------------------------


def test_create_top_up_and_take_back_through_forms(gateway: Gateway, console: httpx.Client) -> None:
    name = "con-" + uuid.uuid4().hex[:10]
    response = send(console, "/console/accounts", {"name": name, "credit": "5.00"})
    assert response.status_code == 303
    assert response.headers["location"] == f"/console/accounts/{name}?ok=created"
    assert gateway.account(name).balance == parse_usd("5.00")
    page = console.get(response.headers["location"]).text
    assert "Account created." in page and '<dd id="balance">5.00</dd>' in page

    url = f"/console/accounts/{name}"
    response = send(console, f"{url}/credit", {"amount": "2.50", "once": "t-" + name})
    assert response.headers["location"] == f"{url}?ok=credited"
    assert gateway.account(name).balance == parse_usd("7.50")
    # the same form sent again (its idempotency key) is not applied twice
    response = send(console, f"{url}/credit", {"amount": "2.50", "once": "t-" + name})
    assert response.headers["location"] == f"{url}?ok=replayed"
    assert gateway.account(name).balance == parse_usd("7.50")
    response = send(console, f"{url}/credit", {"amount": "-1.25"})  # taking credit back
    assert response.status_code == 303
    assert gateway.account(name).balance == parse_usd("6.25")
    assert "6.25" in console.get("/console/accounts").text


@pytest.mark.parametrize(
    ("amount", "status", "says"),
    [("abc", 400, "not a decimal amount"), ("", 400, "Enter an amount"),
     ("0.0000000001", 400, "more than 9 decimal places"),
     ("99999999999999999999", 400, "USD"), ("-100", 409, "cannot take back")],
)  # fmt: skip
def test_a_bad_top_up_is_shown_and_changes_nothing(
    gateway: Gateway, console: httpx.Client, amount: str, status: int, says: str
) -> None:
    name = new_account(gateway, "5.00")
    response = send(console, f"/console/accounts/{name}/credit", {"amount": amount})
    assert response.status_code == status
    assert says in shown_error(response)
    assert gateway.account(name).balance == parse_usd("5.00")


def test_bad_account_forms(gateway: Gateway, console: httpx.Client) -> None:
    taken = new_account(gateway, "1.00")
    cases = [
        ({"name": taken, "credit": "3"}, "already"),
        ({"name": "", "credit": "3"}, "Enter a name"),
        ({"name": "con-neg-" + uuid.uuid4().hex[:6], "credit": "-3"}, "negative"),
        ({"name": "con-bad-" + uuid.uuid4().hex[:6], "credit": "x"}, "decimal"),
    ]
    for data, says in cases:
        response = send(console, "/console/accounts", data)
        assert response.status_code in (400, 409), data
        assert says in shown_error(response), data
        assert f'value="{html.escape(data["name"])}"' in response.text  # the form keeps it
    assert gateway.account(taken).balance == parse_usd("1.00")
    names = {a.name for a in gateway.store_call("list_accounts")}
    assert not any(n.startswith(("con-neg-", "con-bad-")) for n in names)
    ghost = "ghost-" + uuid.uuid4().hex[:6]
    response = send(console, f"/console/accounts/{ghost}/credit", {"amount": "1"})
    assert response.status_code == 404 and "no account" in shown_error(response)


def test_the_balance_alert_is_set_and_cleared(gateway: Gateway, console: httpx.Client) -> None:
    name = new_account(gateway, "5.00")
    url = f"/console/accounts/{name}/alert"
    assert send(console, url, {"alert_below": "1.50"}).status_code == 303
    assert gateway.account(name).alert_below == parse_usd("1.50")
    response = send(console, url, {"alert_below": "lots"})
    assert response.status_code == 400 and "decimal" in shown_error(response)
    assert gateway.account(name).alert_below == parse_usd("1.50")
    assert send(console, url, {"alert_below": "1.50", "clear": "1"}).status_code == 303
    assert gateway.account(name).alert_below is None


# ---- keys -------------------------------------------------------------------------------


def test_a_new_key_is_shown_once_and_works(gateway: Gateway, console: httpx.Client) -> None:
    name = new_account(gateway, "5.00")
    form = {"account": name, "name": "ci", "rpm": "7", "tpm": "", "limit": "2.00",
            "limit_reset": "daily", "expires_at": "2999-01-01T00:00:00Z",
            "models": ["gpt-oss-120b"]}  # fmt: skip
    response = send(console, "/console/keys", form)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    plaintext = KEY.search(response.text).group(1)  # type: ignore[union-attr]
    assert 'data-copy="new-key"' in response.text and "only time it is shown" in response.text
    (key,) = keys_of(gateway, name)
    assert (key.name, key.rpm, key.tpm) == ("ci", 7, None)
    assert (key.spend_limit, key.limit_reset) == (parse_usd("2.00"), "daily")
    assert key.models == frozenset({"gpt-oss-120b"}) and key.expires_at is not None
    gateway.wait_for_key(plaintext)
    chat(sdk(gateway, plaintext))
    for page in ("/console/keys", f"/console/keys/{key.id}", f"/console/accounts/{name}"):
        text = console.get(page).text
        assert key.prefix in text and plaintext not in text


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("limit", "-1", "negative"), ("limit", "ten", "decimal"), ("rpm", "-5", "whole number"),
     ("tpm", "1.5", "whole number"), ("expires_at", "tomorrow", "ISO 8601"),
     ("expires_at", "2001-01-01", "in the past"), ("models", "gpt-9", "unknown model"),
     ("limit_reset", "hourly", "limit_reset"), ("account", "", "Choose the account")],
)  # fmt: skip
def test_a_bad_key_form_is_shown_and_makes_no_key(
    gateway: Gateway, console: httpx.Client, field: str, value: str, says: str
) -> None:
    name = new_account(gateway, "1.00")
    response = send(console, "/console/keys", {"account": name, field: value})
    assert response.status_code == 400, response.text[:300]
    assert says in shown_error(response)
    assert keys_of(gateway, name) == []


def test_key_limits_are_edited_and_cleared(gateway: Gateway, console: httpx.Client) -> None:
    _, name = gateway.new_key("1.00", rpm=5, spend_limit=parse_usd("1.00"))
    (key,) = keys_of(gateway, name)
    url = f"/console/keys/{key.id}"
    edit = {"rpm": "9", "tpm": "1000", "limit": "3.50", "limit_reset": "monthly",
            "expires_at": "2999-06-01T00:00:00Z", "models": ["alias", "gpt-oss-120b"]}  # fmt: skip
    response = send(console, url, edit)
    assert response.headers["location"] == f"{url}?ok=updated"
    (key,) = keys_of(gateway, name)
    assert (key.rpm, key.tpm, key.spend_limit) == (9, 1000, parse_usd("3.50"))
    assert key.limit_reset == "monthly" and key.models == frozenset({"alias", "gpt-oss-120b"})
    page = console.get(url).text
    assert 'value="3.50"' in page and 'value="9"' in page
    # blank limit and expiry clear them, no model ticked is all, blank rpm keeps it
    send(console, url, {"rpm": "", "tpm": "", "limit": "", "limit_reset": "never"})
    (key,) = keys_of(gateway, name)
    assert (key.rpm, key.spend_limit, key.expires_at, key.models) == (9, None, None, None)
    response = send(console, url, {"rpm": "x", "limit": "5"})
    assert response.status_code == 400 and "whole number" in shown_error(response)
    assert keys_of(gateway, name) == [key]


def test_revoke_asks_first_then_revokes(gateway: Gateway, console: httpx.Client) -> None:
    plaintext, name = gateway.new_key("1.00")
    (key,) = keys_of(gateway, name)
    page = console.get(f"/console/keys/{key.id}/revoke")
    assert "cannot be undone" in page.text and not keys_of(gateway, name)[0].revoked
    response = send(console, f"/console/keys/{key.id}/revoke", {})
    assert response.headers["location"] == f"/console/keys/{key.id}?ok=revoked"
    assert keys_of(gateway, name)[0].revoked
    gateway.wait_for_key(plaintext, present=False)
    page = console.get(response.headers["location"]).text
    assert "Key revoked" in page and 'class="badge revoked"' in page
    assert f'action="/console/keys/{key.id}"' not in page  # no limits form on a revoked key


def test_labels_and_names_are_escaped(gateway: Gateway, console: httpx.Client) -> None:
    evil = "<script>alert(1)</script>"
    name = new_account(gateway, "1.00", name=f"x{evil}{uuid.uuid4().hex[:6]}")
    gateway.store_call("create_key", name, evil)
    for page in ("/console/accounts", "/console/keys", f"/console/accounts/{quote(name, safe='')}",
                 f"/console/usage?account={quote(name)}"):  # fmt: skip
        response = console.get(page)
        assert response.status_code == 200, page
        text = response.text
        assert evil not in text, page
        assert html.escape(evil) in text or "&lt;script&gt;" in text, page


# ---- usage and live ----------------------------------------------------------------------


def test_usage_tables_show_the_store_numbers(gateway: Gateway, console: httpx.Client) -> None:
    key, name = gateway.new_key("5.00")
    client = sdk(gateway, key)
    for _ in range(3):
        chat(client)
    rows = gateway.settled(name, 3)
    cost = sum(r.cost for r in rows)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    page = console.get(f"/console/usage?account={name}").text
    assert page.count('<svg class="chart"') == 5
    today = re.search(rf"<tr><td>{day}</td>(.*?)</tr>", page).group(1)  # type: ignore[union-attr]
    cells = re.findall(r'<td class="n">([^<]*)</td>', today)
    inputs = sum(r.input_tokens for r in rows)
    outputs = sum(r.output_tokens for r in rows)
    assert cells[:4] == ["3", "0", f"{inputs:,}", f"{outputs:,}"]
    assert parse_usd(cells[4]) == cost and cells[5] == "0.00"  # exact to the nano-dollar
    model = re.search(r"<tr><td>gpt-oss-120b</td>(.*?)</tr>", page).group(1)  # type: ignore[union-attr]
    assert re.findall(r'<td class="n">([^<]*)</td>', model)[0] == "3"
    # the account page shows the same day and the balance after the spend
    account = console.get(f"/console/accounts/{name}").text
    assert f"<tr><td>{day}</td>" in account
    balance = re.search(r'<dd id="balance">([^<]*)</dd>', account).group(1)  # type: ignore[union-attr]
    assert parse_usd(balance) == gateway.account(name).balance


def test_usage_period_is_checked(console: httpx.Client) -> None:
    for query, says in (("since=2026-02-01&until=2026-01-01", "ends before it starts"),
                        ("since=yesterday", "YYYY-MM-DD"),
                        ("since=2020-01-01&until=2026-01-01", "at most 366 days")):  # fmt: skip
        response = console.get(f"/console/usage?{query}")
        assert response.status_code == 400 and says in shown_error(response)
    response = console.get("/console/usage?account=ghost-" + uuid.uuid4().hex[:6])
    assert response.status_code == 404


def test_live_json_counts_requests(gateway: Gateway, console: httpx.Client) -> None:
    before = console.get("/console/live.json").json()
    key, _ = gateway.new_key("5.00")
    chat(sdk(gateway, key))
    after = console.get("/console/live.json").json()
    assert after["requests_total"] >= before["requests_total"] + 1
    assert after["requests_per_s"] is not None and after["requests_per_s"] > 0
    assert after["overhead_p50_ms_all"] is not None and after["overhead_p50_ms_all"] > 0
    assert after["replica"] == before["replica"] and "pid" in after["replica"]
    states = {u["name"]: u["state"] for u in after["upstreams"]}
    assert states["sim"] == "up" and set(states) >= {"sim", "slow", "dead"}
    assert "gpt-oss-120b" in next(u for u in after["upstreams"] if u["name"] == "sim")["models"]
    assert "upstream-secret" not in console.get("/console/live.json").text
    page = console.get("/console/live").text
    assert "This replica only" in page and after["replica"].split(" ")[0] in page


# ---- pure parts ------------------------------------------------------------------------


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    inf = float("inf")
    buckets = [(0.001, 0), (0.01, 50), (0.1, 90), (inf, 100)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001 + 0.009 * 50 / 50)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.001 + 0.009 * 25 / 50)
    assert histogram_quantile(0.8, buckets) == pytest.approx(0.01 + 0.09 * 30 / 40)
    assert histogram_quantile(0.99, buckets) == 0.1  # in the +Inf bucket: the highest bound
    assert histogram_quantile(0.5, [(0.01, 4), (inf, 4)]) == pytest.approx(0.005)  # from 0
    assert histogram_quantile(0.5, [(0.01, 0), (inf, 0)]) is None
    assert bucket_delta([(0.01, 7), (inf, 9)], [(0.01, 2), (inf, 3)]) == [(0.01, 5), (inf, 6)]


def test_sessions_are_signed_by_the_admin_token() -> None:
    now = [1_000_000.0]
    sessions = Sessions("token-a", ttl_s=60, clock=lambda: now[0])
    cookie, session = sessions.issue()
    assert sessions.read(cookie) == session
    assert Sessions("token-b", clock=lambda: now[0]).read(cookie) is None
    assert sessions.csrf_ok(session, sessions.csrf(session))
    other = sessions.issue()[1]
    assert not sessions.csrf_ok(other, sessions.csrf(session))
    assert not sessions.token_matches("") and not sessions.token_matches("token-\udcff")
    now[0] += 61
    assert sessions.read(cookie) is None


def test_the_default_period_is_the_last_30_days() -> None:
    from datetime import date

    period = parse_period({}, date(2026, 3, 10))
    assert (period.first, period.last) == (date(2026, 2, 9), date(2026, 3, 10))
    assert len(period.days) == 30
    assert period.until_us - period.since_us == 30 * 86_400_000_000


# ---- off without a token --------------------------------------------------------------------


async def test_no_admin_token_means_no_console(tmp_path: Path) -> None:
    config = Config(database_url=f"sqlite:///{tmp_path / 'bastion.db'}")
    async with TestClient(TestServer(create_app(config))) as client:
        for method, path in (("GET", "/console"), ("GET", "/console/login"),
                             ("POST", "/console/login"), ("GET", "/console/live.json"),
                             ("GET", "/console/accounts")):  # fmt: skip
            response = await client.request(method, path, data={"token": ""})
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == "not_found"
