"""The console's plumbing: login and logout, and the wrappers every page and form goes through.

A page (GET) needs a valid session, else it redirects to the login form. A form post
needs, before anything is read or changed: an Origin header naming this host (or none),
a valid session, and the session's CSRF token in the form; any of them missing is a 403
that changes nothing. Every console response carries the security headers, and pages
are ``no-store``: they show balances and, once, a new key.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from bastion.app import Gateway
from bastion.console.assets import SECURITY_HEADERS, Assets, environment
from bastion.console.session import (
    COOKIE,
    Session,
    Sessions,
    clear_cookie,
    same_origin,
    set_cookie,
)
from bastion.errors import APIError
from bastion.store import Account

log = logging.getLogger("bastion.console")

HOME = "/console/accounts"
LOGIN = "/console/login"
FAILED_LOGIN_DELAY_S = 1.0
"""A wrong token is answered after a second: a guesser gets one try per second per
connection. The real defence is the token's length (32 random bytes guess in no
lifetime); restrict /console to operator networks at the load balancer too."""

NOTICES = {
    "created": "Account created.",
    "credited": "Balance changed.",
    "replayed": "That top-up was already applied (the form was sent twice); applied once.",
    "alert": "Balance alert saved.",
    "updated": "Key updated.",
    "revoked": "Key revoked. Gateways refuse it from their next refresh.",
}
"""The messages a redirect after a change may show (``?ok=created``): fixed texts, so a
link cannot make the console display words of someone else's choosing."""


@dataclass(frozen=True)
class View:
    """What every page template gets: the session's CSRF token, where it is, any notice."""

    session: Session
    csrf: str
    path: str
    notice: str | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PageHandler = Callable[[web.Request, View], Awaitable[web.StreamResponse]]
ActionHandler = Callable[[web.Request, View, Any], Awaitable[web.StreamResponse]]


class Site:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self.config = gateway.config
        self.sessions = Sessions(gateway.config.admin_token)
        self.assets = Assets()
        self.env = environment(self.assets)
        self.env.globals["account_url"] = account_url
        self.failure_delay_s = FAILED_LOGIN_DELAY_S

    # ---- responses ---------------------------------------------------------------
    def render(
        self, template: str, view: View | None, status: int = 200, **context: Any
    ) -> web.Response:
        html = self.env.get_template(template).render(view=view, **context)
        return web.Response(text=html, status=status, content_type="text/html",
                            headers=page_headers())  # fmt: skip

    def failed(
        self, view: View | None, exc: APIError, template: str, **context: Any
    ) -> web.Response:
        """A refused form: the page again, with the reason, and the status it deserves."""
        return self.render(template, view, exc.status, error=exc.message, **context)

    def show(
        self, template: str, view: View, error: APIError | None, **context: Any
    ) -> web.Response:
        """The page, or (after a refused form) the page with the refusal."""
        if error is not None:
            return self.failed(view, error, template, **context)
        return self.render(template, view, **context)

    # ---- wrappers ----------------------------------------------------------------
    def page(self, handler: PageHandler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            session = self.sessions.read(request.cookies.get(COOKIE))
            if session is None:
                return redirect(f"{LOGIN}?next={quote(request.raw_path, safe='')}")
            notice = NOTICES.get(request.query.get("ok", ""))
            view = View(session, self.sessions.csrf(session), request.path, notice)
            return await self.guarded(request, view, handler(request, view))

        return run

    def action(self, handler: ActionHandler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            if not same_origin(request):
                return self.forbidden("This form was sent from another site.")
            session = self.sessions.read(request.cookies.get(COOKIE))
            if session is None:
                return self.forbidden("Your session has ended: log in again, then resend.")
            form = await request.post()
            csrf = form.get("csrf")
            if not self.sessions.csrf_ok(session, csrf if isinstance(csrf, str) else None):
                return self.forbidden("This form is stale or was not made by this console.")
            view = View(session, self.sessions.csrf(session), request.path)
            log.info("console %s %s", request.method, request.path)
            return await self.guarded(request, view, handler(request, view, form))

        return run

    async def guarded(
        self, request: web.Request, view: View, work: Awaitable[web.StreamResponse]
    ) -> web.StreamResponse:
        """An unexpected failure (the store down) is a page that says where to look."""
        try:
            return await work
        except web.HTTPException:
            raise
        except Exception:
            ref = "req_" + uuid.uuid4().hex
            log.exception("console %s %s failed (%s)", request.method, request.path, ref)
            message = f"The operation failed; see the gateway log for {ref}."
            return self.render("error.html", view, 500, error=message)

    def forbidden(self, why: str) -> web.Response:
        return self.render("error.html", None, 403, error=f"Refused: {why} Nothing was changed.")

    # ---- login -------------------------------------------------------------------
    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.sessions.read(request.cookies.get(COOKIE)) is not None:
            return redirect(safe_next(request.query.get("next")))
        return self.render("login.html", None, next=safe_next(request.query.get("next")))

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return self.forbidden("This form was sent from another site.")
        form = await request.post()
        token = form.get("token")
        target = safe_next(form.get("next") if isinstance(form.get("next"), str) else None)
        if not isinstance(token, str) or not self.sessions.token_matches(token.strip()):
            log.warning("console: failed login from %s", request.remote)
            await asyncio.sleep(self.failure_delay_s)
            return self.render("login.html", None, 401, next=target,
                               error="That is not the admin token.")  # fmt: skip
        value, _ = self.sessions.issue()
        response = redirect(target)
        set_cookie(response, request, value, self.sessions.ttl_s)
        log.info("console: login from %s", request.remote)
        return response

    async def logout(self, request: web.Request, view: View, form: Any) -> web.StreamResponse:
        response = redirect(LOGIN)
        clear_cookie(response, request)
        return response

    async def home(self, request: web.Request, view: View) -> web.StreamResponse:
        return redirect(HOME)


def redirect(location: str) -> web.Response:
    """303: after a form post the browser GETs the next page (a reload resends nothing)."""
    return web.Response(status=303, headers={**page_headers(), "Location": location})


def page_headers() -> dict[str, str]:
    return {**SECURITY_HEADERS, "Cache-Control": "no-store"}


def safe_next(target: str | None) -> str:
    """Where to go after login: a console path only, never another site (``//evil``)."""
    if not target or not (target == "/console" or target.startswith("/console/")):
        return HOME
    if "\\" in target or any(ord(c) < 32 for c in target):
        return HOME
    return target


def account_url(account: Account | str) -> str:
    name = account if isinstance(account, str) else account.name
    return f"/console/accounts/{quote(name, safe='')}"
