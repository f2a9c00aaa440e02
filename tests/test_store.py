"""Both Store backends, for real: every method and the money invariant, on a SQLite temp
file and on a fresh PostgreSQL database (``pg_url`` in conftest.py), with the same
expectations; a few tests of SQLite internals, and PostgreSQL's cross-replica races."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bastion.auth import hash_key, well_formed
from bastion.store import LedgerRow, RowRejected, Store, StoreError, open_store
from bastion.store.migrate import load_migrations, split_statements
from bastion.store.postgres import PostgresStore, redact
from bastion.store.sqlite import SQLiteStore, sqlite_path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bastion.db'}"



def _now() -> int:
    return time.time_ns() // 1000


def row(request_id: str, account_id: str, key_id: str, cost: int, **kw: object) -> LedgerRow:
    values: dict[str, object] = {
        "request_id": request_id,
        "account_id": account_id,
        "key_id": key_id,
        "model": "gpt-oss-120b",
        "endpoint": "responses",
        "input_tokens": 10,
        "output_tokens": 20,
        "cost": cost,
        "estimated": False,
        "status": "200",
        "created_at": _now(),
    }
    values.update(kw)
    return LedgerRow(**values)  # type: ignore[arg-type]


async def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """One parameterless statement straight on the database, behind the store's back."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(sqlite_path(url))
        try:
            with conn:
                return [tuple(r) for r in conn.execute(sql)]
        finally:
            conn.close()
    pg = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await pg.fetch(sql)]
    finally:
        await pg.close()


async def invariant_holds(url: str) -> dict[str, tuple[int, int, int]]:
    """balance == Σ credits − Σ (cost − uncharged) ≥ 0, and spent/uncharged add up, read
    straight from the tables."""
    rows = await query(
        url,
        "SELECT a.id, a.balance, a.spent, a.uncharged,"
        " COALESCE((SELECT SUM(c.amount) FROM credits c WHERE c.account_id = a.id), 0),"
        " COALESCE((SELECT SUM(l.cost - l.uncharged) FROM ledger l WHERE l.account_id = a.id), 0),"
        " COALESCE((SELECT SUM(l.uncharged) FROM ledger l WHERE l.account_id = a.id), 0)"
        " FROM accounts a",
    )
    result = {}
    for account_id, balance, spent, uncharged, credits, collected, short in rows:
        credits, collected = int(credits), int(collected)  # PostgreSQL's SUM is NUMERIC
        assert balance == credits - collected >= 0, account_id
        assert spent == collected, account_id
        assert uncharged == int(short), account_id
        result[account_id] = (balance, credits, collected)
    return result


# ---- urls and migrations --------------------------------------------------------------


def test_sqlite_url_forms() -> None:
    assert sqlite_path("sqlite:///rel.db") == "rel.db"
    assert sqlite_path("sqlite:///dir/rel.db") == "dir/rel.db"
    assert sqlite_path("sqlite:////abs/path.db") == "/abs/path.db"
    assert sqlite_path("sqlite://") == ":memory:"
    with pytest.raises(StoreError):
        sqlite_path("postgresql://x")


def test_open_store_refuses_unknown_scheme() -> None:
    with pytest.raises(StoreError, match="unsupported"):
        open_store("mysql://x")


async def test_relative_url_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = open_store("sqlite:///rel.db")
    await s.create_account("a")
    await s.close()
    assert (tmp_path / "rel.db").is_file()


async def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path}/nope/x.db")
    with pytest.raises(StoreError, match="directory does not exist"):
        await s.ping()
    await s.close()


def test_split_statements() -> None:
    sql = "-- comment\nCREATE TABLE a (x INT);\n\nCREATE INDEX i ON a (x);\n-- end\n"
    assert split_statements(sql) == ["CREATE TABLE a (x INT)", "CREATE INDEX i ON a (x)"]


def test_migrations_are_numbered_and_ordered() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].version == 1 and migrations[0].name == "0001_init.sql"
    assert any("CREATE TABLE ledger" in s for s in migrations[0].statements)


async def test_migrate_twice(store: Store, db_url: str) -> None:
    await store.migrate()
    await store.migrate()
    versions = [r[0] for r in await query(db_url, "SELECT version FROM schema_migrations")]
    assert sorted(versions) == [m.version for m in load_migrations()]
    if db_url.startswith("sqlite:"):
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    tables = {r[0] for r in await query(db_url, sql)}
    assert {"accounts", "credits", "api_keys", "ledger", "leases", "gateways"} <= tables
    assert "reservations" not in tables  # dropped by 0002


async def test_sqlite_pragmas(sqlite_url: str) -> None:
    store = SQLiteStore(sqlite_url)
    await store.migrate()
    assert (await query(sqlite_url, "PRAGMA journal_mode"))[0][0] == "wal"
    # settings on the store's own connection
    assert await store._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    assert await store._run(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]) == 10_000
    await store.close()


async def test_concurrent_migrate_from_many_stores(db_url: str) -> None:
    stores = [open_store(db_url) for _ in range(6)]
    await asyncio.gather(*(s.migrate() for s in stores))
    await asyncio.gather(*(s.close() for s in stores))
    count = (await query(db_url, "SELECT COUNT(*) FROM schema_migrations"))[0][0]
    assert count == len(load_migrations())


async def test_runs_off_the_event_loop_thread(sqlite_url: str) -> None:
    import threading

    store = SQLiteStore(sqlite_url)
    name = await store._run(lambda c: threading.current_thread().name)
    assert name.startswith("bastion-sqlite")
    assert name != threading.current_thread().name
    await store.close()


# ---- accounts -------------------------------------------------------------------------


