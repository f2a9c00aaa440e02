"""Per-key spend limits: a key's budget per period, leased like credit, exact across replicas.

From the bottom up: the store's budgets and leases on both backends; the credit book
holding a key's bucket beside its account's; a gateway in this process with its clock
injected (402 ``key_limit_exceeded``, a raised or lowered limit, two periods driven
without waiting for midnight); and two `bastion serve` replicas on PostgreSQL and
Redis, 200 concurrent requests against a key whose limit covers a few of them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest
from aiohttp.test_utils import TestServer
from conftest import (
    Gateway,
    limiter_fell_back,
    mixed_burst,
    shared_store_toml,
    start_replicas,
    stop,
)
from openai import AsyncOpenAI
from test_store import query

from bastion.app import GATEWAY, create_app
from bastion.audit import problem_count, run_audit
from bastion.config import load_config
from bastion.credit import CreditBook
from bastion.ledger import LedgerWriter
from bastion.money import parse_usd
from bastion.periods import period_start
from bastion.store import LedgerRow, Store, open_store

DAY_US = 86_400_000_000


def utc_us(*when: int) -> int:
    return int(datetime(*when, tzinfo=UTC).timestamp()) * 1_000_000  # type: ignore[misc]




def row(request_id: str, account_id: str, key_id: str, cost: int, **kw: object) -> LedgerRow:
    values: dict[str, object] = {
        "request_id": request_id, "account_id": account_id, "key_id": key_id, "model": "m",
        "endpoint": "responses", "input_tokens": 1, "output_tokens": 1, "cost": cost,
        "estimated": False, "status": "200", "created_at": time.time_ns() // 1000,
    }  # fmt: skip
    values.update(kw)
    return LedgerRow(**values)  # type: ignore[arg-type]


async def limited(store: Store, limit: int = 1_000, reset: str = "daily") -> tuple[str, str, int]:
    """An account with plenty of credit, a key limited to ``limit`` per period, and the
    start of the period now: (account id, key id, period start)."""
    account = await store.create_account("acme", 10**12)
    key, _ = await store.create_key("acme", spend_limit=limit, limit_reset=reset)
    return account.id, key.id, period_start(reset, time.time_ns() // 1000)


# ---- the store: budgets and leases on them (both backends) --------------------------------


async def test_leases_on_a_key_budget_never_add_up_past_the_limit(store: Store) -> None:
    _, key_id, period = await limited(store, 1_000)
    assert await store.lease_key("gw_a", key_id, period, 600) == (600, 400)  # (granted, unleased)
    assert await store.lease_key("gw_b", key_id, period, 600) == (400, 0)
    assert await store.lease_key("gw_c", key_id, period, 1) == (0, 0)
    budget = await store.key_budget(key_id, period)
    assert budget is not None and (budget.spent, budget.leased, budget.limit) == (0, 1_000, 1_000)
    assert await store.lease_key("gw_a", key_id, period + DAY_US, 600) == (600, 400)  # tomorrow


async def test_a_ledger_write_counts_the_cost_in_its_period_and_takes_it_from_the_lease(
    store: Store,
) -> None:
    account_id, key_id, period = await limited(store, 1_000)
    await store.lease_key("gw_a", key_id, period, 600)
    [written] = await store.write_ledger(
        [row("r1", account_id, key_id, 250, key_period=period, key_leased=250)], "gw_a"
    )
    assert (written.key_period, written.key_leased) == (period, 250)  # all from the lease
    budget = await store.key_budget(key_id, period)
    assert budget is not None and (budget.spent, budget.leased) == (250, 350)
    assert await store.lease_key("gw_b", key_id, period, 1_000) == (400, 0)  # 1000 − 250 − 350
    assert (await store.ledger_row("r1")).key_period == period  # type: ignore[union-attr]


async def test_a_request_admitted_before_midnight_counts_in_its_own_day(store: Store) -> None:
    account_id, key_id, today = await limited(store, 1_000)
    tomorrow = today + DAY_US
    await store.lease_key("gw_a", key_id, today, 300)
    late = row("late", account_id, key_id, 300, key_period=today, key_leased=300)
    late.created_at = tomorrow + 5_000_000  # settled five seconds after midnight
    await store.write_ledger([late], "gw_a")
    assert await store.lease_key("gw_a", key_id, tomorrow, 5_000) == (1_000, 0)  # all of it
    today_budget = await store.key_budget(key_id, today)
    tomorrow_budget = await store.key_budget(key_id, tomorrow)
    assert today_budget is not None and tomorrow_budget is not None
    assert (today_budget.spent, tomorrow_budget.spent, tomorrow_budget.seeded) == (300, 0, 0)


async def test_a_new_limit_counts_what_the_key_spent_earlier_in_the_period(store: Store) -> None:
    account = await store.create_account("acme", 10**12)
    key, _ = await store.create_key("acme")  # no limit yet
    now = time.time_ns() // 1000
    today = period_start("daily", now)
    await store.write_ledger(
        [
            row("yesterday", account.id, key.id, 500, created_at=today - 1),
            row("this-morning", account.id, key.id, 300, created_at=now),
        ]
    )
    await store.update_key(key.id, spend_limit=1_000, limit_reset="daily")
    assert await store.lease_key("gw_a", key.id, today, 5_000) == (700, 0)
    budget = await store.key_budget(key.id, today)
    assert budget is not None and (budget.spent, budget.seeded) == (300, 300)
    assert (await run_audit(store))["ok"]


async def test_a_lowered_limit_grants_nothing_more_and_a_removed_one_grants_all(
    store: Store,
) -> None:
    account_id, key_id, period = await limited(store, 1_000)
    await store.lease_key("gw_a", key_id, period, 400)
    await store.write_ledger(
        [row("r1", account_id, key_id, 400, key_period=period, key_leased=400)], "gw_a"
    )
    await store.update_key(key_id, spend_limit=100)  # below what was spent
    assert await store.lease_key("gw_b", key_id, period, 50) == (0, 0)  # never negative
    assert (await run_audit(store))["ok"]  # lowering a limit is no problem in the books
    await store.update_key(key_id, spend_limit=None)
    assert (await store.lease_key("gw_b", key_id, period, 50))[0] == 50


async def test_a_cost_no_lease_backs_is_counted_and_what_passes_the_limit_is_reported(
    store: Store,
) -> None:
    account_id, key_id, period = await limited(store, 1_000)
    await store.lease_key("gw_a", key_id, period, 800)  # a live lease on most of the budget
    # settled by a gateway that had given up its leases: it backs nothing any more
    await store.write_ledger([row("cut-off", account_id, key_id, 300, key_period=period)])
    budget = await store.key_budget(key_id, period)
    assert budget is not None and (budget.spent, budget.over_limit) == (300, 100)  # 200 room
    report = await run_audit(store)
    [problem] = report["accounts"][0]["problems"]
    assert f"key {key_id}" in problem and "spent 0.0000001 USD past its spend limit" in problem
    assert problem_count(report) == 1 and not report["ok"]


async def test_key_leases_go_with_their_gateway(db_url: str) -> None:
    store = open_store(db_url, lease_ttl_s=0.5)
    try:
        _, key_id, period = await limited(store, 1_000)
        await store.lease_key("gw_quiet", key_id, period, 1_000)
        assert await store.lease_key("gw_b", key_id, period, 1) == (0, 0)
        await asyncio.sleep(0.6)  # gw_quiet misses its heartbeats: its lease stops counting
        assert await store.lease_key("gw_b", key_id, period, 1_000) == (1_000, 0)
        assert await query(db_url, "SELECT gateway_id FROM key_leases ORDER BY 1") == [
            ("gw_b",), ("gw_quiet",),
        ]  # fmt: skip
        await store.heartbeat("gw_b")  # the reaper takes the silent one's away
        assert await query(db_url, "SELECT gateway_id FROM key_leases") == [("gw_b",)]
        await store.retire("gw_b")  # a clean shutdown gives its lease back at once
        assert await query(db_url, "SELECT gateway_id FROM key_leases") == []
    finally:
        await store.close()


async def test_released_and_resynced_key_leases(store: Store) -> None:
    _, key_id, period = await limited(store, 1_000)
    await store.lease_key("gw_a", key_id, period, 600)
    await store.release_keys("gw_a", {(key_id, period): 200})
    assert await store.sync_key_lease("gw_a", key_id, period, 1_000) == 400  # the store's
    assert await store.sync_key_lease("gw_a", key_id, period, 100) == 100  # the gateway's
    budget = await store.key_budget(key_id, period)
    assert budget is not None and budget.leased == 100


async def test_streams_of_a_dead_gateway_count_against_the_key(db_url: str) -> None:
    store = open_store(db_url, lease_ttl_s=0.5)
    try:
        account_id, key_id, period = await limited(store, 1_000)
        await store.heartbeat("gw_dead")
        await store.checkpoint("gw_dead", [row("stream", account_id, key_id, 120)], [])
        await asyncio.sleep(0.6)
        await store.heartbeat("gw_b")  # reaps gw_dead
        [charged] = await store.reclaim_checkpoints()
        assert (charged.cost, charged.key_period) == (120, period)
        budget = await store.key_budget(key_id, period)
        assert budget is not None and budget.spent == 120
        assert (await run_audit(store))["ok"]
    finally:
        await store.close()


async def test_replicas_granting_at_once_never_lease_more_than_the_limit(pg_url: str) -> None:
    """Twelve gateways, each with its own connection pool, ask for the same budget at once."""
    replicas = [open_store(pg_url) for _ in range(12)]
    try:
        _, key_id, period = await limited(replicas[0], 1_000)
        grants = await asyncio.gather(
            *(s.lease_key(f"gw_{i}", key_id, period, 150) for i, s in enumerate(replicas))
        )
        assert sum(granted for granted, _ in grants) == 1_000
        budget = await replicas[0].key_budget(key_id, period)
        assert budget is not None and budget.leased == 1_000
    finally:
        for s in replicas:
            await s.close()


# ---- the book: a key's bucket beside its account's ------------------------------------


async def test_the_book_holds_a_key_budget_like_credit(tmp_path: Path, monkeypatch) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'book.db'}")
    try:
        account_id, key_id, period = await limited(store, 1_000)
        book = CreditBook(store, "gw_test")
        writer = LedgerWriter(store, book, _no_keys)
        await writer.refresh()
        bucket = (key_id, period)
        held = [await book.reserve(bucket, 300) for _ in range(3)]
        assert all(held) and await book.reserve(bucket, 300) is None  # 100 left of 1000
        assert book.available(bucket) == 100
        for i, hold in enumerate(held):
            assert hold is not None
            leased = book.settle(hold, 200)  # each cost less than its worst case
            writer.append(
                row(f"r{i}", account_id, key_id, 200, key_period=period, key_leased=leased),
                hold.epoch,
            )
        await writer.flush()
        assert book.free(bucket) == 400 and not book.doubtful
        book.limit(bucket, 1_000)
        await store.update_key(key_id, spend_limit=700)  # the operator lowers it
        book.limit(bucket, 700)  # the gateway sees it: what is free goes back at the next refresh
        assert book.free(bucket) == 0
        monkeypatch.setattr("bastion.credit.IDLE_RELEASE_S", 3600.0)
        await writer.refresh()
        budget = await store.key_budget(key_id, period)
        assert budget is not None and (budget.spent, budget.leased) == (600, 0)
        assert await book.reserve(bucket, 100) is not None  # 700 − 600
        assert await book.reserve(bucket, 1) is None
    finally:
        await store.close()


async def test_given_up_leases_take_the_key_budget_leases_with_them(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'book.db'}")
    try:
        account_id, key_id, period = await limited(store, 1_000)
        book = CreditBook(store, "gw_old")
        writer = LedgerWriter(store, book, _no_keys)
        await writer.refresh()
        key_hold = await book.reserve((key_id, period), 300)
        account_hold = await book.reserve(account_id, 300)
        assert key_hold is not None and account_hold is not None
        account_hold.key = key_hold
        book.distrust("test: the store stopped answering")
        assert book.gateway_id != "gw_old" and book.lease == {}  # both kinds forgotten
        assert (book.settle(account_hold, 250), book.settle(key_hold, 250)) == (0, 0)
        served = row("late", account_id, key_id, 250, key_period=period)
        writer.append(served, account_hold.epoch)
        await writer.refresh()  # the store answers: the old identity's leases go back
        await writer.flush()
        budget = await store.key_budget(key_id, period)
        assert budget is not None and (budget.spent, budget.leased) == (250, 0)  # in full
        assert budget.over_limit == 0  # no lease held the budget any more: it fitted the room
        assert (await run_audit(store))["ok"]
    finally:
        await store.close()


async def test_releasing_a_request_gives_both_holds_back(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'book.db'}")
    try:
        account_id, key_id, period = await limited(store, 1_000)
        book = CreditBook(store, "gw_test")
        await LedgerWriter(store, book, _no_keys).refresh()
        key_hold = await book.reserve((key_id, period), 300)
        account_hold = await book.reserve(account_id, 300)
        assert key_hold is not None and account_hold is not None
        account_hold.key = key_hold
        book.release(account_hold)  # the request never reached the upstream
        assert book.in_use((key_id, period)) == book.in_use(account_id) == 0
    finally:
        await store.close()


async def _no_keys() -> None:
    return None


# ---- one gateway, in this process, with its clock injected ----------------------------

GATEWAY_TOML = """
refresh_interval_s = 0.2

