"""The paths of the admin API's document, from admin.py's route table.

admin.py's ``ROUTES`` says which routes exist, their handler and success status;
``OPERATIONS`` here adds what the table does not: the answer's schema, the error
statuses a handler can give, its body, query parameters and headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from bastion import __version__
from bastion.openapi.schemas import STRING, TIME_IN, Schema, array, ref, schemas
from bastion.store.idempotency import MAX_KEY_CHARS
from bastion.views import USAGE_GROUPS

Route = tuple[str, str, str, int]
"""One row of admin.py's ROUTES: method, path under the prefix, handler name, status."""


@dataclass(frozen=True)
class Op:
    """What the route table does not say about one operation."""

    tag: str
    summary: str
    answer: Schema
    errors: tuple[int, ...] = ()  # besides 401 and 500, which every route can answer
    body: str | None = None  # the request body's schema
    query: tuple[str, ...] = ()  # names in QUERY
    operation_id: str | None = None  # when the handler's name is taken
    csv: bool = False  # format=csv answers text/csv
    idempotent: bool = False  # takes Idempotency-Key, may answer idempotent-replayed
    links: tuple[str, ...] = ()  # operations taking the new object's name/id in their path


ALWAYS = (401, 500)
BODY_ERRORS = (400, 404, 413)

OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/accounts"): Op(
        "accounts",
        "Create an account",
        ref("NewAccount"),
        (400, 409, 413),
        body="AccountCreate",
        links=("show_account", "update_account", "credit_account"),
    ),
    ("GET", "/accounts"): Op("accounts", "List accounts, by name", array(ref("Account")), (400,)),
    ("GET", "/accounts/{name}"): Op("accounts", "Show an account", ref("Account"), (400, 404)),
    ("PATCH", "/accounts/{name}"): Op(
        "accounts",
        "Set or clear the balance alert",
        ref("Account"),
        BODY_ERRORS,
        body="AccountUpdate",
    ),
    ("POST", "/accounts/{name}/credit"): Op(
        "accounts",
        "Add credit, or take it back with a negative amount",
        ref("Account"),
        (400, 404, 409, 413),
        body="Credit",
        idempotent=True,
    ),
    ("POST", "/keys"): Op(
        "keys",
        "Create a key: the only answer that carries the key itself",
        ref("NewKey"),
        BODY_ERRORS,
        body="KeyCreate",
        links=("update_key", "revoke_key", "delete_key"),
    ),
    ("GET", "/keys"): Op(
        "keys",
        "List keys, of every account or of one",
        array(ref("Key")),
        (400, 404),
        query=("account",),
    ),
    ("PATCH", "/keys/{id}"): Op(
        "keys",
        "Change a key's limits (only the fields sent)",
        ref("Key"),
        BODY_ERRORS,
        body="KeyUpdate",
    ),
    ("POST", "/keys/{id}/revoke"): Op("keys", "Revoke a key (idempotent)", ref("Key"), (400, 404)),
    ("DELETE", "/keys/{id}"): Op(
        "keys", "Revoke a key (as POST …/revoke)", ref("Key"), (400, 404), operation_id="delete_key"
    ),
    ("GET", "/usage"): Op(
        "reports",
        "Ledger rows, or totals per group with group_by; CSV with format=csv",
        {"anyOf": [array(ref("LedgerRow")), array(ref("UsageTotals"))]},
        (400, 404),
        query=("account", "key", "since", "until", "group_by", "format"),
        csv=True,
    ),
    ("GET", "/refusals"): Op(
        "reports",
        "Refusal counts per account, key, status and code",
        array(ref("Refusal")),
        (400, 404),
        query=("account", "since", "until"),
    ),
    ("GET", "/audit"): Op(
        "reports",
        "The books audit: 200 whether or not problems are found (read ok)",
        ref("AuditReport"),
        (400, 404),
        query=("account",),
    ),
    ("GET", "/openapi.json"): Op(
        "meta", "This document", {"type": "object", "required": ["openapi", "info", "paths"]}
    ),
}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "schema": schema, "description": description}


GROUP = "|".join(USAGE_GROUPS)
QUERY: dict[str, Schema] = {
    "account": query("account", STRING, "Only this account, by name (404 if unknown)."),
    "key": query("key", STRING, "Only this key, by its full id (404 if unknown)."),
    "since": query("since", TIME_IN, "At or after this instant; a date alone is 00:00 UTC."),
    "until": query("until", TIME_IN, "Before this instant."),
    "group_by": query(
        "group_by",
        {"type": "string", "pattern": f"^({GROUP})(,({GROUP}))*$"},
        f"Totals per group instead of rows: any of {', '.join(USAGE_GROUPS)}, each once.",
    ),
    "format": query("format", {"enum": ["json", "csv"]}, "csv: the same fields as CSV."),
}