async def test_create_and_get_account(store: Store) -> None:
    before = _now()
    acct = await store.create_account("acme", 5_000_000_000)
    assert acct.id.startswith("acct_") and len(acct.id) == 5 + 12
    assert (acct.name, acct.balance, acct.spent, acct.reserved) == ("acme", 5_000_000_000, 0, 0)
    assert before <= acct.created_at <= _now()
    assert await store.get_account("acme") == acct
    with pytest.raises(StoreError, match="no account named 'nobody'"):
        await store.get_account("nobody")


async def test_create_account_refusals(store: Store) -> None:
    await store.create_account("acme")
    with pytest.raises(StoreError, match="already exists"):
        await store.create_account("acme", 100)
    with pytest.raises(StoreError, match="empty"):
        await store.create_account("")
    with pytest.raises(StoreError, match="empty"):
        await store.create_account("   ")
    with pytest.raises(StoreError, match="negative"):
        await store.create_account("neg", -1)
    assert [a.name for a in await store.list_accounts()] == ["acme"]
    assert (await store.get_account("acme")).balance == 0


async def test_credit_and_refused_overdraft(store: Store, db_url: str) -> None:
    await store.create_account("acme", 1_000)
    assert (await store.credit_account("acme", 500)).balance == 1_500
    assert (await store.credit_account("acme", -1_500)).balance == 0
    with pytest.raises(StoreError, match=r"balance is 0\.00 USD"):
        await store.credit_account("acme", -1)
    await store.credit_account("acme", 2_000_000_000)
    with pytest.raises(StoreError, match=r"balance is 2\.00 USD"):
        await store.credit_account("acme", -2_000_000_001)
    with pytest.raises(StoreError, match="no account named"):
        await store.credit_account("ghost", 5)
    with pytest.raises(StoreError, match="zero"):
        await store.credit_account("acme", 0)
    assert (await store.get_account("acme")).balance == 2_000_000_000
    (balance, credits, costs) = next(iter((await invariant_holds(db_url)).values()))
    assert (balance, credits, costs) == (2_000_000_000, 2_000_000_000, 0)
    # one credits row per grant/take-back: 1000, 500, -1500, 2e9; nothing for refusals
    amounts = [r[0] for r in await query(db_url, "SELECT amount FROM credits")]
    assert sorted(amounts) == sorted([1_000, 500, -1_500, 2_000_000_000])


async def test_a_credit_past_the_largest_balance_is_refused_and_changes_nothing(
    store: Store, db_url: str
) -> None:
    """Nano-dollars live in 64 bits: SQLite would turn a larger sum into a float, and
    PostgreSQL would fail the statement. The store refuses the credit instead."""
    top = 2**63 - 1
    await store.create_account("acme", top - 10)
    with pytest.raises(StoreError, match="largest balance"):
        await store.credit_account("acme", 11)
    with pytest.raises(StoreError, match="largest balance"):
        await store.credit_account("acme", top, idempotency_key="k-1")
    assert (await store.credit_account("acme", 10)).balance == top
    (balance, credits, _costs) = next(iter((await invariant_holds(db_url)).values()))
    assert balance == credits == top
    assert isinstance((await query(db_url, "SELECT balance FROM accounts"))[0][0], int)


async def test_a_nul_character_in_a_name_or_label_is_refused_on_every_store(store: Store) -> None:
    """PostgreSQL can neither store nor compare text with NUL in it; SQLite would store it.
    Both refuse it, with the same message, before anything is written."""
    with pytest.raises(StoreError, match="NUL"):
        await store.create_account("a\x00b", 0)
    await store.create_account("acme", 0)
    with pytest.raises(StoreError, match="NUL"):
        await store.create_key("acme", name="ci\x00runner")
    assert [a.name for a in await store.list_accounts()] == ["acme"]
    assert await store.list_keys("acme") == []


async def test_list_accounts_sorted(store: Store) -> None:
    for name in ("zeta", "alpha", "mid"):
        await store.create_account(name, 1)
    assert [a.name for a in await store.list_accounts()] == ["alpha", "mid", "zeta"]


# ---- keys -----------------------------------------------------------------------------


async def test_create_key(store: Store) -> None:
    acct = await store.create_account("acme")
    key, plaintext = await store.create_key("acme", "ci", rpm=5, tpm=None)
    assert well_formed(plaintext)
    assert key.id.startswith("key_") and len(key.id) == 4 + 12
    assert key.prefix == plaintext[:12] and key.prefix.startswith("qbt_")
    assert key.key_hash == hash_key(plaintext)
    assert (key.account_id, key.account_name, key.name) == (acct.id, "acme", "ci")
    assert (key.rpm, key.tpm, key.revoked) == (5, None, False)
    with pytest.raises(StoreError, match="no account named"):
        await store.create_key("ghost")
    with pytest.raises(StoreError, match="rpm"):
        await store.create_key("acme", rpm=-1)
    assert len(await store.list_keys()) == 1


async def test_list_keys_filters_by_account(store: Store) -> None:
    await store.create_account("a")
    await store.create_account("b")
    ka, _ = await store.create_key("a", "one")
    kb, _ = await store.create_key("b", "two")
    ka2, _ = await store.create_key("a", "three")
    assert [k.id for k in await store.list_keys()] == [ka.id, kb.id, ka2.id]
    assert [k.id for k in await store.list_keys("a")] == [ka.id, ka2.id]
    assert [k.id for k in await store.list_keys("b")] == [kb.id]
    with pytest.raises(StoreError, match="no account named"):
        await store.list_keys("ghost")


