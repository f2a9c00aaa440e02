"""Key spend limits in the store: a budget per key and period, and the gateways' leases on it.

A key with a spend limit may spend at most that much per period (bastion/periods.py).
Its budget for one period is a ``key_budgets`` row: what it spent then. Gateways admit
only against *leases* on a budget, granted under the budget row's lock, so the live
leases never add up to more than ``limit − spent``: replicas admit locally and together
never pass the limit. It is account credit over again (0002_leases.sql) with the key's
remaining limit as the balance; see 0008_key_budgets.sql for the columns.

Both backends share the SQL here, like refusals.py. What differs: the placeholders,
the clock that says which gateways are live (SQLite: Python's, one machine; PostgreSQL:
the database's, as for account leases) and the row lock (``FOR UPDATE``; SQLite's write
transaction already holds the whole file). Every function runs inside the caller's
write transaction.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bastion.periods import period_start
from bastion.store import KeyBudget, LedgerRow, RowRejected

if TYPE_CHECKING:
    import asyncpg

Bucket = tuple[str, int]  # (key id, period start µs)

NO_LIMIT = 2**63 - 1  # the room of a key whose limit was removed: as good as unlimited

_PG_NOW = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT"  # as postgres.DB_NOW

# One budget, read for a grant or a ledger write. On PostgreSQL its row is locked by an
# earlier statement (``_LOCK``), so this one's snapshot sees every lease committed
# before the lock was ours. Parameters: gateway id, cutoff, cutoff, key id, period start.
_BUDGET = """
SELECT b.spent, k.spend_limit,
       CAST(COALESCE((SELECT kl.amount FROM key_leases kl
                      JOIN gateways g ON g.id = kl.gateway_id
                      WHERE kl.gateway_id = ? AND kl.key_id = b.key_id
                        AND kl.period_start = b.period_start AND g.seen_at >= {cutoff}), 0)
            AS BIGINT),
       CAST(COALESCE((SELECT SUM(kl.amount) FROM key_leases kl
                      JOIN gateways g ON g.id = kl.gateway_id
                      WHERE kl.key_id = b.key_id AND kl.period_start = b.period_start
                        AND g.seen_at >= {cutoff}), 0) AS BIGINT)
FROM key_budgets b JOIN api_keys k ON k.id = b.key_id
WHERE b.key_id = ? AND b.period_start = ?
"""

_LOCK = "SELECT 1 FROM key_budgets WHERE key_id = ? AND period_start = ? FOR UPDATE"

# A budget opens with what the ledger shows the key spent in the period already: rows
# written before it had a limit (by when they were written), and rows counted in a
# later period (a reset that changed). Rows of an earlier period, written after this
# one began, stay in theirs. Parameters: key id, period, key id, period, period, key id.
_OPEN = """
INSERT INTO key_budgets (key_id, period_start, spent, seeded)
SELECT ?, CAST(? AS BIGINT), s.total, s.total FROM (
    SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) AS total FROM ledger
    WHERE key_id = ? AND created_at >= ? AND COALESCE(key_period, created_at) >= ?) s
WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = ?)
ON CONFLICT (key_id, period_start) DO NOTHING
"""

_GRANT = """
INSERT INTO key_leases (gateway_id, key_id, period_start, amount) VALUES (?, ?, ?, ?)
ON CONFLICT (gateway_id, key_id, period_start)
DO UPDATE SET amount = key_leases.amount + excluded.amount
"""

_SHRINK = """
UPDATE key_leases SET amount = CASE WHEN amount > ? THEN amount - ? ELSE 0 END
WHERE gateway_id = ? AND key_id = ? AND period_start = ?
"""

_DROP_EMPTY = "DELETE FROM key_leases WHERE gateway_id = ? AND amount <= 0"

_HELD = "SELECT amount FROM key_leases WHERE gateway_id = ? AND key_id = ? AND period_start = ?"

_SET = "UPDATE key_leases SET amount = ? WHERE gateway_id = ? AND key_id = ? AND period_start = ?"

_CHARGE = """
UPDATE key_budgets SET spent = spent + ?, over_limit = over_limit + ?
WHERE key_id = ? AND period_start = ?
"""

# Parameters: cutoff; then key id and period start for one budget (``_ONE``).
_SELECT = """
SELECT b.key_id, k.account_id, b.period_start, k.spend_limit, k.limit_reset, b.spent,
       b.seeded, b.over_limit,
       CAST(COALESCE((SELECT SUM(kl.amount) FROM key_leases kl
                      JOIN gateways g ON g.id = kl.gateway_id
                      WHERE kl.key_id = b.key_id AND kl.period_start = b.period_start
                        AND g.seen_at >= {cutoff}), 0) AS BIGINT)