PATH: dict[str, str] = {"name": "The account's name.", "id": "The key's id (key_…)."}

IDEMPOTENCY_KEY: Schema = {
    "name": "Idempotency-Key",
    "in": "header",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
    "description": "A repeat of the same top-up under the same key (kept 7 days) is answered"
    " with the first answer, not applied again; the same key for another top-up is 409.",
}


def answer(description: str, schema: Schema) -> Schema:
    """A JSON answer; every answer carries x-request-id."""
    return {
        "description": description,
        "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/json": {"schema": schema}},
    }


ERRORS: dict[int, Schema] = {
    400: answer("A bad body, field, parameter or header; param names it.", ref("Error")),
    401: answer("No admin token, or a wrong one.", ref("Error"))
    | {
        "headers": {
            "x-request-id": {"$ref": "#/components/headers/RequestId"},
            "www-authenticate": {
                "required": True,
                "schema": {"const": 'Bearer realm="bastion-admin"'},
            },
        }
    },
    404: answer("No account or key by that name or id.", ref("Error")),
    409: answer(
        "Clashes with the current state: a taken name (conflict), a take-back past the"
        " balance (insufficient_balance), an Idempotency-Key used for another top-up"
        " (idempotency_key_reused).",
        ref("Error"),
    ),
    413: answer("The body is over server.max_body_bytes.", ref("Error")),
    500: answer(
        "The store failed; the message names the request id to look for in the log.", ref("Error")
    ),
}


def operation(route: Route, op: Op, targets: dict[str, str]) -> dict[str, Any]:
    """The OpenAPI operation object of one route; ``targets``: operationId -> its path."""
    _, path, handler, status = route
    success = answer("Done.", op.answer)
    if op.csv:
        success["content"]["text/csv"] = {"schema": {"type": "string"}}
    if op.idempotent:
        success["headers"]["idempotent-replayed"] = {
            "description": "A repeat under a used Idempotency-Key: the first answer, not applied.",
            "schema": {"const": "true"},
        }
    if op.links:
        success["links"] = {t: link(t, targets[t]) for t in op.links if t in targets}
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": PATH[name],
            "schema": {"type": "string", "minLength": 1},
        }
        for name in re.findall(r"{(\w+)}", path)
    ]
    parameters += [QUERY[name] for name in op.query]
    if op.idempotent:
        parameters.append(IDEMPOTENCY_KEY)
    result: dict[str, Any] = {
        "operationId": op.operation_id or handler,
        "tags": [op.tag],
        "summary": op.summary,
        "parameters": parameters,
        "responses": {str(status): success}
        | {str(code): ERRORS[code] for code in sorted({*op.errors, *ALWAYS})},
    }
    if op.body is not None:
        body = {"application/json": {"schema": ref(op.body)}}
        result["requestBody"] = {"required": True, "content": body}
    return result


def link(target: str, path: str) -> Schema:
    """A link to the operation taking the new object's name or id in its path."""
    (name,) = re.findall(r"{(\w+)}", path)
    return {"operationId": target, "parameters": {name: f"$response.body#/{name}"}}


@cache
def admin_document(
    routes: tuple[Route, ...], prefix: str, models: tuple[str, ...]
) -> dict[str, Any]:
    """The document of ``routes`` (admin.py's ROUTES) under ``prefix``; ``models``: the
    config's model ids, the values a key's ``models`` may take. Shared: do not modify.

    A route missing from OPERATIONS is left out rather than refused, so the gateway still
    starts and the test comparing the document with the router names the route."""
    documented = [(route, OPERATIONS[route[:2]]) for route in routes if route[:2] in OPERATIONS]
    targets = {op.operation_id or route[2]: route[1] for route, op in documented}
    paths: dict[str, dict[str, Any]] = {}
    for route, op in documented:
        method, path = route[:2]
        paths.setdefault(prefix + path, {})[method.lower()] = operation(route, op, targets)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Bastion admin API",
            "version": __version__,
            "description": "Accounts, keys, credit and reports of a Bastion gateway. Money is"
            " a decimal string in USD, times are ISO 8601 UTC, and every error is the OpenAI"
            " error object. Served only when the gateway has an admin token.",
        },
        "security": [{"adminToken": []}],
        "tags": [{"name": tag} for tag in ("accounts", "keys", "reports", "meta")],
        "paths": paths,
        "components": {
            "schemas": schemas(models),
            "headers": {
                "RequestId": {"required": True, "schema": {"type": "string", "pattern": "^req_"}}
            },
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The gateway's BASTION_ADMIN_TOKEN (or [admin] token).",
                }
            },
        },
    }
