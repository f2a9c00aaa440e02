"""Usage reports from the store: the ledger filtered, and totals grouped, in SQL.

Both backends get the same ledger (two accounts, three keys, two models, rows either
side of UTC midnights) and must give the same answers; every grouping's totals must
add up exactly to the ungrouped rows they summarise.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from bastion.store import LedgerRow, NotFound, Store, StoreError, UsageTotal, open_store

DAY = 86_400_000_000
FIELDS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "cost", "uncharged")


def at(iso: str) -> int:
    """µs since epoch of an ISO time (UTC)."""
    moment = datetime.fromisoformat(iso).replace(tzinfo=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


class Ledger:
    """The seeded store, and who is who in it."""

    def __init__(self, store: Store, ids: dict[str, str]) -> None:
        self.store = store
        self.ids = ids  # "acme", "beta", "k1", "k2", "k3" -> ids


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Ledger]:
    store = open_store(db_url)
    await store.migrate()
    acme = await store.create_account("acme", 1_000_000_000)
    beta = await store.create_account("beta", 500)  # too little: some of its cost is uncharged
    k1, _ = await store.create_key("acme", "one")
    k2, _ = await store.create_key("acme", "two")
    k3, _ = await store.create_key("beta", "three")
    rows = [  # (time, account, key, model, input, cached, output, cost)
        ("2025-01-30T23:59:59.999999", acme, k1, "gpt-oss-120b", 100, 40, 10, 1_000),
        ("2025-01-31T00:00:00", acme, k1, "gpt-oss-120b", 200, 0, 20, 2_000),
        ("2025-01-31T08:00:00", acme, k2, "Qwen3-32B", 300, 100, 30, 3_000),
        ("2025-01-31T12:00:00", beta, k3, "gpt-oss-120b", 400, 0, 40, 400),
        ("2025-01-31T23:59:59.999999", beta, k3, "Qwen3-32B", 500, 500, 50, 5_000),
        ("2025-02-01T00:00:00.000001", acme, k1, "Qwen3-32B", 600, 0, 60, 6_000),
    ]
    await store.write_ledger([
        LedgerRow(f"req_{i}", a.id, k.id, model, "responses", inp, out, cost, False, "200",
                  at(t), cached_input_tokens=cached)
        for i, (t, a, k, model, inp, cached, out, cost) in enumerate(rows)
    ])  # fmt: skip
    yield Ledger(store, {"acme": acme.id, "beta": beta.id, "k1": k1.id, "k2": k2.id, "k3": k3.id})
    await store.close()


def numbers(t: UsageTotal) -> tuple[int, ...]:
    return tuple(getattr(t, f) for f in FIELDS)


def summed(rows: list[LedgerRow]) -> tuple[int, ...]:
    return (
        len(rows),
        sum(r.input_tokens for r in rows),
        sum(r.cached_input_tokens for r in rows),
        sum(r.output_tokens for r in rows),
        sum(r.cost for r in rows),
        sum(r.uncharged for r in rows),
    )


# ---- the ledger, filtered in SQL ---------------------------------------------------------


async def test_until_is_exclusive_and_since_inclusive(ledger: Ledger) -> None:
    rows = await ledger.store.usage(None, at("2025-01-31T00:00:00"), at("2025-02-01T00:00:00"))
    assert [r.request_id for r in rows] == ["req_1", "req_2", "req_3", "req_4"]
    before = await ledger.store.usage(until_us=at("2025-01-31T00:00:00"))
    assert [r.request_id for r in before] == ["req_0"]


async def test_filters_by_key_and_account(ledger: Ledger) -> None:
    store, ids = ledger.store, ledger.ids
    assert [r.request_id for r in await store.usage(key_id=ids["k1"])] == [
        "req_0", "req_1", "req_5"
    ]  # fmt: skip
    assert [r.request_id for r in await store.usage("beta")] == ["req_3", "req_4"]
    assert await store.usage("beta", key_id=ids["k1"]) == []  # a key of another account
    since = at("2025-01-31T00:00:00")
    assert [r.request_id for r in await store.usage("acme", since, None, ids["k1"])] == [
        "req_1", "req_5"
    ]  # fmt: skip
    with pytest.raises(NotFound, match="no key with id 'key_nope'"):
        await store.usage(key_id="key_nope")
    with pytest.raises(NotFound, match="no account named 'ghost'"):
        await store.usage("ghost")


# ---- totals, grouped in SQL --------------------------------------------------------------


async def test_every_grouping_adds_up_to_the_ledger_exactly(ledger: Ledger) -> None:
    store = ledger.store
    rows = await store.usage()
    assert sum(r.uncharged for r in rows) > 0  # the totals are tested with uncharged money too
    for n in range(5):
        for group_by in itertools.permutations(("day", "model", "key", "account"), n):
            totals = await store.usage_totals(list(group_by))
            assert summed(rows) == tuple(map(sum, zip(*map(numbers, totals), strict=True))), (
                group_by
            )
            for t in totals:  # each group is exactly its own rows
                mine = [r for r in rows if all(group_of(r, g) == group_of(t, g) for g in group_by)]
                assert numbers(t) == summed(mine), (group_by, t)


def group_of(item: LedgerRow | UsageTotal, field: str) -> object:
    if isinstance(item, UsageTotal):
        return {"day": item.day, "model": item.model, "key": item.key_id,
                "account": item.account_id}[field]  # fmt: skip
    return {"day": item.created_at - item.created_at % DAY, "model": item.model,
            "key": item.key_id, "account": item.account_id}[field]  # fmt: skip


async def test_days_are_utc_days_and_fields_not_grouped_are_none(ledger: Ledger) -> None:
    totals = await ledger.store.usage_totals(["day"])
    assert [(t.day, t.requests, t.cost) for t in totals] == [
        (at("2025-01-30T00:00:00"), 1, 1_000),
        (at("2025-01-31T00:00:00"), 4, 2_000 + 3_000 + 400 + 5_000),
        (at("2025-02-01T00:00:00"), 1, 6_000),
    ]
    assert {(t.model, t.key_id, t.account_id) for t in totals} == {(None, None, None)}


async def test_groups_come_in_the_order_of_their_fields(ledger: Ledger) -> None:
    ids = ledger.ids
    totals = await ledger.store.usage_totals(["model", "account"])
    assert [(t.model, t.account_id, t.requests) for t in totals] == sorted(
        [("Qwen3-32B", ids["acme"], 2), ("Qwen3-32B", ids["beta"], 1),
         ("gpt-oss-120b", ids["acme"], 2), ("gpt-oss-120b", ids["beta"], 1)]
    )  # fmt: skip


async def test_totals_take_the_same_filters(ledger: Ledger) -> None:
    store, ids = ledger.store, ledger.ids
    since, until = at("2025-01-31T00:00:00"), at("2025-02-01T00:00:00")
    [acme] = await store.usage_totals(["account"], account="acme", since_us=since, until_us=until)
    assert (acme.account_id, acme.requests, acme.cost) == (ids["acme"], 2, 5_000)
    [k3] = await store.usage_totals(["key"], key_id=ids["k3"])
    assert (k3.key_id, k3.requests, k3.input_tokens, k3.cached_input_tokens) == (
        ids["k3"], 2, 900, 500
    )  # fmt: skip
    [everything] = await store.usage_totals([])
    assert numbers(everything) == summed(await store.usage())
    assert await store.usage_totals(["day"], since_us=at("2030-01-01T00:00:00")) == []
    assert await store.usage_totals([], since_us=at("2030-01-01T00:00:00")) == []


async def test_bad_groupings_are_refused(ledger: Ledger) -> None:
    for bad in (["week"], ["day", "day"], ["account; DROP TABLE ledger"]):
        with pytest.raises(StoreError, match="group"):
            await ledger.store.usage_totals(bad)
    with pytest.raises(NotFound):
        await ledger.store.usage_totals(["day"], account="ghost")