FROM key_budgets b JOIN api_keys k ON k.id = b.key_id
"""
_ONE = " WHERE b.key_id = ? AND b.period_start = ?"

# What the ledger counted in each budget, for the audit: one pass over the ledger.
_COUNTED = (
    "SELECT key_id, key_period, SUM(cost) FROM ledger WHERE key_period IS NOT NULL GROUP BY 1, 2"
)


@dataclass(slots=True)
class Budget:
    """One key's budget for one period, locked, as a ledger write or a grant sees it."""

    spent: int
    limit: int | None  # the key's spend limit now (None: removed since admission)
    own_lease: int  # the writing (or asking) gateway's live lease on it
    live_leases: int  # every live gateway's leases on it
    added: int = 0  # Σ cost this batch counted
    over: int = 0  # the part of ``added`` past the limit
    taken: int = 0  # what this batch took from ``own_lease``

    @property
    def room(self) -> int:
        """What is neither spent nor leased: what a grant may give, or a cost no lease
        backs may use without going past the limit."""
        if self.limit is None:
            return NO_LIMIT
        return max(0, self.limit - self.spent - self.live_leases)


def allocate(rows: list[LedgerRow], budgets: dict[Bucket, Budget]) -> list[LedgerRow]:
    """Count each row's cost against its key's budget for the period it was admitted in.

    The cost comes first out of the writing gateway's key lease (up to what the gateway
    says the lease backs, ``row.key_leased``), then out of the room nobody has leased;
    what the room cannot cover went past the limit (``over``): possible only for a cost
    no lease backed, settled by a gateway that lost its leases. The whole cost is counted
    either way: it was served. Returns the rows with ``key_leased`` = what was taken from
    the lease; ``budgets`` is updated in place.
    """
    out = []
    for row in rows:
        if row.key_period is None:
            out.append(row)
            continue
        b = budgets[row.key_id, row.key_period]
        from_lease = min(row.key_leased, b.own_lease, row.cost)
        b.own_lease -= from_lease
        b.live_leases -= from_lease
        b.taken += from_lease
        b.spent += from_lease
        rest = row.cost - from_lease
        b.over += max(0, rest - b.room)
        b.spent += rest
        b.added += row.cost
        if row.key_leased != from_lease:
            row = replace(row, key_leased=from_lease)
        out.append(row)
    return out


def buckets(rows: list[LedgerRow]) -> list[Bucket]:
    """The key budgets a batch counts against, in lock order."""
    return sorted({(r.key_id, r.key_period) for r in rows if r.key_period is not None})


def attribute(rows: list[LedgerRow], resets: dict[str, str]) -> list[LedgerRow]:
    """Rows of a gateway that died, charged from its checkpoints: a row of a key with a
    limit (``resets``: key id -> its period) counts in the period of its checkpoint."""
    for row in rows:
        if (reset := resets.get(row.key_id)) is not None:
            row.key_period = period_start(reset, row.created_at)
    return rows


def _granted(budget: Budget | None, want: int) -> int:
    return 0 if budget is None else max(0, min(want, budget.room))


def _unleased(budget: Budget | None, grant: int) -> int:
    return 0 if budget is None else budget.room - grant


def _key_budget(row: Any, counted: dict[Bucket, int] | None = None) -> KeyBudget:
    key_id, account_id, start, limit, reset, spent, seeded, over, leased = row
    ledger = (counted or {}).get((key_id, start), 0)
    return KeyBudget(key_id, account_id, start, limit, reset, spent, seeded, over, leased, ledger)


# ---- SQLite: on the store's worker thread, inside its write transaction -------------------


def _sqlite_budget(
    conn: sqlite3.Connection, gateway_id: str, key_id: str, period: int, cutoff: int
) -> Budget | None:
    """The budget, opened if it is the period's first use; None for an unknown key."""
    sql = _BUDGET.format(cutoff="?")
    args = (gateway_id, cutoff, cutoff, key_id, period)
    row = conn.execute(sql, args).fetchone()
    if row is None:
        conn.execute(_OPEN, (key_id, period, key_id, period, period, key_id))
        row = conn.execute(sql, args).fetchone()
    return None if row is None else Budget(*row)


