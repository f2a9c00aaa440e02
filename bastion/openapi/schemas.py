"""components/schemas of the admin API's document: what ``views`` and ``audit`` answer,
and the request bodies the handlers accept.

Answers are closed objects (every field required, no others), so a field added to
``views`` without a schema fails the tests that validate real answers against these.
Request bodies are closed too, because the handlers refuse unknown fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bastion.money import format_usd
from bastion.periods import RESETS
from bastion.store.common import BIGINT_MAX
from bastion.views import USAGE_GROUPS, USAGE_TOTALS, ledger_fields

Schema = dict[str, Any]

MONEY = r"^-?[0-9]+\.[0-9]{2,9}$"
"""USD as ``format_usd`` writes it: at least two decimals, at most nine (a nano-dollar)."""
MONEY_IN = r"^-?[0-9]+(\.[0-9]{1,9})?$"
"""USD as a client should send it (the gateway also takes whatever Decimal reads)."""
TIME = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$"
"""ISO 8601 UTC with a Z, exact to the microsecond (``views.iso_time``)."""

STRING: Schema = {"type": "string"}
COUNT: Schema = {"type": "integer", "minimum": 0}
BOOLEAN: Schema = {"type": "boolean"}
TIME_IN: Schema = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601; without an offset it is UTC.",
}
LIMIT_IN: Schema = {
    "type": "integer",
    "minimum": 0,
    "maximum": BIGINT_MAX,
    "description": "Per minute; 0: unlimited.",
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(schema: Schema) -> Schema:
    return {"type": "array", "items": schema}


def obj(properties: dict[str, Schema], required: Iterable[str] | None = None) -> Schema:
    """A closed object: the fields listed (all required unless said), no others."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }


MONEY_FIELDS = "balance reserved spent uncharged cost expected_balance credits leased stale_leases"
COUNT_FIELDS = "rpm tpm requests rows estimated_rows dead_letters count"  # and every *_tokens
FLAG_FIELDS = "ok revoked estimated rpm_default tpm_default"
TIME_FIELDS = "created_at last_at"


def usual(name: str) -> Schema:
    """The schema of a field by its name: the answers use each name for one kind of value."""
    if name in MONEY_FIELDS.split():
        return ref("Money")
    if name in COUNT_FIELDS.split() or name.endswith("_tokens"):
        return COUNT
    if name in FLAG_FIELDS.split():
        return BOOLEAN
    if name in TIME_FIELDS.split():
        return ref("Time")
    if name == "problems":
        return array(STRING)
    return STRING


def fields(names: str, **special: Schema) -> dict[str, Schema]:
    """``names`` (space-separated) with their usual schema, then the ``special`` ones."""
    return {name: usual(name) for name in names.split()} | special


def schemas(models: tuple[str, ...]) -> dict[str, Schema]:
    """Every schema by name; ``models``: the config's model ids, all a key may be limited to."""
    controls = {
        "limit": nullable(ref("Money")),
        "limit_reset": {"enum": list(RESETS)},
        "expires_at": nullable(ref("Time")),
        "models": nullable(array(STRING)),
    }
    controls_in = {
        "limit": nullable(ref("MoneyInput")),
        "limit_reset": {"enum": list(RESETS)},
        "expires_at": nullable(TIME_IN),
        "models": nullable(array({"enum": list(models)}) | {"minItems": 1}),
    }
    sums = fields(" ".join(USAGE_TOTALS))
    groups = fields("model key_id account", day={"type": "string", "format": "date"})
    text_or_null = {"type": ["string", "null"]}
    return {
        "Money": {"type": "string", "pattern": MONEY, "examples": ["0.50"]},
        "MoneyInput": {
            "type": "string",
            "pattern": MONEY_IN,
            "examples": ["10.00"],
            "description": f"USD, at most {format_usd(BIGINT_MAX)} either way; JSON numbers"
            " are refused (a float is not exact money).",
        },
        "Time": {"type": "string", "format": "date-time", "pattern": TIME},
        "Error": obj({"error": obj(fields("message type code", param=text_or_null))}),
        "NewAccount": obj(fields("id name balance")),
        "Account": obj(
            fields("id name balance reserved spent uncharged", alert_below=nullable(ref("Money")))
        ),
        "NewKey": obj(fields("id key account name rpm tpm", **controls)),
        "Key": obj(
            fields("id account name prefix rpm tpm rpm_default tpm_default", **controls)
            | fields("revoked created_at")
        ),
        "LedgerRow": obj(
            fields(" ".join(ledger_fields()), endpoint={"enum": ["responses", "chat"]})
        ),
        "UsageTotals": obj(
            {field: groups[field] for field in USAGE_GROUPS.values()} | sums,
            required=sums,  # the group's fields are those named in group_by
        ),
        "Refusal": obj(
            fields(
                "code count last_at",
                account=text_or_null,
                key_id=text_or_null,
                status={"type": "integer"},
            )
        ),
        "AuditAccount": obj(
            fields(
                "name id balance expected_balance credits spent uncharged rows estimated_rows"
                " leased stale_leases dead_letters problems"
            )
        ),
        "AuditReport": obj(
            fields("ok problems uncharged dead_letters", accounts=array(ref("AuditAccount")))
        ),
        "AccountCreate": obj(
            {"name": {"type": "string", "minLength": 1}, "credit": ref("MoneyInput")},
            required=["name"],
        ),
        "AccountUpdate": obj({"alert_below": nullable(ref("MoneyInput"))}),
        "Credit": obj({"amount": ref("MoneyInput")}),
        "KeyCreate": obj(
            fields("account", name=text_or_null, rpm=nullable(LIMIT_IN), tpm=nullable(LIMIT_IN))
            | controls_in,
            required=["account"],
        ),
        "KeyUpdate": obj({"rpm": LIMIT_IN, "tpm": LIMIT_IN, **controls_in}, required=[])
        | {"minProperties": 1},
    }