async def test_update_key_changes_only_given_fields(store: Store) -> None:
    await store.create_account("acme")
    key, _ = await store.create_key("acme", rpm=10, tpm=1000)
    key = await store.update_key(key.id, rpm=20)
    assert (key.rpm, key.tpm) == (20, 1000)
    key = await store.update_key(key.id, tpm=0)
    assert (key.rpm, key.tpm) == (20, 0)
    key = await store.update_key(key.id)
    assert (key.rpm, key.tpm) == (20, 0)
    assert (await store.list_keys())[0] == key
    with pytest.raises(StoreError, match="no key with id"):
        await store.update_key("key_000000000000", rpm=1)
    with pytest.raises(StoreError, match="tpm"):
        await store.update_key(key.id, tpm=-5)


async def test_revoke_key_and_snapshot(store: Store) -> None:
    await store.create_account("a", 700)
    await store.create_account("b")
    k1, p1 = await store.create_key("a")
    k2, p2 = await store.create_key("b")
    snap = await store.snapshot()
    assert set(snap.keys) == {hash_key(p1), hash_key(p2)}
    assert snap.keys[hash_key(p1)] == k1

    revoked = await store.revoke_key(k1.id)
    assert revoked.revoked and revoked.id == k1.id
    again = await store.revoke_key(k1.id)  # idempotent
    assert again == revoked
    snap = await store.snapshot()  # revoked keys stay: gateways tell their holders so
    assert set(snap.keys) == {hash_key(p1), hash_key(p2)}
    assert snap.keys[hash_key(p1)].revoked and snap.keys[hash_key(p2)] == k2
    assert [k.revoked for k in await store.list_keys()] == [True, False]
    with pytest.raises(StoreError, match="no key with id"):
        await store.revoke_key("key_nope")


async def test_keys_changed_since(store: Store) -> None:
    await store.create_account("a", 700)
    k1, _ = await store.create_key("a")
    since = _now()
    assert await store.keys_changed(since) == []
    k2, _ = await store.create_key("a")
    await store.update_key(k1.id, rpm=5)
    changed = {k.id: k for k in await store.keys_changed(since)}
    assert set(changed) == {k1.id, k2.id} and changed[k1.id].rpm == 5
    later = _now()
    await store.revoke_key(k2.id)
    [revoked] = await store.keys_changed(later)
    assert revoked.id == k2.id and revoked.revoked


async def test_key_limit_expiry_and_models_round_trip(store: Store) -> None:
    await store.create_account("acme")
    plain, _ = await store.create_key("acme")
    assert (plain.spend_limit, plain.limit_reset, plain.expires_at, plain.models) == (
        None, "never", None, None,
    )  # fmt: skip
    key, secret = await store.create_key(
        "acme",
        "ci",
        spend_limit=5_000_000_000,
        limit_reset="daily",
        expires_at=1_900_000_000_000_000,
        models=frozenset({"gpt-oss-120b", "qwen3-8b"}),
    )
    assert key.spend_limit == 5_000_000_000 and key.limit_reset == "daily"
    assert key.expires_at == 1_900_000_000_000_000
    assert key.models == frozenset({"gpt-oss-120b", "qwen3-8b"})
    assert (await store.snapshot()).keys[hash_key(secret)] == key
    assert (await store.list_keys())[1] == key


async def test_update_key_sets_clears_or_leaves_each_field(store: Store) -> None:
    await store.create_account("acme")
    key, _ = await store.create_key(
        "acme", rpm=10, spend_limit=1_000, expires_at=2_000, models=frozenset({"m1"})
    )
    same = await store.update_key(key.id)  # nothing given: nothing changes
    assert same == key
    key = await store.update_key(key.id, limit_reset="monthly", models=frozenset({"m1", "m2"}))
    assert (key.rpm, key.spend_limit, key.limit_reset, key.expires_at) == (
        10, 1_000, "monthly", 2_000,
    )  # fmt: skip
    assert key.models == frozenset({"m1", "m2"})
    key = await store.update_key(key.id, spend_limit=None, expires_at=None, models=None)
    assert (key.spend_limit, key.expires_at, key.models) == (None, None, None)
    assert (key.rpm, key.limit_reset) == (10, "monthly")  # left alone
    key = await store.update_key(key.id, spend_limit=0, expires_at=3_000)
    assert (key.spend_limit, key.expires_at) == (0, 3_000)  # 0: a key that may spend nothing


async def test_a_key_field_change_reaches_gateways(store: Store) -> None:
    """keys_changed is how gateways learn of a new limit, expiry or model list."""
    await store.create_account("acme")
    key, _ = await store.create_key("acme")
    since = _now()
    await store.update_key(key.id, expires_at=1_000)
    [changed] = await store.keys_changed(since)
    assert changed.id == key.id and changed.expires_at == 1_000
    since = _now()
    await store.update_key(key.id, models=frozenset({"m1"}))
    [changed] = await store.keys_changed(since)
    assert changed.models == frozenset({"m1"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"spend_limit": -1}, "spend limit must be 0 or positive"),
        ({"limit_reset": "hourly"}, "unknown limit reset 'hourly'"),
        ({"expires_at": -5}, "expires_at"),
        ({"models": frozenset()}, "at least one model"),
        ({"models": frozenset({""})}, "non-empty"),
    ],
)
async def test_key_fields_are_validated(
    store: Store, fields: dict[str, Any], message: str
) -> None:
    await store.create_account("acme")
    key, _ = await store.create_key("acme")
    with pytest.raises(StoreError, match=message):
        await store.create_key("acme", **fields)
    with pytest.raises(StoreError, match=message):
        await store.update_key(key.id, **fields)
    assert len(await store.list_keys()) == 1


