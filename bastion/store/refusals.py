"""Refusal counts in the store: one row per hour, account, key, status and code.

Both backends share the SQL here (only the parameter style differs), so the store
classes stay a thin delegation and this concern stays in one place.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg

HOUR_US = 3_600_000_000


@dataclass(slots=True)
class Refusal:
    """Refusals of one kind: ``account_id`` and ``key_id`` are '' when no key was recognised."""

    account_id: str
    key_id: str
    status: int
    code: str
    count: int
    last_at: int  # µs since epoch, the latest refusal counted
    hour: int = 0  # µs since epoch, start of its UTC hour (0 in summed results)


_UPSERT = """
INSERT INTO refusals (hour, account_id, key_id, status, code, count, last_at)
VALUES ({0}, {1}, {2}, {3}, {4}, {5}, {6})
ON CONFLICT (hour, account_id, key_id, status, code) DO UPDATE SET
    count = refusals.count + excluded.count,
    last_at = CASE WHEN excluded.last_at > refusals.last_at
                   THEN excluded.last_at ELSE refusals.last_at END
"""
_SUMMED = """
SELECT account_id, key_id, status, code, SUM(count), MAX(last_at) FROM refusals
WHERE ({0} IS NULL OR account_id = {0}) AND hour >= {1} AND hour < {2}
GROUP BY account_id, key_id, status, code
ORDER BY MAX(last_at) DESC, account_id, key_id, status, code
"""
_FOREVER = 2**62


def hour_of(us: int) -> int:
    return us - us % HOUR_US


def _values(r: Refusal) -> tuple[Any, ...]:
    return (hour_of(r.last_at), r.account_id, r.key_id, r.status, r.code, r.count, r.last_at)


def _window(since_us: int | None, until_us: int | None) -> tuple[int, int]:
    """Hours that overlap [since, until): counts are kept per hour, so edges round out."""
    low = 0 if since_us is None else hour_of(since_us)
    high = _FOREVER if until_us is None else hour_of(until_us - 1) + HOUR_US
    return low, high


def _summed(row: Any) -> Refusal:
    return Refusal(row[0], row[1], int(row[2]), row[3], int(row[4]), int(row[5]))


def sqlite_add(conn: sqlite3.Connection, rows: list[Refusal]) -> None:
    conn.executemany(_UPSERT.format(*"???????"), [_values(r) for r in rows])


def sqlite_read(
    conn: sqlite3.Connection, account_id: str | None, since_us: int | None, until_us: int | None
) -> list[Refusal]:
    sql = _SUMMED.format("?1", "?2", "?3")
    return [_summed(r) for r in conn.execute(sql, (account_id, *_window(since_us, until_us)))]


async def pg_add(conn: asyncpg.Connection, rows: list[Refusal]) -> None:
    sql = _UPSERT.format(*(f"${i}" for i in range(1, 8)))
    await conn.executemany(sql, [_values(r) for r in rows])


async def pg_read(
    conn: asyncpg.Connection, account_id: str | None, since_us: int | None, until_us: int | None
) -> list[Refusal]:
    sql = _SUMMED.format("$1::text", "$2::bigint", "$3::bigint")
    return [_summed(r) for r in await conn.fetch(sql, account_id, *_window(since_us, until_us))]
