"""The PostgreSQL store: what every gateway replica shares once Bastion scales out (SPEC §6).

Same schema (one migration history), same semantics and the same refusal messages as
the SQLite store; only the concurrency control differs. SQLite serialises every writer
on one file lock, while here each write is one READ COMMITTED transaction taking row
locks, in a fixed order so replicas never deadlock each other:

* ``lease`` and ``credit_account`` lock the account row (``SELECT … FOR UPDATE``)
  before summing its live leases, so two replicas can never lease (or an operator
  take back) the same credit twice;
* ``write_ledger`` inserts rows in request-id order, then charges accounts in
  account-id order, then shrinks the writer's leases in account-id order;
* ``heartbeat`` reaps silent gateways with ``SKIP LOCKED``: one another reaper (or
  the gateway itself, coming back) is busy with is left for the next beat.

The pool opens lazily on first use (``open_store`` is synchronous and the pool
belongs to the event loop that made it) and migrates then, as SQLite does. A
database that cannot be reached on that first connect is a ``StoreError`` (like an
unopenable SQLite file); a connection lost later surfaces as asyncpg's or the OS's
own exception, which the gateway treats as "store unavailable".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from bastion.auth import generate_key, hash_key
from bastion.money import format_usd
from bastion.store import (
    LEASE_TTL_US,
    Account,
    ApiKey,
    Conflict,
    LedgerRow,
    NotFound,
    Snapshot,
    StoreError,
)
from bastion.store.common import (
    KEY_SELECT,
    LEDGER_COLUMNS,
    account_select,
    api_key,
    check_limits,
    ledger_row,
    live_leases,
    new_id,
    now_us,
)
from bastion.store.migrate import migrate_postgres

if TYPE_CHECKING:
    import asyncpg

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 10
CLOSE_TIMEOUT_S = 10.0

_LIVE_LEASES = live_leases("$1") + "::BIGINT"
_ACCOUNT_SELECT = account_select("$1", "::BIGINT")

# One statement for a whole batch; RETURNING names exactly the rows that were new.
_INSERT_LEDGER = f"""
INSERT INTO ledger ({LEDGER_COLUMNS})
SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                     $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::SMALLINT[], $10::TEXT[],
                     $11::BIGINT[])
