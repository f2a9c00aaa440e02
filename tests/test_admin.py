"""The admin API against the real gateway process from conftest (token: test-admin-token).

Everything goes through HTTP as an operator's tooling would send it; a key made
here is used with the official openai SDK, and changes are awaited for at most the
5 s that docs/operations.md promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import Gateway, free_port, start, stop

from bastion.admin import add_admin_routes
from bastion.views import iso_time

TOKEN = "test-admin-token"
PROPAGATION_S = 5.0
MODEL = "gpt-oss-120b"


@pytest.fixture(scope="module")
def admin(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{gateway.root}/admin/v1",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    ) as client:
        yield client


def new_name() -> str:
    return "adm-" + uuid.uuid4().hex[:10]


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    return response.json()


def refused(response: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    """Require the OpenAI error object with this status/code/param; return its message."""
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["message"]
    return str(error["message"])


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Poll ``check`` until true; fail after ``seconds``. Returns the time it took."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not true within {seconds}s")


def sdk(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=10)


def chat(client: openai.OpenAI) -> str:
    """One small billed request; returns its x-request-id (the ledger row's key)."""
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=16
    )
    assert completion.choices[0].message.content
    request_id = completion._request_id
    assert request_id
    return request_id


def cli_text(gateway: Gateway, *args: str) -> str:
    """The CLI's standard output against the same database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bastion", *args, "--config", str(gateway.config_path)],
        capture_output=True,  # bytes: CSV lines end in CRLF, kept as sent
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


def cli_json(gateway: Gateway, *args: str) -> Any:
    """The CLI's --json answer against the same database, for shape comparisons."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bastion", *args, "--json", "--config", str(gateway.config_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---- the full round trip ---------------------------------------------------------------


def test_round_trip_with_the_sdk(gateway: Gateway, admin: httpx.Client) -> None:
    name = new_name()
    created = ok(admin.post("/accounts", json={"name": name, "credit": "1.00"}), 201)
    assert created == {"id": created["id"], "name": name, "balance": "1.00"}
    assert created["id"].startswith("acct_")

    made = ok(admin.post("/keys", json={"account": name, "name": "ci"}), 201)
    assert set(made) == {
        "id", "key", "account", "name", "rpm", "tpm", "limit", "limit_reset", "expires_at",
        "models",
    }  # fmt: skip
    assert made["key"].startswith("qbt_") and made["account"] == name and made["name"] == "ci"
    assert (made["rpm"], made["tpm"]) == (100000, 100000000)  # the config defaults
    client = sdk(gateway, made["key"])

    served: list[str] = []

    def works() -> bool:
        try:
            served.append(chat(client))
        except openai.AuthenticationError:
            return False
        return True

    within(PROPAGATION_S, works)

    # top-up and take-back: balance = grants − Σ ledger costs, to the nano-dollar
    ok(admin.post(f"/accounts/{name}/credit", json={"amount": "2.50"}))
    after = ok(admin.post(f"/accounts/{name}/credit", json={"amount": "-0.50"}))
    assert set(after) == {"id", "name", "balance", "reserved", "spent", "uncharged", "alert_below"}

    # limit change: rpm 1 lets one request through per window, then 429
    patched = ok(admin.patch(f"/keys/{made['id']}", json={"rpm": 1}))
    assert (patched["rpm"], patched["rpm_default"], patched["tpm_default"]) == (1, False, True)

    def limited() -> bool:
        try:
            served.append(chat(client))
        except openai.RateLimitError:
            return True
        return False

    within(PROPAGATION_S, limited)
    patched = ok(admin.patch(f"/keys/{made['id']}", json={"rpm": 0}))
    assert patched["rpm"] == 0  # 0 = unlimited

    def unlimited() -> bool:
        try:
            served.append(chat(client))
        except openai.RateLimitError:
            return False
        return True

    within(PROPAGATION_S, unlimited)

    # usage lists exactly the served requests, and the money adds up
    def settled() -> bool:
        rows = ok(admin.get("/usage", params={"account": name}))
        return len(rows) == len(served)

    within(PROPAGATION_S, settled)
    rows = ok(admin.get("/usage", params={"account": name}))
    assert {r["request_id"] for r in rows} == set(served)
    assert all(r["account"] == name and r["key_id"] == made["id"] for r in rows)
    assert all(r["model"] == MODEL and r["endpoint"] == "chat" for r in rows)
    assert all(r["status"] == "200" and r["estimated"] is False for r in rows)
    spent = sum(Decimal(r["cost"]) for r in rows)
    assert spent > 0
    account = ok(admin.get(f"/accounts/{name}"))
    assert Decimal(account["spent"]) == spent
    assert Decimal(account["balance"]) == Decimal("3.00") - spent

    # revoke: the SDK is refused within 5 s
    revoked = ok(admin.post(f"/keys/{made['id']}/revoke"))
    assert revoked["revoked"] is True

    def refused_now() -> bool:
        try:
            chat(client)
        except openai.AuthenticationError:
            return True
        return False

    within(PROPAGATION_S, refused_now)
    listed = ok(admin.get("/keys", params={"account": name}))
    assert [(k["id"], k["revoked"]) for k in listed] == [(made["id"], True)]
    assert "key" not in listed[0] and made["key"].startswith(listed[0]["prefix"])


