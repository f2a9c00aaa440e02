"""The usage page (charts with their tables) and the live view (a page and its JSON)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from bastion.console.live import Live
from bastion.console.session import COOKIE
from bastion.console.site import Site, View, page_headers
from bastion.console.usage import (
    day_charts,
    model_charts,
    parse_period,
    per_day,
    per_model,
    today,
    total,
)
from bastion.errors import APIError
from bastion.store import StoreError


class ReportPages:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.store = site.store
        self.live = Live(site.gateway)

    async def usage(self, request: web.Request, view: View) -> web.StreamResponse:
        """Spend, tokens, requests and refusals per day and per model, for a period
        (default: the last 30 days) and optionally one account."""
        query = request.query
        account = query.get("account") or None
        names = [a.name for a in await self.store.list_accounts()]
        context: dict[str, Any] = {
            "accounts": names, "account": account, "since": query.get("since", ""),
            "until": query.get("until", ""), "today": today().isoformat(),
        }  # fmt: skip
        try:
            period = parse_period(query)
        except ValueError as exc:
            return self.site.render("usage.html", view, 400, error=f"Period: {exc}.", **context)
        if account is not None and account not in names:
            error = f"No account named {account!r}."
            return self.site.render("usage.html", view, 404, error=error, **context)
        try:
            days = await per_day(self.store, account, period)
            models = await per_model(self.store, account, period)
        except StoreError as exc:  # the account went away in between
            return self.site.render("usage.html", view, 404, error=str(exc), **context)
        context.update(
            period=period, days=days, models=models, day_total=total(days),
            model_total=total(models), day_charts=day_charts(days),
            model_charts=model_charts(models),
            since=period.first.isoformat(), until=period.last.isoformat(),
        )  # fmt: skip
        return self.site.render("usage.html", view, **context)

    async def live_page(self, request: web.Request, view: View) -> web.StreamResponse:
        """Drawn with a snapshot already, so it reads before (and without) the first poll."""
        return self.site.render("live.html", view, live=self.live.snapshot())

    async def live_json(self, request: web.Request) -> web.StreamResponse:
        """The live figures; a missing or ended session is a 401 (the page then reloads
        to the login form), never a redirect a script would follow."""
        if self.site.sessions.read(request.cookies.get(COOKIE)) is None:
            error = APIError(401, "invalid_api_key", "Log in to the console first.")
            return web.Response(body=error.body(), status=401, content_type="application/json",
                                headers=page_headers())  # fmt: skip
        return web.Response(body=orjson.dumps(self.live.snapshot()),
                            content_type="application/json", headers=page_headers())  # fmt: skip
