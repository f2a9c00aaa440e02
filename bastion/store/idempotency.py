"""Idempotency keys of top-ups (0010_idempotency.sql): a retried credit is applied once.

An operator's tooling that times out on a top-up cannot know whether it was applied;
retrying it under the same key is safe. ``credit_account`` claims the key first, in
the transaction that makes the credit, and records its answer there too, so the key
and the credit commit or roll back together. The primary key decides a race between
replicas: the second claim waits for the first transaction, then finds its row.

Both backends share the SQL here (only the parameter style differs, and PostgreSQL's
pruning skips rows another transaction is pruning), so the store classes stay a thin
delegation, as for refusals.py.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from bastion.money import format_usd
from bastion.store import Account, Conflict, StoreError

if TYPE_CHECKING:
    import asyncpg

KEEP_US = 7 * 86_400_000_000
"""A key is remembered for 7 days (µs), then deleted by the next top-up under any key."""

MAX_KEY_CHARS = 255


class KeyReused(Conflict):
    """The idempotency key was used for a different top-up: nothing was applied."""


def check_key(key: str | None) -> None:
    """1 to 255 printable characters, not only spaces (None: no key, nothing to check)."""
    if key is not None and (not key.strip() or len(key) > MAX_KEY_CHARS or not key.isprintable()):
        raise StoreError(
            f"an idempotency key must be 1 to {MAX_KEY_CHARS} printable characters, got {key!r}"
        )


def credit_request(name: str, amount: int) -> str:
    """What a top-up asks for, canonically: the same key must always ask the same."""
    return json.dumps({"account": name, "amount": amount}, sort_keys=True)


def _answer(account: Account) -> str:
    """The account as stored for replays (``replayed`` is not part of it)."""
    values = {f.name: getattr(account, f.name) for f in fields(Account) if f.name != "replayed"}
    return json.dumps(values)


def _replay(key: str, request: str, found: Any) -> Account:
    """The first answer, if the key was used for this same request; else KeyReused."""
    if found[0] != request:
        was = json.loads(found[0])
        raise KeyReused(
            f"idempotency key {key!r} was already used for another top-up"
            f" ({format_usd(was['amount'])} USD to {was['account']!r}); nothing was applied:"
            " send a new key for a new top-up"
        )
    data = json.loads(found[1])
    known = {f.name for f in fields(Account)}
    return Account(**{k: v for k, v in data.items() if k in known}, replayed=True)


_CLAIM = """
INSERT INTO idempotency_keys (idempotency_key, request, response, created_at)
VALUES ({0}, {1}, '', {2}) ON CONFLICT (idempotency_key) DO NOTHING
"""
_FOUND = "SELECT request, response FROM idempotency_keys WHERE idempotency_key = {0}"
_ANSWER = "UPDATE idempotency_keys SET response = {1} WHERE idempotency_key = {0}"


def sqlite_claim(
    conn: sqlite3.Connection, key: str, request: str, now: int
) -> Account | None:
    """Inside the top-up's write transaction: None if the key is new (and now held),
    else the first answer. SQLite has one writer at a time, so no race remains."""
    conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (now - KEEP_US,))
    if conn.execute(_CLAIM.format("?", "?", "?"), (key, request, now)).rowcount == 1:
        return None
    return _replay(key, request, conn.execute(_FOUND.format("?"), (key,)).fetchone())


def sqlite_answer(conn: sqlite3.Connection, key: str, account: Account) -> None:
    conn.execute(_ANSWER.format("?1", "?2"), (key, _answer(account)))


async def pg_claim(
    conn: asyncpg.Connection, key: str, request: str, now: int
) -> Account | None:
    """``sqlite_claim`` on PostgreSQL. A claim of a key another transaction holds waits
    for it: its commit makes this one a replay, its rollback leaves the key to this one."""
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE idempotency_key IN (SELECT idempotency_key"
        " FROM idempotency_keys WHERE created_at < $1 FOR UPDATE SKIP LOCKED)",
        now - KEEP_US,
    )
    if await conn.fetchval(_CLAIM.format("$1", "$2", "$3") + " RETURNING 1", key, request, now):
        return None
    return _replay(key, request, await conn.fetchrow(_FOUND.format("$1"), key))


async def pg_answer(conn: asyncpg.Connection, key: str, account: Account) -> None:
    await conn.execute(_ANSWER.format("$1", "$2"), key, _answer(account))
