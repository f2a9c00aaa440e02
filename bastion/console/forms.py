"""The console's form fields, checked as the admin API checks its JSON fields.

A form sends strings; they are turned into the admin API's field values and go
through its checks (``parse_key_controls``), so the console and the API accept and
refuse the same things with the same messages. Every refusal is an ``APIError``
whose message the page shows; nothing is changed before all fields pass.
"""

from __future__ import annotations

import time
from typing import Any

from multidict import MultiMapping

from bastion.admin import parse_amount, parse_key_controls
from bastion.config import Config
from bastion.errors import APIError, invalid
from bastion.store import Conflict, NotFound, StoreError
from bastion.store.common import BIGINT_MAX

Form = MultiMapping[str]
_NONE = ("", "none", "never")


def text(form: Form, field: str) -> str:
    value = form.get(field, "")
    return value.strip() if isinstance(value, str) else ""


def amount(form: Form, field: str, label: str) -> int:
    """USD as typed: '10', '2.50', '-1' (a negative top-up takes credit back)."""
    value = text(form, field)
    if not value:
        raise invalid(f"Enter {label} in USD, e.g. 10.00.", field)
    return parse_amount(value, field)


def per_minute(form: Form, field: str) -> int | None:
    """A rate limit: blank is None (the default, or unchanged), else an integer ≥ 0."""
    value = text(form, field)
    if not value:
        return None
    if not value.isdigit() or int(value) > BIGINT_MAX:
        raise invalid(f"'{field}' must be a whole number ≥ 0 (0 = unlimited), or blank.", field)
    return int(value)


def key_controls(form: Form, config: Config) -> dict[str, Any]:
    """Spend limit, reset period, expiry and models, as ``Store.create_key`` and
    ``update_key`` take them: a blank limit or expiry is none, no model ticked is all."""
    body: dict[str, Any] = {
        "limit": optional(form, "limit"),
        "limit_reset": text(form, "limit_reset") or "never",
        "expires_at": optional(form, "expires_at"),
        "models": [m for m in form.getall("models", []) if isinstance(m, str)] or None,
    }
    return parse_key_controls(body, config)


def optional(form: Form, field: str) -> str | None:
    """Blank, 'none' or 'never': None (no limit, no expiry)."""
    value = text(form, field)
    return None if value.lower() in _NONE else value


def not_past(expires_at: int | None) -> None:
    """A new key that expired already could never be used: refuse it, as the API does."""
    if expires_at is not None and expires_at <= time.time_ns() // 1000:
        raise invalid("The expiry is in the past: the key could never be used.", "expires_at")


def refused(exc: StoreError) -> APIError:
    """The store's refusal as a page error: unknown is 404, a clash with the state 409."""
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
    return APIError(status, "refused", str(exc))
