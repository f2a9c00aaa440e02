"""SPEC §2: exact money. Balance = credits − Σ ledger costs; never below zero."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from bastion.money import cost_nanos, parse_usd


def client(gateway, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)


def test_balance_is_credits_minus_ledger_to_the_nano_dollar(gateway):
    key, account = gateway.new_key(credit="1.00")
    c = client(gateway, key)
    for i in range(5):
        c.responses.create(model="gpt-oss-120b", input=f"question {i}", max_output_tokens=64)
        c.chat.completions.create(model="alias", messages=[{"role": "user", "content": "é" * i}])
    list(c.responses.create(model="gpt-oss-120b", input="streamed", stream=True))
    rows = gateway.settled(account, 11)
    assert len(rows) == 11 and len({r.request_id for r in rows}) == 11
    prices = {"gpt-oss-120b": ("0.10", "0.50"), "alias": ("1.00", "2.00")}
    for row in rows:
        i_price, o_price = (parse_usd(p) for p in prices[row.model])
        assert row.cost == cost_nanos(row.input_tokens, row.output_tokens, i_price, o_price)
    acct = gateway.account(account)
    assert acct.balance == parse_usd("1.00") - sum(r.cost for r in rows)
    assert acct.spent == sum(r.cost for r in rows)


def test_402_says_what_is_available_and_what_is_needed(gateway):
    key, account = gateway.new_key(credit="0.000001")
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway, key).responses.create(model="alias", input="x")
    assert err.value.status_code == 402
    assert err.value.code == "insufficient_funds"
    message = err.value.message
    assert "$0.000001 available" in message and "needs up to $" in message
    assert "max_output_tokens" in message
    assert gateway.ledger(account) == []
    assert gateway.account(account).balance == parse_usd("0.000001")


def test_a_lower_cap_fits_where_the_default_does_not(gateway):
    # alias: $1/M in, $2/M out, default cap 1024 -> ~$0.0021 worst case; $0.0005 is too little
    key, _ = gateway.new_key(credit="0.0005")
    c = client(gateway, key)
    with pytest.raises(openai.APIStatusError):
        c.responses.create(model="alias", input="x")
    assert c.responses.create(model="alias", input="x", max_output_tokens=16).output_text


def test_top_up_is_usable_within_five_seconds(gateway):
    key, account = gateway.new_key(credit="0.000001")
    body = {"model": "alias", "input": "x"}
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(gateway.url + "/responses", json=body, headers=headers).status_code == 402
    gateway.store_call("credit_account", account, parse_usd("5"))
    deadline = time.monotonic() + 5
    while httpx.post(gateway.url + "/responses", json=body, headers=headers).status_code == 402:
        assert time.monotonic() < deadline, "top-up not seen within 5 s"
        time.sleep(0.1)


def test_never_below_zero_under_50_concurrent_requests(gateway):
    """Credit for ~4 answers of 1000 tokens; 50 at once: the rest get 402, none overdraw."""
    key, account = gateway.new_key(credit="0.01")
    each = cost_nanos(0, 1000, parse_usd("1.00"), parse_usd("2.00"))  # $0.002 of output alone
    long_answer = {"sim": {"tokens": 1000}}

    async def one(c: AsyncOpenAI, i: int) -> str:
        try:
            if i % 2 == 0:
                stream = await c.responses.create(
                    model="alias",
                    input=f"request {i}",
                    stream=True,
                    max_output_tokens=1000,
                    extra_body=long_answer,
                )
                async for _ in stream:
                    pass
            else:
                await c.chat.completions.create(
                    model="alias",
                    messages=[{"role": "user", "content": f"request {i}"}],
                    max_tokens=1000,
                    extra_body=long_answer,
                )
            return "ok"
        except openai.APIStatusError as exc:
            return str(exc.status_code)

    async def burst() -> list[str]:
        async with AsyncOpenAI(base_url=gateway.url, api_key=key, max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(50)))

    outcomes = asyncio.run(burst())
    served = outcomes.count("ok")
    assert set(outcomes) <= {"ok", "402"}
    assert 1 <= served <= parse_usd("0.01") // each
    rows = gateway.settled(account, served)
    assert len(rows) == served and all(r.output_tokens == 1000 for r in rows)
    acct = gateway.account(account)
    assert acct.balance >= 0
    assert acct.balance == parse_usd("0.01") - sum(r.cost for r in rows)


def test_refused_requests_cost_nothing_and_write_nothing(gateway):
    key, account = gateway.new_key(rpm=1)
    headers = {"Authorization": f"Bearer {key}"}
    for body in (b"nope", b'{"model": "nope", "input": "x"}'):
        resp = httpx.post(gateway.url + "/responses", content=body, headers=headers)
        assert resp.status_code == 400
    ok = httpx.post(
        gateway.url + "/responses", json={"model": "alias", "input": "x"}, headers=headers
    )
    assert ok.status_code == 200
    limited = httpx.post(
        gateway.url + "/responses", json={"model": "alias", "input": "x"}, headers=headers
    )
    assert limited.status_code == 429
    rows = gateway.settled(account, 1)
    time.sleep(0.5)
    assert len(gateway.ledger(account)) == 1 == len(rows)
