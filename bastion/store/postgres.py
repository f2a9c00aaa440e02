"""The PostgreSQL store: what every gateway replica shares once Bastion scales out (docs/deploy.md).

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
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from bastion.auth import generate_key, hash_key
from bastion.store import (
    LEASE_TTL_US,
    UNCHANGED,
    Account,
    ApiKey,
    AuditData,
    Conflict,
    KeyBudget,
    LedgerRow,
    NotFound,
    Reclaimed,
    RowRejected,
    Snapshot,
    StoreError,
    Unchanged,
    UsageTotal,
    budgets,
    idempotency,
    outbox,
    refusals,
    usage,
)
from bastion.store.common import (
    CHECKPOINT_COLUMNS,
    KEY_SELECT,
    LEDGER_COLUMNS,
    Funds,
    account_select,
    allocate,
    api_key,
    charges,
    check_account_name,
    check_credit,
    check_key_fields,
    check_limits,
    check_row,
    check_text,
    checkpoint_row,
    checkpoint_values,
    dead_letter_json,
    key_changes,
    ledger_row,
    ledger_values,
    live_leases,
    models_text,
    new_id,
    new_rows,
    now_us,
)
from bastion.store.migrate import migrate_postgres
from bastion.store.refusals import Refusal

if TYPE_CHECKING:
    import asyncpg

POOL_MIN_SIZE = 0  # no floor to restore: an outage is not retried (and logged) in the background
POOL_MAX_SIZE = 10
CLOSE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0  # a black-holed database: refuse promptly rather than hang
COMMAND_TIMEOUT_S = 10.0
ACQUIRE_TIMEOUT_S = 5.0

# Lease times come from the database's clock, so replicas whose clocks disagree still
# agree on which gateways are live. $1 is the lease TTL in µs.
DB_NOW = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT"
_CUTOFF = f"({DB_NOW} - $1::BIGINT)"
_LIVE_LEASES = live_leases(_CUTOFF) + "::BIGINT"
_ACCOUNT_SELECT = account_select(_CUTOFF, "::BIGINT")

# One statement for a whole batch of rows already known to be new.
_INSERT_LEDGER = f"""
INSERT INTO ledger ({LEDGER_COLUMNS})
SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                     $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::SMALLINT[], $10::TEXT[],
                     $11::BIGINT[], $12::BIGINT[], $13::BIGINT[], $14::BIGINT[], $15::BIGINT[])