def test_shapes_are_the_clis(gateway: Gateway, admin: httpx.Client) -> None:
    """Same operations, same JSON: the admin API and ``--json`` share one set of views."""
    key, name = gateway.new_key(credit="5.00")
    chat(sdk(gateway, key))
    gateway.settled(name, 1)
    assert ok(admin.get(f"/accounts/{name}")) == cli_json(gateway, "accounts", "show", name)
    assert ok(admin.get("/keys", params={"account": name})) == cli_json(
        gateway, "keys", "list", "--account", name
    )
    assert ok(admin.get("/usage", params={"account": name})) == cli_json(
        gateway, "usage", "--account", name
    )
    everyone = ok(admin.get("/accounts"))
    assert any(a["name"] == name for a in everyone)
    assert [a["name"] for a in everyone] == sorted(a["name"] for a in everyone)


def test_patch_sets_and_clears_the_balance_alert(admin: httpx.Client) -> None:
    name = new_name()
    ok(admin.post("/accounts", json={"name": name, "credit": "10"}), 201)
    patched = ok(admin.patch(f"/accounts/{name}", json={"alert_below": "5.00"}))
    assert (patched["name"], patched["balance"], patched["alert_below"]) == (name, "10.00", "5.00")
    assert ok(admin.get(f"/accounts/{name}")) == patched
    assert ok(admin.patch(f"/accounts/{name}", json={"alert_below": "0.000000001"}))[
        "alert_below"
    ] == "0.000000001"
    assert ok(admin.patch(f"/accounts/{name}", json={"alert_below": None}))["alert_below"] is None


def test_bad_alert_patches(admin: httpx.Client) -> None:
    name = new_name()
    ok(admin.post("/accounts", json={"name": name}), 201)
    assert "Nothing to change" in refused(admin.patch(f"/accounts/{name}", json={}), 400,
                                          "invalid_request")  # fmt: skip
    for value in (5, 5.0, True):  # floats are not money
        refused(
            admin.patch(f"/accounts/{name}", json={"alert_below": value}),
            400, "invalid_request", "alert_below",
        )  # fmt: skip
    for text in ("0", "-1", "five"):
        refused(
            admin.patch(f"/accounts/{name}", json={"alert_below": text}),
            400, "invalid_request", "alert_below",
        )  # fmt: skip
    refused(
        admin.patch(f"/accounts/{name}", json={"alert_below": "1", "balance": "9"}),
        400, "invalid_request", "balance",
    )  # fmt: skip
    refused(admin.patch(f"/accounts/{name}-ghost", json={"alert_below": "1"}), 404, "not_found")
    assert ok(admin.get(f"/accounts/{name}"))["alert_below"] is None


def test_audit_of_a_served_account(gateway: Gateway, admin: httpx.Client) -> None:
    """Books written by the gateway itself add up; the report is ``bastion audit``'s."""
    key, name = gateway.new_key(credit="5.00")
    chat(sdk(gateway, key))
    gateway.settled(name, 1)
    report = ok(admin.get("/audit", params={"account": name}))
    assert report["ok"] is True and report["problems"] == []
    [account] = report["accounts"]
    assert account["name"] == name and account["problems"] == []
    assert account["balance"] == account["expected_balance"]
    assert (account["rows"], account["dead_letters"], account["uncharged"]) == (1, 0, "0.00")
    shown = ok(admin.get(f"/accounts/{name}"))
    assert (account["balance"], account["spent"]) == (shown["balance"], shown["spent"])
    cli = cli_json(gateway, "audit", "--account", name)
    # the gateway may resize its lease between the two reads; everything else is equal
    assert {**cli["accounts"][0], "leased": None} == {**account, "leased": None}
    assert {**cli, "accounts": None} == {**report, "accounts": None}
    everyone = ok(admin.get("/audit"))
    assert name in {a["name"] for a in everyone["accounts"]}


