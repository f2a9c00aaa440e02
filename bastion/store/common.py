"""What the SQLite and PostgreSQL stores share: the queries' common text and the row shapes.

The two backends differ only in placeholders (``?`` against ``$1``) and drivers, so
the SELECT lists, column orders and row conversions live here once.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from bastion.money import format_usd
from bastion.periods import RESETS
from bastion.store import (
    UNCHANGED,
    Account,
    ApiKey,
    Conflict,
    LedgerRow,
    RowRejected,
    StoreError,
    Unchanged,
)

# The most a BIGINT column holds: a row beyond it is refused before it reaches the driver.
BIGINT_MAX = 2**63 - 1


def check_credit(account: Account, amount: int) -> None:
    """Refuse a take-back past the unleased balance, and a grant past what 64 bits hold.

    SQLite would store a larger sum as a float and PostgreSQL would fail the statement:
    either way the ledger would no longer add up, so the credit is refused before it."""
    name = account.name
    if account.balance - account.reserved + amount < 0:
        held = f" ({format_usd(account.reserved)} USD held by running gateways)"
        raise Conflict(
            f"cannot take back {format_usd(-amount)} USD from {name!r}: "
            f"its balance is {format_usd(account.balance)} USD"
            + (held if account.reserved else "")
        )
    if account.balance + amount > BIGINT_MAX:
        raise Conflict(
            f"cannot add {format_usd(amount)} USD to {name!r}: the balance would pass the "
            f"largest balance a ledger holds ({format_usd(BIGINT_MAX)} USD)"
        )

KEY_SELECT = """
SELECT k.id, k.account_id, a.name, k.name, k.prefix, k.key_hash, k.rpm, k.tpm,
       k.revoked, k.created_at, k.spend_limit, k.limit_reset, k.expires_at, k.models
FROM api_keys k JOIN accounts a ON a.id = k.account_id
"""

LEDGER_COLUMNS = (
    "request_id, account_id, key_id, model, endpoint, input_tokens, output_tokens,"
    " cost, estimated, status, created_at, cached_input_tokens, reasoning_tokens, uncharged,"
    " key_period"
)


def live_leases(cutoff: str) -> str:
    """Σ leases of gateways seen since ``cutoff`` (a placeholder) for account ``a``."""
    return f"""COALESCE((SELECT SUM(l.amount) FROM leases l
                 JOIN gateways g ON g.id = l.gateway_id
                 WHERE l.account_id = a.id AND g.seen_at >= {cutoff}), 0)"""


def account_select(cutoff: str, cast: str = "") -> str:
    return f"""
SELECT a.id, a.name, a.balance, a.spent, {live_leases(cutoff)}{cast}, a.created_at,
       a.uncharged, a.alert_below
