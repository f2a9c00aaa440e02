"""The operator-facing JSON shapes, shared by the CLI's ``--json`` and the admin API.

One set of functions, so that ``bastion accounts show acme --json`` and
``GET /admin/v1/accounts/acme`` cannot drift apart. Money goes out as a decimal
string in USD, times as ISO 8601 UTC with a ``Z``, exact to the microsecond.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bastion.config import Config
from bastion.money import format_usd
from bastion.store import Account, ApiKey, LedgerRow, Refusal

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_time(us: int) -> str:
    """µs since epoch -> ISO 8601 UTC with a Z, exact to the microsecond."""
    moment = EPOCH + timedelta(microseconds=us)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_since(text: str) -> int:
    """ISO 8601 with or without offset (naive = UTC) -> µs since epoch.

    Raises ValueError with a message fit for an operator; each caller wraps it in
    its own refusal type (CLI error line, admin 400).
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r} (e.g. 2025-01-31T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


def effective_limits(key: ApiKey, config: Config) -> tuple[int, int]:
    """The limits a gateway applies: the key's override, else the config default."""
    rpm = config.ratelimit.default_rpm if key.rpm is None else key.rpm
    tpm = config.ratelimit.default_tpm if key.tpm is None else key.tpm
    return rpm, tpm


def new_account_json(account: Account) -> dict[str, Any]:
    """``accounts create`` / ``POST /accounts``: just what was made."""
    return {"id": account.id, "name": account.name, "balance": format_usd(account.balance)}


def account_json(account: Account) -> dict[str, Any]:
    """``spent`` is what was collected; ``uncharged`` what was served but never collected."""
    return {
        "id": account.id,
        "name": account.name,
        "balance": format_usd(account.balance),
        "reserved": format_usd(account.reserved),
        "spent": format_usd(account.spent),
        "uncharged": format_usd(account.uncharged),
    }


def new_key_json(key: ApiKey, plaintext: str, config: Config) -> dict[str, Any]:
    """``keys create`` / ``POST /keys``: the only shape that ever carries the key itself."""
    rpm, tpm = effective_limits(key, config)
    return {
        "id": key.id,
        "key": plaintext,
        "account": key.account_name,
        "name": key.name,
        "rpm": rpm,
        "tpm": tpm,
    }


def key_json(key: ApiKey, config: Config) -> dict[str, Any]:
    """A key as listed: its prefix for recognition, never the key or its hash."""
    rpm, tpm = effective_limits(key, config)
    return {
        "id": key.id,
        "account": key.account_name,
        "name": key.name,
        "prefix": key.prefix,
        "rpm": rpm,
        "tpm": tpm,
        "rpm_default": key.rpm is None,
        "tpm_default": key.tpm is None,
        "revoked": key.revoked,
        "created_at": iso_time(key.created_at),
    }


def ledger_json(row: LedgerRow, names: dict[str, str]) -> dict[str, Any]:
    """A ledger row, with the account's name (``names``: id -> name) rather than its id.

    Each part sits next to its whole: ``cached_input_tokens`` is part of
    ``input_tokens``, ``reasoning_tokens`` of ``output_tokens``, ``uncharged`` of ``cost``.
    """
    return {
        "request_id": row.request_id,
        "account": names.get(row.account_id, row.account_id),
        "key_id": row.key_id,
        "model": row.model,
        "endpoint": row.endpoint,
        "input_tokens": row.input_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "output_tokens": row.output_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "cost": format_usd(row.cost),
        "uncharged": format_usd(row.uncharged),
        "estimated": row.estimated,
        "status": row.status,
        "created_at": iso_time(row.created_at),
    }


def refusal_json(row: Refusal, names: dict[str, str]) -> dict[str, Any]:
    """Refusals of one kind summed over the window; ``account``/``key_id`` null: no key known."""
    return {
        "account": names.get(row.account_id, row.account_id) if row.account_id else None,
        "key_id": row.key_id or None,
        "status": row.status,
        "code": row.code,
        "count": row.count,
        "last_at": iso_time(row.last_at),
    }
