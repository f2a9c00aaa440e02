"""Console sessions and CSRF tokens: signed, so every replica checks them and none stores them.

The session cookie is ``<expiry>.<nonce>.<signature>``: when it ends (Unix seconds), a
random nonce, and an HMAC-SHA256 of both under a key derived from the admin token.
Checking it needs only the token, so it works on any replica and across restarts, and
a new admin token is a new key: every session ends at once. The CSRF token a form
carries is an HMAC of the session's nonce, which a page of another site cannot read.
Every comparison of secrets is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

COOKIE = "bastion_console"
PATH = "/console"
TTL_S = 12 * 3600
"""A session lasts 12 hours: a working day, after which the token is asked for again."""

_KEY_LABEL = b"bastion console session v1"  # the derived key is for sessions only
_CSRF_LABEL = b"csrf:"


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int  # Unix seconds


class Sessions:
    """Issues and checks session cookies and CSRF tokens for one admin token."""

    def __init__(
        self, admin_token: str, ttl_s: int = TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._token = admin_token.encode()
        self._key = hmac.new(self._token, _KEY_LABEL, hashlib.sha256).digest()
        self.ttl_s = ttl_s
        self.clock = clock

    def token_matches(self, given: str) -> bool:
        """The login check: constant-time, any bytes accepted (never a 500)."""
        data = given.encode("utf-8", "surrogateescape")
        return bool(data) and hmac.compare_digest(data, self._token)

    def issue(self) -> tuple[str, Session]:
        """A new session and its cookie value."""
        session = Session(secrets.token_urlsafe(18), int(self.clock()) + self.ttl_s)
        payload = f"{session.expires}.{session.nonce}"
        return f"{payload}.{self._mac(payload.encode())}", session

    def read(self, cookie: str | None) -> Session | None:
        """The session the cookie holds, or None: missing, forged, signed under another
        token, or expired."""
        if not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, signature = cookie.split(".")
        payload = f"{expires}.{nonce}".encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"),
                                   self._mac(payload).encode()):  # fmt: skip
            return None
        if not expires.isdigit() or int(expires) <= self.clock():
            return None
        return Session(nonce, int(expires))

    def csrf(self, session: Session) -> str:
        """The token every form of this session carries."""
        return self._mac(_CSRF_LABEL + session.nonce.encode())

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        expected = self.csrf(session).encode()
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected
        )

    def _mac(self, data: bytes) -> str:
        digest = hmac.new(self._key, data, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def set_cookie(response: web.StreamResponse, request: web.Request, value: str, ttl_s: int) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site sends it), scoped to
    /console, and Secure when the browser reached us over https (directly or via a proxy)."""
    response.set_cookie(
        COOKIE, value, max_age=ttl_s, path=PATH, httponly=True, samesite="Strict",
        secure=came_over_https(request),
    )  # fmt: skip


def clear_cookie(response: web.StreamResponse, request: web.Request) -> None:
    set_cookie(response, request, "", 0)


def came_over_https(request: web.Request) -> bool:
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return forwarded == "https" or request.secure


def same_origin(request: web.Request) -> bool:
    """No Origin header (an old browser, a script), or one naming this host: a form
    posted from another site carries that site's origin and is refused."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a sandboxed frame, a data: page) is not this host
    hosts = {request.host, request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()}
    return parts.netloc.lower() in {h.lower() for h in hosts if h}
