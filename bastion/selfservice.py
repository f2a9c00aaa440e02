"""The client's view of itself: ``GET /v1/key`` and ``GET /v1/generation?id=…``.

A customer holding only a key can see what that key may do and has spent, and what
one of its account's requests cost, without asking the operator. Both are free (no
ledger row, no rate-limit tokens) and read the store directly: they are for
dashboards and scripts, not for the hot path, so they cost a query or two each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from bastion.answers import error_response, json_response, new_request_id
from bastion.app import Gateway
from bastion.errors import APIError, invalid
from bastion.money import format_usd
from bastion.periods import period_start
from bastion.store import ApiKey, LedgerRow
from bastion.views import iso_time, row_fields

log = logging.getLogger("bastion")


def add_selfservice_routes(app: web.Application, gateway: Gateway) -> None:
    """Register /v1/key and /v1/generation (before the catch-all 404)."""
    service = SelfService(gateway)
    app.router.add_get("/v1/key", service.key)
    app.router.add_get("/v1/generation", service.generation)


class SelfService:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store

    async def key(self, request: web.Request) -> web.Response:
        """The calling key: its effective limits, its spend this period, its account's credit."""
        request_id = new_request_id()
        try:
            key = self.gateway.authenticate(request)
            now = time.time_ns() // 1000
            account, usage = await self._read(
                self.store.get_account(key.account_name),
                self.store.key_spent(key.id, period_start(key.limit_reset, now)),
            )
        except APIError as exc:
            return error_response(exc, request_id)
        # What the account can spend now: credit no gateway has leased, plus the part of
        # this gateway's lease not held by requests in flight or costs not yet written.
        unleased = max(0, account.balance - account.reserved)
        available = unleased + max(0, self.gateway.book.free(key.account_id))
        rpm, tpm = self.gateway.limits(key)
        return json_response({"data": key_view(key, rpm, tpm, usage, account.balance, available)},
                     request_id)  # fmt: skip

    async def generation(self, request: web.Request) -> web.Response:
        """One request's ledger row, if it belongs to the calling key's account."""
        request_id = new_request_id()
        try:
            key = self.gateway.authenticate(request)
            wanted = request.query.get("id", "").strip()
            if not wanted:
                raise invalid("Send the request id to look up: GET /v1/generation?id=req_…", "id")
            (row,) = await self._read(self.store.ledger_row(wanted))
            if row is None or row.account_id != key.account_id:
                # another account's request is as unknown as one that never was
                raise APIError(
                    404,
                    "not_found",
                    f"No request with id '{wanted[:64]}' for this account. Requests are"
                    " recorded within a second or two of ending; retry if it just ended.",
                    "id",
                )
        except APIError as exc:
            return error_response(exc, request_id)
        return json_response({"data": generation_view(row)}, request_id)

    async def _read(self, *reads: Any) -> tuple[Any, ...]:
        """Await the store reads; an unreachable store is a 503 the client may retry."""
        try:
            return tuple(await asyncio.gather(*reads))
        except Exception as exc:
            log.warning("self-service read failed (%s): answering 503", type(exc).__name__)
            raise APIError(
                503,
                "service_unavailable",
                "Your key's records cannot be read right now (billing store unreachable);"
                " retry shortly.",
                type="server_error",
            ) from None


def key_view(
    key: ApiKey, rpm: int, tpm: int, usage: int, balance: int, available: int
) -> dict[str, Any]:
    """``GET /v1/key``'s ``data``: money as USD strings, ``null`` for what is unset."""
    limit = key.spend_limit
    return {
        "key_id": key.id,
        "label": key.name,
        "account": key.account_name,
        "rpm": rpm,
        "tpm": tpm,
        "limit": None if limit is None else format_usd(limit),
        "limit_reset": key.limit_reset,
        "limit_usage": format_usd(usage),
        "limit_remaining": None if limit is None else format_usd(max(0, limit - usage)),
        "expires_at": None if key.expires_at is None else iso_time(key.expires_at),
        "models": None if key.models is None else sorted(key.models),
        "balance": format_usd(balance),
        "available": format_usd(available),
    }


def generation_view(row: LedgerRow) -> dict[str, Any]:
    """``GET /v1/generation``'s ``data``: the ledger row, without account or key ids."""
    return {"id": row.request_id, **row_fields(row)}