def sqlite_lease(
    conn: sqlite3.Connection, gateway_id: str, key_id: str, period: int, want: int, cutoff: int
) -> tuple[int, int]:
    budget = _sqlite_budget(conn, gateway_id, key_id, period, cutoff)
    grant = _granted(budget, want)
    if grant:
        conn.execute(_GRANT, (gateway_id, key_id, period, grant))
    return grant, _unleased(budget, grant)


def sqlite_shrink(conn: sqlite3.Connection, gateway_id: str, amounts: dict[Bucket, int]) -> None:
    """Lower this gateway's key leases (never below zero); drop the emptied ones."""
    for (key_id, period), amount in sorted(amounts.items()):
        conn.execute(_SHRINK, (amount, amount, gateway_id, key_id, period))
    conn.execute(_DROP_EMPTY, (gateway_id,))


def sqlite_sync(
    conn: sqlite3.Connection, gateway_id: str, key_id: str, period: int, amount: int
) -> int:
    held = conn.execute(_HELD, (gateway_id, key_id, period)).fetchone()
    agreed = max(0, min(held[0] if held else 0, amount))
    if held is not None and agreed != held[0]:
        conn.execute(_SET, (agreed, gateway_id, key_id, period))
    return agreed


def sqlite_charge(
    conn: sqlite3.Connection, rows: list[LedgerRow], gateway_id: str | None, cutoff: int
) -> list[LedgerRow]:
    """Count a ledger batch against its keys' budgets; call before inserting the rows."""
    wanted = buckets(rows)
    if not wanted:
        return rows
    found: dict[Bucket, Budget] = {}
    for key_id, period in wanted:
        budget = _sqlite_budget(conn, gateway_id or "", key_id, period, cutoff)
        if budget is None:
            raise RowRejected(f"ledger rows for unknown key {key_id}")
        found[key_id, period] = budget
    rows = allocate(rows, found)
    conn.executemany(_CHARGE, [(b.added, b.over, *bucket) for bucket, b in found.items()])
    if gateway_id is not None:
        sqlite_shrink(conn, gateway_id, {bucket: b.taken for bucket, b in found.items()})
    return rows


def sqlite_read(
    conn: sqlite3.Connection, key_id: str, period: int, cutoff: int
) -> KeyBudget | None:
    row = conn.execute(_SELECT.format(cutoff="?") + _ONE, (cutoff, key_id, period)).fetchone()
    return None if row is None else _key_budget(row)


def sqlite_audit(conn: sqlite3.Connection, cutoff: int) -> list[KeyBudget]:
    counted = {(k, p): int(total) for k, p, total in conn.execute(_COUNTED)}
    rows = conn.execute(_SELECT.format(cutoff="?") + " ORDER BY 1, 3", (cutoff,))
    return [_key_budget(row, counted) for row in rows]


def sqlite_resets(conn: sqlite3.Connection, key_ids: set[str]) -> dict[str, str]:
    """Key id -> its limit's period, for those of ``key_ids`` that have a spend limit."""
    found = {}
    for key_id in sorted(key_ids):
        row = conn.execute(
            "SELECT limit_reset FROM api_keys WHERE id = ? AND spend_limit IS NOT NULL",
            (key_id,),
        ).fetchone()
        if row is not None:
            found[key_id] = row[0]
    return found


# ---- PostgreSQL: inside the caller's transaction; "live" by the database's clock ---------


def _pg(sql: str) -> str:
    """``?`` placeholders as ``$1``, ``$2``, …"""
    numbers = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


_PG_CUTOFF = f"({_PG_NOW} - ?::BIGINT)"
_PG_BUDGET = _pg(_BUDGET.format(cutoff=_PG_CUTOFF))
_PG_LOCK = _pg(_LOCK)
_PG_OPEN = _pg(_OPEN)
_PG_GRANT = _pg(_GRANT)
_PG_SHRINK = _pg(_SHRINK)
_PG_DROP_EMPTY = _pg(_DROP_EMPTY)
_PG_HELD = _pg(_HELD + " FOR UPDATE")
_PG_SET = _pg(_SET)
_PG_CHARGE = _pg(_CHARGE)
_PG_SELECT = _pg(_SELECT.format(cutoff=_PG_CUTOFF))
_PG_ONE = _pg(_SELECT.format(cutoff=_PG_CUTOFF) + _ONE)