async def test_key_spent_sums_the_keys_rows_since_a_time(store: Store) -> None:
    acct = await store.create_account("acme", 1_000_000)
    k1, _ = await store.create_key("acme")
    k2, _ = await store.create_key("acme")
    await store.write_ledger(
        [
            row("r1", acct.id, k1.id, 100, created_at=1_000),
            row("r2", acct.id, k1.id, 20, created_at=2_000),
            row("r3", acct.id, k1.id, 3, created_at=3_000),
            row("r4", acct.id, k2.id, 4_000, created_at=3_000),
        ]
    )
    assert await store.key_spent(k1.id, 0) == 123
    assert await store.key_spent(k1.id, 2_000) == 23  # from the period start, inclusive
    assert await store.key_spent(k2.id, 0) == 4_000
    assert await store.key_spent(k1.id, 3_001) == 0
    assert await store.key_spent("key_000000000000", 0) == 0


async def test_ledger_row_by_request_id(store: Store) -> None:
    acct = await store.create_account("acme", 1_000_000)
    key, _ = await store.create_key("acme")
    written = row("req_1", acct.id, key.id, 42, cached_input_tokens=4, reasoning_tokens=7)
    await store.write_ledger([written])
    assert await store.ledger_row("req_1") == written
    assert await store.ledger_row("req_missing") is None


# ---- ledger ---------------------------------------------------------------------------


async def test_write_ledger_charges_once(store: Store, db_url: str) -> None:
    acct = await store.create_account("acme", 1_000_000)
    key, _ = await store.create_key("acme")
    r1 = row("req_1", acct.id, key.id, 300)
    r2 = row("req_2", acct.id, key.id, 200, estimated=True, status="cancelled")
    assert len(await store.write_ledger([r1, r2])) == 2
    assert len(await store.write_ledger([r1, r2])) == 0  # written twice, charged once
    assert len(await store.write_ledger([r2, row("req_3", acct.id, key.id, 1)])) == 1
    assert len(await store.write_ledger([])) == 0
    got = await store.get_account("acme")
    assert (got.balance, got.spent) == (1_000_000 - 501, 501)
    await invariant_holds(db_url)


async def test_duplicate_inside_one_batch_is_charged_once(store: Store) -> None:
    acct = await store.create_account("acme", 1_000)
    key, _ = await store.create_key("acme")
    r = row("dup", acct.id, key.id, 100)
    assert len(await store.write_ledger([r, r])) == 1
    assert (await store.get_account("acme")).balance == 900


async def test_write_ledger_never_overdraws_the_shortfall_is_uncharged(
    store: Store, db_url: str
) -> None:
    """A cost the balance cannot cover keeps its exact value; the rest is ``uncharged``."""
    acct = await store.create_account("acme", 100)
    key, _ = await store.create_key("acme")
    [written] = await store.write_ledger([row("big", acct.id, key.id, 250)])
    assert (written.cost, written.uncharged) == (250, 150)
    got = await store.get_account("acme")
    assert (got.balance, got.spent, got.uncharged) == (0, 100, 150)
    [stored] = await store.usage("acme")
    assert (stored.cost, stored.uncharged) == (250, 150)
    await invariant_holds(db_url)


async def test_a_lease_pays_first_then_unleased_credit(store: Store) -> None:
    """Another gateway's lease is never spent: only ours and what nobody holds."""
    acct = await store.create_account("acme", 1_000)
    key, _ = await store.create_key("acme")
    await store.lease("gw1", acct.id, 300)
    await store.lease("gw2", acct.id, 500)  # 200 left unleased
    [r] = await store.write_ledger([row("r", acct.id, key.id, 600, leased=300)], "gw1")
    assert (r.leased, r.uncharged) == (300, 100)  # 300 lease + 200 unleased, 100 short
    got = await store.get_account("acme")
    assert (got.balance, got.reserved, got.uncharged) == (500, 500, 100)
    # a row the lease does not back (its lease was reclaimed) takes only unleased credit
    [r2] = await store.write_ledger([row("r2", acct.id, key.id, 50)], "gw2")
    assert (r2.leased, r2.uncharged) == (0, 50)
    assert (await store.get_account("acme")).balance == 500


async def test_a_value_no_column_holds_is_refused_before_the_batch(store: Store) -> None:
    acct = await store.create_account("acme", 1_000)
    key, _ = await store.create_key("acme")
    with pytest.raises(RowRejected, match="out of range"):
        await store.write_ledger([row("huge", acct.id, key.id, 1, output_tokens=10**19)])
    assert await store.usage() == []
    await store.dead_letter(row("huge", acct.id, key.id, 1, output_tokens=10**19), "out of range")
    data = await store.audit_data()
    assert data.dead_letters == [("huge", acct.id, "out of range")]


async def test_write_ledger_is_one_transaction(store: Store) -> None:
    """A bad row (unknown account) rolls back the whole batch: nothing half-charged."""
    acct = await store.create_account("acme", 1_000)
    key, _ = await store.create_key("acme")
    with pytest.raises(RowRejected):
        await store.write_ledger(
            [row("ok", acct.id, key.id, 100), row("bad", "acct_missing", key.id, 5)]
        )
    assert (await store.get_account("acme")).balance == 1_000
    assert await store.usage() == []


async def test_usage_filters_and_order(store: Store) -> None:
    a = await store.create_account("a", 10_000)
    b = await store.create_account("b", 10_000)
    ka, _ = await store.create_key("a")
    kb, _ = await store.create_key("b")
    rows = [
        row("r3", a.id, ka.id, 3, created_at=3_000),
        row("r1", a.id, ka.id, 1, created_at=1_000, endpoint="chat", estimated=True),
        row("r2", b.id, kb.id, 2, created_at=2_000),
    ]
    await store.write_ledger(rows)
    assert [r.request_id for r in await store.usage()] == ["r1", "r2", "r3"]
    assert [r.request_id for r in await store.usage("a")] == ["r1", "r3"]
    assert [r.request_id for r in await store.usage(since_us=2_000)] == ["r2", "r3"]
    assert [r.request_id for r in await store.usage("a", since_us=1_001)] == ["r3"]
    first = (await store.usage("a"))[0]
    assert first == rows[1]  # round-trips exactly, estimated as a bool
    assert first.estimated is True
    with pytest.raises(StoreError, match="no account named"):
        await store.usage("ghost")


