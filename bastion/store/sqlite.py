"""The SQLite store: the embedded default, one file shared by the gateway and the CLI.

sqlite3 blocks, so every call runs on one dedicated worker thread that owns the
connection; the async methods only await that thread and the event loop never
stalls. The file is in WAL mode (readers never wait for the writer) with
synchronous=FULL (a committed charge or top-up survives a power cut), and writers
wait up to 10 s for each other (busy_timeout), since a CLI and a running gateway
share the file. Every write is one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

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
from bastion.store.migrate import migrate_sqlite
from bastion.store.refusals import Refusal

GRANTS_SQL = "SELECT account_id, SUM(amount) FROM credits GROUP BY 1"

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000

_ACCOUNT_SELECT = account_select("?")
_LIVE_LEASES = live_leases("?")


def sqlite_path(url: str) -> str:
    """SQLAlchemy form: ``sqlite:///rel.db`` (cwd-relative), ``sqlite:////abs.db``.

    ``sqlite://`` alone is an in-memory database (tests only: it dies with the store).
    """
    if not url.startswith("sqlite://"):
        raise StoreError(f"not a SQLite url: {url!r}")
    rest = url[len("sqlite://") :].split("?", 1)[0]
    if rest in ("", "/", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise StoreError(f"bad SQLite url {url!r}: use sqlite:///relative.db or sqlite:////abs.db")
    return rest[1:]


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. While another connection switches the same new file, SQLite answers
    "database is locked" at once, without its busy handler: retry within the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteStore:
    """The Store protocol (bastion.store.Store) on one SQLite file."""

    def __init__(self, url: str, lease_ttl_us: int = LEASE_TTL_US) -> None:
        self.url = url
        self.ttl = lease_ttl_us  # one machine, one clock: lease times use Python's
        self.path = sqlite_path(url)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._migrated = False

    # ---- plumbing -------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """On the worker: open and migrate on first use, then run ``fn(conn, *args)``."""
        conn = self._connect()
        if not self._migrated:
            migrate_sqlite(conn)
            self._migrated = True
        return fn(conn, *args)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:" and not Path(self.path).parent.is_dir():
                raise StoreError(f"cannot open database {self.path}: directory does not exist")
            try:
                conn = sqlite3.connect(
                    self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
                )
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                _wal(conn)
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open database {self.path}: {exc}") from None
            self._conn = conn
        return self._conn

    @staticmethod
    @contextmanager
    def _write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One write transaction; the lock is taken up front so reads inside are current."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ---- lifecycle ------------------------------------------------------------------

    async def migrate(self) -> None:
        """Idempotent; also done implicitly on first use. Safe from several processes."""
        await self._run(migrate_sqlite)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=False)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # ---- accounts -------------------------------------------------------------------

    async def create_account(self, name: str, credit: int = 0) -> Account:
        check_account_name(name)
        if credit < 0:
            raise StoreError("initial credit must not be negative")
        return await self._run(self._create_account, name, credit)

    def _create_account(self, conn: sqlite3.Connection, name: str, credit: int) -> Account:
        account_id, now = new_id("acct_"), now_us()
        with self._write(conn):
            if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"an account named {name!r} already exists")
            conn.execute(
                "INSERT INTO accounts (id, name, balance, spent, created_at)"
                " VALUES (?, ?, ?, 0, ?)",
                (account_id, name, credit, now),
            )
            if credit > 0:
                conn.execute(
                    "INSERT INTO credits (id, account_id, amount, created_at) VALUES (?, ?, ?, ?)",
                    (new_id("cred_"), account_id, credit, now),
                )
        return self._account(conn, name)

    async def credit_account(
        self, name: str, amount: int, idempotency_key: str | None = None
    ) -> Account:
        """``idempotency_key``: a repeat of the same top-up is answered, not applied."""
        if amount == 0:
            raise StoreError("credit amount must not be zero")
        idempotency.check_key(idempotency_key)
        return await self._run(self._credit_account, name, amount, idempotency_key)

    def _credit_account(
        self, conn: sqlite3.Connection, name: str, amount: int, key: str | None
    ) -> Account:
        with self._write(conn):
            if key is not None:  # idempotency.py: claimed first, answered in this transaction
                request = idempotency.credit_request(name, amount)
                first = idempotency.sqlite_claim(conn, key, request, now_us())
                if first is not None:
                    return first
            account = self._account(conn, name)
            check_credit(account, amount)
            conn.execute(
                "INSERT INTO credits (id, account_id, amount, created_at) VALUES (?, ?, ?, ?)",
                (new_id("cred_"), account.id, amount, now_us()),
            )
            conn.execute(
                "UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, account.id)
            )
            # webhooks: a take-back through the balance alert, in this transaction
            outbox.sqlite_insert(conn, outbox.credit_events(account, amount, now_us()))
            if key is not None:
                answer = self._account(conn, name)
                idempotency.sqlite_answer(conn, key, answer)
                return answer
        return self._account(conn, name)

    async def get_account(self, name: str) -> Account:
        return await self._run(self._account, name)

    def _account(self, conn: sqlite3.Connection, name: str) -> Account:
        row = conn.execute(
            _ACCOUNT_SELECT + "WHERE a.name = ?", (now_us() - self.ttl, name)
        ).fetchone()
        if row is None:
            raise NotFound(f"no account named {name!r}")
        return Account(*row)

    async def list_accounts(self) -> list[Account]:
        def _list(conn: sqlite3.Connection) -> list[Account]:
            rows = conn.execute(_ACCOUNT_SELECT + "ORDER BY a.name", (now_us() - self.ttl,))
            return [Account(*row) for row in rows]

        return await self._run(_list)

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
        fields = (rpm, tpm, spend_limit, limit_reset, expires_at, models_text(models))
        return await self._run(self._create_key, account, name, fields)

    def _create_key(
        self, conn: sqlite3.Connection, account: str, name: str, fields: tuple[Any, ...]
    ) -> tuple[ApiKey, str]:
        key_id, plaintext, now = new_id("key_"), generate_key(), now_us()
        with self._write(conn):
            owner = self._account(conn, account)
            conn.execute(
                "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, rpm, tpm,"
                " spend_limit, limit_reset, expires_at, models, revoked, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (key_id, owner.id, name, plaintext[:12], hash_key(plaintext), *fields, now, now),
            )
        return self._key(conn, key_id), plaintext

    async def list_keys(self, account: str | None = None) -> list[ApiKey]:
        def _list(conn: sqlite3.Connection) -> list[ApiKey]:
            if account is None:
                rows = conn.execute(KEY_SELECT + "ORDER BY k.created_at, k.id")
            else:
                owner = self._account(conn, account)
                rows = conn.execute(
                    KEY_SELECT + "WHERE k.account_id = ? ORDER BY k.created_at, k.id",
                    (owner.id,),
                )
            return [api_key(row) for row in rows]

        return await self._run(_list)

    def _key(self, conn: sqlite3.Connection, key_id: str) -> ApiKey:
        row = conn.execute(KEY_SELECT + "WHERE k.id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no key with id {key_id!r}")
        return api_key(row)

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
        sets = ", ".join(f"{column} = ?" for column in changes)

        def _update(conn: sqlite3.Connection) -> ApiKey:
            with self._write(conn):
                self._key(conn, key_id)
                conn.execute(
                    f"UPDATE api_keys SET {sets} WHERE id = ?", (*changes.values(), key_id)
                )
            return self._key(conn, key_id)

        return await self._run(_update)

    async def key_spent(self, key_id: str, since_us: int) -> int:
        """Σ ledger cost of the key's rows created at or after ``since_us``."""

        def _spent(conn: sqlite3.Connection) -> int:
            (total,) = conn.execute(
                "SELECT COALESCE(SUM(cost), 0) FROM ledger"
                " WHERE key_id = ? AND COALESCE(key_period, created_at) >= ?",
                (key_id, since_us),
            ).fetchone()
            return int(total)

        return await self._run(_spent)

    async def ledger_row(self, request_id: str) -> LedgerRow | None:
        def _row(conn: sqlite3.Connection) -> LedgerRow | None:
            found = conn.execute(
                f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE request_id = ?", (request_id,)
            ).fetchone()
            return None if found is None else ledger_row(found)

        return await self._run(_row)

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Idempotent: revoking a revoked key keeps its first revocation time."""

        def _revoke(conn: sqlite3.Connection) -> ApiKey:
            with self._write(conn):
                self._key(conn, key_id)
                conn.execute(
                    "UPDATE api_keys SET revoked = 1, revoked_at = ?, updated_at = ?"
                    " WHERE id = ? AND revoked = 0",
                    (now_us(), now_us(), key_id),
                )
            return self._key(conn, key_id)

        return await self._run(_revoke)

    # ---- ledger ---------------------------------------------------------------------

    async def usage(
        self,
        account: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        key_id: str | None = None,
    ) -> list[LedgerRow]:
        """Ledger rows, oldest first: at or after ``since_us``, before ``until_us``."""

        def _usage(conn: sqlite3.Connection) -> list[LedgerRow]:
            account_id = None if account is None else self._account(conn, account).id
            return usage.sqlite_rows(conn, account_id, key_id, since_us, until_us)

        return await self._run(_usage)

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

        def _totals(conn: sqlite3.Connection) -> list[UsageTotal]:
            account_id = None if account is None else self._account(conn, account).id
            return usage.sqlite_totals(conn, group_by, account_id, key_id, since_us, until_us)

        return await self._run(_totals)

    async def add_refusals(self, rows: list[Refusal]) -> None:
        def _add(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                refusals.sqlite_add(conn, rows)

        if rows:
            await self._run(_add)

    async def refusals(
        self, account: str | None = None, since_us: int | None = None, until_us: int | None = None
    ) -> list[Refusal]:
        def _read(conn: sqlite3.Connection) -> list[Refusal]:
            account_id = None if account is None else self._account(conn, account).id
            return refusals.sqlite_read(conn, account_id, since_us, until_us)

        return await self._run(_read)

    async def write_ledger(
        self, rows: list[LedgerRow], gateway_id: str | None = None
    ) -> list[LedgerRow]:
        """Insert new rows and collect their cost in one transaction; returns the new rows.

        A repeated request_id is a no-op. Each row's cost comes out of ``gateway_id``'s
        live lease (up to ``row.leased``), then out of unleased credit; the rest is the
        row's ``uncharged`` (``common.allocate``), so no balance goes below zero.
        """
        if not rows:
            return []
        for row in rows:
            check_row(row)
        return await self._run(self._write_ledger, list(rows), gateway_id)

    def _write_ledger(
        self, conn: sqlite3.Connection, rows: list[LedgerRow], gateway_id: str | None
    ) -> list[LedgerRow]:
        try:
            with self._write(conn):
                seen: set[str] = set()  # request ids already in the ledger
                ids = [row.request_id for row in rows]
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    sql = f"SELECT request_id FROM ledger WHERE request_id IN ({marks})"
                    seen.update(found for (found,) in conn.execute(sql, chunk))
                batch = new_rows(rows, seen)
                funds = {a: self._funds(conn, a, gateway_id) for a in {r.account_id for r in batch}}
                if missing := sorted(a for a, f in funds.items() if f is None):
                    raise RowRejected(f"ledger rows for unknown accounts {missing}")
                batch = allocate(batch, funds)  # type: ignore[arg-type]
                batch = budgets.sqlite_charge(conn, batch, gateway_id, now_us() - self.ttl)
                conn.executemany(  # one C loop: the worker holds the GIL as little as it can
                    f"INSERT INTO ledger ({LEDGER_COLUMNS}) VALUES ({','.join('?' * 15)})",
                    [ledger_values(row) for row in batch],
                )
                money, taken = charges(batch)
                conn.executemany(  # fixed order: no lock-order deadlocks
                    "UPDATE accounts SET balance = balance - ?, spent = spent + ?,"
                    " uncharged = uncharged + ? WHERE id = ?",
                    [(money[a][0], money[a][0], money[a][1], a) for a in sorted(money)],
                )
                if gateway_id is not None:
                    self._shrink_leases(conn, gateway_id, taken)
                outbox.sqlite_ledger(conn, batch, now_us())  # webhooks: in this transaction
        except (sqlite3.IntegrityError, OverflowError) as exc:
            raise RowRejected(str(exc)) from exc
        return batch

    def _funds(self, conn: sqlite3.Connection, account_id: str, gateway_id: str | None) -> Funds:
        cutoff = now_us() - self.ttl
        row = conn.execute(
            "SELECT a.balance, COALESCE((SELECT l.amount FROM leases l JOIN gateways g"
            " ON g.id = l.gateway_id WHERE l.account_id = a.id AND l.gateway_id = ?"
            f" AND g.seen_at >= ?), 0), {live_leases('?')} FROM accounts a WHERE a.id = ?",
            (gateway_id or "", cutoff, cutoff, account_id),
        ).fetchone()
        return None if row is None else Funds(*row)  # type: ignore[return-value]

    async def dead_letter(self, row: LedgerRow, error: str) -> None:
        """Keep a row the ledger refused, whole, for the audit (a repeat is a no-op)."""

        def _dead(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                conn.execute(
                    "INSERT INTO dead_letters (request_id, account_id, row_json, error,"
                    " created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                    (row.request_id, row.account_id, dead_letter_json(row), error[:2000], now_us()),
                )

        await self._run(_dead)

    async def audit_data(self) -> AuditData:
        """Read in one transaction, so every figure the audit compares is from one moment."""

        def _read(conn: sqlite3.Connection) -> AuditData:
            with self._write(conn):  # BEGIN IMMEDIATE: no writer moves the figures under us
                cutoff = now_us() - self.ttl
                accounts = [Account(*r) for r in conn.execute(_ACCOUNT_SELECT, (cutoff,))]
                grants = dict(conn.execute(GRANTS_SQL))
                ledger = {
                    r[0]: tuple(r[1:])
                    for r in conn.execute(
                        "SELECT account_id, COUNT(*), SUM(cost), SUM(uncharged), SUM(estimated)"
                        " FROM ledger GROUP BY 1"
                    )
                }
                live: dict[str, int] = {}
                stale: dict[str, int] = {}
                for account_id, is_live, amount in conn.execute(
                    "SELECT l.account_id, COALESCE(g.seen_at >= ?, 0), SUM(l.amount)"
                    " FROM leases l LEFT JOIN gateways g ON g.id = l.gateway_id GROUP BY 1, 2",
                    (cutoff,),
                ):
                    (live if is_live else stale)[account_id] = amount
                dead = [
                    tuple(r)
                    for r in conn.execute(
                        "SELECT request_id, account_id, error FROM dead_letters ORDER BY created_at"
                    )
                ]
                key_budgets = tuple(budgets.sqlite_audit(conn, cutoff))
            return AuditData(accounts, grants, ledger, live, stale, dead, key_budgets)  # type: ignore[arg-type]

        return await self._run(_read)

    # ---- webhooks (bastion/store/outbox.py) -----------------------------------------

    async def update_account(
        self, name: str, *, alert_below: int | Unchanged | None = UNCHANGED
    ) -> Account:
        """Set the balance alert (None: off); setting it records no event by itself."""
        outbox.check_alert(alert_below)

        def _update(conn: sqlite3.Connection) -> Account:
            with self._write(conn):
                account = self._account(conn, name)
                if alert_below is not UNCHANGED:
                    conn.execute(
                        "UPDATE accounts SET alert_below = ? WHERE id = ?",
                        (alert_below, account.id),
                    )
            return self._account(conn, name)

        return await self._run(_update)

    async def add_event(self, event_id: str, type: str, data: dict[str, Any]) -> None:
        """Record an event for the webhook; a repeated ``event_id`` is a no-op (for as long
        as the event is kept: until a week after it was delivered or given up)."""
        row = outbox.checked_event(event_id, type, data, now_us())

        def _add(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                outbox.sqlite_insert(conn, [row])

        await self._run(_add)

    async def claim_events(
        self, claimer: str, limit: int, hold_us: int
    ) -> list[outbox.OutboxEvent]:
        """Up to ``limit`` due events, oldest first, held for ``claimer`` for ``hold_us``."""

        def _claim(conn: sqlite3.Connection) -> list[outbox.OutboxEvent]:
            if not outbox.sqlite_any_due(conn, now_us()):  # the usual answer, without a lock
                return []
            with self._write(conn):
                return outbox.sqlite_claim(conn, claimer, limit, hold_us, now_us())

        return await self._run(_claim)

    async def event_delivered(self, event_id: str) -> None:
        def _done(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                outbox.sqlite_delivered(conn, event_id, now_us())

        await self._run(_done)

    async def event_failed(
        self, event_id: str, claimer: str, error: str | None, retry_in_us: int | None
    ) -> None:
        """Retry after ``retry_in_us`` (None: give up); only while ``claimer`` holds it."""

        def _failed(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                outbox.sqlite_failed(conn, event_id, claimer, error, retry_in_us, now_us())

        await self._run(_failed)

    async def prune_events(self, keep_us: int) -> int:
        """Delete events delivered or given up more than ``keep_us`` ago; how many."""

        def _prune(conn: sqlite3.Connection) -> int:
            with self._write(conn):
                return outbox.sqlite_prune(conn, now_us() - keep_us)

        return await self._run(_prune)

    # ---- gateways -------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        def _snapshot(conn: sqlite3.Connection) -> Snapshot:
            keys = [api_key(r) for r in conn.execute(KEY_SELECT)]
            return Snapshot(keys={k.key_hash: k for k in keys})

        return await self._run(_snapshot)

    async def keys_changed(self, since_us: int) -> list[ApiKey]:
        """Keys created, changed or revoked at or after ``since_us`` (revoked included)."""

        def _changed(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(KEY_SELECT + "WHERE k.updated_at >= ?", (since_us,))
            return [api_key(r) for r in rows]

        return await self._run(_changed)

    async def heartbeat(self, gateway_id: str, seat: str = "") -> bool:
        """This gateway is alive; leases of gateways silent past the TTL are reclaimed.

        Returns whether the store still knew this gateway: False after it was reaped
        (its leases are gone) or on its first beat."""

        def _beat(conn: sqlite3.Connection) -> bool:
            now = now_us()
            with self._write(conn):
                known = self._touch(conn, gateway_id, now, seat)
                cutoff = now - self.ttl
                conn.execute(
                    "DELETE FROM leases WHERE gateway_id IN"
                    " (SELECT id FROM gateways WHERE seen_at < ?)",
                    (cutoff,),
                )
                conn.execute("DELETE FROM gateways WHERE seen_at < ?", (cutoff,))
            return known

        return await self._run(_beat)

    async def lease(self, gateway_id: str, account_id: str, want: int) -> tuple[int, int]:
        """Grant up to ``want`` of the account's unleased credit: (granted, still unleased)."""

        def _lease(conn: sqlite3.Connection) -> tuple[int, int]:
            now = now_us()
            with self._write(conn):
                self._touch(conn, gateway_id, now)
                row = conn.execute(
                    f"SELECT a.balance, {_LIVE_LEASES} FROM accounts a WHERE a.id = ?",
                    (now - self.ttl, account_id),
                ).fetchone()
                if row is None:
                    return 0, 0
                free = max(0, row[0] - row[1])
                grant = max(0, min(want, free))
                if grant:
                    conn.execute(
                        "INSERT INTO leases (gateway_id, account_id, amount) VALUES (?, ?, ?)"
                        " ON CONFLICT (gateway_id, account_id)"
                        " DO UPDATE SET amount = leases.amount + excluded.amount",
                        (gateway_id, account_id, grant),
                    )
            return grant, free - grant

        return await self._run(_lease)

    async def sync_lease(self, gateway_id: str, account_id: str, amount: int) -> int:
        """Agree with the gateway on one lease after a doubt: both become the smaller value."""

        def _sync(conn: sqlite3.Connection) -> int:
            with self._write(conn):
                row = conn.execute(
                    "SELECT amount FROM leases WHERE gateway_id = ? AND account_id = ?",
                    (gateway_id, account_id),
                ).fetchone()
                agreed = max(0, min(row[0] if row else 0, amount))
                if row is not None and agreed != row[0]:
                    conn.execute(
                        "UPDATE leases SET amount = ? WHERE gateway_id = ? AND account_id = ?",
                        (agreed, gateway_id, account_id),
                    )
            return agreed

        return await self._run(_sync)

    async def release(self, gateway_id: str, amounts: dict[str, int]) -> None:
        """Give leased credit back (never below zero)."""

        def _release(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                self._shrink_leases(conn, gateway_id, amounts)

        if amounts:
            await self._run(_release)

    # ---- key spend limits (bastion/store/budgets.py) ----------------------------------

    async def lease_key(
        self, gateway_id: str, key_id: str, period_start: int, want: int
    ) -> tuple[int, int]:
        """Grant up to ``want`` of what is left of the key's limit in the period (never
        more than limit − spent − the live leases): (granted, still unleased)."""

        def _lease(conn: sqlite3.Connection) -> tuple[int, int]:
            now = now_us()
            with self._write(conn):
                self._touch(conn, gateway_id, now)
                return budgets.sqlite_lease(
                    conn, gateway_id, key_id, period_start, want, now - self.ttl
                )

        return await self._run(_lease)

    async def release_keys(self, gateway_id: str, amounts: dict[tuple[str, int], int]) -> None:
        """Give leased key budget back (never below zero)."""

        def _release(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                budgets.sqlite_shrink(conn, gateway_id, amounts)

        if amounts:
            await self._run(_release)

    async def sync_key_lease(
        self, gateway_id: str, key_id: str, period_start: int, amount: int
    ) -> int:
        """``sync_lease`` for a key budget lease: both become the smaller value."""

        def _sync(conn: sqlite3.Connection) -> int:
            with self._write(conn):
                return budgets.sqlite_sync(conn, gateway_id, key_id, period_start, amount)

        return await self._run(_sync)

    async def key_budget(self, key_id: str, period_start: int) -> KeyBudget | None:
        """The key's budget for the period starting then; None if it was never used."""

        def _read(conn: sqlite3.Connection) -> KeyBudget | None:
            return budgets.sqlite_read(conn, key_id, period_start, now_us() - self.ttl)

        return await self._run(_read)

    async def retire(self, gateway_id: str) -> None:
        """A clean shutdown: every lease of this gateway goes back at once."""

        def _retire(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                conn.execute("DELETE FROM leases WHERE gateway_id = ?", (gateway_id,))
                conn.execute("DELETE FROM inflight WHERE gateway_id = ?", (gateway_id,))
                conn.execute("DELETE FROM gateways WHERE id = ?", (gateway_id,))

        await self._run(_retire)

    async def reclaim_seat(self, seat: str, gateway_id: str) -> list[Reclaimed]:
        """The gateways that held this seat before us are dead: their leases go back now."""

        def _reclaim(conn: sqlite3.Connection) -> list[Reclaimed]:
            with self._write(conn):
                gone = conn.execute(
                    "SELECT g.id, g.seen_at, COALESCE((SELECT SUM(amount) FROM leases l"
                    " WHERE l.gateway_id = g.id), 0) FROM gateways g WHERE seat = ? AND id <> ?",
                    (seat, gateway_id),
                ).fetchall()
                for gid, _, _ in gone:
                    conn.execute("DELETE FROM leases WHERE gateway_id = ?", (gid,))
                    conn.execute("DELETE FROM gateways WHERE id = ?", (gid,))
            return [Reclaimed(*g) for g in gone]

        return await self._run(_reclaim)

    async def checkpoint(self, gateway_id: str, rows: list[LedgerRow], gone: list[str]) -> None:
        """Record this gateway's streams in flight (upsert ``rows``, drop ``gone`` ids)."""

        def _save(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                conn.executemany(
                    "DELETE FROM inflight WHERE gateway_id = ? AND request_id = ?",
                    [(gateway_id, rid) for rid in gone],
                )
                conn.executemany(
                    f"INSERT INTO inflight ({CHECKPOINT_COLUMNS}) VALUES ({','.join('?' * 10)})"
                    " ON CONFLICT (request_id) DO UPDATE SET input_tokens = excluded.input_tokens,"
                    " output_tokens = excluded.output_tokens, cost = excluded.cost",
                    [checkpoint_values(gateway_id, r) for r in rows],
                )

        if rows or gone:
            await self._run(_save)

    async def reclaim_checkpoints(self) -> list[LedgerRow]:
        """Charge the checkpointed streams of gateways that are gone; returns the new rows."""

        def _found(conn: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
            found = conn.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM inflight i WHERE NOT EXISTS"
                " (SELECT 1 FROM gateways g WHERE g.id = i.gateway_id) LIMIT 1000"
            ).fetchall()
            return found, budgets.sqlite_resets(conn, {r[3] for r in found})

        def _drop(conn: sqlite3.Connection, ids: list[str]) -> None:
            with self._write(conn):
                conn.executemany("DELETE FROM inflight WHERE request_id = ?", [(i,) for i in ids])

        found, resets = await self._run(_found)
        if not found:
            return []
        rows = budgets.attribute([checkpoint_row(r) for r in found], resets)
        written = await self.write_ledger(rows)
        await self._run(_drop, [r[0] for r in found])
        return written

    @staticmethod
    def _touch(conn: sqlite3.Connection, gateway_id: str, now: int, seat: str = "") -> bool:
        """Stamp the gateway as seen; False if it was not known."""
        updated = conn.execute("UPDATE gateways SET seen_at = ? WHERE id = ?", (now, gateway_id))
        if updated.rowcount:
            return True
        conn.execute(
            "INSERT INTO gateways (id, seen_at, seat) VALUES (?, ?, ?)", (gateway_id, now, seat)
        )
        return False

    @staticmethod
    def _shrink_leases(conn: sqlite3.Connection, gateway_id: str, amounts: dict[str, int]) -> None:
        for account_id in sorted(amounts):
            conn.execute(
                "UPDATE leases SET amount = CASE WHEN amount > ? THEN amount - ? ELSE 0 END"
                " WHERE gateway_id = ? AND account_id = ?",
                (amounts[account_id], amounts[account_id], gateway_id, account_id),
            )
        conn.execute("DELETE FROM leases WHERE gateway_id = ? AND amount <= 0", (gateway_id,))
