"""The webhook outbox in the store: events recorded with the change that causes them,
and the claims by which gateways deliver each one (bastion/webhooks/sender.py).

An event is a row inserted in the same transaction as its cause, so a rolled-back
ledger write leaves no event and a committed one always has its event. The body is
made once, at insertion, and sent byte for byte on every attempt: its ``id`` is the
receiver's idempotency key.

Both backends share the SQL here, like refusals.py: SQLite takes the time from Python
(one machine), PostgreSQL from the database's clock, so replicas whose clocks
disagree still agree on when a claim runs out. A claim is one short transaction
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL: two replicas never claim the same row);
the delivery happens outside it, and the claim deadline (``next_at``) hands the event
to another sender if this one dies before it says how the delivery went.

Other parts of Bastion record events of their own with ``Store.add_event``, or with
``sqlite_insert`` / ``pg_insert`` inside a transaction of theirs.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from bastion.money import format_usd

if TYPE_CHECKING:
    import asyncpg

    from bastion.store import Account, LedgerRow

BALANCE_LOW = "account.balance_low"
KEY_LIMIT_REACHED = "key.limit_reached"
LEDGER_UNCHARGED = "ledger.uncharged"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PG_NOW = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT"  # as postgres.DB_NOW
_CHUNK = 500  # ids per IN (…) list on SQLite


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event claimed for delivery."""

    id: str  # "evt_…"
    type: str
    body: str  # the JSON to POST, exactly as stored
    attempts: int  # deliveries tried, this one included
    created_at: int  # µs since epoch


# (id, type, body, created_at): a row for the outbox
Row = tuple[str, str, str, int]


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def event_row(event_id: str, type: str, data: dict[str, Any], created_us: int) -> Row:
    """The outbox row of one event; its body is ``{"id", "type", "created_at", "data"}``."""
    moment = _EPOCH + timedelta(microseconds=created_us)
    body = {
        "id": event_id,
        "type": type,
        "created_at": moment.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "data": data,
    }
    return event_id, type, orjson.dumps(body).decode(), created_us


def crossed(before: int, after: int, alert_below: int | None) -> bool:
    """The balance fell from at or above the alert to below it (a top-up re-arms it)."""
    return alert_below is not None and before >= alert_below > after


def balance_low(
    account_id: str, name: str, before: int, after: int, alert_below: int, cause: str, now: int
) -> Row:
    data = {
        "account": name,
        "account_id": account_id,
        "balance": format_usd(after),
        "previous_balance": format_usd(before),
        "alert_below": format_usd(alert_below),
        "cause": cause,  # "ledger": requests were charged; "credit": credit taken back
    }
    return event_row(new_event_id(), BALANCE_LOW, data, now)


def credit_events(account: Account, amount: int, now: int) -> list[Row]:
    """The balance alert a credit crosses, if it does (``account`` as read before it)."""
    before, after, alert = account.balance, account.balance + amount, account.alert_below
    if alert is None or not crossed(before, after, alert):
        return []
    return [balance_low(account.id, account.name, before, after, alert, "credit", now)]


def check_alert(alert_below: object) -> None:
    """An alert is a positive amount (None turns it off; UNCHANGED leaves it)."""
    from bastion.store import StoreError

    if isinstance(alert_below, int) and not 0 < alert_below < 2**63:
        raise StoreError(
            f"alert_below must be a positive amount, got {format_usd(alert_below)} USD"
            " (none turns the alert off)"
        )


def checked_event(event_id: str, type: str, data: dict[str, Any], now: int) -> Row:
    """``Store.add_event``'s row, after refusing what no receiver could use."""
    from bastion.store import StoreError

    if not event_id or not type:
        raise StoreError("an event needs an id and a type")
    if not isinstance(data, dict):
        raise StoreError(f"an event's data is a JSON object, got {data.__class__.__name__}")
    try:
        return event_row(event_id, type, data, now)
    except TypeError as exc:  # orjson: a value JSON cannot hold
        raise StoreError(f"event {event_id}: data is not JSON: {exc}") from None