# ---- credit leases, ping ---------------------------------------------------------------


async def test_leases_never_exceed_the_balance(store: Store) -> None:
    a = await store.create_account("a", 1_000)
    assert await store.lease("gw1", a.id, 600) == (600, 400)
    assert await store.lease("gw2", a.id, 600) == (400, 0)  # only what is left
    assert await store.lease("gw1", a.id, 1) == (0, 0)
    assert (await store.get_account("a")).reserved == 1_000
    with pytest.raises(StoreError, match="held by running gateways"):
        await store.credit_account("a", -1)  # leased credit cannot be taken back
    await store.release("gw2", {a.id: 150})
    assert (await store.get_account("a")).reserved == 850
    assert await store.lease("gw1", "acct_missing", 10) == (0, 0)


async def test_a_ledger_write_spends_balance_and_lease_together(store: Store) -> None:
    a = await store.create_account("a", 1_000)
    key, _ = await store.create_key("a")
    await store.lease("gw1", a.id, 500)
    await store.write_ledger([row("r1", a.id, key.id, 200, leased=200)], "gw1")
    got = await store.get_account("a")
    assert (got.balance, got.reserved, got.spent) == (800, 300, 200)
    # the other 500 were never leased: still free for any gateway
    assert await store.lease("gw2", a.id, 10_000) == (500, 0)


async def test_a_silent_gateway_loses_its_leases(store: Store, db_url: str) -> None:
    a = await store.create_account("a", 1_000)
    await store.lease("gw_dead", a.id, 700)
    await store.lease("gw_live", a.id, 100)
    await query(db_url, f"UPDATE gateways SET seen_at = {_now() - 31_000_000} WHERE id = 'gw_dead'")
    assert (await store.get_account("a")).reserved == 100  # expired leases no longer count
    await store.heartbeat("gw_live")  # and are reclaimed
    assert await query(db_url, "SELECT gateway_id FROM leases") == [("gw_live",)]
    assert await query(db_url, "SELECT id FROM gateways") == [("gw_live",)]
    await store.retire("gw_live")
    assert (await store.get_account("a")).reserved == 0
    assert (await store.get_account("a")).balance == 1_000  # leases never touch money


async def test_ping(store: Store) -> None:
    await store.ping()


# ---- several stores, one database -----------------------------------------------------


async def test_two_stores_on_one_file(db_url: str) -> None:
    s1, s2 = open_store(db_url), open_store(db_url)
    try:
        acct = await s1.create_account("shared", 10_000)
        key, plaintext = await s1.create_key("shared")
        assert (await s2.get_account("shared")).id == acct.id
        assert hash_key(plaintext) in (await s2.snapshot()).keys
        await s2.revoke_key(key.id)
        assert (await s1.snapshot()).keys[hash_key(plaintext)].revoked
        with pytest.raises(StoreError, match="already exists"):
            await s2.create_account("shared")
        # both write the same request concurrently: charged exactly once
        r = row("same", acct.id, key.id, 1_234)
        counts = await asyncio.gather(s1.write_ledger([r]), s2.write_ledger([r]))
        assert sorted(map(len, counts)) == [0, 1]
        assert (await s1.get_account("shared")).balance == 10_000 - 1_234
    finally:
        await s1.close()
        await s2.close()


async def test_invariant_under_concurrent_writers(db_url: str) -> None:
    """Credits, take-backs and ledger batches from several stores at once: exact to the nano."""
    stores = [open_store(db_url) for _ in range(3)]
    try:
        accts = [await stores[0].create_account(f"acct{i}", 1_000_000_000) for i in range(3)]
        keys = [(await stores[0].create_key(a.name))[0] for a in accts]

        async def writer(n: int) -> None:
            s = stores[n % len(stores)]
            for i in range(30):
                a, k = accts[i % 3], keys[i % 3]
                batch = [row(f"w{n}-{i}-{j}", a.id, k.id, 1_000 + 7 * j + n) for j in range(3)]
                await s.write_ledger(batch + batch[:1])  # a duplicate in every batch
                if i % 5 == 0:
                    await s.credit_account(a.name, 123_456_789)
                if i % 7 == 0:
                    await s.credit_account(a.name, -3)

        await asyncio.gather(*(writer(n) for n in range(6)))
        result = await invariant_holds(db_url)
        rows = await stores[1].usage()
        assert len(rows) == 6 * 30 * 3
        assert sum(costs for (_, _, costs) in result.values()) == sum(r.cost for r in rows)
        for a in accts:
            got = await stores[2].get_account(a.name)
            assert got.balance == result[a.id][0]
    finally:
        for s in stores:
            await s.close()


# ---- PostgreSQL specifics: urls, connection failures, replicas racing -------------------