def test_audit_refusals(admin: httpx.Client) -> None:
    ghost = new_name()
    message = refused(admin.get("/audit", params={"account": ghost}), 404, "not_found", "account")
    assert ghost in message
    refused(admin.get("/audit", params={"acount": "x"}), 400, "invalid_request", "acount")


def test_delete_is_revoke_and_idempotent(gateway: Gateway, admin: httpx.Client) -> None:
    key, name = gateway.new_key()
    key_id = ok(admin.get("/keys", params={"account": name}))[0]["id"]
    first = ok(admin.delete(f"/keys/{key_id}"))
    again = ok(admin.post(f"/keys/{key_id}/revoke"))
    assert first == again and first["revoked"] is True
    gateway.wait_for_key(key, present=False, timeout=PROPAGATION_S)


def test_key_limits_at_creation(admin: httpx.Client) -> None:
    name = new_name()
    ok(admin.post("/accounts", json={"name": name}), 201)
    made = ok(admin.post("/keys", json={"account": name, "rpm": 0, "tpm": 5000}), 201)
    assert (made["rpm"], made["tpm"], made["name"]) == (0, 5000, "")
    both_default = ok(admin.post("/keys", json={"account": name, "rpm": None}), 201)
    assert both_default["rpm"] == 100000
    listed = {k["id"]: k for k in ok(admin.get("/keys", params={"account": name}))}
    assert listed[made["id"]]["rpm_default"] is False
    assert listed[both_default["id"]]["rpm_default"] is True
    assert set(listed) <= {k["id"] for k in ok(admin.get("/keys"))}


def test_key_limit_expiry_and_models_set_and_cleared(admin: httpx.Client) -> None:
    name = new_name()
    ok(admin.post("/accounts", json={"name": name}), 201)
    made = ok(admin.post("/keys", json={
        "account": name, "limit": "5", "limit_reset": "monthly",
        "expires_at": "2100-01-01T00:00:00+02:00", "models": ["gpt-oss-120b", "alias"],
    }), 201)  # fmt: skip
    assert (made["limit"], made["limit_reset"]) == ("5.00", "monthly")
    assert made["expires_at"] == "2099-12-31T22:00:00.000000Z"
    assert made["models"] == ["alias", "gpt-oss-120b"]
    plain = ok(admin.post("/keys", json={"account": name}), 201)
    assert (plain["limit"], plain["limit_reset"], plain["expires_at"], plain["models"]) == (
        None, "never", None, None,
    )  # fmt: skip

    path = f"/keys/{made['id']}"
    changed = ok(admin.patch(path, json={"limit": "0.50", "limit_reset": "daily"}))
    assert (changed["limit"], changed["limit_reset"], changed["models"]) == (
        "0.50", "daily", ["alias", "gpt-oss-120b"],
    )  # fmt: skip
    cleared = ok(admin.patch(path, json={"limit": None, "expires_at": None, "models": None}))
    assert (cleared["limit"], cleared["expires_at"], cleared["models"]) == (None, None, None)
    assert cleared["limit_reset"] == "daily"  # not sent: unchanged
    listed = {k["id"]: k for k in ok(admin.get("/keys", params={"account": name}))}
    assert listed[made["id"]] == cleared


def test_an_expiry_patched_in_ends_a_live_key(gateway: Gateway, admin: httpx.Client) -> None:
    key, name = gateway.new_key()
    key_id = ok(admin.get("/keys", params={"account": name}))[0]["id"]
    ok(admin.patch(f"/keys/{key_id}", json={"expires_at": "2000-01-01T00:00:00Z"}))
    gateway.wait_for_key(key, present=False, timeout=PROPAGATION_S)


