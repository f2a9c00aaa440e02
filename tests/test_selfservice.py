"""GET /v1/key and GET /v1/generation (docs/api.md) through the official SDK's raw helpers:
a key sees its own limits and spend, and its own account's requests, for free."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from bastion.money import format_usd, parse_usd
from bastion.store import LedgerRow

KEY_FIELDS = {
    "key_id", "label", "account", "rpm", "tpm", "limit", "limit_reset", "limit_usage",
    "limit_remaining", "expires_at", "models", "balance", "available",
}  # fmt: skip
GENERATION_FIELDS = {
    "id", "model", "endpoint", "input_tokens", "cached_input_tokens", "output_tokens",
    "reasoning_tokens", "cost", "uncharged", "estimated", "status", "created_at",
}  # fmt: skip
DAY_US = 86_400_000_000


def client(gateway, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)


def my_key(gateway, key: str) -> dict[str, Any]:
    resp = client(gateway, key).get("/key", cast_to=httpx.Response)
    assert resp.headers["x-request-id"].startswith("req_")
    data = resp.json()["data"]
    assert set(data) == KEY_FIELDS
    return data


def generation(gateway, key: str, request_id: str) -> dict[str, Any]:
    resp = client(gateway, key).get(
        "/generation", cast_to=httpx.Response, options={"params": {"id": request_id}}
    )
    data = resp.json()["data"]
    assert set(data) == GENERATION_FIELDS
    return data


def ask(gateway, key: str, model: str = "gpt-oss-120b") -> str:
    """One small request; its x-request-id."""
    res = client(gateway, key).responses.create(model=model, input="hi", max_output_tokens=16)
    return res._request_id


def test_a_plain_key_sees_the_defaults_and_its_credit(gateway):
    key, account = gateway.new_key(credit="10.00")
    [stored] = gateway.store_call("list_keys", account)
    assert my_key(gateway, key) == {
        "key_id": stored.id,
        "label": "test",
        "account": account,
        "rpm": 100000,  # the config's defaults: this key has no override
        "tpm": 100000000,
        "limit": None,
        "limit_reset": "never",
        "limit_usage": "0.00",
        "limit_remaining": None,
        "expires_at": None,
        "models": None,
        "balance": "10.00",
        "available": "10.00",
    }


def test_a_key_sees_its_own_limit_expiry_and_models(gateway):
    key, _ = gateway.new_key(
        rpm=7,
        tpm=0,
        spend_limit=parse_usd("5"),
        limit_reset="weekly",
        expires_at=4_102_444_800_000_000,  # 2100-01-01
        models=frozenset({"gpt-oss-120b", "alias"}),
    )
    data = my_key(gateway, key)
    assert (data["rpm"], data["tpm"]) == (7, 0)  # 0: unlimited
    assert (data["limit"], data["limit_reset"]) == ("5.00", "weekly")
    assert (data["limit_usage"], data["limit_remaining"]) == ("0.00", "5.00")
    assert data["expires_at"] == "2100-01-01T00:00:00.000000Z"
    assert data["models"] == ["alias", "gpt-oss-120b"]


def test_limit_usage_counts_the_keys_spend_in_the_current_period(gateway):
    key, account = gateway.new_key(spend_limit=parse_usd("1"), limit_reset="daily")
    [stored] = gateway.store_call("list_keys", account)
    yesterday = LedgerRow(
        "req_yesterday", stored.account_id, stored.id, "gpt-oss-120b", "responses",
        1000, 1000, parse_usd("0.25"), False, "200", time.time_ns() // 1000 - DAY_US,
    )  # fmt: skip
    gateway.store_call("write_ledger", [yesterday])
    ask(gateway, key)
    ask(gateway, key)
    rows = gateway.settled(account, 3)
    today = sum(r.cost for r in rows if r.request_id != "req_yesterday")
    data = my_key(gateway, key)
    assert data["limit_usage"] == format_usd(today)  # yesterday's row is another period
    assert data["limit_remaining"] == format_usd(parse_usd("1") - today)
    balance = gateway.account(account).balance
    assert balance == parse_usd("10") - today - parse_usd("0.25")
    assert data["balance"] == data["available"] == format_usd(balance)  # nothing in flight


def test_asking_costs_nothing(gateway):
    key, account = gateway.new_key()
    request_id = ask(gateway, key)
    gateway.settled(account, 1)
    before = gateway.account(account)
    for _ in range(3):
        my_key(gateway, key)
        generation(gateway, key, request_id)
    assert gateway.account(account) == before
    assert len(gateway.ledger(account)) == 1


def test_generation_is_the_requests_ledger_row(gateway):
    key, account = gateway.new_key()
    res = client(gateway, key).chat.completions.with_raw_response.create(
        model="Mistral-7B-Instruct-v0.3", messages=[{"role": "user", "content": "hi"}]
    )
    request_id = res.headers["x-request-id"]
    [row] = gateway.settled(account, 1)
    data = generation(gateway, key, request_id)
    assert data["id"] == request_id
    assert (data["model"], data["endpoint"], data["status"]) == (
        "Mistral-7B-Instruct-v0.3", "chat", "200",
    )  # fmt: skip
    usage = res.parse().usage
    assert (data["input_tokens"], data["output_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens,
    )  # fmt: skip
    assert data["cost"] == format_usd(row.cost) and data["uncharged"] == "0.00"
    assert data["estimated"] is False and data["created_at"].endswith("Z")


def test_another_accounts_request_is_not_found(gateway):
    mine, account = gateway.new_key()
    other, _ = gateway.new_key()
    request_id = ask(gateway, mine)
    gateway.settled(account, 1)
    for key, wanted in ((other, request_id), (mine, "req_" + "0" * 32)):
        with pytest.raises(openai.NotFoundError) as err:
            generation(gateway, key, wanted)
        assert (err.value.code, err.value.param) == ("not_found", "id")
    same_account = gateway.store_call("create_key", account)[1]  # any key of the account
    gateway.wait_for_key(same_account)
    assert generation(gateway, same_account, request_id)["id"] == request_id


def test_generation_needs_an_id(gateway):
    key, _ = gateway.new_key()
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway, key).get("/generation", cast_to=httpx.Response)
    assert (err.value.code, err.value.param) == ("invalid_request", "id")


def test_both_need_a_valid_key(gateway):
    key, account = gateway.new_key()
    [stored] = gateway.store_call("list_keys", account)
    gateway.store_call("update_key", stored.id, expires_at=1)
    gateway.wait_for_key(key, present=False)
    for path in ("/key", "/generation?id=req_x"):
        with pytest.raises(openai.AuthenticationError) as err:
            client(gateway, key).get(path, cast_to=httpx.Response)
        assert err.value.code == "invalid_api_key" and "expired" in err.value.message
        assert httpx.get(gateway.url + path).status_code == 401  # no key at all