def test_open_store_postgres_urls() -> None:
    for url in ("postgresql://u@h:5432/db", "postgres://u@h/db"):
        assert isinstance(open_store(url), PostgresStore)  # lazy: nothing connects yet
    assert redact("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


async def test_unreachable_postgres_is_a_store_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_store(f"postgresql://bob:pw@127.0.0.1:{port}/nope")
    with pytest.raises(
        StoreError, match=rf"cannot connect to database .*bob:\*\*\*@127.0.0.1:{port}"
    ):
        await store.ping()
    await store.close()


async def test_missing_postgres_database_is_a_store_error(pg_url: str) -> None:
    store = open_store(pg_url + "_missing")
    with pytest.raises(StoreError, match="cannot connect to database"):
        await store.create_account("a")
    await store.close()


async def test_two_replicas_never_lease_more_than_the_balance(pg_url: str) -> None:
    """Two pools (two replicas), 50 concurrent leases each: exactly the balance is leased."""
    r1, r2 = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        a = await r1.create_account("a", 10_000)
        await r2.migrate()
        calls = [r.lease(gw, a.id, 137) for r, gw in ((r1, "gw1"), (r2, "gw2")) for _ in range(50)]
        grants = await asyncio.gather(*calls)
        assert sum(g for g, _ in grants) == 10_000  # demand 13_700: all of it, never more
        assert all(left >= 0 for _, left in grants)
        assert (await r2.get_account("a")).reserved == 10_000
        leases = dict(await query(pg_url, "SELECT gateway_id, amount FROM leases"))
        assert sum(leases.values()) == 10_000
        assert leases["gw1"] == sum(g for g, _ in grants[:50])
        with pytest.raises(StoreError, match="held by running gateways"):
            await r1.credit_account("a", -1)
    finally:
        await r1.close()
        await r2.close()


async def test_two_replicas_racing_ledger_leases_and_credits(pg_url: str) -> None:
    """Overlapping batches in opposite orders, leases, releases, heartbeats and credits from
    two replicas at once: no deadlock, each row charged once, balance exact to the nano."""
    r1, r2 = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        accts = [await r1.create_account(f"acct{i}", 1_000_000) for i in range(4)]
        keys = [(await r1.create_key(a.name))[0] for a in accts]
        await r2.migrate()

        async def replica(store: PostgresStore, gw: str, flip: bool) -> None:
            for i in range(12):
                batch = [
                    row(f"req-{i}-{j}", accts[j % 4].id, keys[j % 4].id, 100 + i * 40 + j)
                    for j in range(40)
                ]  # the same request ids from both replicas, in opposite orders
                await store.lease(gw, accts[i % 4].id, 5_000)
                await store.write_ledger(batch[::-1] if flip else batch, gw)
                if i % 4 == 0:
                    await store.release(gw, {accts[(i + 1) % 4].id: 700})
                    await store.heartbeat(gw)
                if i % 3 == 0:
                    await store.credit_account(accts[i % 4].name, 12_345)
                    await store.credit_account(accts[(i + 2) % 4].name, -7)

        await asyncio.gather(
            *(replica(r1, "gw1", False) for _ in range(4)),
            *(replica(r2, "gw2", True) for _ in range(4)),
        )
        result = await invariant_holds(pg_url)
        rows = await r1.usage()
        assert len(rows) == 12 * 40  # every request once, though written eight times
        assert sum(costs for (_, _, costs) in result.values()) == sum(r.cost for r in rows)
        for a in accts:
            got = await r2.get_account(a.name)
            assert got.balance == result[a.id][0] and 0 <= got.reserved <= got.balance
    finally:
        await r1.close()
        await r2.close()


async def test_opposite_order_batches_never_deadlock(pg_url: str) -> None:
    """Eight writers on two replicas, 40-row batches of the same ids in opposite orders."""
    r1, r2 = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        a, b = await r1.create_account("a", 10**12), await r1.create_account("b", 10**12)
        key, _ = await r1.create_key("a")

        async def writer(n: int) -> None:
            store = (r1, r2)[n % 2]
            for i in range(10):
                batch = [row(f"q{i}-{j}", (a, b)[j % 2].id, key.id, 5 + j) for j in range(40)]
                await store.write_ledger(batch[::-1] if n % 2 else batch, f"gw{n}")

        await asyncio.gather(*(writer(n) for n in range(8)))
        result = await invariant_holds(pg_url)
        assert sum(costs for (_, _, costs) in result.values()) == 10 * sum(range(5, 45))
    finally:
        await r1.close()
        await r2.close()


async def test_concurrent_heartbeats_reap_a_dead_gateway_once(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        a = await store.create_account("a", 1_000)
        for gw in ("dead1", "dead2", "dead3"):
            await store.lease(gw, a.id, 100)
        old = _now() - 31_000_000
        await query(pg_url, f"UPDATE gateways SET seen_at = {old}")
        await asyncio.gather(*(store.heartbeat(f"live{i}") for i in range(8)))
        assert await query(pg_url, "SELECT COUNT(*) FROM leases") == [(0,)]
        assert await query(pg_url, "SELECT COUNT(*) FROM gateways") == [(8,)]
        assert await store.lease("live0", a.id, 5_000) == (1_000, 0)
    finally:
        await store.close()


def test_cli_against_postgres(pg_url: str, tmp_path: Path) -> None:
    """The operator CLI, as a subprocess, on a PostgreSQL database from its config file."""
    config = tmp_path / "b.toml"
    config.write_text(f'[database]\nurl = "{pg_url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}

    def bastion(*args: str) -> Any:
        proc = subprocess.run(
            [sys.executable, "-m", "bastion", *args, "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    created = bastion("accounts", "create", "x", "--credit", "5")
    assert created["name"] == "x" and created["id"].startswith("acct_")
    assert created["balance"] == "5.00"
    shown = bastion("accounts", "show", "x")
    assert (shown["id"], shown["balance"], shown["spent"]) == (created["id"], "5.00", "0.00")
    key = bastion("keys", "create", "--account", "x")
    assert key["account"] == "x"
    assert [k["id"] for k in bastion("keys", "list")] == [key["id"]]


# ---- crashes: seats and checkpoints ---------------------------------------------------


async def test_a_dead_gateways_seat_and_checkpoints_are_reclaimed(store: Store) -> None:
    a = await store.create_account("a", 1_000)
    key, _ = await store.create_key("a")
    await store.heartbeat("gw_dead", "host:8080/0")
    await store.lease("gw_dead", a.id, 600)
    stream = row("s1", a.id, key.id, 40, output_tokens=20, estimated=True, status="cancelled")
    await store.checkpoint("gw_dead", [stream, row("s2", a.id, key.id, 10)], [])
    await store.checkpoint("gw_dead", [replace(stream, output_tokens=30, cost=60)], ["s2"])
    # the process that takes the seat: the dead one's lease is back at once
    [dead] = await store.reclaim_seat("host:8080/0", "gw_new")
    assert (dead.gateway_id, dead.leased) == ("gw_dead", 600)
    assert (await store.get_account("a")).reserved == 0
    # its checkpointed stream is charged, once, as the last checkpoint said
    [charged] = await store.reclaim_checkpoints()
    assert (charged.request_id, charged.output_tokens, charged.cost) == ("s1", 30, 60)
    assert charged.estimated and charged.status == "cancelled"
    assert await store.reclaim_checkpoints() == []
    assert (await store.get_account("a")).balance == 940


async def test_a_live_gateways_checkpoints_are_left_alone(store: Store) -> None:
    a = await store.create_account("a", 1_000)
    key, _ = await store.create_key("a")
    await store.heartbeat("gw_live", "host:8080/1")
    await store.checkpoint("gw_live", [row("s1", a.id, key.id, 40)], [])
    assert await store.reclaim_seat("host:8080/0", "gw_other") == []
    assert await store.reclaim_checkpoints() == []
    await store.retire("gw_live")  # a clean shutdown leaves no checkpoint behind
    assert await store.reclaim_checkpoints() == []


async def test_refusal_counts_add_up_per_hour_and_sum_over_a_window(store: Store) -> None:
    from bastion.store.refusals import HOUR_US, Refusal

    acct = await store.create_account("a")
    key, _ = await store.create_key("a")
    noon = 1_767_268_800_000_000  # 2026-01-01T12:00:00Z, an hour's start
    await store.add_refusals([Refusal(acct.id, key.id, 402, "insufficient_funds", 2, noon + 5)])
    await store.add_refusals(
        [
            Refusal(
                acct.id, key.id, 402, "insufficient_funds", 3, noon + 1
            ),  # earlier: last_at stays
            Refusal(acct.id, key.id, 402, "insufficient_funds", 1, noon + HOUR_US + 7),
            Refusal("", "", 401, "invalid_api_key", 4, noon + 9),
        ]
    )
    [summed] = await store.refusals("a")
    assert (summed.count, summed.last_at) == (6, noon + HOUR_US + 7)
    [first_hour] = await store.refusals("a", until_us=noon + HOUR_US)
    assert (first_hour.count, first_hour.last_at) == (5, noon + 5)
    [second_hour] = await store.refusals("a", since_us=noon + HOUR_US + 1)  # rounds to the hour
    assert second_hour.count == 1
    everyone = await store.refusals()
    assert {(r.account_id, r.status, r.count) for r in everyone} == {
        (acct.id, 402, 6),
        ("", 401, 4),
    }
    with pytest.raises(StoreError):
        await store.refusals("nobody")


# ---- webhooks: balance alerts and the outbox (bastion/store/outbox.py) ----------------

HOLD_US = 60_000_000


async def due_events(store: Store, claimer: str = "test") -> list[dict[str, Any]]:
    """Every event due now, claimed (so held for a minute), as the bodies a receiver gets."""
    return [json.loads(e.body) for e in await store.claim_events(claimer, 1000, HOLD_US)]


async def test_alert_below_is_set_changed_and_cleared(store: Store) -> None:
    from bastion.store import UNCHANGED, NotFound

    await store.create_account("acme", 10_000)
    assert (await store.get_account("acme")).alert_below is None
    assert (await store.update_account("acme", alert_below=5_000)).alert_below == 5_000
    assert (await store.update_account("acme", alert_below=UNCHANGED)).alert_below == 5_000
    assert (await store.list_accounts())[0].alert_below == 5_000
    assert (await store.update_account("acme", alert_below=None)).alert_below is None
    for bad in (0, -1):
        with pytest.raises(StoreError, match="positive"):
            await store.update_account("acme", alert_below=bad)
    with pytest.raises(NotFound):
        await store.update_account("ghost", alert_below=1)
    assert await due_events(store) == []  # setting an alert is not a crossing


async def test_balance_low_is_recorded_once_per_crossing(store: Store) -> None:
    """Down through the alert: one event; further down: none; a top-up re-arms it; a
    take-back through it is a crossing too."""
    acct = await store.create_account("acme", 1_000)
    key, _ = await store.create_key("acme")
    await store.update_account("acme", alert_below=500)
    await store.write_ledger([row("r1", acct.id, key.id, 300)])  # 1000 -> 700
    assert await due_events(store) == []
    await store.write_ledger([row("r2", acct.id, key.id, 300)])  # 700 -> 400: crossed
    await store.write_ledger([row("r3", acct.id, key.id, 100)])  # 400 -> 300: still below
    [first] = await due_events(store)
    assert first["type"] == "account.balance_low" and first["id"].startswith("evt_")
    assert first["data"] == {
        "account": "acme",
        "account_id": acct.id,
        "balance": "0.0000004",
        "previous_balance": "0.0000007",
        "alert_below": "0.0000005",
        "cause": "ledger",
    }
    assert first["created_at"].endswith("Z")

    await store.credit_account("acme", 500)  # 300 -> 800: above again, nothing to say
    await store.write_ledger(
        [row("r4", acct.id, key.id, 200), row("r5", acct.id, key.id, 200)]
    )  # 800 -> 400 in one batch: one crossing, one event
    await store.credit_account("acme", 100)  # 500: at the alert is not below it
    await store.credit_account("acme", -1)  # 499: a take-back crossing
    second, third = await due_events(store)
    assert (second["data"]["balance"], second["data"]["cause"]) == ("0.0000004", "ledger")
    assert (third["data"]["previous_balance"], third["data"]["balance"]) == (
        "0.0000005",
        "0.000000499",
    )
    assert third["data"]["cause"] == "credit"
    assert len({first["id"], second["id"], third["id"]}) == 3


async def test_an_uncharged_row_records_an_event(store: Store) -> None:
    acct = await store.create_account("acme", 100)
    key, _ = await store.create_key("acme")
    await store.update_account("acme", alert_below=50)
    await store.write_ledger([row("fine", acct.id, key.id, 10)])
    await store.write_ledger([row("big", acct.id, key.id, 250)])  # 90 collected, 160 uncharged
    await store.write_ledger([row("big", acct.id, key.id, 250)])  # a repeat: no new event
    events = {e["type"]: e["data"] for e in await due_events(store)}
    assert events == {
        "account.balance_low": {
            "account": "acme", "account_id": acct.id, "balance": "0.00",
            "previous_balance": "0.00000009", "alert_below": "0.00000005", "cause": "ledger",
        },
        "ledger.uncharged": {
            "account": "acme", "account_id": acct.id, "request_id": "big", "key_id": key.id,
            "model": "gpt-oss-120b", "cost": "0.00000025", "uncharged": "0.00000016",
        },
    }  # fmt: skip


async def test_a_rolled_back_ledger_write_records_no_event(store: Store) -> None:
    acct = await store.create_account("acme", 100)
    key, _ = await store.create_key("acme")
    with pytest.raises(RowRejected):
        await store.write_ledger(
            [row("short", acct.id, key.id, 500), row("bad", "acct_missing", key.id, 5)]
        )
    assert await due_events(store) == []


async def test_add_event_is_idempotent_on_its_id(store: Store) -> None:
    data = {"key_id": "key_1", "account": "acme", "limit": "5.00", "period_start": "x"}
    await store.add_event("evt_limit_key_1_p1", "key.limit_reached", data)
    await store.add_event("evt_limit_key_1_p1", "key.limit_reached", {**data, "limit": "6"})
    [event] = await due_events(store)
    assert (event["id"], event["type"], event["data"]) == (
        "evt_limit_key_1_p1",
        "key.limit_reached",
        data,
    )
    await store.add_event("evt_limit_key_1_p1", "key.limit_reached", data)  # even once claimed
    assert await due_events(store) == []
    with pytest.raises(StoreError):
        await store.add_event("", "key.limit_reached", data)
    with pytest.raises(StoreError, match="JSON"):
        await store.add_event("evt_x", "t", {"when": object()})


async def test_a_claim_holds_an_event_until_it_is_settled(store: Store) -> None:
    await store.add_event("evt_a", "t", {})
    await store.add_event("evt_b", "t", {})
    [a, b] = await store.claim_events("s1", 10, HOLD_US)
    assert (a.id, a.attempts, b.id) == ("evt_a", 1, "evt_b")
    assert await store.claim_events("s2", 10, HOLD_US) == []  # held by s1
    await store.event_failed("evt_a", "s2", "not s2's to settle", 0)  # ignored
    assert await store.claim_events("s2", 10, HOLD_US) == []
    await store.event_failed("evt_a", "s1", "HTTP 500", 0)  # retry at once
    await store.event_delivered("evt_b")
    [again] = await store.claim_events("s2", 10, HOLD_US)
    assert (again.id, again.attempts, again.body) == ("evt_a", 2, a.body)  # byte for byte
    await store.event_failed("evt_a", "s2", "too old", None)  # given up
    await store.add_event("evt_c", "t", {})
    [c] = await store.claim_events("s1", 10, 0)  # a claim that has already run out …
    [c_again] = await store.claim_events("s2", 10, HOLD_US)  # … is anyone's
    assert c.id == c_again.id == "evt_c" and c_again.attempts == 2
    await store.event_failed("evt_c", "s2", None, 3_600_000_000)  # an hour from now
    assert await store.claim_events("s1", 10, HOLD_US) == []
    assert await store.prune_events(3_600_000_000) == 0  # delivered just now: kept
    assert await store.prune_events(0) == 2  # delivered (b) and given up (a); c waits
    await store.add_event("evt_b", "t", {})  # pruned ids can come back: keep them unique
    assert [e.id for e in await store.claim_events("s1", 10, HOLD_US)] == ["evt_b"]


async def test_two_replicas_never_claim_the_same_event(pg_url: str) -> None:
    """Two stores (two replicas' pools) claiming at once: each event goes to exactly one."""
    one, two = open_store(pg_url), open_store(pg_url)
    try:
        await one.migrate()
        for i in range(60):
            await one.add_event(f"evt_{i:03}", "t", {"i": i})

        async def drain(store: Store, name: str) -> list[str]:
            got: list[str] = []
            while batch := await store.claim_events(name, 4, HOLD_US):
                got += [e.id for e in batch]
            return got

        await two.ping()  # both pools open before the race
        claims = await asyncio.gather(*(drain(s, n) for s, n in [(one, "a"), (two, "b")] * 3))
        a = [i for got in claims[0::2] for i in got]
        b = [i for got in claims[1::2] for i in got]
        assert sorted(a + b) == [f"evt_{i:03}" for i in range(60)]
        assert a and b  # both took part
    finally:
        await one.close()
        await two.close()