def test_bad_key_controls(admin: httpx.Client, account: str) -> None:
    for body, param in [
        ({"limit": 5}, "limit"),  # floats and numbers are not money
        ({"limit": "-1"}, "limit"),
        ({"limit": "lots"}, "limit"),
        ({"limit_reset": "hourly"}, "limit_reset"),
        ({"limit_reset": None}, "limit_reset"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": 4102444800}, "expires_at"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),  # in the past: never usable
        ({"models": "gpt-oss-120b"}, "models"),
        ({"models": []}, "models"),
        ({"models": ["gpt-oss-120b", "gpt-5-turbo-ultra"]}, "models"),
    ]:
        message = refused(admin.post("/keys", json={"account": account, **body}), 400,
                          "invalid_request", param)  # fmt: skip
        if body == {"models": ["gpt-oss-120b", "gpt-5-turbo-ultra"]}:
            assert "'gpt-5-turbo-ultra'" in message and "gpt-oss-120b" in message
    assert ok(admin.get("/keys", params={"account": account})) == []
    made = ok(admin.post("/keys", json={"account": account}), 201)
    refused(admin.patch(f"/keys/{made['id']}", json={"models": ["nope"]}), 400,
            "invalid_request", "models")  # fmt: skip
    [key] = ok(admin.get("/keys", params={"account": account}))
    assert key["models"] is None


def test_names_are_path_segments(admin: httpx.Client) -> None:
    """Any account name is reachable: percent-encode it (a '/' too) in the path."""
    name = f"café {uuid.uuid4().hex[:6]}/west"
    ok(admin.post("/accounts", json={"name": name, "credit": "0.000000001"}), 201)
    path = "/accounts/" + quote(name, safe="")
    assert ok(admin.get(path))["balance"] == "0.000000001"
    assert ok(admin.post(path + "/credit", json={"amount": "1"}))["balance"] == "1.000000001"


def test_usage_since(gateway: Gateway, admin: httpx.Client) -> None:
    key, name = gateway.new_key()
    request_id = chat(sdk(gateway, key))
    gateway.settled(name, 1)
    rows = ok(admin.get("/usage", params={"account": name, "since": "2000-01-01"}))
    assert [r["request_id"] for r in rows] == [request_id]
    assert ok(admin.get("/usage", params={"account": name, "since": "2999-01-01T00:00:00Z"})) == []
    # an offset's '+' typed into a URL unencoded arrives as a space: still understood
    raw = f"/usage?account={quote(name)}&since=2000-01-01T12:00:00+01:00"
    assert [r["request_id"] for r in ok(admin.get(raw))] == [request_id]
    everything = ok(admin.get("/usage"))
    assert request_id in {r["request_id"] for r in everything}


def test_usage_reports_are_the_clis(gateway: Gateway, admin: httpx.Client) -> None:
    """key/until filters, group_by totals and format=csv answer what ``bastion usage`` prints."""
    key, name = gateway.new_key()
    client = sdk(gateway, key)
    first, second = chat(client), chat(client)
    [row, _] = gateway.settled(name, 2)
    params = {"account": name, "key": row.key_id}
    assert [r["request_id"] for r in ok(admin.get("/usage", params=params))] == [first, second]
    until = ok(admin.get("/usage", params={**params, "until": iso_time(row.created_at + 1)}))
    assert [r["request_id"] for r in until] == [first]

    grouped = {**params, "group_by": "day,model,key,account"}
    cli = ("usage", "--account", name, "--key", row.key_id, "--group-by", grouped["group_by"])
    totals = ok(admin.get("/usage", params=grouped))
    assert totals == cli_json(gateway, *cli)
    [total] = totals
    assert list(total)[:4] == ["day", "model", "key_id", "account"]
    assert (total["model"], total["key_id"], total["account"], total["requests"]) == (
        MODEL, row.key_id, name, 2
    )  # fmt: skip

    csv_answer = admin.get("/usage", params={**grouped, "format": "csv"})
    assert csv_answer.status_code == 200, csv_answer.text
    assert csv_answer.headers["content-type"].startswith("text/csv")
    assert csv_answer.headers["x-request-id"].startswith("req_")
    assert csv_answer.text == cli_text(gateway, *cli, "--csv")
    rows_csv = admin.get("/usage", params={**params, "format": "csv"}).text.splitlines()
    assert rows_csv[0].startswith("request_id,account,key_id,") and len(rows_csv) == 3
    assert ok(admin.get("/usage", params={**params, "format": "json"})) == ok(
        admin.get("/usage", params=params)
    )


# ---- auth --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer tést".encode()},  # non-ASCII must not crash compare_digest
        {"Authorization": TOKEN},
    ],
)
def test_auth_is_required(gateway: Gateway, headers: dict[str, str | bytes]) -> None:
    name = new_name()
    url = f"{gateway.root}/admin/v1"
    refused(httpx.get(f"{url}/accounts", headers=headers), 401, "invalid_api_key")
    response = httpx.post(f"{url}/accounts", json={"name": name}, headers=headers)
    refused(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(Exception, match="no account named"):
        gateway.account(name)


def test_client_key_is_not_an_admin_token(gateway: Gateway) -> None:
    key, _ = gateway.new_key()
    response = httpx.get(
        f"{gateway.root}/admin/v1/accounts", headers={"Authorization": f"Bearer {key}"}
    )
    refused(response, 401, "invalid_api_key")


def test_unknown_admin_path_is_404(admin: httpx.Client) -> None:
    refused(admin.get("/nope"), 404, "not_found")
    refused(admin.put("/accounts"), 404, "not_found")


# ---- bad inputs: 4xx, and nothing changed ----------------------------------------------


@pytest.fixture
def account(admin: httpx.Client) -> str:
    name = new_name()
    ok(admin.post("/accounts", json={"name": name, "credit": "1.00"}), 201)
    return name


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"amount": 0.5}, 400, "invalid_request", "amount"),  # float
        ({"amount": 1}, 400, "invalid_request", "amount"),  # a JSON number at all
        ({"amount": "0.1234567891"}, 400, "invalid_request", "amount"),  # below a nano-dollar
        ({"amount": "ten"}, 400, "invalid_request", "amount"),
        ({"amount": "nan"}, 400, "invalid_request", "amount"),
        ({"amount": "0"}, 400, "invalid_request", "amount"),
        ({}, 400, "invalid_request", "amount"),
        ({"amount": "1", "note": "x"}, 400, "invalid_request", "note"),
        ({"amount": "-1.01"}, 409, "insufficient_balance", "amount"),  # overdraft
    ],
)
def test_bad_credit(
    admin: httpx.Client, account: str, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    refused(admin.post(f"/accounts/{account}/credit", json=body), status, code, param)
    assert ok(admin.get(f"/accounts/{account}"))["balance"] == "1.00"


def test_a_top_up_retried_with_its_idempotency_key_is_applied_once(
    admin: httpx.Client, account: str
) -> None:
    path, key = f"/accounts/{account}/credit", {"Idempotency-Key": f"{account}-invoice-42"}
    first = admin.post(path, json={"amount": "2.50"}, headers=key)
    again = admin.post(path, json={"amount": "2.50"}, headers=key)
    assert ok(again) == ok(first) and ok(first)["balance"] == "3.50"
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["x-request-id"] != first.headers["x-request-id"]  # its own request

    message = refused(
        admin.post(path, json={"amount": "2.51"}, headers=key),
        409, "idempotency_key_reused", "Idempotency-Key",
    )  # fmt: skip
    assert "already used for another top-up (2.50 USD to" in message
    for bad in ("", "x" * 256):
        bad_key = {"Idempotency-Key": bad}
        refused(admin.post(path, json={"amount": "1"}, headers=bad_key),
                400, "invalid_request", "Idempotency-Key")  # fmt: skip
    assert ok(admin.get(f"/accounts/{account}"))["balance"] == "3.50"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'"amount"', b"\xff\xfe"],
)
def test_body_must_be_a_json_object(admin: httpx.Client, account: str, content: bytes) -> None:
    response = admin.post(
        f"/accounts/{account}/credit",
        content=content,
        headers={"content-type": "application/json"},
    )
    refused(response, 400, "invalid_request")
    assert ok(admin.get(f"/accounts/{account}"))["balance"] == "1.00"


