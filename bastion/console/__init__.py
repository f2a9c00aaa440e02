"""The operator console (docs/console.md): server-rendered pages under ``/console``.

Accounts, keys, usage and a live view of the gateway, for an operator with a browser
instead of a shell. It sits on the admin token: without one, ``create_app`` never
calls ``add_console_routes`` and every ``/console`` path is the gateway's usual 404.
Its handlers run only for ``/console`` requests; the API's hot path does not see it.
"""

from __future__ import annotations

from aiohttp import web

from bastion.app import Gateway
from bastion.console.accounts import AccountPages
from bastion.console.assets import STATIC_PREFIX
from bastion.console.keys import KeyPages
from bastion.console.reports import ReportPages
from bastion.console.site import LOGIN, Site


def add_console_routes(app: web.Application, gateway: Gateway) -> Site:
    """Register /console/… (only when an admin token is set); returns the site, whose
    ``failure_delay_s`` a test may shorten."""
    site = Site(gateway)
    accounts, keys, reports = AccountPages(site), KeyPages(site), ReportPages(site)
    page, action = site.page, site.action
    r = app.router
    r.add_get(f"{STATIC_PREFIX}/{{digest}}/{{name}}", site.assets.serve)
    r.add_get(LOGIN, site.login_form)
    r.add_post(LOGIN, site.login)
    r.add_post("/console/logout", action(site.logout))
    r.add_get("/console", page(site.home))
    r.add_get("/console/", page(site.home))
    r.add_get("/console/accounts", page(accounts.index))
    r.add_post("/console/accounts", action(accounts.create))
    r.add_get("/console/accounts/{name}", page(accounts.show))
    r.add_post("/console/accounts/{name}/credit", action(accounts.credit))
    r.add_post("/console/accounts/{name}/alert", action(accounts.alert))
    r.add_get("/console/keys", page(keys.index))
    r.add_post("/console/keys", action(keys.create))
    r.add_get("/console/keys/{id}", page(keys.show))
    r.add_post("/console/keys/{id}", action(keys.update))
    r.add_get("/console/keys/{id}/revoke", page(keys.confirm_revoke))
    r.add_post("/console/keys/{id}/revoke", action(keys.revoke))
    r.add_get("/console/usage", page(reports.usage))
    r.add_get("/console/live", page(reports.live_page))
    r.add_get("/console/live.json", reports.live_json)
    return site
