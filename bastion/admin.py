"""The admin HTTP API (docs/admin.md): the CLI's operations under ``/admin/v1/…``.

It exists so an operator's tooling can manage accounts and keys without shell
access to a machine holding the database URL. Same operations, same JSON shapes as
``bastion … --json`` (both render through ``bastion.views``), same store calls; a
change reaches every gateway at its next snapshot refresh, as a CLI change does.

Off unless ``BASTION_ADMIN_TOKEN`` (or ``[admin] token``) is set: then the routes
are not even registered and the gateway's catch-all answers 404. Errors are the
OpenAI error object, like the rest of the gateway; see docs/admin.md for the table.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web

from bastion.answers import error_response, json_response
from bastion.app import Gateway
from bastion.audit import run_audit
from bastion.config import Config
from bastion.errors import APIError, invalid
from bastion.money import MoneyError, format_usd, parse_usd
from bastion.openapi import admin_document
from bastion.periods import RESETS
from bastion.store import UNCHANGED, Conflict, NotFound, StoreError
from bastion.store.common import BIGINT_MAX
from bastion.store.idempotency import KeyReused, check_key
from bastion.views import (
    USAGE_GROUPS,
    USAGE_TOTALS,
    account_json,
    check_models,
    csv_text,
    key_json,
    ledger_fields,
    ledger_json,
    new_account_json,
    new_key_json,
    parse_expiry,
    parse_group_by,
    parse_since,
    refusal_json,
    usage_totals_json,
)

log = logging.getLogger("bastion.admin")

PREFIX = "/admin/v1"

KEY_CONTROLS = ("limit", "limit_reset", "expires_at", "models")
"""A key's fields besides its rate limits, in POST /keys and PATCH /keys/{id}."""

Handler = Callable[[web.Request], Awaitable[Any]]

IDEMPOTENCY_KEY = "Idempotency-Key"

# `since=…+01:00` typed into a URL unencoded arrives with the `+` decoded to a space.
_SPACE_OFFSET = re.compile(r"^(.*\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)$")

ROUTES: tuple[tuple[str, str, str, int], ...] = (
    ("POST", "/accounts", "create_account", 201),
    ("GET", "/accounts", "list_accounts", 200),
    ("GET", "/accounts/{name}", "show_account", 200),
    ("PATCH", "/accounts/{name}", "update_account", 200),
    ("POST", "/accounts/{name}/credit", "credit_account", 200),
    ("POST", "/keys", "create_key", 201),
    ("GET", "/keys", "list_keys", 200),
    ("PATCH", "/keys/{id}", "update_key", 200),
    ("POST", "/keys/{id}/revoke", "revoke_key", 200),
    ("DELETE", "/keys/{id}", "revoke_key", 200),
    ("GET", "/usage", "usage", 200),
    ("GET", "/refusals", "refusals", 200),
    ("GET", "/audit", "audit", 200),
    ("GET", "/openapi.json", "openapi", 200),
)
"""Every admin route: method, path under PREFIX, ``Admin`` method, success status. The
OpenAPI document (bastion/openapi.py) is built from this table."""


def add_admin_routes(app: web.Application, gateway: Gateway) -> None:
    """Register /admin/v1/… (``create_app`` calls this only when an admin token is set)."""
    admin = Admin(gateway)
    for method, path, handler, status in ROUTES:
        app.router.add_route(method, PREFIX + path, admin.wrap(getattr(admin, handler), status))


