"""The store: accounts, credit grants, API keys and the ledger, behind one async interface.

The gateway never waits on it per request: it keeps keys in memory (``snapshot``,
then ``keys_changed``), admits against leased credit (``lease``), and writes settled
requests in batches (``write_ledger``). The CLI and the admin API call the rest.
``open_store(url)`` picks the backend by URL. Ids are made in Python and timestamps
are integer microseconds since the epoch, so one migration history serves SQLite
and PostgreSQL alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from bastion.store.outbox import OutboxEvent
from bastion.store.refusals import Refusal


class StoreError(ValueError):
    """A refused operation (unknown account, duplicate name, overdraft); message is for humans."""


class NotFound(StoreError):
    """No account or key by that name or id."""


class Conflict(StoreError):
    """The operation clashes with the current state (a duplicate name, leased credit)."""


@dataclass(frozen=True)
class Account:
    id: str  # "acct_…"
    name: str
    balance: int  # nano-dollars: credits granted − spent
    spent: int  # nano-dollars collected: Σ (ledger.cost − ledger.uncharged)
    reserved: int  # nano-dollars leased by running gateways (requests in flight + headroom)
    created_at: int  # µs since epoch
    uncharged: int = 0  # nano-dollars served but never collected: Σ ledger.uncharged
    alert_below: int | None = None  # nano-dollars: account.balance_low below it; None: off
    replayed: bool = field(default=False, kw_only=True, compare=False)
    """Not stored. ``credit_account`` under an idempotency key already used for the same
    top-up: nothing was applied, this is the account as the first answer gave it."""


@dataclass(frozen=True)
class ApiKey:
    id: str  # "key_…"
    account_id: str
    account_name: str
    name: str  # operator's label
    prefix: str  # first 12 characters of the key, for recognition ("qbt_AbCdEfGh")
    key_hash: str  # hex SHA-256 of the whole key
    rpm: int | None  # None: the config default; 0: unlimited
    tpm: int | None
    revoked: bool
    created_at: int
    spend_limit: int | None = None  # nano-dollars per period; None: no limit
    limit_reset: str = "never"  # the period: bastion.periods.RESETS
    expires_at: int | None = None  # µs since epoch; refused from then on; None: never
    models: frozenset[str] | None = None  # client-facing model ids it may use; None: all


class Unchanged(Enum):
    """The type of ``UNCHANGED``: lets type checkers tell it from ``None`` ("clear")."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED
"""``update_key``'s default for a field that may be set to ``None``: leave it as it is."""


@dataclass(slots=True)  # not frozen: made once per request, and frozen init costs ~2 µs
class LedgerRow:
    request_id: str  # the x-request-id; primary key, so a row is written at most once
    account_id: str
    key_id: str
    model: str  # client-facing model id
    endpoint: str  # "responses" | "chat"
    input_tokens: int
    output_tokens: int
    cost: int  # nano-dollars: always the exact price of the row's tokens
    estimated: bool
    status: str  # HTTP status the client got ("200", "502", …) or "cancelled"
    created_at: int
    cached_input_tokens: int = 0  # part of input_tokens, at the cached-input price
    reasoning_tokens: int = 0  # part of output_tokens (recorded, not charged twice)
    uncharged: int = 0  # the part of cost the account could not cover (set by the store)
    key_period: int | None = None
    """µs: start of the key's spend-limit period the request was admitted in, whose
    budget its cost counts against (0008_key_budgets.sql); None: the key had no limit."""
    leased: int = 0
    """Not stored. Going in: how much of ``cost`` the writing gateway's lease backs.
    Coming back from ``write_ledger``: how much was taken from that lease."""
    key_leased: int = 0
    """Not stored. ``leased`` for the key's budget lease (rows with a ``key_period``)."""


@dataclass(frozen=True)
class UsageTotal:
    """Ledger rows summed per group (``usage_totals``); a field not grouped by is None."""

    day: int | None  # µs since epoch: 00:00 UTC of the day
    model: str | None
    key_id: str | None
    account_id: str | None
    requests: int
    input_tokens: int
    cached_input_tokens: int  # part of input_tokens
    output_tokens: int
    cost: int  # nano-dollars
    uncharged: int  # nano-dollars: the part of cost never collected


@dataclass(frozen=True)
class Snapshot:
    """What a gateway caches: every non-revoked key by hash."""

    keys: dict[str, ApiKey]  # key_hash -> key


