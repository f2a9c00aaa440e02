"""A replica cut off from PostgreSQL while another keeps serving: the balance never goes
below zero, what could not be collected is recorded as uncharged, and nothing is lost.

Replica A reaches PostgreSQL through a TCP proxy that black-holes (a network partition);
B reaches it directly. Both share Redis. The lease TTL is 6 s, so A trusts its lease
for 3 s after its last heartbeat, and B reclaims it 6 s after.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import Gateway, free_port, start, stop
from faultproxy import FaultProxy
from openai import AsyncOpenAI

from bastion.money import cost_nanos, parse_usd
from bastion.store import open_store

TTL = 6  # lease_ttl_s: A trusts its lease for TTL/2 after a heartbeat; B reclaims it after TTL

TOML = f"""
refresh_interval_s = 0.5
lease_ttl_s = {TTL}

[database]
url = "{{pg}}"

[ratelimit]
url = "redis://127.0.0.1:6379/0"
default_rpm = 100000
default_tpm = 100000000

[[upstreams]]
name = "fast"
url = "http://127.0.0.1:{{sim}}/v1"

[[upstreams]]
name = "slow"
url = "http://127.0.0.1:{{slow}}/v1"

[[models]]
id = "m"
upstreams = ["fast"]
input_price = "1.00"
output_price = "1000.00"
max_output_tokens = 100

[[models]]
id = "slow"
upstreams = ["slow"]
input_price = "1.00"
output_price = "1000.00"
max_output_tokens = 100
"""

IN, OUT = parse_usd("1.00"), parse_usd("1000.00")


@pytest.fixture
def cluster(tmp_path, pg_url: str, sim_port: int, slow_sim_port: int) -> Iterator[tuple]:
    parts = urllib.parse.urlsplit(pg_url)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    gateways = []
    for name, url in (("a", proxy.url_for(pg_url)), ("b", pg_url)):
        config = tmp_path / f"{name}.toml"
        config.write_text(TOML.format(pg=url, sim=sim_port, slow=slow_sim_port))
        port = free_port()
        proc = start(
            ["serve", "--config", str(config), "--port", str(port)],
            f"http://127.0.0.1:{port}/healthz",
            env={**os.environ},
            stderr=open(tmp_path / f"{name}.log", "w"),
        )
        gateways.append(
            Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config, pg_url, proc)
        )
    yield gateways[0], gateways[1], proxy, tmp_path
    for gw in gateways:
        stop(gw.proc)
    proxy.stop()


async def short(c: AsyncOpenAI, i: int) -> str:
    try:
        await c.responses.create(
            model="m", input=f"q{i}", max_output_tokens=20, extra_body={"sim": {"tokens": 20}}
        )
        return "200"
    except openai.APIStatusError as exc:
        return str(exc.status_code)
    except openai.APIConnectionError:
        return "conn"


async def long_stream(c: AsyncOpenAI) -> str:
    """100 tokens at 5 tokens/s: 20 s, longer than the partition's trust."""
    events = []
    try:
        stream = await c.responses.create(
            model="slow", input="long", max_output_tokens=100, stream=True,
            extra_body={"sim": {"tokens": 100}},
        )  # fmt: skip
        async for event in stream:
            events.append(event.type)
    except openai.APIError as exc:
        return f"error: {exc}"
    return events[-1] if events else "empty"


@pytest.mark.timeout(120)
def test_a_partitioned_replica_never_drives_the_balance_below_zero(cluster):
    a, b, proxy, _ = cluster
    key, account = b.new_key(credit="1.00")
    a.wait_for_key(key)
    low_water = [parse_usd("1.00")]

    async def watch_balance(stop_at: float) -> None:
        store = open_store(b.db_url)
        try:
            while time.monotonic() < stop_at:
                low_water.append((await store.get_account(account)).balance)
                await asyncio.sleep(0.2)
        finally:
            await store.close()

    async def scenario() -> dict:
        ca = AsyncOpenAI(base_url=a.url, api_key=key, max_retries=0, timeout=30)
        cb = AsyncOpenAI(base_url=b.url, api_key=key, max_retries=0, timeout=30)
        watcher = asyncio.create_task(watch_balance(time.monotonic() + 60))
        warm = await asyncio.gather(*(short(ca, i) for i in range(5)))
        assert warm == ["200"] * 5
        streams = [asyncio.create_task(long_stream(ca)) for _ in range(3)]
        await asyncio.sleep(1.0)
        proxy.blackhole()  # A is cut off from PostgreSQL
        cut = time.monotonic()
        during: list[str] = []
        while time.monotonic() - cut < TTL / 2 + 2:
            during.append(await short(ca, 100 + len(during)))
            await asyncio.sleep(0.05)
        refused_at = time.monotonic()
        assert await short(ca, 999) == "503"  # refused, promptly, not hung
        assert time.monotonic() - refused_at < 2
        ended = await asyncio.gather(*streams)
        await asyncio.sleep(TTL + 2 - (time.monotonic() - cut))  # past A's lease TTL
        spent_by_b: list[str] = []
        for i in range(200):  # B leases what A held and spends everything
            spent_by_b.append(await short(cb, 1000 + i))
            if spent_by_b[-1] == "402":
                break
        proxy.passing()  # A is back
        deadline = time.monotonic() + 20
        while await short(ca, 5000) == "503":  # A re-leases before admitting again
            assert time.monotonic() < deadline, "A did not recover"
            await asyncio.sleep(0.5)
        await watcher
        await ca.close()
        await cb.close()
        return {"during": during, "ended": ended, "b": spent_by_b}

    outcome = asyncio.run(scenario())

    # the books first: balance never below zero, every row once at its exact price
    time.sleep(2)  # A's queued rows reach the ledger
    rows = b.ledger(account)
    acct = b.account(account)
    assert min(low_water) >= 0 and acct.balance >= 0, (min(low_water), acct.balance)
    uncharged = [getattr(r, "uncharged", 0) for r in rows]
    assert acct.balance == parse_usd("1.00") - sum(r.cost for r in rows) + sum(uncharged)
    assert len(rows) == len({r.request_id for r in rows})
    for row in rows:
        assert row.cost == cost_nanos(row.input_tokens, row.output_tokens, IN, OUT)
    assert acct.uncharged == sum(uncharged) > 0  # visible, never hidden in a smaller cost

    # then what clients saw
    assert "200" in outcome["during"] and "503" in outcome["during"]
    for ended in outcome["ended"]:  # ended with the stream error event, not a silent cut
        assert ended.startswith("error:") and "billing store" in ended, ended
    assert outcome["b"][-1] == "402"
    served = 5 + outcome["during"].count("200") + outcome["b"].count("200") + 3
    assert len(rows) >= served  # the recovery request may be there too
    metrics = httpx.get(a.root + "/metrics").text
    assert "bastion_credit_leases_given_up_total 1.0" in metrics
    assert "bastion_uncharged_nanodollars_total 0.0" not in metrics
