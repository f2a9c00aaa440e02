"""Upgrading a database the previous release left behind, on SQLite and on PostgreSQL.

The previous release's schema is migrations 0001–0006 (``upto=6``): the test builds it,
fills it the way that release wrote its tables (raw SQL in the old shape: accounts,
grants, keys, ledger rows, a live lease, a dead gateway's checkpoint, a dead letter, a
refusal count), then opens the store as an upgraded gateway would. Every old row must
come through with every value, every column added since must hold its default on the
old rows, and the upgraded store must work on the old data: look a key up, write a
ledger row, credit the account, charge the dead gateway's checkpoint, pass the audit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bastion.audit import problem_count, run_audit
from bastion.auth import hash_key
from bastion.store import LedgerRow, Store, open_store
from bastion.store.migrate import load_migrations, migrate_postgres, migrate_sqlite
from bastion.store.sqlite import sqlite_path

PREVIOUS_RELEASE = 6
"""The newest migration the previous release shipped."""

NOW = time.time_ns() // 1000
JUST_NOW = object()
"""The time the row is written (a heartbeat must be recent, however long the suite ran)."""
HOUR = 3_600_000_000
USD = 1_000_000_000  # nano-dollars

KEY = "qbt_oldreleasekeyoldreleasekeyoldrelease"
REVOKED_KEY = "qbt_revokedkeyrevokedkeyrevokedkeyrevoked"

# What the previous release wrote, table by table, in its own columns.
# fmt: off
OLD_ROWS: dict[str, tuple[str, list[tuple[Any, ...]]]] = {
    "accounts": (
        "id, name, balance, spent, created_at, uncharged",
        [
            ("acct_000000000001", "acme", 10 * USD - 1_000_300, 1_000_300, NOW - 48 * HOUR, 200),
            ("acct_000000000002", "empty", 0, 0, NOW - 47 * HOUR, 0),
        ],
    ),
    "credits": (
        "id, account_id, amount, created_at",
        [
            ("cred_000000000001", "acct_000000000001", 8 * USD, NOW - 48 * HOUR),
            ("cred_000000000002", "acct_000000000001", 2 * USD, NOW - 30 * HOUR),
        ],
    ),
    "api_keys": (
        "id, account_id, name, prefix, key_hash, rpm, tpm, revoked, created_at, revoked_at,"
        " updated_at",
        [
            ("key_000000000001", "acct_000000000001", "ci", KEY[:12], hash_key(KEY), 60, None,
             0, NOW - 40 * HOUR, None, NOW - 40 * HOUR),
            ("key_000000000002", "acct_000000000001", "", REVOKED_KEY[:12], hash_key(REVOKED_KEY),
             None, 0, 1, NOW - 39 * HOUR, NOW - 38 * HOUR, NOW - 38 * HOUR),
        ],
    ),
    "ledger": (
        "request_id, account_id, key_id, model, endpoint, input_tokens, output_tokens, cost,"
        " estimated, status, created_at, cached_input_tokens, reasoning_tokens, uncharged",
        [
            ("req_old1", "acct_000000000001", "key_000000000001", "gpt-oss-120b", "responses",
             1200, 300, 1_000_000, 0, "200", NOW - 36 * HOUR, 512, 64, 0),
            ("req_old2", "acct_000000000001", "key_000000000001", "Qwen3-32B", "chat",
             10, 5, 500, 1, "cancelled", NOW - 35 * HOUR, 0, 0, 200),
        ],
    ),
    "gateways": (
        "id, seen_at, seat",
        [("gw_live", JUST_NOW, "10.0.0.1:8080/0")],  # alive: its lease counts
    ),
    "leases": (
        "gateway_id, account_id, amount",
        [("gw_live", "acct_000000000001", 5_000_000)],
    ),
    "inflight": (  # a stream of a gateway that died (no gateways row): charged on upgrade
        "request_id, gateway_id, account_id, key_id, model, endpoint, input_tokens,"
        " output_tokens, cost, created_at",
        [("req_cut", "gw_dead", "acct_000000000001", "key_000000000001", "gpt-oss-120b",
          "responses", 40, 7, 700, NOW - 2 * HOUR)],
    ),
    "dead_letters": (
        "request_id, account_id, row_json, error, created_at",
        [("req_dead", "acct_000000000001", '{"cost": 9}', "value out of range", NOW - HOUR)],
    ),
    "refusals": (
        "hour, account_id, key_id, status, code, count, last_at",
        [(NOW - NOW % HOUR, "acct_000000000001", "key_000000000002", 401, "invalid_api_key",
          3, NOW - 60_000_000)],
    ),
}
# fmt: on
PRIMARY_KEYS = {"leases": "gateway_id, account_id", "refusals": "hour, account_id, key_id"}

NEW_COLUMN_DEFAULTS: dict[str, dict[str, Any]] = {
    "accounts": {"alert_below": None},
    "api_keys": {"spend_limit": None, "limit_reset": "never", "expires_at": None, "models": None},
    "ledger": {"key_period": None},
}
"""What each column added to an old table since the previous release holds on old rows.
A migration that adds one must say it here: the test refuses a column it does not know."""


def literal(value: Any) -> str:
    """A SQL literal both engines read alike (the values are the test's own constants)."""
    if value is JUST_NOW:
        return str(time.time_ns() // 1000)
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def old_inserts() -> list[str]:
    return [
        f"INSERT INTO {table} ({columns}) VALUES "
        + ", ".join("(" + ", ".join(literal(v) for v in row) + ")" for row in rows)
        for table, (columns, rows) in OLD_ROWS.items()
    ]


def selects(columns: dict[str, list[str]]) -> dict[str, str]:
    """Per old table: its listed columns, in a stable row order."""
    return {
        table: f"SELECT {', '.join(names)} FROM {table}"
        f" ORDER BY {PRIMARY_KEYS.get(table, names[0])}"
        for table, names in columns.items()
    }


class OldDatabase:
    """A database as the previous release left it, and raw SQL on it behind the store."""

    def __init__(self, url: str, fetch: Callable[[str], Awaitable[list[tuple[Any, ...]]]],
                 columns: Callable[[str], Awaitable[list[str]]]) -> None:  # fmt: skip
        self.url = url
        self.fetch = fetch
        self.columns = columns

    async def snapshot(self, names: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
        return {table: await self.fetch(sql) for table, sql in selects(names).items()}


@pytest.fixture(params=["sqlite", "postgres"])
async def old(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OldDatabase]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        with closing(sqlite3.connect(sqlite_path(url), isolation_level=None)) as conn:
            assert migrate_sqlite(conn, upto=PREVIOUS_RELEASE) == list(range(1, 7))
            for sql in old_inserts():
                conn.execute(sql)

        async def fetch(sql: str) -> list[tuple[Any, ...]]:
            with closing(sqlite3.connect(sqlite_path(url))) as conn:
                return [tuple(r) for r in conn.execute(sql)]

        async def columns(table: str) -> list[str]:
            return [r[1] for r in await fetch(f"PRAGMA table_info({table})")]

        yield OldDatabase(url, fetch, columns)
        return

    url = request.getfixturevalue("pg_url")
    conn = await asyncpg.connect(url)
    try:
        assert await migrate_postgres(conn, upto=PREVIOUS_RELEASE) == list(range(1, 7))
        for sql in old_inserts():
            await conn.execute(sql)

        async def fetch(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in await conn.fetch(sql)]

        async def columns(table: str) -> list[str]:
            rows = await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = $1"
                " ORDER BY ordinal_position",
                table,
            )
            return [r[0] for r in rows]

        yield OldDatabase(url, fetch, columns)
    finally:
        await conn.close()


async def upgraded(old: OldDatabase) -> Store:
    store = open_store(old.url)
    await store.migrate()
    return store


def test_the_previous_release_is_migrations_1_to_6() -> None:
    """Pins what "the previous release" means here: its files are never edited."""
    names = [m.name for m in load_migrations()[:PREVIOUS_RELEASE]]
    assert names == [
        "0001_init.sql", "0002_leases.sql", "0003_key_changes.sql", "0004_money.sql",
        "0005_checkpoints.sql", "0006_refusals.sql",
    ]  # fmt: skip


async def test_every_old_row_survives_with_its_values(old: OldDatabase) -> None:
    old_columns = {table: await old.columns(table) for table in OLD_ROWS}
    before = await old.snapshot(old_columns)
    assert {t: len(rows) for t, rows in before.items()} == {
        t: len(rows) for t, (_, rows) in OLD_ROWS.items()
    }
    store = await upgraded(old)
    try:
        versions = [r[0] for r in await old.fetch("SELECT version FROM schema_migrations")]
        assert sorted(versions) == [m.version for m in load_migrations()]
        assert await old.snapshot(old_columns) == before
    finally:
        await store.close()


async def test_columns_added_since_hold_their_defaults_on_old_rows(old: OldDatabase) -> None:
    old_columns = {table: await old.columns(table) for table in OLD_ROWS}
    store = await upgraded(old)
    try:
        for table, names in old_columns.items():
            added = [c for c in await old.columns(table) if c not in names]
            expected = NEW_COLUMN_DEFAULTS.get(table, {})
            assert sorted(added) == sorted(expected), (
                f"{table} gained columns {added}: state their value on old rows in"
                " NEW_COLUMN_DEFAULTS"
            )
            if added:
                found = await old.fetch(f"SELECT DISTINCT {', '.join(added)} FROM {table}")
                assert found == [tuple(expected[c] for c in added)], (table, found)
    finally:
        await store.close()


async def test_the_upgraded_store_works_on_the_old_data(old: OldDatabase) -> None:
    store = await upgraded(old)
    try:
        acme = await store.get_account("acme")
        assert (acme.id, acme.balance, acme.spent, acme.uncharged, acme.reserved) == (
            "acct_000000000001",
            10 * USD - 1_000_300,
            1_000_300,
            200,
            5_000_000,
        )
        assert acme.alert_below is None

        # key lookup: the gateway's snapshot finds the old key by its hash, limits intact
        keys = (await store.snapshot()).keys
        key = keys[hash_key(KEY)]
        assert (key.id, key.account_name, key.name, key.rpm, key.tpm) == (
            "key_000000000001",
            "acme",
            "ci",
            60,
            None,
        )
        assert (key.spend_limit, key.limit_reset, key.expires_at, key.models) == (
            None,
            "never",
            None,
            None,
        )
        assert keys[hash_key(REVOKED_KEY)].revoked

        # the old ledger reads back whole, and a new row lands beside it
        rows = await store.usage("acme")
        assert [(r.request_id, r.cost, r.uncharged, r.cached_input_tokens, r.key_period)
                for r in rows] == [("req_old1", 1_000_000, 0, 512, None),
                                   ("req_old2", 500, 200, 0, None)]  # fmt: skip
        new = LedgerRow("req_new", acme.id, key.id, "gpt-oss-120b", "responses", 100, 10, 3_000,
                        False, "200", NOW)  # fmt: skip
        assert [r.request_id for r in await store.write_ledger([new])] == ["req_new"]

        # the dead gateway's checkpoint is charged as a cancelled, estimated row
        [cut] = await store.reclaim_checkpoints()
        assert (cut.request_id, cut.cost, cut.status, cut.estimated) == (
            "req_cut",
            700,
            "cancelled",
            True,
        )

        # credit, with and without an idempotency key
        await store.credit_account("acme", USD)
        first = await store.credit_account("acme", USD, idempotency_key="upgrade-1")
        again = await store.credit_account("acme", USD, idempotency_key="upgrade-1")
        assert again == first and again.replayed and not first.replayed
        acme = await store.get_account("acme")
        assert acme.balance == 12 * USD - 1_000_300 - 3_000 - 700

        totals = await store.usage_totals(["model"], account="acme")
        assert {t.model: (t.requests, t.cost) for t in totals} == {
            "gpt-oss-120b": (3, 1_000_000 + 3_000 + 700),
            "Qwen3-32B": (1, 500),
        }

        # the books still add up; the old dead letter is still reported, and only it
        report = await run_audit(store)
        assert problem_count(report) == 1 and report["dead_letters"] == 1
        assert [r.key_id for r in await store.refusals("acme")] == ["key_000000000002"]
    finally:
        await store.close()