async def _pg_budget(
    conn: asyncpg.Connection, gateway_id: str, key_id: str, period: int, ttl: int
) -> Budget | None:
    """The budget, locked; opened if it is the period's first use; None: unknown key.

    The lock comes first and the read after, in a statement of its own: a statement
    that waited for the lock still reads with the snapshot it started with, which would
    miss a lease granted by the transaction it waited for."""
    if await conn.fetchval(_PG_LOCK, key_id, period) is None:
        # Two replicas opening it at once: one inserts, the other's insert waits, then
        # does nothing; both then lock the one row, in turn.
        await conn.execute(_PG_OPEN, key_id, period, key_id, period, period, key_id)
        await conn.fetchval(_PG_LOCK, key_id, period)
    row = await conn.fetchrow(_PG_BUDGET, gateway_id, ttl, ttl, key_id, period)
    return None if row is None else Budget(*row)


async def pg_lease(
    conn: asyncpg.Connection, gateway_id: str, key_id: str, period: int, want: int, ttl: int
) -> tuple[int, int]:
    budget = await _pg_budget(conn, gateway_id, key_id, period, ttl)
    grant = _granted(budget, want)
    if grant:
        await conn.execute(_PG_GRANT, gateway_id, key_id, period, grant)
    return grant, _unleased(budget, grant)


async def pg_shrink(conn: asyncpg.Connection, gateway_id: str, amounts: dict[Bucket, int]) -> None:
    """Lower this gateway's key leases (in key order, never below zero); drop emptied ones."""
    if not amounts:
        return
    await conn.executemany(
        _PG_SHRINK, [(a, a, gateway_id, k, p) for (k, p), a in sorted(amounts.items())]
    )
    await conn.execute(_PG_DROP_EMPTY, gateway_id)


async def pg_sync(
    conn: asyncpg.Connection, gateway_id: str, key_id: str, period: int, amount: int
) -> int:
    held = await conn.fetchval(_PG_HELD, gateway_id, key_id, period)
    agreed = max(0, min(held or 0, amount))
    if held is not None and agreed != held:
        await conn.execute(_PG_SET, agreed, gateway_id, key_id, period)
    return agreed


async def pg_charge(
    conn: asyncpg.Connection, rows: list[LedgerRow], gateway_id: str | None, ttl: int
) -> list[LedgerRow]:
    """Count a ledger batch against its keys' budgets (locked in key order, after the
    accounts); call before inserting the rows."""
    wanted = buckets(rows)
    if not wanted:
        return rows
    found: dict[Bucket, Budget] = {}
    for key_id, period in wanted:
        budget = await _pg_budget(conn, gateway_id or "", key_id, period, ttl)
        if budget is None:
            raise RowRejected(f"ledger rows for unknown key {key_id}")
        found[key_id, period] = budget
    rows = allocate(rows, found)
    await conn.executemany(_PG_CHARGE, [(b.added, b.over, *bucket) for bucket, b in found.items()])
    if gateway_id is not None:
        await pg_shrink(conn, gateway_id, {bucket: b.taken for bucket, b in found.items()})
    return rows


async def pg_read(conn: asyncpg.Connection, key_id: str, period: int, ttl: int) -> KeyBudget | None:
    row = await conn.fetchrow(_PG_ONE, ttl, key_id, period)
    return None if row is None else _key_budget(tuple(row))


async def pg_audit(conn: asyncpg.Connection, ttl: int) -> list[KeyBudget]:
    counted = {(k, p): int(total) for k, p, total in await conn.fetch(_COUNTED)}
    rows = await conn.fetch(_PG_SELECT + " ORDER BY 1, 3", ttl)
    return [_key_budget(tuple(row), counted) for row in rows]


async def pg_resets(conn: asyncpg.Connection, key_ids: set[str]) -> dict[str, str]:
    """Key id -> its limit's period, for those of ``key_ids`` that have a spend limit."""
    rows = await conn.fetch(
        "SELECT id, limit_reset FROM api_keys WHERE id = ANY($1::TEXT[])"
        " AND spend_limit IS NOT NULL",
        sorted(key_ids),
    )
    return {key_id: reset for key_id, reset in rows}