def ledger_events(
    batch: list[LedgerRow], accounts: dict[str, tuple[str, int, int | None]], now: int
) -> list[Row]:
    """The events of a ledger batch just charged. ``accounts``: id -> (name, balance
    after the batch, alert_below) for the batch's accounts with an alert or an uncharged
    row; the balance before is the balance after plus what the batch collected."""
    collected: dict[str, int] = {}
    for row in batch:
        collected[row.account_id] = collected.get(row.account_id, 0) + row.cost - row.uncharged
    events = []
    for account_id, (name, after, alert_below) in sorted(accounts.items()):
        before = after + collected.get(account_id, 0)
        if alert_below is not None and crossed(before, after, alert_below):
            events.append(balance_low(account_id, name, before, after, alert_below, "ledger", now))
    for row in batch:
        if row.uncharged > 0:
            data = {
                "account": accounts[row.account_id][0],
                "account_id": row.account_id,
                "request_id": row.request_id,
                "key_id": row.key_id,
                "model": row.model,
                "cost": format_usd(row.cost),
                "uncharged": format_usd(row.uncharged),
            }
            events.append(event_row(new_event_id(), LEDGER_UNCHARGED, data, now))
    return events


def _wanted(batch: list[LedgerRow]) -> tuple[list[str], list[str]]:
    """The batch's accounts, and those of its rows with something uncharged."""
    ids = sorted({r.account_id for r in batch if r.cost})
    short = sorted({r.account_id for r in batch if r.uncharged > 0})
    return ids, short


_INSERT = """
INSERT INTO webhook_outbox (id, type, body, created_at) VALUES ({0}, {1}, {2}, {3})
ON CONFLICT (id) DO NOTHING
"""
_DUE = "delivered_at IS NULL AND given_up_at IS NULL"
_COLUMNS = "id, type, body, attempts, created_at"