ON CONFLICT (request_id) DO NOTHING
RETURNING account_id, cost
"""

_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact(url: str) -> str:
    """The URL for messages and logs: a password, if any, becomes ***."""
    return _PASSWORD.sub(r"\1***@", url)


class PostgresStore:
    """The Store protocol (bastion.store.Store) on a PostgreSQL database, via an asyncpg pool."""

    def __init__(
        self, url: str, min_size: int = POOL_MIN_SIZE, max_size: int = POOL_MAX_SIZE
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise StoreError(f"not a PostgreSQL url: {redact(url)!r}")
        self.url = url
        self.min_size, self.max_size = min_size, max_size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()  # binds to a loop only when first contended

    # ---- plumbing -------------------------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        """Open the pool and migrate on first use; a failed first connect is retried next call."""
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                try:
                    import asyncpg
                except ImportError:
                    raise StoreError(
                        "PostgreSQL needs the asyncpg package: pip install 'bastion[postgres]'"
                    ) from None
                try:
                    pool = await asyncpg.create_pool(
                        self.url, min_size=self.min_size, max_size=self.max_size
                    )
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    raise StoreError(
                        f"cannot connect to database {redact(self.url)}: {exc}"
                    ) from None
                try:
                    async with pool.acquire() as conn:
                        await migrate_postgres(conn)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[asyncpg.Connection]:
        """One write transaction on one pooled connection; any exception rolls it back."""
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            yield conn

    # ---- lifecycle ------------------------------------------------------------------

    async def migrate(self) -> None:
        """Idempotent; also done implicitly on first use. Safe from several processes."""
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            await migrate_postgres(conn)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:  # a connection stuck in a query: do not hang shutdown
            pool.terminate()

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.fetchval("SELECT 1")

    # ---- accounts -------------------------------------------------------------------

    async def create_account(self, name: str, credit: int = 0) -> Account:
        if not name or not name.strip():
            raise StoreError("account name must not be empty")
        if name != name.strip():
            raise StoreError(f"account name {name!r} has leading or trailing spaces")
        if credit < 0:
            raise StoreError("initial credit must not be negative")
        account_id, now = new_id("acct_"), now_us()
        async with self._write() as conn:
            # ON CONFLICT rather than check-then-insert: two creators racing get one refusal.
            created = await conn.fetchval(
                "INSERT INTO accounts (id, name, balance, spent, created_at)"
                " VALUES ($1, $2, $3, 0, $4) ON CONFLICT (name) DO NOTHING RETURNING id",
                account_id,
                name,
                credit,
                now,
            )
            if created is None:
                raise Conflict(f"an account named {name!r} already exists")
            if credit > 0:
                await conn.execute(
                    "INSERT INTO credits (id, account_id, amount, created_at)"
                    " VALUES ($1, $2, $3, $4)",
                    new_id("cred_"),
                    account_id,
                    credit,
                    now,
                )
            return await _account(conn, name)

    async def credit_account(self, name: str, amount: int) -> Account:
        if amount == 0:
            raise StoreError("credit amount must not be zero")
        async with self._write() as conn:
            # Lock first: leases and ledger charges of this account wait until we commit,
            # so the balance and the leases read below cannot move under the check.
            await conn.execute("SELECT 1 FROM accounts WHERE name = $1 FOR UPDATE", name)
            account = await _account(conn, name)
            if account.balance - account.reserved + amount < 0:
                held = f" ({format_usd(account.reserved)} USD held by running gateways)"
                raise Conflict(
                    f"cannot take back {format_usd(-amount)} USD from {name!r}: "
                    f"its balance is {format_usd(account.balance)} USD"
                    + (held if account.reserved else "")
                )
            await conn.execute(
                "INSERT INTO credits (id, account_id, amount, created_at) VALUES ($1, $2, $3, $4)",
                new_id("cred_"),
                account.id,
                amount,
                now_us(),
            )
            await conn.execute(
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2", amount, account.id
            )
            return await _account(conn, name)

    async def get_account(self, name: str) -> Account:
        async with self._read() as conn:
            return await _account(conn, name)

    async def list_accounts(self) -> list[Account]:
        async with self._read() as conn:
            rows = await conn.fetch(_ACCOUNT_SELECT + "ORDER BY a.name", now_us() - LEASE_TTL_US)
        return [Account(*row) for row in rows]

    # ---- keys -----------------------------------------------------------------------

    async def create_key(
        self, account: str, name: str = "", rpm: int | None = None, tpm: int | None = None
    ) -> tuple[ApiKey, str]:
        check_limits(rpm, tpm)
        key_id, plaintext = new_id("key_"), generate_key()
        async with self._write() as conn:
            owner = await _account(conn, account)
            await conn.execute(
                "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, rpm, tpm,"
                " revoked, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $8)",
                key_id,
                owner.id,
                name,
                plaintext[:12],
                hash_key(plaintext),
                rpm,
                tpm,
                now_us(),
            )
            return await _key(conn, key_id), plaintext

    async def list_keys(self, account: str | None = None) -> list[ApiKey]:
        async with self._read() as conn:
            if account is None:
                rows = await conn.fetch(KEY_SELECT + "ORDER BY k.created_at, k.id")
            else:
                owner = await _account(conn, account)
                rows = await conn.fetch(
                    KEY_SELECT + "WHERE k.account_id = $1 ORDER BY k.created_at, k.id", owner.id
                )
        return [api_key(row) for row in rows]

    async def update_key(
        self, key_id: str, rpm: int | None = None, tpm: int | None = None
    ) -> ApiKey:
        check_limits(rpm, tpm)
        async with self._write() as conn:
            await _key(conn, key_id)
            await conn.execute(
                "UPDATE api_keys SET rpm = COALESCE($1, rpm), tpm = COALESCE($2, tpm),"
                " updated_at = $3 WHERE id = $4",
                rpm,
                tpm,
                now_us(),
                key_id,
            )
            return await _key(conn, key_id)

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Idempotent: revoking a revoked key keeps its first revocation time."""
        async with self._write() as conn:
            await _key(conn, key_id)
            await conn.execute(
                "UPDATE api_keys SET revoked = 1, revoked_at = $1, updated_at = $1"
                " WHERE id = $2 AND revoked = 0",
                now_us(),
                key_id,
            )
            return await _key(conn, key_id)

    # ---- ledger ---------------------------------------------------------------------

    async def usage(
        self, account: str | None = None, since_us: int | None = None
    ) -> list[LedgerRow]:
        async with self._read() as conn:
            where: list[str] = []
            params: list[Any] = []
            if account is not None:
                params.append((await _account(conn, account)).id)
                where.append(f"account_id = ${len(params)}")
            if since_us is not None:
                params.append(since_us)
                where.append(f"created_at >= ${len(params)}")
            sql = f"SELECT {LEDGER_COLUMNS} FROM ledger"
            if where:
                sql += " WHERE " + " AND ".join(where)
            rows = await conn.fetch(sql + " ORDER BY created_at, request_id", *params)
        return [ledger_row(row) for row in rows]

    async def write_ledger(self, rows: list[LedgerRow], gateway_id: str | None = None) -> int:
        """Insert new rows and charge them in one transaction; a repeated request_id is a no-op.

        With ``gateway_id``, the charged cost also leaves that gateway's lease, so the
        live leases never exceed the balance. Rows go in request-id order and charges
        in account-id order, so two replicas writing overlapping batches never deadlock.
        """
        if not rows:
            return 0
        unique: dict[str, LedgerRow] = {}
        for row in rows:  # the first of a repeated request_id wins, as on SQLite
            unique.setdefault(row.request_id, row)
        batch = [unique[rid] for rid in sorted(unique)]
        columns = (
            [r.request_id for r in batch],
            [r.account_id for r in batch],
            [r.key_id for r in batch],
            [r.model for r in batch],
            [r.endpoint for r in batch],
            [r.input_tokens for r in batch],
            [r.output_tokens for r in batch],
            [r.cost for r in batch],
            [int(r.estimated) for r in batch],
            [r.status for r in batch],
            [r.created_at for r in batch],
        )
        async with self._write() as conn:
            inserted = await conn.fetch(_INSERT_LEDGER, *columns)
            charges: dict[str, int] = {}
            for account_id, cost in inserted:
                charges[account_id] = charges.get(account_id, 0) + cost
            if charges:
                await conn.executemany(
                    "UPDATE accounts SET balance = balance - $1, spent = spent + $1 WHERE id = $2",
                    [(charges[a], a) for a in sorted(charges)],
                )
            if gateway_id is not None:
                await _shrink_leases(conn, gateway_id, charges)
        return len(inserted)

    # ---- gateways -------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        async with self._read() as conn:
            rows = await conn.fetch(KEY_SELECT + "WHERE k.revoked = 0")
        keys = [api_key(r) for r in rows]
        return Snapshot(keys={k.key_hash: k for k in keys})

    async def keys_changed(self, since_us: int) -> list[ApiKey]:
        """Keys created, changed or revoked at or after ``since_us`` (revoked included)."""
        async with self._read() as conn:
            rows = await conn.fetch(KEY_SELECT + "WHERE k.updated_at >= $1", since_us)
        return [api_key(r) for r in rows]

    async def heartbeat(self, gateway_id: str) -> None:
        """This gateway is alive; leases of gateways silent past the TTL are reclaimed."""
        now = now_us()
        async with self._write() as conn:
            await _touch(conn, gateway_id, now)
            # SKIP LOCKED: a silent gateway that is leasing right now (it holds its row) is
            # alive after all, and one another reaper holds is being reaped already.
            dead = await conn.fetch(
                "DELETE FROM gateways WHERE id IN (SELECT id FROM gateways WHERE seen_at < $1"
                " ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id",
                now - LEASE_TTL_US,
            )
            if dead:
                await conn.execute(
                    "DELETE FROM leases WHERE gateway_id = ANY($1::TEXT[])", [r[0] for r in dead]
                )

    async def lease(self, gateway_id: str, account_id: str, want: int) -> tuple[int, int]:
        """Grant up to ``want`` of the account's unleased credit: (granted, still unleased)."""
        now = now_us()
        async with self._write() as conn:
            await _touch(conn, gateway_id, now)
            # The account row lock serialises every lease of this account across replicas;
            # the sum is a later statement, so it sees every lease committed before ours.
            balance = await conn.fetchval(
                "SELECT balance FROM accounts WHERE id = $1 FOR UPDATE", account_id
            )
            if balance is None:
                return 0, 0
            leased = await conn.fetchval(
                f"SELECT {_LIVE_LEASES} FROM accounts a WHERE a.id = $2",
                now - LEASE_TTL_US,
                account_id,
            )
            free = max(0, balance - leased)
            grant = max(0, min(want, free))
            if grant:
                await conn.execute(
                    "INSERT INTO leases (gateway_id, account_id, amount) VALUES ($1, $2, $3)"
                    " ON CONFLICT (gateway_id, account_id)"
                    " DO UPDATE SET amount = leases.amount + excluded.amount",
                    gateway_id,
                    account_id,
                    grant,
                )
        return grant, free - grant

    async def release(self, gateway_id: str, amounts: dict[str, int]) -> None:
        """Give leased credit back (never below zero)."""
        if amounts:
            async with self._write() as conn:
                await _shrink_leases(conn, gateway_id, amounts)

    async def retire(self, gateway_id: str) -> None:
        """A clean shutdown: every lease of this gateway goes back at once."""
        async with self._write() as conn:
            await conn.execute("DELETE FROM leases WHERE gateway_id = $1", gateway_id)
            await conn.execute("DELETE FROM gateways WHERE id = $1", gateway_id)


