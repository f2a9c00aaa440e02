"""Accounts: the list, the create form, and one account's page (keys, top-up, alert, usage).

The same store calls as ``bastion accounts …`` and the admin API, the numbers rendered
through the same ``account_json``. A top-up form carries an idempotency key made when
the page was drawn, so a form sent twice (a double click, a resubmit) credits once.
"""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from bastion.console.forms import Form, amount, refused, text
from bastion.console.keys import key_row
from bastion.console.site import Site, View, account_url, redirect
from bastion.console.usage import day_charts, last_days, per_day, total
from bastion.errors import APIError, invalid
from bastion.store import StoreError
from bastion.store.idempotency import KeyReused
from bastion.views import account_json

USAGE_DAYS = 30


class AccountPages:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.store = site.store

    async def index(
        self, request: web.Request, view: View, error: APIError | None = None,
        form: Form | None = None,
    ) -> web.StreamResponse:  # fmt: skip
        accounts = [account_json(a) for a in await self.store.list_accounts()]
        context: dict[str, Any] = {"accounts": accounts, "form": form or {}}
        return self.site.show("accounts.html", view, error, **context)

    async def create(self, request: web.Request, view: View, form: Form) -> web.StreamResponse:
        try:
            name = text(form, "name")
            if not name:
                raise invalid("Enter a name for the account.", "name")
            credit = amount(form, "credit", "the initial credit") if text(form, "credit") else 0
            if credit < 0:
                raise invalid("The initial credit must not be negative.", "credit")
            try:
                account = await self.store.create_account(name, credit)
            except StoreError as exc:
                raise refused(exc) from None
        except APIError as exc:
            return await self.index(request, view, exc, form)
        return redirect(account_url(account) + "?ok=created")

    async def show(
        self, request: web.Request, view: View, error: APIError | None = None
    ) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            account = await self.store.get_account(name)
        except StoreError as exc:
            return self.site.failed(view, refused(exc), "error.html")
        period = last_days(USAGE_DAYS)
        days = await per_day(self.store, name, period)
        context: dict[str, Any] = {
            "account": account_json(account),
            "url": account_url(name),
            "keys": [key_row(k, self.site.config) for k in await self.store.list_keys(name)],
            "days": days,
            "total": total(days),
            "chart": day_charts(days)["spend"],
            "period": period,
            "once": "console-" + secrets.token_hex(16),
        }
        return self.site.show("account.html", view, error, **context)

    async def credit(self, request: web.Request, view: View, form: Form) -> web.StreamResponse:
        """Add credit, or take it back with a negative amount (refused below zero)."""
        name = request.match_info["name"]
        try:
            value = amount(form, "amount", "an amount")
            once = text(form, "once") or None
            try:
                account = await self.store.credit_account(name, value, once)
            except KeyReused as exc:
                raise APIError(409, "refused", str(exc)) from None
            except StoreError as exc:
                raise refused(exc) from None
        except APIError as exc:
            return await self.show(request, view, exc)
        done = "replayed" if account.replayed else "credited"
        return redirect(f"{account_url(name)}?ok={done}")

    async def alert(self, request: web.Request, view: View, form: Form) -> web.StreamResponse:
        """Set the balance alert (a webhook when the balance falls below it), or clear it."""
        name = request.match_info["name"]
        try:
            below = None if text(form, "clear") else amount(form, "alert_below", "a threshold")
            try:
                await self.store.update_account(name, alert_below=below)
            except StoreError as exc:
                raise refused(exc) from None
        except APIError as exc:
            return await self.show(request, view, exc)
        return redirect(account_url(name) + "?ok=alert")
