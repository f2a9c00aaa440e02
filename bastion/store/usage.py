"""Usage reports in the store: ledger rows filtered, and totals grouped, by the database.

Filtering and grouping happen in SQL (``WHERE`` on the indexed account, key and time
columns, ``GROUP BY``), so a report over a large ledger sends back only what it shows.
Both backends share the SQL here (only the placeholders differ), as refusals.py does.

A day is the UTC day of ``created_at``: its µs divided by a day's, in integer arithmetic
that SQLite and PostgreSQL do alike (no time-zone functions, which they do not share).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.store import LedgerRow, NotFound, StoreError, UsageTotal
from bastion.store.common import LEDGER_COLUMNS, ledger_row

if TYPE_CHECKING:
    import asyncpg

DAY_US = 86_400_000_000

GROUPS = {"day": f"created_at / {DAY_US}", "model": "model", "key": "key_id",
          "account": "account_id"}  # fmt: skip
"""What a report may be grouped by, and the ledger expression each one groups."""

_TOTALS = (
    "COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),"
    " SUM(cost), SUM(uncharged)"
)


def check_groups(group_by: Sequence[str]) -> None:
    """Only known fields, each once: they become SQL, so nothing else may get through."""
    for field in group_by:
        if field not in GROUPS:
            raise StoreError(f"cannot group usage by {field!r}: use {', '.join(GROUPS)}")
    if len(set(group_by)) != len(group_by):
        raise StoreError(f"usage grouped by {', '.join(group_by)}: a field is named twice")


def _where(
    mark: str, account_id: str | None, key_id: str | None, since: int | None, until: int | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (or '') and its parameters; ``mark`` is '?' (SQLite) or '$'."""
    clauses: list[str] = []
    params: list[Any] = []
    for condition, value in (
        ("account_id = {}", account_id),
        ("key_id = {}", key_id),
        ("created_at >= {}", since),
        ("created_at < {}", until),
    ):
        if value is not None:
            params.append(value)
            clauses.append(condition.format(f"{mark}{len(params)}"))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _rows_sql(where: str) -> str:
    return f"SELECT {LEDGER_COLUMNS} FROM ledger{where} ORDER BY created_at, request_id"


def _totals_sql(group_by: Sequence[str], where: str) -> str:
    groups = ", ".join(GROUPS[g] for g in group_by)
    if not groups:
        return f"SELECT {_TOTALS} FROM ledger{where} HAVING COUNT(*) > 0"
    return f"SELECT {groups}, {_TOTALS} FROM ledger{where} GROUP BY {groups}"


def _ordered(totals: list[UsageTotal], group_by: Sequence[str]) -> list[UsageTotal]:
    """By the grouped values, in the order of ``group_by``; sorted here, by code point,
    because the two databases collate text differently."""
    names = {"day": "day", "model": "model", "key": "key_id", "account": "account_id"}
    return sorted(totals, key=lambda t: tuple(getattr(t, names[g]) for g in group_by))


def _total(group_by: Sequence[str], row: Any) -> UsageTotal:
    """A result row as a UsageTotal (PostgreSQL's SUM of BIGINT is NUMERIC: made int)."""
    values = list(row)
    grouped = dict(zip(group_by, values[: len(group_by)], strict=True))
    counts = [int(v) for v in values[len(group_by) :]]
    day = grouped.get("day")
    return UsageTotal(
        day=None if day is None else int(day) * DAY_US,
        model=grouped.get("model"),
        key_id=grouped.get("key"),
        account_id=grouped.get("account"),
        requests=counts[0],
        input_tokens=counts[1],
        cached_input_tokens=counts[2],
        output_tokens=counts[3],
        cost=counts[4],
        uncharged=counts[5],
    )


def _no_key(key_id: str) -> NotFound:
    return NotFound(f"no key with id {key_id!r}")


def _check_key(found: Any, key_id: str | None) -> None:
    if key_id is not None and found is None:
        raise _no_key(key_id)


_KEY_EXISTS = "SELECT 1 FROM api_keys WHERE id = {}"


def sqlite_rows(
    conn: sqlite3.Connection, account_id: str | None, key_id: str | None,
    since: int | None, until: int | None,
) -> list[LedgerRow]:  # fmt: skip
    if key_id is not None:
        _check_key(conn.execute(_KEY_EXISTS.format("?"), (key_id,)).fetchone(), key_id)
    where, params = _where("?", account_id, key_id, since, until)
    return [ledger_row(r) for r in conn.execute(_rows_sql(where), params)]


def sqlite_totals(
    conn: sqlite3.Connection, group_by: Sequence[str], account_id: str | None,
    key_id: str | None, since: int | None, until: int | None,
) -> list[UsageTotal]:  # fmt: skip
    if key_id is not None:
        _check_key(conn.execute(_KEY_EXISTS.format("?"), (key_id,)).fetchone(), key_id)
    where, params = _where("?", account_id, key_id, since, until)
    rows = conn.execute(_totals_sql(group_by, where), params)
    return _ordered([_total(group_by, r) for r in rows], group_by)


async def pg_rows(
    conn: asyncpg.Connection, account_id: str | None, key_id: str | None,
    since: int | None, until: int | None,
) -> list[LedgerRow]:  # fmt: skip
    if key_id is not None:
        _check_key(await conn.fetchval(_KEY_EXISTS.format("$1"), key_id), key_id)
    where, params = _where("$", account_id, key_id, since, until)
    return [ledger_row(r) for r in await conn.fetch(_rows_sql(where), *params)]


async def pg_totals(
    conn: asyncpg.Connection, group_by: Sequence[str], account_id: str | None,
    key_id: str | None, since: int | None, until: int | None,
) -> list[UsageTotal]:  # fmt: skip
    if key_id is not None:
        _check_key(await conn.fetchval(_KEY_EXISTS.format("$1"), key_id), key_id)
    where, params = _where("$", account_id, key_id, since, until)
    rows = await conn.fetch(_totals_sql(group_by, where), *params)
    return _ordered([_total(group_by, r) for r in rows], group_by)