def test_bad_account_creation(admin: httpx.Client, account: str) -> None:
    name = new_name()
    for body, param in [
        ({"name": name, "credit": 1.5}, "credit"),
        ({"name": name, "credit": "-1"}, "credit"),
        ({"name": name, "credits": "5"}, "credits"),
        ({"credit": "5"}, "name"),
        ({"name": 42}, "name"),
        ({"name": ""}, "name"),
        ({"name": f" {name}"}, "name"),
    ]:
        refused(admin.post("/accounts", json=body), 400, "invalid_request", param)
    refused(admin.get(f"/accounts/{name}"), 404, "not_found")
    assert name not in {a["name"] for a in ok(admin.get("/accounts"))}
    # a duplicate name is a conflict, and the first account is untouched
    refused(admin.post("/accounts", json={"name": account, "credit": "9"}), 409, "conflict", "name")
    assert ok(admin.get(f"/accounts/{account}"))["balance"] == "1.00"


def test_unknown_account(admin: httpx.Client) -> None:
    ghost = new_name()
    refused(admin.get(f"/accounts/{ghost}"), 404, "not_found")
    refused(admin.post(f"/accounts/{ghost}/credit", json={"amount": "1"}), 404, "not_found")
    refused(admin.post("/keys", json={"account": ghost}), 404, "not_found", "account")
    refused(admin.get("/keys", params={"account": ghost}), 404, "not_found", "account")
    refused(admin.get("/usage", params={"account": ghost}), 404, "not_found", "account")
    refused(admin.get(f"/accounts/{ghost}"), 404, "not_found")  # still nothing