class Store(Protocol):
    async def migrate(self) -> None: ...
    async def close(self) -> None: ...

    # operators (CLI, admin API)
    async def create_account(self, name: str, credit: int = 0) -> Account: ...
    async def credit_account(
        self, name: str, amount: int, idempotency_key: str | None = None
    ) -> Account: ...
    async def get_account(self, name: str) -> Account: ...
    async def list_accounts(self) -> list[Account]: ...
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
    ) -> tuple[ApiKey, str]: ...
    async def list_keys(self, account: str | None = None) -> list[ApiKey]: ...
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
    ) -> ApiKey: ...
    async def key_spent(self, key_id: str, since_us: int) -> int: ...
    async def ledger_row(self, request_id: str) -> LedgerRow | None: ...
    async def revoke_key(self, key_id: str) -> ApiKey: ...
    async def usage(
        self,
        account: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        key_id: str | None = None,
    ) -> list[LedgerRow]: ...
    async def usage_totals(
        self,
        group_by: Sequence[str],
        account: str | None = None,
        key_id: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[UsageTotal]: ...
    async def audit_data(self) -> AuditData: ...
    async def add_refusals(self, rows: list[Refusal]) -> None: ...
    async def refusals(
        self, account: str | None = None, since_us: int | None = None, until_us: int | None = None
    ) -> list[Refusal]: ...

    # gateways: credit leases (see 0002_leases.sql) and the ledger
    async def snapshot(self) -> Snapshot: ...
    async def keys_changed(self, since_us: int) -> list[ApiKey]: ...
    async def heartbeat(self, gateway_id: str, seat: str = "") -> bool: ...
    async def reclaim_seat(self, seat: str, gateway_id: str) -> list[Reclaimed]: ...
    async def checkpoint(self, gateway_id: str, rows: list[LedgerRow], gone: list[str]) -> None: ...
    async def reclaim_checkpoints(self) -> list[LedgerRow]: ...
    async def lease(self, gateway_id: str, account_id: str, want: int) -> tuple[int, int]: ...
    async def release(self, gateway_id: str, amounts: dict[str, int]) -> None: ...
    async def sync_lease(self, gateway_id: str, account_id: str, amount: int) -> int: ...
    # key spend limits: leases on a key's budget for one period (see 0008_key_budgets.sql)
    async def lease_key(
        self, gateway_id: str, key_id: str, period_start: int, want: int
    ) -> tuple[int, int]: ...
    async def release_keys(self, gateway_id: str, amounts: dict[tuple[str, int], int]) -> None: ...
    async def sync_key_lease(
        self, gateway_id: str, key_id: str, period_start: int, amount: int
    ) -> int: ...
    async def key_budget(self, key_id: str, period_start: int) -> KeyBudget | None: ...
    async def retire(self, gateway_id: str) -> None: ...
    async def write_ledger(
        self, rows: list[LedgerRow], gateway_id: str | None = None
    ) -> list[LedgerRow]: ...
    async def dead_letter(self, row: LedgerRow, error: str) -> None: ...
    async def ping(self) -> None: ...

    # webhooks (bastion/store/outbox.py): events are recorded by write_ledger and
    # credit_account themselves; add_event records one from elsewhere (idempotent on id)
    async def update_account(
        self, name: str, *, alert_below: int | Unchanged | None = UNCHANGED
    ) -> Account: ...
    async def add_event(self, event_id: str, type: str, data: dict[str, Any]) -> None: ...
    async def claim_events(self, claimer: str, limit: int, hold_us: int) -> list[OutboxEvent]: ...
    async def event_delivered(self, event_id: str) -> None: ...
    async def event_failed(
        self, event_id: str, claimer: str, error: str | None, retry_in_us: int | None
    ) -> None: ...
    async def prune_events(self, keep_us: int) -> int: ...


@dataclass(frozen=True)
class Reclaimed:
    """A gateway that stopped without a clean shutdown, and the credit leases it held."""

    gateway_id: str
    seen_at: int  # µs since epoch: its last heartbeat
    leased: int  # nano-dollars given back


class RowRejected(StoreError):
    """The database refused a ledger batch for its data (a value out of range, a missing
    account), not for being unreachable: retrying the same batch cannot help."""


@dataclass(frozen=True)
class AuditData:
    """Everything ``bastion audit`` recomputes balances from, read in one snapshot."""

    accounts: list[Account]
    grants: dict[str, int]  # account id -> Σ credits.amount
    ledger: dict[str, tuple[int, int, int, int]]  # id -> (rows, Σ cost, Σ uncharged, estimated)
    leases: dict[str, int]  # account id -> Σ live leases
    stale_leases: dict[str, int]  # account id -> Σ leases of gateways past the TTL
    dead_letters: list[tuple[str, str, str]]  # (request_id, account_id, error)
    key_budgets: tuple[KeyBudget, ...] = ()  # every key's budget in every period it was used


@dataclass(frozen=True)
class KeyBudget:
    """A key's spend-limit budget for one period (0008_key_budgets.sql)."""

    key_id: str
    account_id: str
    period_start: int  # µs since epoch (0: the ``never`` period)
    limit: int | None  # the key's spend limit now; None: it has none any more
    limit_reset: str  # the key's period now
    spent: int  # nano-dollars counted in the period: seeded + its ledger rows' costs
    seeded: int  # what the ledger showed spent in the period when the budget opened
    over_limit: int  # the part of spent past the limit (costs no lease backed)
    leased: int  # Σ live gateways' leases on it
    ledger: int = 0  # Σ cost of the ledger rows counted in it (filled for the audit)


LEASE_TTL_US = 30_000_000
"""A gateway's leases count until 30 s after its last heartbeat, then are reclaimed."""


def open_store(url: str, lease_ttl_s: float = LEASE_TTL_US / 1e6) -> Store:
    """``sqlite:///rel.db`` / ``sqlite:////abs.db`` (SQLAlchemy form) or ``postgresql://…``.

    ``lease_ttl_s``: how long after its last heartbeat a gateway's leases still count;
    every replica and the CLI must use the same value (config ``lease_ttl_s``)."""
    ttl_us = int(lease_ttl_s * 1_000_000)
    if url.startswith("sqlite:"):
        from bastion.store.sqlite import SQLiteStore

        return SQLiteStore(url, ttl_us)
    if url.startswith(("postgresql:", "postgres:")):
        from bastion.store.postgres import PostgresStore

        return PostgresStore(url, lease_ttl_us=ttl_us)
    raise StoreError(f"unsupported database url {url!r}: use sqlite:///… or postgresql://…")