[database]
url = "sqlite:///{db}"

[ratelimit]
url = "memory://"
default_rpm = 100000
default_tpm = 100000000

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"

[[upstreams]]
name = "slow"
url = "http://127.0.0.1:{slow}/v1"

[[models]]
id = "m"
upstreams = ["sim"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 1000

[[models]]
id = "slow"
upstreams = ["slow"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 1000
"""


class Clock:
    """The gateway's wall clock, set by the test."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


@asynccontextmanager
async def serving(tmp_path: Path, sim: int, slow: int, clock: Clock) -> AsyncIterator[tuple]:
    """A gateway serving in this process: (its base URL for the SDK, its store, the app)."""
    path = tmp_path / "bastion.toml"
    path.write_text(GATEWAY_TOML.format(db=tmp_path / "bastion.db", sim=sim, slow=slow))
    app = create_app(load_config(path))
    app[GATEWAY].now_us = clock
    store = open_store(f"sqlite:///{tmp_path / 'bastion.db'}")
    async with TestServer(app) as server:
        try:
            yield str(server.make_url("/v1")), store, app[GATEWAY]
        finally:
            await store.close()


async def new_key(store: Store, url: str, **fields: object) -> tuple[str, str]:
    """An account with $10 and a key for it, once the gateway knows it: (key, key id)."""
    name = "acct-" + uuid.uuid4().hex[:8]
    await store.create_account(name, parse_usd("10.00"))
    key, secret = await store.create_key(name, **fields)  # type: ignore[arg-type]
    async with AsyncOpenAI(base_url=url, api_key=secret, max_retries=0) as client:
        for _ in range(100):
            try:
                await client.models.list()
                break
            except openai.AuthenticationError:
                await asyncio.sleep(0.05)
    return secret, key.id


async def ask(client: AsyncOpenAI, model: str = "m") -> str:
    """One request with a worst case of about $0.0020 (1000 output tokens at $2 / 1M):
    "200", or the refusal's code."""
    try:
        await client.responses.create(
            model=model, input="hi", max_output_tokens=1000, extra_body={"sim": {"tokens": 1000}}
        )
        return "200"
    except openai.APIStatusError as exc:
        return str(exc.code)


async def seconds_until(client: AsyncOpenAI, outcome: str) -> float:
    """Ask until the answer is ``outcome``; how long that took."""
    started = time.monotonic()
    for _ in range(200):
        if await ask(client) == outcome:
            break
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def recorded_events(store: Store) -> list[dict]:
    """The webhook events recorded so far (recorded off the request path: wait a little)."""
    for _ in range(40):
        if events := await store.claim_events("test", 10, 60_000_000):
            return [json.loads(e.body) for e in events]
        await asyncio.sleep(0.05)
    return []


REFUSAL = re.compile(
    r"Key spend limit reached: \$(?P<left>[0-9.]+) of this key's \$0\.003 daily limit is"
    r" left, this request needs up to \$0\.002\d+ \(input ≤ \d+ tokens, output cap 1000"
    r" tokens\)\. The limit resets at 2026-12-06T00:00:00Z\. Send a lower"
    r" 'max_output_tokens', or ask the account owner to raise the limit\."
)


async def test_a_key_past_its_limit_gets_402_until_the_limit_is_raised(
    tmp_path: Path, sim_port: int, slow_sim_port: int
) -> None:
    clock = Clock(utc_us(2026, 12, 5, 15, 0))
    async with serving(tmp_path, sim_port, slow_sim_port, clock) as (url, store, _):
        secret, key_id = await new_key(
            store, url, spend_limit=parse_usd("0.003"), limit_reset="daily"
        )
        async with AsyncOpenAI(base_url=url, api_key=secret, max_retries=0) as client:
            assert await ask(client) == "200"  # about $0.002 spent: less than a worst case left
            with pytest.raises(openai.APIStatusError) as refused:
                await client.responses.create(
                    model="m", input="hi", max_output_tokens=1000,
                    extra_body={"sim": {"tokens": 1000}},
                )  # fmt: skip
            error = refused.value
            assert (error.status_code, error.code, error.param) == (
                402, "key_limit_exceeded", "max_output_tokens",
            )  # fmt: skip
            assert isinstance(error.body, dict)
            match = REFUSAL.fullmatch(error.body["message"])
            assert match and parse_usd(match["left"]) < parse_usd("0.001"), error.body["message"]
            assert await ask(client) == "key_limit_exceeded"  # refused again: one event only
            [event] = await recorded_events(store)
            assert (event["id"], event["type"]) == (
                f"evt_limit_{key_id}_{utc_us(2026, 12, 5)}", "key.limit_reached",
            )  # fmt: skip
            assert event["data"]["limit"] == "0.003" and event["data"]["limit_reset"] == "daily"
            assert event["data"]["resets_at"] == "2026-12-06T00:00:00Z"

            await store.update_key(key_id, spend_limit=parse_usd("1.00"))
            assert await seconds_until(client, "200") < 5
            await store.update_key(key_id, spend_limit=parse_usd("0.001"))  # below what is spent
            assert await seconds_until(client, "key_limit_exceeded") < 5
            assert await ask(client) == "key_limit_exceeded"
        await asyncio.sleep(0.5)  # the last rows reach the ledger
        assert (await run_audit(store))["ok"]


async def test_a_key_without_a_limit_takes_no_part_in_budgets(
    tmp_path: Path, sim_port: int, slow_sim_port: int
) -> None:
    clock = Clock(utc_us(2026, 12, 5, 15, 0))
    async with serving(tmp_path, sim_port, slow_sim_port, clock) as (url, store, gw):
        secret, key_id = await new_key(store, url)
        async with AsyncOpenAI(base_url=url, api_key=secret, max_retries=0) as client:
            assert [await ask(client) for _ in range(3)] == ["200"] * 3
        assert all(isinstance(bucket, str) for bucket in gw.book.lease)  # accounts only
        await asyncio.sleep(0.5)
        assert [r.key_period for r in await store.usage()] == [None] * 3
        assert await store.key_budget(key_id, 0) is None


async def test_a_new_day_starts_from_zero_and_a_request_across_midnight_stays_in_its_day(
    tmp_path: Path, sim_port: int, slow_sim_port: int
) -> None:
    clock = Clock(utc_us(2026, 12, 5, 23, 59, 58))
    today, tomorrow = utc_us(2026, 12, 5), utc_us(2026, 12, 6)
    async with serving(tmp_path, sim_port, slow_sim_port, clock) as (url, store, _):
        secret, key_id = await new_key(
            store, url, spend_limit=parse_usd("0.003"), limit_reset="daily"
        )
        async with AsyncOpenAI(base_url=url, api_key=secret, max_retries=0) as client:
            # admitted at 23:59:58; its 3 tokens take 0.6 s; midnight passes meanwhile
            stream = await client.responses.create(
                model="slow", input="hi", max_output_tokens=1000, stream=True,
                extra_body={"sim": {"tokens": 3}},
            )  # fmt: skip
            async for event in stream:
                if event.type == "response.output_text.delta":
                    clock.now_us = tomorrow + 1_000_000  # 00:00:01
            assert await ask(client) == "200"  # about $0.002 of the new day's $0.003
            assert await ask(client) == "key_limit_exceeded"
            clock.now_us = utc_us(2026, 12, 7, 0, 0, 1)
            assert await ask(client) == "200"  # and the day after starts from zero again
        await asyncio.sleep(0.5)
        rows = sorted(await store.usage(), key=lambda r: r.key_period or 0)
        assert [r.key_period for r in rows] == [today, tomorrow, utc_us(2026, 12, 7)]
        assert rows[0].created_at >= tomorrow  # settled after midnight, counted the day before
        for r in rows:
            budget = await store.key_budget(key_id, r.key_period)  # type: ignore[arg-type]
            assert budget is not None and (budget.spent, budget.seeded) == (r.cost, 0)
        assert (await run_audit(store))["ok"]


# ---- two replicas on PostgreSQL and Redis ----------------------------------------------


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str, sim_port: int) -> Iterator[tuple[Gateway, Gateway]]:
    """Two `bastion serve` processes, same config, same PostgreSQL and Redis."""
    config = tmp_path / "bastion.toml"
    config.write_text(shared_store_toml(pg_url, sim_port))
    gateways = start_replicas(config, pg_url)
    yield gateways[0], gateways[1]
    for gw in gateways:
        stop(gw.proc)


@pytest.mark.timeout(120)
def test_200_requests_over_two_replicas_never_spend_past_the_key_limit(replicas) -> None:
    a, b = replicas
    limit = parse_usd("0.01")  # each request costs about $0.002: four fit, not five
    key, account = a.new_key(credit="10.00", spend_limit=limit, limit_reset="daily")
    b.wait_for_key(key)

    outcomes = mixed_burst(a, b, key)
    served = outcomes.count("ok")
    refused = set(outcomes) - {"ok"}
    fell_back = {"429 rate_limit_exceeded"} if limiter_fell_back(a.root, b.root) else set()
    assert "ok" in outcomes and "402 key_limit_exceeded" in refused, outcomes
    assert refused <= {"402 key_limit_exceeded"} | fell_back, outcomes
    rows = a.settled(account, served)
    assert len(rows) == served >= 1
    assert sum(r.cost for r in rows) <= limit
    assert a.account(account).balance == parse_usd("10.00") - sum(r.cost for r in rows)
    report = a.run(_audit(a.db_url))
    assert report["ok"], report


async def _audit(url: str) -> dict:
    store = open_store(url)
    try:
        return await run_audit(store)
    finally:
        await store.close()