async def _account(conn: asyncpg.Connection, name: str) -> Account:
    row = await conn.fetchrow(_ACCOUNT_SELECT + "WHERE a.name = $2", now_us() - LEASE_TTL_US, name)
    if row is None:
        raise NotFound(f"no account named {name!r}")
    return Account(*row)


async def _key(conn: asyncpg.Connection, key_id: str) -> ApiKey:
    row = await conn.fetchrow(KEY_SELECT + "WHERE k.id = $1", key_id)
    if row is None:
        raise NotFound(f"no key with id {key_id!r}")
    return api_key(row)


async def _touch(conn: asyncpg.Connection, gateway_id: str, now: int) -> None:
    await conn.execute(
        "INSERT INTO gateways (id, seen_at) VALUES ($1, $2)"
        " ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
        gateway_id,
        now,
    )


async def _shrink_leases(
    conn: asyncpg.Connection, gateway_id: str, amounts: dict[str, int]
) -> None:
    """Lower this gateway's leases (account-id order, never below zero); drop emptied ones."""
    if not amounts:
        return
    accounts = sorted(amounts)
    await conn.executemany(
        "UPDATE leases SET amount = CASE WHEN amount > $1 THEN amount - $1 ELSE 0 END"
        " WHERE gateway_id = $2 AND account_id = $3",
        [(amounts[a], gateway_id, a) for a in accounts],
    )
    await conn.execute(
        "DELETE FROM leases WHERE gateway_id = $1 AND account_id = ANY($2::TEXT[]) AND amount <= 0",
        gateway_id,
        accounts,
    )
