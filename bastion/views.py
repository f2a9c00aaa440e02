"""The operator-facing JSON shapes, shared by the CLI's ``--json`` and the admin API.

One set of functions, so that ``bastion accounts show acme --json`` and
``GET /admin/v1/accounts/acme`` cannot drift apart. Money goes out as a decimal
string in USD, times as ISO 8601 UTC with a ``Z``, exact to the microsecond.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bastion.config import Config
from bastion.money import format_usd
from bastion.store import Account, ApiKey, LedgerRow, Refusal, UsageTotal

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
    """``spent`` is what was collected; ``uncharged`` what was served but never collected;
    ``alert_below`` the balance alert of the webhooks (null: off)."""
    return {
        "id": account.id,
        "name": account.name,
        "balance": format_usd(account.balance),
        "reserved": format_usd(account.reserved),
        "spent": format_usd(account.spent),
        "uncharged": format_usd(account.uncharged),
        "alert_below": None if account.alert_below is None else format_usd(account.alert_below),
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
        **key_controls(key),
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
        **key_controls(key),
        "revoked": key.revoked,
        "created_at": iso_time(key.created_at),
    }


def key_controls(key: ApiKey) -> dict[str, Any]:
    """Spend limit (USD per ``limit_reset`` period), expiry and model allow-list; null: none."""
    return {
        "limit": None if key.spend_limit is None else format_usd(key.spend_limit),
        "limit_reset": key.limit_reset,
        "expires_at": None if key.expires_at is None else iso_time(key.expires_at),
        "models": None if key.models is None else sorted(key.models),
    }


LAST_TIME_US = 253402300799999999
"""9999-12-31T23:59:59.999999Z in µs since the epoch: the last time an answer can show."""


def parse_expiry(text: str) -> int:
    """An expiry time, ISO 8601 (naive = UTC) -> µs since epoch; ValueError says why.

    One past 9999 in UTC is refused: no answer could show it (datetime ends there)."""
    try:
        expires_at = parse_since(text)
    except ValueError:
        raise ValueError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-01-31T00:00:00Z); 'none' clears it"
        ) from None
    if expires_at > LAST_TIME_US:
        raise ValueError(f"{text!r} is after 9999-12-31T23:59:59.999999Z")
    return expires_at


def check_models(names: Iterable[str], config: Config) -> frozenset[str]:
    """A model allow-list, every name in the config's catalogue, so a typo is refused
    here rather than found later as a key that cannot reach the model it was made for."""
    wanted = frozenset(name.strip() for name in names if name.strip())
    if not wanted:
        raise ValueError("name at least one model ('all' / null allows every model)")
    unknown = sorted(wanted - config.models.keys())
    if unknown:
        listed = ", ".join(repr(name) for name in unknown)
        known = ", ".join(config.models) or "none"
        raise ValueError(f"unknown model {listed}: the config's models are {known}")
    return wanted


def ledger_json(row: LedgerRow, names: dict[str, str]) -> dict[str, Any]:
    """A ledger row, with the account's name (``names``: id -> name) rather than its id.

    Each part sits next to its whole: ``cached_input_tokens`` is part of
    ``input_tokens``, ``reasoning_tokens`` of ``output_tokens``, ``uncharged`` of ``cost``.
    """
    return {
        "request_id": row.request_id,
        "account": names.get(row.account_id, row.account_id),
        "key_id": row.key_id,
        **row_fields(row),
    }


def row_fields(row: LedgerRow) -> dict[str, Any]:
    """What one request cost, as every view of a ledger row shows it (the admin API, the
    CLI, and the key holder's ``GET /v1/generation``)."""
    return {
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


USAGE_GROUPS = {"day": "day", "model": "model", "key": "key_id", "account": "account"}
"""What usage totals may be grouped by (``--group-by``, ``group_by=``), and the field
each one is in the JSON: ``key`` is ``key_id``, as in a ledger row."""

USAGE_TOTALS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "cost",
                "uncharged")  # fmt: skip


def parse_group_by(text: str) -> list[str]:
    """``day,model``: known fields, each once, in the order given; ValueError says why."""
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise ValueError(f"name at least one of {', '.join(USAGE_GROUPS)}")
    for field in fields:
        if field not in USAGE_GROUPS:
            raise ValueError(f"unknown field {field!r}: use {', '.join(USAGE_GROUPS)}")
        if fields.count(field) > 1:
            raise ValueError(f"{field!r} is named twice")
    return fields


def usage_totals_json(
    totals: Iterable[UsageTotal], group_by: Sequence[str], names: dict[str, str]
) -> list[dict[str, Any]]:
    """Totals per group: the group's fields first (day ``YYYY-MM-DD`` UTC, account by name,
    key by id), then the sums; sorted by the group's fields as shown."""
    out = []
    for t in totals:
        group = {
            "day": None if t.day is None else iso_time(t.day)[:10],
            "model": t.model,
            "key_id": t.key_id,
            "account": names.get(t.account_id or "", t.account_id),
        }
        sums = {
            "requests": t.requests,
            "input_tokens": t.input_tokens,
            "cached_input_tokens": t.cached_input_tokens,
            "output_tokens": t.output_tokens,
            "cost": format_usd(t.cost),
            "uncharged": format_usd(t.uncharged),
        }
        out.append({USAGE_GROUPS[g]: group[USAGE_GROUPS[g]] for g in group_by} | sums)
    return sorted(out, key=lambda item: [item[USAGE_GROUPS[g]] for g in group_by])


def ledger_fields() -> list[str]:
    """The fields of ``ledger_json``, in order: a CSV header even when no row matched."""
    return list(ledger_json(LedgerRow("", "", "", "", "", 0, 0, 0, False, "", 0), {}))


def csv_text(items: Iterable[dict[str, Any]], fields: Sequence[str]) -> str:
    """The JSON objects as CSV (RFC 4180: a header line, CRLF): the same fields and values,
    booleans as ``true``/``false``, null as an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(fields)
    for item in items:
        writer.writerow([_cell(item[f]) for f in fields])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