def _events(rows: Iterable[Any]) -> list[OutboxEvent]:
    found = [OutboxEvent(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]
    return sorted(found, key=lambda e: (e.created_at, e.id))


# ---- SQLite: called on the store's worker thread, inside its write transaction -----------


def sqlite_insert(conn: sqlite3.Connection, rows: list[Row]) -> None:
    conn.executemany(_INSERT.format("?", "?", "?", "?"), rows)


def sqlite_ledger(conn: sqlite3.Connection, batch: list[LedgerRow], now: int) -> None:
    """Record the events of a ledger batch, after its accounts were charged."""
    ids, short = _wanted(batch)
    if not ids:
        return
    accounts: dict[str, tuple[str, int, int | None]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for account_id, name, balance, alert_below in conn.execute(
            f"SELECT id, name, balance, alert_below FROM accounts WHERE id IN ({marks})"
            " AND alert_below IS NOT NULL",
            chunk,
        ):
            accounts[account_id] = (name, balance, alert_below)
    for account_id in short:
        if account_id not in accounts:
            name, balance = conn.execute(
                "SELECT name, balance FROM accounts WHERE id = ?", (account_id,)
            ).fetchone()
            accounts[account_id] = (name, balance, None)
    sqlite_insert(conn, ledger_events(batch, accounts, now))


def sqlite_any_due(conn: sqlite3.Connection, now: int) -> bool:
    sql = f"SELECT 1 FROM webhook_outbox WHERE {_DUE} AND next_at <= ? LIMIT 1"
    return conn.execute(sql, (now,)).fetchone() is not None


def sqlite_claim(
    conn: sqlite3.Connection, claimer: str, limit: int, hold_us: int, now: int
) -> list[OutboxEvent]:
    ids = [
        r[0]
        for r in conn.execute(
            f"SELECT id FROM webhook_outbox WHERE {_DUE} AND next_at <= ?"
            " ORDER BY created_at, id LIMIT ?",
            (now, limit),
        )
    ]
    if not ids:
        return []
    conn.executemany(
        "UPDATE webhook_outbox SET next_at = ?, claimed_by = ?, attempts = attempts + 1"
        " WHERE id = ?",
        [(now + hold_us, claimer, i) for i in ids],
    )
    marks = ",".join("?" * len(ids))
    return _events(
        conn.execute(f"SELECT {_COLUMNS} FROM webhook_outbox WHERE id IN ({marks})", ids)
    )


def sqlite_delivered(conn: sqlite3.Connection, event_id: str, now: int) -> None:
    conn.execute(
        "UPDATE webhook_outbox SET delivered_at = ?, claimed_by = NULL, last_error = NULL"
        " WHERE id = ? AND delivered_at IS NULL",
        (now, event_id),
    )


def sqlite_failed(
    conn: sqlite3.Connection,
    event_id: str,
    claimer: str,
    error: str | None,
    retry_in_us: int | None,
    now: int,
) -> None:
    if retry_in_us is None:
        sql = "given_up_at = ?"
        value = now
    else:
        sql = "next_at = ?"
        value = now + retry_in_us
    conn.execute(
        f"UPDATE webhook_outbox SET {sql}, claimed_by = NULL,"
        f" last_error = COALESCE(?, last_error) WHERE id = ? AND claimed_by = ? AND {_DUE}",
        (value, error, event_id, claimer),
    )


def sqlite_prune(conn: sqlite3.Connection, cutoff: int) -> int:
    return conn.execute(
        "DELETE FROM webhook_outbox WHERE delivered_at < ? OR given_up_at < ?", (cutoff, cutoff)
    ).rowcount


# ---- PostgreSQL: inside the store's transaction, on its connection -----------------------


async def pg_insert(conn: asyncpg.Connection, rows: list[Row]) -> None:
    if rows:
        await conn.executemany(_INSERT.format("$1", "$2", "$3", "$4"), rows)


async def pg_ledger(conn: asyncpg.Connection, batch: list[LedgerRow], now: int) -> None:
    """Record the events of a ledger batch, after its accounts were charged."""
    ids, short = _wanted(batch)
    if not ids:
        return
    found = await conn.fetch(
        "SELECT id, name, balance, alert_below FROM accounts WHERE id = ANY($1::TEXT[])"
        " AND (alert_below IS NOT NULL OR id = ANY($2::TEXT[]))",
        ids,
        short,
    )
    accounts = {r[0]: (r[1], int(r[2]), r[3]) for r in found}
    await pg_insert(conn, ledger_events(batch, accounts, now))


async def pg_claim(
    conn: asyncpg.Connection, claimer: str, limit: int, hold_us: int
) -> list[OutboxEvent]:
    """One statement: rows another replica is claiming right now are skipped, not waited for."""
    rows = await conn.fetch(
        f"UPDATE webhook_outbox SET next_at = {_PG_NOW} + $2::BIGINT, claimed_by = $1,"
        " attempts = attempts + 1 WHERE id IN (SELECT id FROM webhook_outbox"
        f" WHERE {_DUE} AND next_at <= {_PG_NOW} ORDER BY created_at, id LIMIT $3"
        f" FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
        claimer,
        hold_us,
        limit,
    )
    return _events(rows)


async def pg_delivered(conn: asyncpg.Connection, event_id: str) -> None:
    await conn.execute(
        f"UPDATE webhook_outbox SET delivered_at = {_PG_NOW}, claimed_by = NULL,"
        " last_error = NULL WHERE id = $1 AND delivered_at IS NULL",
        event_id,
    )


async def pg_failed(
    conn: asyncpg.Connection,
    event_id: str,
    claimer: str,
    error: str | None,
    retry_in_us: int | None,
) -> None:
    if retry_in_us is None:
        done = f"given_up_at = {_PG_NOW}"
    else:
        done = f"next_at = {_PG_NOW} + {int(retry_in_us)}"
    await conn.execute(
        f"UPDATE webhook_outbox SET {done}, claimed_by = NULL,"
        f" last_error = COALESCE($3, last_error) WHERE id = $1 AND claimed_by = $2 AND {_DUE}",
        event_id,
        claimer,
        error,
    )


async def pg_prune(conn: asyncpg.Connection, keep_us: int) -> int:
    status = await conn.execute(
        f"DELETE FROM webhook_outbox WHERE delivered_at < {_PG_NOW} - $1::BIGINT"
        f" OR given_up_at < {_PG_NOW} - $1::BIGINT",
        keep_us,
    )
    return int(status.split()[-1])
