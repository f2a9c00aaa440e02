"""Exact money (docs/operations.md). Balance = credits − Σ ledger costs; never below zero."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from bastion.config import MeteringConfig
from bastion.metering import input_bound
from bastion.money import cost_nanos, format_usd, parse_usd


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


# ---- money on every path: each defect below was reproduced before it was fixed -------------


def metric(gateway, name: str) -> float:
    """The value of one unlabelled /metrics sample (0 if absent)."""
    for line in httpx.get(gateway.root + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def price(model: str, row) -> int:
    """The exact price of a row's tokens (the conftest catalogue's prices)."""
    prices = {"alias": ("1.00", "1.00", "2.00"), "slow-model": ("1.00", "1.00", "2.00")}
    i, c, o = (parse_usd(p) for p in prices[model])
    fresh = row.input_tokens - row.cached_input_tokens
    total = fresh * i + row.cached_input_tokens * c + row.output_tokens * o
    return -(-total // 1_000_000)


def test_chat_cap_is_max_completion_tokens_first_as_the_upstream_reads_it(gateway):
    """{"max_completion_tokens": 4000, "max_tokens": 1} is reserved for 4,000, not 1."""
    key, account = gateway.new_key(credit="0.001")  # alias: 3,000 tokens cost $0.006
    body = {
        "model": "alias",
        "messages": [{"role": "user", "content": "x"}],
        "max_completion_tokens": 1000,
        "max_tokens": 1,
        "sim": {"tokens": 900},
    }
    headers = {"Authorization": f"Bearer {key}"}
    answer = httpx.post(gateway.url + "/chat/completions", json=body, headers=headers)
    assert answer.status_code == 402, answer.text  # the worst case is 1,000 output tokens
    gateway.store_call("credit_account", account, parse_usd("1"))
    deadline = time.monotonic() + 5
    while (answer := httpx.post(gateway.url + "/chat/completions", json=body, headers=headers))\
            .status_code == 402 and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.1)
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 900  # the upstream used the 1,000 cap
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == 900 and row.cost == price("alias", row) and row.uncharged == 0
    assert gateway.account(account).balance == parse_usd("1.001") - row.cost


def test_each_chat_cap_field_is_checked_against_the_model_maximum(gateway):
    key, _ = gateway.new_key()
    for fields in ({"max_completion_tokens": 10, "max_tokens": 5000},
                   {"max_completion_tokens": 5000, "max_tokens": 10}):  # fmt: skip
        body = {"model": "alias", "messages": [{"role": "user", "content": "x"}], **fields}
        answer = httpx.post(
            gateway.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 400
        too_big = next(k for k, v in fields.items() if v == 5000)
        assert answer.json()["error"]["param"] == too_big


def test_a_cost_over_the_reservation_is_recorded_exactly_and_the_rest_is_uncharged(gateway):
    """An upstream reports more input than the bound (but not absurdly more): the row keeps
    the exact price; what the account cannot cover is uncharged, counted, never hidden."""
    body = {"model": "alias", "input": "x", "max_output_tokens": 16}
    bound = input_bound({**body, "sim": {"report": {"input_tokens": 0}}}, 1, MeteringConfig())
    worst = cost_nanos(bound, 16, parse_usd("1.00"), parse_usd("2.00"))
    key, account = gateway.new_key(credit=format_usd(worst))  # exactly one worst case
    before = metric(gateway, "bastion_uncharged_nanodollars_total")
    reported = bound + bound // 2  # over the bound, but within what a miscount could explain
    answer = client(gateway, key).responses.create(
        **body, extra_body={"sim": {"report": {"input_tokens": reported}}}
    )
    assert answer.usage.input_tokens == reported
    [row] = gateway.settled(account, 1)
    assert row.input_tokens == reported and not row.estimated
    assert row.cost == price("alias", row) > worst
    assert row.uncharged == row.cost - worst
    acct = gateway.account(account)
    assert acct.balance == 0 and acct.uncharged == row.uncharged
    assert metric(gateway, "bastion_uncharged_nanodollars_total") - before == row.uncharged


def test_chat_stream_with_usage_null_in_every_chunk_is_still_counted(gateway):
    """OpenAI's include_usage format: a client that leaves early still pays for its deltas."""
    key, account = gateway.new_key()
    stream = client(gateway, key).chat.completions.create(
        model="slow-model",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"tokens": 50, "usage_null_chunks": True}},
    )
    seen = 0
    for chunk in stream:
        assert chunk.usage is None
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    stream.close()
    [row] = gateway.settled(account, 1)
    assert row.status == "cancelled" and row.estimated
    assert row.output_tokens >= 3 and row.cost == price("slow-model", row) > 0


