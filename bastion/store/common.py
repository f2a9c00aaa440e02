"""What the SQLite and PostgreSQL stores share: the queries' common text and the row shapes.

The two backends differ only in placeholders (``?`` against ``$1``) and drivers, so
the SELECT lists, column orders and row conversions live here once.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from bastion.store import ApiKey, LedgerRow, StoreError

KEY_SELECT = """
SELECT k.id, k.account_id, a.name, k.name, k.prefix, k.key_hash, k.rpm, k.tpm,
       k.revoked, k.created_at
FROM api_keys k JOIN accounts a ON a.id = k.account_id
"""

LEDGER_COLUMNS = (
    "request_id, account_id, key_id, model, endpoint, input_tokens, output_tokens,"
    " cost, estimated, status, created_at"
)


def live_leases(cutoff: str) -> str:
    """Σ leases of gateways seen since ``cutoff`` (a placeholder) for account ``a``."""
    return f"""COALESCE((SELECT SUM(l.amount) FROM leases l
                 JOIN gateways g ON g.id = l.gateway_id
                 WHERE l.account_id = a.id AND g.seen_at >= {cutoff}), 0)"""


def account_select(cutoff: str, cast: str = "") -> str:
    return f"""
SELECT a.id, a.name, a.balance, a.spent, {live_leases(cutoff)}{cast}, a.created_at
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


def api_key(row: tuple[Any, ...]) -> ApiKey:
    kid, account_id, account_name, name, prefix, key_hash, rpm, tpm, revoked, created = row
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
    )


def ledger_values(row: LedgerRow) -> tuple[Any, ...]:
    return (
        row.request_id, row.account_id, row.key_id, row.model, row.endpoint,
        row.input_tokens, row.output_tokens, row.cost, int(row.estimated), row.status,
        row.created_at,
    )  # fmt: skip


def ledger_row(row: tuple[Any, ...]) -> LedgerRow:
    values = list(row)
    values[8] = bool(values[8])  # estimated
    return LedgerRow(*values)