"""

_CHECKPOINT = f"""
INSERT INTO inflight ({CHECKPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (request_id) DO UPDATE SET input_tokens = excluded.input_tokens,
    output_tokens = excluded.output_tokens, cost = excluded.cost
"""

# Per account of a batch (locked first): balance, this gateway's live lease, all live leases.
_FUNDS = f"""
SELECT a.id, a.balance,
       COALESCE((SELECT l.amount FROM leases l JOIN gateways g ON g.id = l.gateway_id
                 WHERE l.account_id = a.id AND l.gateway_id = $3
                   AND g.seen_at >= {_CUTOFF}), 0)::BIGINT,
       {_LIVE_LEASES}
FROM accounts a WHERE a.id = ANY($2::TEXT[])
"""

_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact(url: str) -> str:
    """The URL for messages and logs: a password, if any, becomes ***."""
    return _PASSWORD.sub(r"\1***@", url)


class PostgresStore:
    """The Store protocol (bastion.store.Store) on a PostgreSQL database, via an asyncpg pool."""

    def __init__(
        self,
        url: str,
        min_size: int = POOL_MIN_SIZE,
        max_size: int = POOL_MAX_SIZE,
        lease_ttl_us: int = LEASE_TTL_US,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise StoreError(f"not a PostgreSQL url: {redact(url)!r}")
        self.url = url
        self.min_size, self.max_size = min_size, max_size
        self.ttl = lease_ttl_us
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
                        self.url,
                        min_size=self.min_size,
                        max_size=self.max_size,
                        timeout=CONNECT_TIMEOUT_S,
                        command_timeout=COMMAND_TIMEOUT_S,
                    )
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                ) as exc:
                    raise StoreError(
                        f"cannot connect to database {redact(self.url)}: {exc}"
                    ) from None
                try:
                    async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                        await migrate_postgres(conn)
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.InterfaceError,
                    asyncpg.InvalidCatalogNameError,
                    asyncpg.InvalidAuthorizationSpecificationError,
                ) as exc:
                    pool.terminate()
                    raise StoreError(
                        f"cannot connect to database {redact(self.url)}: {exc}"
                    ) from None
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._get_pool()
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[asyncpg.Connection]:
        """One write transaction on one pooled connection; any exception rolls it back."""
        pool = await self._get_pool()
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
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
        check_account_name(name)
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
            return await _account(conn, name, self.ttl)

    async def credit_account(
        self, name: str, amount: int, idempotency_key: str | None = None
    ) -> Account:
        """``idempotency_key``: a repeat of the same top-up is answered, not applied."""
        if amount == 0:
            raise StoreError("credit amount must not be zero")
        idempotency.check_key(idempotency_key)
        async with self._write() as conn:
            if idempotency_key is not None:  # idempotency.py: the key's row first, then ours
                request = idempotency.credit_request(name, amount)
                first = await idempotency.pg_claim(conn, idempotency_key, request, now_us())
                if first is not None:
                    return first
            # Lock first: leases and ledger charges of this account wait until we commit,
            # so the balance and the leases read below cannot move under the check.
            await conn.execute("SELECT 1 FROM accounts WHERE name = $1 FOR UPDATE", name)
            account = await _account(conn, name, self.ttl)
            check_credit(account, amount)
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
            # webhooks: a take-back through the balance alert, in this transaction
            await outbox.pg_insert(conn, outbox.credit_events(account, amount, now_us()))
            answer = await _account(conn, name, self.ttl)
            if idempotency_key is not None:
                await idempotency.pg_answer(conn, idempotency_key, answer)
            return answer

    async def get_account(self, name: str) -> Account:
        async with self._read() as conn:
            return await _account(conn, name, self.ttl)

    async def list_accounts(self) -> list[Account]:
        async with self._read() as conn:
            rows = await conn.fetch(_ACCOUNT_SELECT + "ORDER BY a.name", self.ttl)
        return [Account(*row) for row in rows]

    # ---- keys -----------------------------------------------------------------------

    async def create_key(
        self,
        account: str,
        name: str = "",
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        spend_limit: int | None = None,
        limit_reset: str = "never",
        expires_at: int | None = None,
        models: frozenset[str] | None = None,
    ) -> tuple[ApiKey, str]:
        check_text(name, "key label")
        check_limits(rpm, tpm)
        check_key_fields(spend_limit, limit_reset, expires_at, models)
        key_id, plaintext = new_id("key_"), generate_key()
        async with self._write() as conn:
            owner = await _account(conn, account)
            await conn.execute(
                "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, rpm, tpm,"
                " spend_limit, limit_reset, expires_at, models, revoked, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12, $12)",
                key_id,
                owner.id,
                name,
                plaintext[:12],
                hash_key(plaintext),
                rpm,
                tpm,
                spend_limit,
                limit_reset,
                expires_at,
                models_text(models),
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
        self,
        key_id: str,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        spend_limit: int | Unchanged | None = UNCHANGED,
        limit_reset: str | None = None,
        expires_at: int | Unchanged | None = UNCHANGED,
        models: frozenset[str] | Unchanged | None = UNCHANGED,
    ) -> ApiKey:
        """Set the given fields, leave the rest; always stamps updated_at."""
        check_limits(rpm, tpm)
        check_key_fields(spend_limit, limit_reset, expires_at, models)
        changes = key_changes(rpm, tpm, spend_limit, limit_reset, expires_at, models)
        changes["updated_at"] = now_us()
        sets = ", ".join(f"{column} = ${n}" for n, column in enumerate(changes, start=1))
        async with self._write() as conn:
            await _key(conn, key_id)
            await conn.execute(
                f"UPDATE api_keys SET {sets} WHERE id = ${len(changes) + 1}",
                *changes.values(),
                key_id,
            )
            return await _key(conn, key_id)

    async def key_spent(self, key_id: str, since_us: int) -> int:
        """Σ ledger cost of the key's rows created at or after ``since_us``."""
        async with self._read() as conn:
            total = await conn.fetchval(
                "SELECT COALESCE(SUM(cost), 0) FROM ledger"
                " WHERE key_id = $1 AND COALESCE(key_period, created_at) >= $2",
                key_id,
                since_us,
            )
        return int(total)

    async def ledger_row(self, request_id: str) -> LedgerRow | None:
        async with self._read() as conn:
            found = await conn.fetchrow(
                f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE request_id = $1", request_id
            )
        return None if found is None else ledger_row(found)

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
        self,
        account: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        key_id: str | None = None,
    ) -> list[LedgerRow]:
        """Ledger rows, oldest first: at or after ``since_us``, before ``until_us``."""
        async with self._read() as conn:
            account_id = None if account is None else (await _account(conn, account)).id
            return await usage.pg_rows(conn, account_id, key_id, since_us, until_us)

    async def usage_totals(
        self,
        group_by: Sequence[str],
        account: str | None = None,
        key_id: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[UsageTotal]:
        """The rows ``usage`` would give, summed per group (bastion/store/usage.py)."""
        usage.check_groups(group_by)
        async with self._read() as conn:
            account_id = None if account is None else (await _account(conn, account)).id
            return await usage.pg_totals(conn, group_by, account_id, key_id, since_us, until_us)

    async def add_refusals(self, rows: list[Refusal]) -> None:
        if rows:
            async with self._write() as conn:
                await refusals.pg_add(conn, rows)

    async def refusals(
        self, account: str | None = None, since_us: int | None = None, until_us: int | None = None
    ) -> list[Refusal]:
        async with self._read() as conn:
            account_id = None if account is None else (await _account(conn, account)).id
            return await refusals.pg_read(conn, account_id, since_us, until_us)

    async def write_ledger(
        self, rows: list[LedgerRow], gateway_id: str | None = None
    ) -> list[LedgerRow]:
        """Insert new rows and collect their cost in one transaction; returns the new rows.

        A repeated request_id is a no-op. Each row's cost comes out of ``gateway_id``'s
        live lease (up to ``row.leased``), then out of unleased credit; the rest is the
        row's ``uncharged`` (``common.allocate``), so no balance goes below zero. Accounts
        are locked in id order, then rows go in request-id order: two replicas writing
        overlapping batches never deadlock.
        """
        import asyncpg

        if not rows:
            return []
        for row in rows:
            check_row(row)
        try:
            async with self._write() as conn:
                accounts = sorted({r.account_id for r in rows})
                await conn.execute(
                    "SELECT 1 FROM accounts WHERE id = ANY($1::TEXT[]) ORDER BY id FOR UPDATE",
                    accounts,
                )
                found = await conn.fetch(
                    "SELECT request_id FROM ledger WHERE request_id = ANY($1::TEXT[])",
                    [r.request_id for r in rows],
                )
                batch = new_rows(rows, {r[0] for r in found})
                funds = {
                    a: Funds(balance, own, live)
                    for a, balance, own, live in await conn.fetch(
                        _FUNDS, self.ttl, accounts, gateway_id or ""
                    )
                }
                if missing := {r.account_id for r in batch} - set(funds):
                    raise RowRejected(f"ledger rows for unknown accounts {sorted(missing)}")
                batch = allocate(batch, funds)
                batch = await budgets.pg_charge(conn, batch, gateway_id, self.ttl)  # key limits
                if batch:
                    await conn.execute(_INSERT_LEDGER, *_columns(batch))
                money, taken = charges(batch)
                await conn.executemany(
                    "UPDATE accounts SET balance = balance - $1, spent = spent + $1,"
                    " uncharged = uncharged + $2 WHERE id = $3",
                    [(*money[a], a) for a in sorted(money)],
                )
                if gateway_id is not None:
                    await _shrink_leases(conn, gateway_id, taken)
                await outbox.pg_ledger(conn, batch, now_us())  # webhooks: in this transaction
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise RowRejected(str(exc)) from exc
        return batch

    async def dead_letter(self, row: LedgerRow, error: str) -> None:
        """Keep a row the ledger refused, whole, for the audit (a repeat is a no-op)."""
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO dead_letters (request_id, account_id, row_json, error, created_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING",
                row.request_id,
                row.account_id,
                dead_letter_json(row),
                error[:2000],
                now_us(),
            )

    async def audit_data(self) -> AuditData:
        """One REPEATABLE READ snapshot: every figure the audit compares is from one moment."""
        pool = await self._get_pool()
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
            accounts = [Account(*r) for r in await conn.fetch(_ACCOUNT_SELECT, self.ttl)]
            grants = dict(
                await conn.fetch("SELECT account_id, SUM(amount) FROM credits GROUP BY 1")
            )
            ledger = {
                r[0]: (r[1], r[2], r[3], r[4])
                for r in await conn.fetch(
                    "SELECT account_id, COUNT(*), SUM(cost), SUM(uncharged), SUM(estimated)"
                    " FROM ledger GROUP BY 1"
                )
            }
            live, stale = {}, {}
            for account_id, is_live, amount in await conn.fetch(
                f"SELECT l.account_id, COALESCE(g.seen_at >= {_CUTOFF}, FALSE), SUM(l.amount)"
                " FROM leases l LEFT JOIN gateways g ON g.id = l.gateway_id GROUP BY 1, 2",
                self.ttl,
            ):
                (live if is_live else stale)[account_id] = int(amount)
            dead = [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT request_id, account_id, error FROM dead_letters ORDER BY created_at"
                )
            ]
            key_budgets = tuple(await budgets.pg_audit(conn, self.ttl))
        return AuditData(
            accounts=accounts,
            grants={a: int(v) for a, v in grants.items()},
            ledger={a: tuple(int(x) for x in v) for a, v in ledger.items()},  # type: ignore[misc]
            leases=live,
            stale_leases=stale,
            dead_letters=dead,  # type: ignore[arg-type]
            key_budgets=key_budgets,
        )

    # ---- webhooks (bastion/store/outbox.py) -----------------------------------------

    async def update_account(
        self, name: str, *, alert_below: int | Unchanged | None = UNCHANGED
    ) -> Account:
        """Set the balance alert (None: off); setting it records no event by itself."""
        outbox.check_alert(alert_below)
        async with self._write() as conn:
            account = await _account(conn, name, self.ttl)
            if alert_below is not UNCHANGED:
                await conn.execute(
                    "UPDATE accounts SET alert_below = $1 WHERE id = $2", alert_below, account.id
                )
            return await _account(conn, name, self.ttl)

    async def add_event(self, event_id: str, type: str, data: dict[str, Any]) -> None:
        """Record an event for the webhook; a repeated ``event_id`` is a no-op (for as long
        as the event is kept: until a week after it was delivered or given up)."""
        row = outbox.checked_event(event_id, type, data, now_us())
        async with self._write() as conn:
            await outbox.pg_insert(conn, [row])

    async def claim_events(
        self, claimer: str, limit: int, hold_us: int
    ) -> list[outbox.OutboxEvent]:
        """Up to ``limit`` due events, oldest first, held for ``claimer`` for ``hold_us``;
        rows another replica is claiming at the same moment are skipped (SKIP LOCKED)."""
        async with self._write() as conn:
            return await outbox.pg_claim(conn, claimer, limit, hold_us)

    async def event_delivered(self, event_id: str) -> None:
        async with self._write() as conn:
            await outbox.pg_delivered(conn, event_id)

    async def event_failed(
        self, event_id: str, claimer: str, error: str | None, retry_in_us: int | None
    ) -> None:
        """Retry after ``retry_in_us`` (None: give up); only while ``claimer`` holds it."""
        async with self._write() as conn:
            await outbox.pg_failed(conn, event_id, claimer, error, retry_in_us)

    async def prune_events(self, keep_us: int) -> int:
        """Delete events delivered or given up more than ``keep_us`` ago; how many."""
        async with self._write() as conn:
            return await outbox.pg_prune(conn, keep_us)

    # ---- gateways -------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        async with self._read() as conn:
            rows = await conn.fetch(KEY_SELECT)
        keys = [api_key(r) for r in rows]
        return Snapshot(keys={k.key_hash: k for k in keys})

    async def keys_changed(self, since_us: int) -> list[ApiKey]:
        """Keys created, changed or revoked at or after ``since_us`` (revoked included)."""
        async with self._read() as conn:
            rows = await conn.fetch(KEY_SELECT + "WHERE k.updated_at >= $1", since_us)
        return [api_key(r) for r in rows]

    async def heartbeat(self, gateway_id: str, seat: str = "") -> bool:
        """This gateway is alive; leases of gateways silent past the TTL are reclaimed.

        Returns whether the store still knew this gateway: False after it was reaped
        (its leases are gone) or on its first beat. The checkpoints of a reaped gateway
        stay, for ``reclaim_checkpoints``."""
        async with self._write() as conn:
            known = await _touch(conn, gateway_id, seat)
            # SKIP LOCKED: a silent gateway that is leasing right now (it holds its row) is
            # alive after all, and one another reaper holds is being reaped already.
            dead = await conn.fetch(
                "DELETE FROM gateways WHERE id IN (SELECT id FROM gateways"
                f" WHERE seen_at < {_CUTOFF} ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id",
                self.ttl,
            )
            if dead:
                await conn.execute(
                    "DELETE FROM leases WHERE gateway_id = ANY($1::TEXT[])", [r[0] for r in dead]
                )
        return known

    async def lease(self, gateway_id: str, account_id: str, want: int) -> tuple[int, int]:
        """Grant up to ``want`` of the account's unleased credit: (granted, still unleased)."""
        async with self._write() as conn:
            await _touch(conn, gateway_id)
            # The account row lock serialises every lease of this account across replicas;
            # the sum is a later statement, so it sees every lease committed before ours.
            balance = await conn.fetchval(
                "SELECT balance FROM accounts WHERE id = $1 FOR UPDATE", account_id
            )
            if balance is None:
                return 0, 0
            leased = await conn.fetchval(
                f"SELECT {_LIVE_LEASES} FROM accounts a WHERE a.id = $2", self.ttl, account_id
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

    async def sync_lease(self, gateway_id: str, account_id: str, amount: int) -> int:
        """Agree with the gateway on one lease after a doubt: both become the smaller value.

        Credit the store holds that the gateway no longer counts goes back to the others;
        a gateway that counts more than the store holds learns the truth."""
        async with self._write() as conn:
            held = await conn.fetchval(
                "SELECT amount FROM leases WHERE gateway_id = $1 AND account_id = $2 FOR UPDATE",
                gateway_id,
                account_id,
            )
            agreed = max(0, min(held or 0, amount))
            if held is not None and agreed != held:
                await conn.execute(
                    "UPDATE leases SET amount = $1 WHERE gateway_id = $2 AND account_id = $3",
                    agreed,
                    gateway_id,
                    account_id,
                )
        return agreed

    async def release(self, gateway_id: str, amounts: dict[str, int]) -> None:
        """Give leased credit back (never below zero)."""
        if amounts:
            async with self._write() as conn:
                await _shrink_leases(conn, gateway_id, amounts)

    # ---- key spend limits (bastion/store/budgets.py) ----------------------------------

    async def lease_key(
        self, gateway_id: str, key_id: str, period_start: int, want: int
    ) -> tuple[int, int]:
        """Grant up to ``want`` of what is left of the key's limit in the period (never
        more than limit − spent − the live leases): (granted, still unleased)."""
        async with self._write() as conn:
            await _touch(conn, gateway_id)
            return await budgets.pg_lease(conn, gateway_id, key_id, period_start, want, self.ttl)

    async def release_keys(self, gateway_id: str, amounts: dict[tuple[str, int], int]) -> None:
        """Give leased key budget back (never below zero)."""
        if amounts:
            async with self._write() as conn:
                await budgets.pg_shrink(conn, gateway_id, amounts)

    async def sync_key_lease(
        self, gateway_id: str, key_id: str, period_start: int, amount: int
    ) -> int:
        """``sync_lease`` for a key budget lease: both become the smaller value."""
        async with self._write() as conn:
            return await budgets.pg_sync(conn, gateway_id, key_id, period_start, amount)

    async def key_budget(self, key_id: str, period_start: int) -> KeyBudget | None:
        """The key's budget for the period starting then; None if it was never used."""
        async with self._read() as conn:
            return await budgets.pg_read(conn, key_id, period_start, self.ttl)

    async def retire(self, gateway_id: str) -> None:
        """A clean shutdown: every lease of this gateway goes back at once."""
        async with self._write() as conn:
            await conn.execute("DELETE FROM leases WHERE gateway_id = $1", gateway_id)
            await conn.execute("DELETE FROM inflight WHERE gateway_id = $1", gateway_id)
            await conn.execute("DELETE FROM gateways WHERE id = $1", gateway_id)

    async def reclaim_seat(self, seat: str, gateway_id: str) -> list[Reclaimed]:
        """The gateways that held this seat before us are dead: their leases go back now."""
        async with self._write() as conn:
            gone = await conn.fetch(
                "DELETE FROM gateways WHERE seat = $1 AND id <> $2 RETURNING id, seen_at",
                seat,
                gateway_id,
            )
            held = dict(
                await conn.fetch(
                    "DELETE FROM leases WHERE gateway_id = ANY($1::TEXT[])"
                    " RETURNING gateway_id, amount",
                    [g[0] for g in gone],
                )
            )
        return [Reclaimed(g[0], g[1], int(held.get(g[0], 0))) for g in gone]

    async def checkpoint(self, gateway_id: str, rows: list[LedgerRow], gone: list[str]) -> None:
        """Record this gateway's streams in flight (upsert ``rows``, drop ``gone`` ids)."""
        async with self._write() as conn:
            if gone:
                await conn.execute(
                    "DELETE FROM inflight WHERE gateway_id = $1 AND request_id = ANY($2::TEXT[])",
                    gateway_id,
                    gone,
                )
            if rows:
                values = [checkpoint_values(gateway_id, r) for r in rows]
                await conn.executemany(_CHECKPOINT, values)

    async def reclaim_checkpoints(self) -> list[LedgerRow]:
        """Charge the checkpointed streams of gateways that are gone; returns the new rows."""
        async with self._read() as conn:
            found = await conn.fetch(
                f"SELECT {CHECKPOINT_COLUMNS} FROM inflight i WHERE NOT EXISTS"
                " (SELECT 1 FROM gateways g WHERE g.id = i.gateway_id) LIMIT 1000"
            )
            resets = await budgets.pg_resets(conn, {r[3] for r in found}) if found else {}
        if not found:
            return []
        rows = budgets.attribute([checkpoint_row(tuple(r)) for r in found], resets)
        written = await self.write_ledger(rows)
        async with self._write() as conn:
            await conn.execute(
                "DELETE FROM inflight WHERE request_id = ANY($1::TEXT[])", [r[0] for r in found]
            )
        return written


async def _account(conn: asyncpg.Connection, name: str, ttl: int = LEASE_TTL_US) -> Account:
    row = await conn.fetchrow(_ACCOUNT_SELECT + "WHERE a.name = $2", ttl, name)
    if row is None:
        raise NotFound(f"no account named {name!r}")
    return Account(*row)


async def _key(conn: asyncpg.Connection, key_id: str) -> ApiKey:
    row = await conn.fetchrow(KEY_SELECT + "WHERE k.id = $1", key_id)
    if row is None:
        raise NotFound(f"no key with id {key_id!r}")
    return api_key(row)


async def _touch(conn: asyncpg.Connection, gateway_id: str, seat: str = "") -> bool:
    """Stamp the gateway as seen now (database clock); False if it was not known."""
    updated = await conn.fetchval(
        f"UPDATE gateways SET seen_at = {DB_NOW} WHERE id = $1 RETURNING 1", gateway_id
    )
    if updated:
        return True
    await conn.execute(
        f"INSERT INTO gateways (id, seen_at, seat) VALUES ($1, {DB_NOW}, $2)"
        f" ON CONFLICT (id) DO UPDATE SET seen_at = {DB_NOW}",
        gateway_id,
        seat,
    )
    return False


def _columns(batch: list[LedgerRow]) -> tuple[list[Any], ...]:
    """The batch as one array per ledger column, for unnest()."""
    return tuple(list(c) for c in zip(*(ledger_values(r) for r in batch), strict=True))


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