@pytest.mark.parametrize(
    "report",
    [{"output_tokens": 10**19}, {"output_tokens": 17}, {"input_tokens": 10**12}],
    ids=["overflow", "over-cap", "input-far-over-bound"],
)
def test_a_bogus_usage_report_charges_the_admitted_worst_case(gateway, report):
    key, account = gateway.new_key()
    body = {"model": "alias", "input": "x", "max_output_tokens": 16}
    bound = input_bound({**body, "sim": {"report": report}}, 1, MeteringConfig())
    before = metric(gateway, "bastion_usage_rejected_total")
    c = client(gateway, key)
    c.responses.create(**body, extra_body={"sim": {"report": report}})
    [row] = gateway.settled(account, 1)
    assert row.estimated and (row.input_tokens, row.output_tokens) == (bound, 16)
    assert row.cost == cost_nanos(bound, 16, parse_usd("1.00"), parse_usd("2.00"))
    assert metric(gateway, "bastion_usage_rejected_total") - before == 1
    # and the gateway carries on: the next request is served and written
    assert c.responses.create(**body).output_text
    assert len(gateway.settled(account, 2)) == 2


def test_tokens_per_minute_come_back_when_credit_refuses(gateway):
    """A 402 spends no TPM: after a top-up the same request is admitted at once."""
    key, account = gateway.new_key(credit="0.000001", tpm=2000)
    body = {"model": "alias", "input": "x", "max_output_tokens": 1000}  # ~1,300 tokens worst case
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        answer = httpx.post(gateway.url + "/responses", json=body, headers=headers)
        assert answer.status_code == 402, answer.text
    gateway.store_call("credit_account", account, parse_usd("1"))
    deadline = time.monotonic() + 5
    while (status := httpx.post(gateway.url + "/responses", json=body, headers=headers)
           .status_code) == 402 and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.2)
    assert status == 200


@pytest.mark.parametrize("endpoint", ["responses", "chat"])
def test_cached_input_tokens_are_priced_apart_and_reasoning_tokens_recorded(gateway, endpoint):
    key, account = gateway.new_key()
    c = client(gateway, key)
    sim = {"sim": {"cached_tokens": 8, "reasoning_tokens": 5, "tokens": 12}}
    text = "a prompt long enough to have some cached tokens " * 3
    if endpoint == "responses":
        answer = c.responses.create(model="gpt-oss-120b", input=text, extra_body=sim)
        cached = answer.usage.input_tokens_details.cached_tokens
        reasoning = answer.usage.output_tokens_details.reasoning_tokens
    else:
        answer = c.chat.completions.create(
            model="gpt-oss-120b", messages=[{"role": "user", "content": text}], extra_body=sim
        )
        cached = answer.usage.prompt_tokens_details.cached_tokens
        reasoning = answer.usage.completion_tokens_details.reasoning_tokens
    assert (cached, reasoning) == (8, 5)
    [row] = gateway.settled(account, 1)
    assert (row.cached_input_tokens, row.reasoning_tokens, row.output_tokens) == (8, 5, 12)
    i, c_, o = parse_usd("0.10"), parse_usd("0.025"), parse_usd("0.50")
    exact = -(-((row.input_tokens - 8) * i + 8 * c_ + 12 * o) // 1_000_000)
    assert row.cost == exact < cost_nanos(row.input_tokens, 12, i, o)


def test_both_chat_caps_reach_the_upstream_as_the_one_reserved(gateway):
    """Whichever field an upstream reads, it reads the cap Bastion reserved for."""
    key, account = gateway.new_key()
    answer = client(gateway, key).chat.completions.create(
        model="alias",
        messages=[{"role": "user", "content": "x"}],
        max_completion_tokens=7,
        max_tokens=900,
        extra_body={"sim": {"tokens": 50}},
    )
    assert answer.usage.completion_tokens == 7
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == 7 and not row.estimated