def test_bad_key_requests(admin: httpx.Client, account: str) -> None:
    for body, param in [
        ({"account": account, "rpm": -1}, "rpm"),
        ({"account": account, "rpm": "5"}, "rpm"),
        ({"account": account, "tpm": 1.5}, "tpm"),
        ({"account": account, "tpm": True}, "tpm"),
        ({"account": account, "name": 7}, "name"),
        ({"account": account, "key": "qbt_mine"}, "key"),
        ({"name": "no account"}, "account"),
    ]:
        refused(admin.post("/keys", json=body), 400, "invalid_request", param)
    assert ok(admin.get("/keys", params={"account": account})) == []

    made = ok(admin.post("/keys", json={"account": account, "rpm": 7}), 201)
    path = f"/keys/{made['id']}"
    refused(admin.patch(path, json={}), 400, "invalid_request")
    refused(admin.patch(path, json={"rpm": None}), 400, "invalid_request", "rpm")
    refused(admin.patch(path, json={"rpm": -3}), 400, "invalid_request", "rpm")
    refused(admin.patch(path, json={"account": "x"}), 400, "invalid_request", "account")
    [key] = ok(admin.get("/keys", params={"account": account}))
    assert (key["rpm"], key["revoked"]) == (7, False)

    refused(admin.patch("/keys/key_nope", json={"rpm": 1}), 404, "not_found")
    refused(admin.post("/keys/key_nope/revoke"), 404, "not_found")
    refused(admin.delete("/keys/key_nope"), 404, "not_found")


def test_bad_usage_queries(admin: httpx.Client) -> None:
    refused(admin.get("/usage", params={"since": "yesterday"}), 400, "invalid_request", "since")
    refused(admin.get("/usage", params={"acount": "x"}), 400, "invalid_request", "acount")
    refused(admin.get("/usage", params={"until": "soon"}), 400, "invalid_request", "until")
    refused(admin.get("/usage", params={"group_by": "week"}), 400, "invalid_request", "group_by")
    refused(admin.get("/usage", params={"group_by": ""}), 400, "invalid_request", "group_by")
    refused(admin.get("/usage", params={"format": "xml"}), 400, "invalid_request", "format")
    refused(admin.get("/usage", params={"key": "key_nope"}), 404, "not_found", "key")
    refused(admin.get("/usage", params={"account": "ghost"}), 404, "not_found", "account")
    refused(admin.get("/keys", params={"acount": "x"}), 400, "invalid_request", "acount")


# ---- a failing store -------------------------------------------------------------------


class _BrokenStore:
    async def list_accounts(self) -> list[Any]:
        raise OSError("disk on fire")


async def test_store_failure_is_an_error_object() -> None:
    """An unexpected store failure is a 500 in the OpenAI shape, never aiohttp's text page."""
    gateway = SimpleNamespace(store=_BrokenStore(), config=SimpleNamespace(admin_token=TOKEN))
    app = web.Application()
    add_admin_routes(app, gateway)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        response = await client.get(
            "/admin/v1/accounts", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status == 500
        error = (await response.json())["error"]
        assert error["code"] == "internal_error" and error["type"] == "server_error"
        assert response.headers["x-request-id"] in error["message"]
        assert "disk on fire" not in error["message"]


# ---- off without a token -----------------------------------------------------------------


def test_no_admin_token_means_404(tmp_path: Path, sim_port: int) -> None:
    port = free_port()
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}