FROM accounts a
"""


def now_us() -> int:
    return time.time_ns() // 1000


def new_id(prefix: str) -> str:
    """Ids are made here, not by the database, so the SQL stays portable."""
    return prefix + secrets.token_hex(6)


def check_limits(rpm: int | None, tpm: int | None) -> None:
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 0:
            raise StoreError(f"{label} must be 0 (unlimited) or positive, got {value}")


def check_account_name(name: str) -> None:
    """A name an operator can type and every store can hold and compare."""
    if not name or not name.strip():
        raise StoreError("account name must not be empty")
    if name != name.strip():
        raise StoreError(f"account name {name!r} has leading or trailing spaces")
    check_text(name, "account name")


def check_text(value: str, what: str) -> None:
    """PostgreSQL can neither store nor look up text with a NUL character; refused on
    every store alike, so a name that works on SQLite does not fail later on PostgreSQL."""
    if "\x00" in value:
        raise StoreError(f"{what} {value!r} contains a NUL character")


def check_key_fields(
    spend_limit: int | Unchanged | None,
    limit_reset: str | None,
    expires_at: int | Unchanged | None,
    models: frozenset[str] | Unchanged | None,
) -> None:
    """Refuse values the gateway could not enforce, before they reach the database."""
    if isinstance(spend_limit, int) and not 0 <= spend_limit <= BIGINT_MAX:
        raise StoreError(f"the spend limit must be 0 or positive, got {spend_limit}")
    if limit_reset is not None and limit_reset not in RESETS:
        raise StoreError(f"unknown limit reset {limit_reset!r}: use one of {', '.join(RESETS)}")
    if isinstance(expires_at, int) and not 0 <= expires_at <= BIGINT_MAX:
        raise StoreError(f"expires_at must be µs since the epoch, got {expires_at}")
    if isinstance(models, frozenset):
        if not models:
            raise StoreError("a model list must name at least one model (None allows all)")
        if not all(isinstance(m, str) and m for m in models):
            raise StoreError("model names must be non-empty strings")
        for model in models:
            check_text(model, "model name")


def key_changes(
    rpm: int | None,
    tpm: int | None,
    spend_limit: int | Unchanged | None,
    limit_reset: str | None,
    expires_at: int | Unchanged | None,
    models: frozenset[str] | Unchanged | None,
) -> dict[str, Any]:
    """The api_keys columns an ``update_key`` call sets, as stored (None: "unchanged"
    for rpm, tpm and limit_reset; ``UNCHANGED`` for the fields that may be cleared)."""
    changes: dict[str, Any] = {}
    if rpm is not None:
        changes["rpm"] = rpm
    if tpm is not None:
        changes["tpm"] = tpm
    if spend_limit is not UNCHANGED:
        changes["spend_limit"] = spend_limit
    if limit_reset is not None:
        changes["limit_reset"] = limit_reset
    if expires_at is not UNCHANGED:
        changes["expires_at"] = expires_at
    if models is not UNCHANGED:
        changes["models"] = models_text(models)
    return changes


def models_text(models: frozenset[str] | None) -> str | None:
    """A model allow-list as stored: a sorted JSON array, or NULL for "all models"."""
    return None if models is None else json.dumps(sorted(models))


def api_key(row: tuple[Any, ...]) -> ApiKey:
    (kid, account_id, account_name, name, prefix, key_hash, rpm, tpm, revoked, created,
     spend_limit, limit_reset, expires_at, models) = row  # fmt: skip
    return ApiKey(
        id=kid,
        account_id=account_id,
        account_name=account_name,
        name=name,
        prefix=prefix,
        key_hash=key_hash,
        rpm=rpm,
        tpm=tpm,
        revoked=bool(revoked),
        created_at=created,
        spend_limit=spend_limit,
        limit_reset=limit_reset,
        expires_at=expires_at,
        models=None if models is None else frozenset(json.loads(models)),
    )


def ledger_values(row: LedgerRow) -> tuple[Any, ...]:
    return (
        row.request_id, row.account_id, row.key_id, row.model, row.endpoint,
        row.input_tokens, row.output_tokens, row.cost, int(row.estimated), row.status,
        row.created_at, row.cached_input_tokens, row.reasoning_tokens, row.uncharged,
        row.key_period,
    )  # fmt: skip


def ledger_row(row: tuple[Any, ...]) -> LedgerRow:
    values = list(row)
    values[8] = bool(values[8])  # estimated
    return LedgerRow(*values)


CHECKPOINT_COLUMNS = (
    "request_id, gateway_id, account_id, key_id, model, endpoint, input_tokens,"
    " output_tokens, cost, created_at"
)


def checkpoint_values(gateway_id: str, row: LedgerRow) -> tuple[Any, ...]:
    return (
        row.request_id, gateway_id, row.account_id, row.key_id, row.model, row.endpoint,
        row.input_tokens, row.output_tokens, row.cost, row.created_at,
    )  # fmt: skip


def checkpoint_row(values: tuple[Any, ...]) -> LedgerRow:
    """A checkpoint of a dead gateway's stream, as the ledger row it becomes: what was
    streamed at the last checkpoint, estimated, cancelled (the client was cut off)."""
    rid, _gateway, account, key, model, endpoint, inp, out, cost, created = values
    return LedgerRow(rid, account, key, model, endpoint, inp, out, cost, True, "cancelled", created)


def dead_letter_json(row: LedgerRow) -> str:
    """A refused row, whole, as text (huge integers included): nothing served is lost."""
    import json
    from dataclasses import asdict

    return json.dumps(asdict(row), sort_keys=True)


def new_rows(rows: list[LedgerRow], existing: set[str]) -> list[LedgerRow]:
    """The rows not yet in the ledger, first of a repeated request id, in request-id order
    (so two replicas writing overlapping batches lock in the same order)."""
    unique: dict[str, LedgerRow] = {}
    for row in rows:
        if row.request_id not in existing:
            unique.setdefault(row.request_id, row)
    return [unique[rid] for rid in sorted(unique)]


def check_row(row: LedgerRow) -> None:
    """Refuse a row no ledger column can hold, before it can poison a whole batch."""
    numbers = (
        row.input_tokens, row.output_tokens, row.cost, row.created_at,
        row.cached_input_tokens, row.reasoning_tokens, row.uncharged,
    )  # fmt: skip
    if max(numbers) > BIGINT_MAX or min(numbers) < -BIGINT_MAX:
        raise RowRejected(f"ledger row {row.request_id}: a number is out of range: {numbers}")


@dataclass(slots=True)
class Funds:
    """One account at write time: its balance, this gateway's live lease, all live leases."""

    balance: int
    own_lease: int
    live_leases: int

    @property
    def unleased(self) -> int:
        return max(0, self.balance - self.live_leases)


def allocate(rows: list[LedgerRow], funds: dict[str, Funds]) -> list[LedgerRow]:
    """Decide what each new row collects, so that no balance ever goes below zero.

    A row's cost is paid first from the writing gateway's live lease (up to what the
    gateway says the lease backs, ``row.leased``), then from credit nobody has leased;
    what is still missing is ``uncharged``. The balance therefore never drops below
    the live leases, which never exceed it. Returns the rows as stored, with ``leased``
    = what was taken from the lease. ``funds`` is updated in place.
    """
    out = []
    for row in rows:
        f = funds[row.account_id]
        from_lease = min(row.leased, f.own_lease, row.cost)
        f.own_lease -= from_lease
        f.live_leases -= from_lease
        f.balance -= from_lease
        rest = row.cost - from_lease
        from_free = min(rest, f.unleased)
        f.balance -= from_free
        if row.uncharged != rest - from_free or row.leased != from_lease:
            row = replace(row, uncharged=rest - from_free, leased=from_lease)
        out.append(row)
    return out


def charges(rows: list[LedgerRow]) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """Per account: (collected, uncharged), and what came out of the writer's lease."""
    money: dict[str, tuple[int, int]] = {}
    taken: dict[str, int] = {}
    for row in rows:
        collected, uncharged = money.get(row.account_id, (0, 0))
        money[row.account_id] = (collected + row.cost - row.uncharged, uncharged + row.uncharged)
        if row.leased:
            taken[row.account_id] = taken.get(row.account_id, 0) + row.leased
    return money, taken