class Admin:
    """The handlers; each returns the JSON-able result, ``wrap`` does auth and errors."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self.config = gateway.config
        self._token = gateway.config.admin_token.encode()

    # ---- plumbing ----------------------------------------------------------------
    def wrap(self, handler: Handler, status: int) -> Handler:
        """Auth first, then the handler; every answer is JSON with an x-request-id."""

        async def run(request: web.Request) -> web.Response:
            request_id = "req_" + uuid.uuid4().hex
            try:
                self.authorize(request)
                _refuse_nul(request.match_info.values(), None)
                result = await handler(request)
            except APIError as exc:
                if exc.status == 401:
                    exc.headers.setdefault("www-authenticate", 'Bearer realm="bastion-admin"')
                return error_response(exc, request_id)
            except StoreError as exc:  # a store call no handler expected to refuse
                return error_response(_store_error(exc), request_id)
            except Exception:  # the store is down or broken: still an OpenAI error object
                log.exception("admin %s %s failed (%s)", request.method, request.path, request_id)
                failure = APIError(
                    500,
                    "internal_error",
                    f"The admin operation failed; see the gateway log for {request_id}.",
                    type="server_error",
                )
                return error_response(failure, request_id)
            if request.method != "GET":
                log.info("admin %s %s -> %d (%s)", request.method, request.path, status, request_id)
            if isinstance(result, web.Response):  # made by the handler (CSV, a replay)
                result.headers["x-request-id"] = request_id
                return result
            return json_response(result, request_id, status)

        return run

    def authorize(self, request: web.Request) -> None:
        """Constant-time comparison, so the token cannot be guessed byte by byte."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")  # any bytes: never a 500
        if scheme.lower() != "bearer" or not given or not hmac.compare_digest(given, self._token):
            raise APIError(
                401,
                "invalid_api_key",
                "Missing or incorrect admin token: send 'Authorization: Bearer "
                "<BASTION_ADMIN_TOKEN>'. (qbt_ client keys are not admin tokens.)",
            )

    async def body(self, request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
        """The JSON object sent, refusing unknown fields so a typo is never silently ignored."""
        raw = await self.gateway.read_body(request)
        if not raw.strip():
            data: Any = {}
        else:
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise invalid("The body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise invalid("The body must be a JSON object.")
        for field in data:
            if field not in allowed:
                known = ", ".join(f"'{f}'" for f in allowed) or "none"
                raise invalid(f"Unknown field '{field}'; known fields: {known}.", field)
            value = data[field]
            _refuse_nul(value if isinstance(value, list) else [value], field)
        return data

    # ---- accounts ----------------------------------------------------------------
    async def create_account(self, request: web.Request) -> Any:
        body = await self.body(request, ("name", "credit"))
        name = _string(body, "name", required=True)
        credit = _amount(body, "credit", default="0")
        if credit < 0:
            raise invalid("'credit' must not be negative.", "credit")
        try:
            account = await self.store.create_account(name, credit)
        except StoreError as exc:
            raise _store_error(exc, "name") from None
        return new_account_json(account)

    async def list_accounts(self, request: web.Request) -> Any:
        _query(request, ())
        return [account_json(a) for a in await self.store.list_accounts()]

    async def show_account(self, request: web.Request) -> Any:
        try:
            account = await self.store.get_account(request.match_info["name"])
        except StoreError as exc:
            raise _store_error(exc) from None
        return account_json(account)

    async def update_account(self, request: web.Request) -> Any:
        """The balance alert: ``{"alert_below": "5.00"}`` sets it, ``null`` turns it off."""
        body = await self.body(request, ("alert_below",))
        if "alert_below" not in body:
            raise invalid(
                "Nothing to change: send 'alert_below' (USD as a decimal string, or null: off)."
            )
        alert = None if body["alert_below"] is None else _amount(body, "alert_below")
        try:
            account = await self.store.update_account(
                request.match_info["name"], alert_below=alert
            )
        except StoreError as exc:
            raise _store_error(exc, "alert_below") from None
        return account_json(account)

    async def credit_account(self, request: web.Request) -> Any:
        """With an ``Idempotency-Key`` header a repeat of the same top-up is not applied
        again: it gets the first answer, marked ``idempotent-replayed: true``."""
        body = await self.body(request, ("amount",))
        amount = _amount(body, "amount")
        key = request.headers.get(IDEMPOTENCY_KEY)
        try:
            check_key(key)
        except StoreError as exc:
            raise invalid(f"{IDEMPOTENCY_KEY}: {exc}.", IDEMPOTENCY_KEY) from None
        try:
            account = await self.store.credit_account(request.match_info["name"], amount, key)
        except KeyReused as exc:
            raise APIError(409, "idempotency_key_reused", str(exc), IDEMPOTENCY_KEY) from None
        except StoreError as exc:
            raise _store_error(exc, "amount") from None
        if account.replayed:
            return web.Response(
                body=orjson.dumps(account_json(account)),
                content_type="application/json",
                headers={"idempotent-replayed": "true"},
            )
        return account_json(account)

    # ---- keys --------------------------------------------------------------------
    async def create_key(self, request: web.Request) -> Any:
        body = await self.body(request, ("account", "name", "rpm", "tpm", *KEY_CONTROLS))
        account = _string(body, "account", required=True)
        label = _string(body, "name", required=False)
        rpm = _limit(body, "rpm", nullable=True)
        tpm = _limit(body, "tpm", nullable=True)
        controls = parse_key_controls(body, self.config)
        expires_at = controls.get("expires_at")
        if isinstance(expires_at, int) and expires_at <= time.time_ns() // 1000:
            raise invalid("'expires_at' is in the past: the key could never be used.", "expires_at")
        try:
            key, plaintext = await self.store.create_key(
                account,
                label,
                rpm,
                tpm,
                spend_limit=controls.get("spend_limit"),
                limit_reset=controls.get("limit_reset") or "never",
                expires_at=expires_at,
                models=controls.get("models"),
            )
        except StoreError as exc:
            raise _store_error(exc, "account") from None
        return new_key_json(key, plaintext, self.config)

    async def list_keys(self, request: web.Request) -> Any:
        account = _query(request, ("account",)).get("account")
        try:
            keys = await self.store.list_keys(account)
        except StoreError as exc:
            raise _store_error(exc, "account") from None
        return [key_json(k, self.config) for k in keys]

    async def update_key(self, request: web.Request) -> Any:
        """Only the fields sent change; null clears ``limit``, ``expires_at`` and ``models``."""
        body = await self.body(request, ("rpm", "tpm", *KEY_CONTROLS))
        if not body:
            raise invalid(
                "Nothing to change: send 'rpm', 'tpm' (0 = unlimited), 'limit', 'limit_reset',"
                " 'expires_at' or 'models'."
            )
        rpm = _limit(body, "rpm", nullable=False)
        tpm = _limit(body, "tpm", nullable=False)
        controls = parse_key_controls(body, self.config)
        try:
            key = await self.store.update_key(
                request.match_info["id"],
                rpm=rpm,
                tpm=tpm,
                spend_limit=controls.get("spend_limit", UNCHANGED),
                limit_reset=controls.get("limit_reset"),
                expires_at=controls.get("expires_at", UNCHANGED),
                models=controls.get("models", UNCHANGED),
            )
        except StoreError as exc:
            raise _store_error(exc) from None
        return key_json(key, self.config)

    async def revoke_key(self, request: web.Request) -> Any:
        """Idempotent (the store keeps the first revocation); no body needed."""
        try:
            key = await self.store.revoke_key(request.match_info["id"])
        except StoreError as exc:
            raise _store_error(exc) from None
        return key_json(key, self.config)

    # ---- usage -------------------------------------------------------------------
    async def usage(self, request: web.Request) -> Any:
        """Ledger rows, or with ``group_by`` totals per group (``bastion usage --json``);
        ``format=csv`` gives the same as ``--csv``."""
        query = _query(request, ("account", "key", "since", "until", "group_by", "format"))
        since_us, until_us = _time(query, "since"), _time(query, "until")
        account, key_id = query.get("account"), query.get("key")
        groups: list[str] = []
        if "group_by" in query:
            try:
                groups = parse_group_by(query["group_by"])
            except ValueError as exc:
                raise invalid(f"'group_by': {exc}.", "group_by") from None
        form = query.get("format", "json")
        if form not in ("json", "csv"):
            raise invalid("'format' must be json or csv.", "format")
        try:
            if groups:
                found = await self.store.usage_totals(groups, account, key_id, since_us, until_us)
            else:
                rows = await self.store.usage(account, since_us, until_us, key_id)
        except NotFound as exc:  # "no account named …" or "no key with id …"
            param = "key" if str(exc).startswith("no key") else "account"
            raise APIError(404, "not_found", str(exc), param) from None
        names = {a.id: a.name for a in await self.store.list_accounts()}
        if groups:
            items = usage_totals_json(found, groups, names)
            fields = [USAGE_GROUPS[g] for g in groups] + list(USAGE_TOTALS)
        else:
            items = [ledger_json(r, names) for r in rows]
            fields = ledger_fields()
        if form == "csv":
            return web.Response(text=csv_text(items, fields), content_type="text/csv")
        return items

    async def refusals(self, request: web.Request) -> Any:
        """401/402/403/429 counts per account, key and code (``bastion refusals --json``)."""
        query = _query(request, ("account", "since", "until"))
        since_us, until_us = _time(query, "since"), _time(query, "until")
        try:
            rows = await self.store.refusals(query.get("account"), since_us, until_us)
        except StoreError as exc:
            raise _store_error(exc, "account") from None
        names = {a.id: a.name for a in await self.store.list_accounts()}
        return [refusal_json(r, names) for r in rows]

    # ---- audit -------------------------------------------------------------------
    async def audit(self, request: web.Request) -> Any:
        """The books check of ``bastion audit --json``; 200 even when problems are found
        (the answer is the report: read its ``ok``), 404 for an unknown account."""
        account = _query(request, ("account",)).get("account")
        try:
            return await run_audit(self.store, account)
        except StoreError as exc:
            raise _store_error(exc, "account") from None

    # ---- the API's description ---------------------------------------------------
    async def openapi(self, request: web.Request) -> Any:
        """The OpenAPI 3.1 document of these routes, behind the token like the rest."""
        return admin_document(ROUTES, PREFIX, tuple(self.config.models))


# ---- field checks ------------------------------------------------------------------


def parse_key_controls(body: dict[str, Any], config: Config) -> dict[str, Any]:
    """The spend limit, reset period, expiry and model list sent, as the store takes
    them (``spend_limit`` for ``limit``); a field not sent is absent from the result.
    Public: the console's key forms go through it too."""
    controls: dict[str, Any] = {}
    if "limit" in body:
        limit = None if body["limit"] is None else _amount(body, "limit")
        if limit is not None and limit < 0:
            raise invalid("'limit' must not be negative (\"0\": the key may spend nothing).",
                          "limit")  # fmt: skip
        controls["spend_limit"] = limit
    if "limit_reset" in body:
        reset = body["limit_reset"]
        if reset not in RESETS:
            raise invalid(f"'limit_reset' must be one of {', '.join(RESETS)}.", "limit_reset")
        controls["limit_reset"] = reset
    if "expires_at" in body:
        controls["expires_at"] = None if body["expires_at"] is None else _expiry(body)
    if "models" in body:
        controls["models"] = _models(body, config)
    return controls


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """Query parameters, refusing unknown ones (``?acount=x`` must not list everything)."""
    for name in request.query:
        if name not in allowed:
            known = ", ".join(f"'{f}'" for f in allowed) or "none"
            raise invalid(f"Unknown query parameter '{name}'; known: {known}.", name)
        _refuse_nul(request.query.getall(name), name)
    return {name: request.query[name] for name in allowed if name in request.query}


def _refuse_nul(values: Iterable[object], param: str | None) -> None:
    """PostgreSQL can neither store nor look up a NUL character (its driver raises): a
    name, label or parameter with one is refused here, the same on every store."""
    if any(isinstance(value, str) and "\x00" in value for value in values):
        where = f"'{param}'" if param else "The path"
        raise invalid(f"{where} contains a NUL character (\\u0000).", param)


def _time(query: dict[str, str], name: str) -> int | None:
    """An ISO 8601 query parameter (a '+' offset arrives as a space) -> µs, or None."""
    if name not in query:
        return None
    try:
        return parse_since(_SPACE_OFFSET.sub(r"\1+\2", query[name]))
    except ValueError as exc:
        raise invalid(f"'{name}': {exc}", name) from None


def _string(body: dict[str, Any], field: str, *, required: bool) -> str:
    value = body.get(field)
    if value is None:
        if required:
            raise invalid(f"Missing required field '{field}'.", field)
        return ""
    if not isinstance(value, str):
        raise invalid(f"'{field}' must be a string.", field)
    return value


def _amount(body: dict[str, Any], field: str, default: str | None = None) -> int:
    """USD as a decimal string; JSON numbers are refused, since a float is not money."""
    value = body.get(field, default)
    if value is None:
        raise invalid(f"Missing required field '{field}' (USD as a decimal string).", field)
    if not isinstance(value, str):
        raise invalid(
            f'\'{field}\' must be a decimal string in USD, e.g. "10.00" or "-0.50": '
            "JSON numbers are refused because floats are not exact money.",
            field,
        )
    return parse_amount(value, field)


def parse_amount(value: str, field: str) -> int:
    """USD typed as a decimal string -> nano-dollars the database can hold; a refusal
    names ``field``. Public: the console's forms check amounts with it too."""
    try:
        nanos = parse_usd(value)
    except MoneyError as exc:
        raise invalid(f"'{field}': {exc}.", field) from None
    if abs(nanos) > BIGINT_MAX:  # the database holds nano-dollars in 64 bits
        raise invalid(f"'{field}': more than {format_usd(BIGINT_MAX)} USD either way.", field)
    return nanos


def _limit(body: dict[str, Any], field: str, *, nullable: bool) -> int | None:
    """A per-minute limit: integer ≥ 0 (0 = unlimited); absent = default / unchanged."""
    if field not in body:
        return None
    value = body[field]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= BIGINT_MAX:
        hint = "" if nullable else "; omit it to leave it unchanged"
        raise invalid(f"'{field}' must be an integer ≥ 0 (0 = unlimited), < 2^63{hint}.", field)
    return value


def _expiry(body: dict[str, Any]) -> int:
    """``expires_at``: an ISO 8601 string (naive = UTC) -> µs since epoch."""
    value = body["expires_at"]
    if not isinstance(value, str):
        raise invalid("'expires_at' must be an ISO 8601 time string, or null.", "expires_at")
    try:
        expires_at = parse_expiry(value)
    except ValueError as exc:
        raise invalid(f"'expires_at': {exc}.", "expires_at") from None
    return expires_at


def _models(body: dict[str, Any], config: Config) -> frozenset[str] | None:
    """``models``: a list of the config's model ids, or null for every model."""
    value = body["models"]
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise invalid("'models' must be a list of model ids, or null (every model).", "models")
    try:
        return check_models(value, config)
    except ValueError as exc:
        raise invalid(f"'models': {exc}.", "models") from None


def _store_error(exc: StoreError, param: str | None = None) -> APIError:
    """Map the store's refusals to HTTP: unknown → 404, clashes with current state → 409."""
    message = str(exc)
    if isinstance(exc, NotFound):
        return APIError(404, "not_found", message, param if param == "account" else None)
    if isinstance(exc, Conflict):
        code = "insufficient_balance" if message.startswith("cannot take back") else "conflict"
        return APIError(409, code, message, param)
    return APIError(400, "invalid_request", message, param)