[database]
url = "sqlite:///{tmp_path / "bastion.db"}"

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim_port}/v1"

[[models]]
id = "{MODEL}"
upstreams = ["sim"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 1024
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz", env=env)
    try:
        root = f"http://127.0.0.1:{port}/admin/v1"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        refused(httpx.get(f"{root}/accounts"), 404, "not_found")
        refused(httpx.get(f"{root}/accounts", headers=auth), 404, "not_found")
        refused(httpx.post(f"{root}/accounts", json={"name": "x"}, headers=auth), 404, "not_found")
        refused(httpx.get(f"{root}/usage", headers=auth), 404, "not_found")
    finally:
        stop(proc)



# ---- values the store cannot hold (found by the schemathesis run of test_openapi.py) -----

INT64_MAX = 2**63 - 1


def test_amounts_past_64_bits_of_nano_dollars_are_refused(
    admin: httpx.Client, account: str
) -> None:
    """Nano-dollars are 64-bit integers in the database: a larger amount is a 400 naming
    the field, not a 500 from the store."""
    rich = {"name": new_name(), "credit": "7212272764703"}
    refused(admin.post("/accounts", json=rich), 400, "invalid_request", "credit")
    refused(admin.get(f"/accounts/{rich['name']}"), 404, "not_found")
    for amount in ("9223372036.854775808", "-9223372037"):
        credit = admin.post(f"/accounts/{account}/credit", json={"amount": amount})
        refused(credit, 400, "invalid_request", "amount")
    assert ok(admin.get(f"/accounts/{account}"))["balance"] == "1.00"


def test_limits_past_64_bits_are_refused(admin: httpx.Client, account: str) -> None:
    too_big = INT64_MAX + 1
    made = admin.post("/keys", json={"account": account, "rpm": too_big})
    refused(made, 400, "invalid_request", "rpm")
    key = ok(admin.post("/keys", json={"account": account}), 201)
    refused(admin.patch(f"/keys/{key['id']}", json={"tpm": too_big}), 400, "invalid_request", "tpm")
    assert ok(admin.patch(f"/keys/{key['id']}", json={"tpm": INT64_MAX}))["tpm"] == INT64_MAX


def test_an_expiry_past_year_9999_utc_is_refused(admin: httpx.Client, account: str) -> None:
    """9999-12-31T23:59:59-05:00 is in year 10000 UTC, which no answer can show: stored,
    it made every later listing of the key a 500."""
    key = ok(admin.post("/keys", json={"account": account}), 201)
    late = {"expires_at": "9999-12-31T23:59:59-05:00"}
    refused(admin.patch(f"/keys/{key['id']}", json=late), 400, "invalid_request", "expires_at")
    made = admin.post("/keys", json={"account": account, **late})
    refused(made, 400, "invalid_request", "expires_at")
    assert [k["expires_at"] for k in ok(admin.get("/keys", params={"account": account}))] == [None]
    last = {"expires_at": "9999-12-31T23:59:59Z"}
    assert ok(admin.patch(f"/keys/{key['id']}", json=last))["expires_at"].startswith("9999-12-31")


def test_nul_characters_are_refused(admin: httpx.Client, account: str) -> None:
    """PostgreSQL can neither store nor look up a string with a NUL character (its driver
    raises, a 500): it is refused as a 400 on every store, before it reaches one."""
    refused(admin.post("/accounts", json={"name": "a\x00b"}), 400, "invalid_request", "name")
    refused(admin.get("/accounts/a%00b"), 400, "invalid_request")
    refused(admin.post("/keys/key_%00/revoke"), 400, "invalid_request")
    refused(admin.get("/keys", params={"account": "a\x00"}), 400, "invalid_request", "account")
    label = {"account": account, "name": "ci\x00"}
    refused(admin.post("/keys", json=label), 400, "invalid_request", "name")
    models = {"account": account, "models": [MODEL + "\x00"]}
    refused(admin.post("/keys", json=models), 400, "invalid_request", "models")
    assert ok(admin.get("/keys", params={"account": account})) == []
