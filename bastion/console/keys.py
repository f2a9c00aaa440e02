"""Keys: the list with the create form, one key's limits, and revocation.

A new key's plaintext is in exactly one response, the answer to the create form, sent
``no-store``; the store keeps only its hash, so no page can show it again. Revoking asks
first on a page of its own (it works without JavaScript) and cannot be undone.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from bastion.config import Config
from bastion.console.forms import Form, key_controls, not_past, per_minute, refused, text
from bastion.console.site import Site, View, redirect
from bastion.errors import APIError, invalid
from bastion.periods import RESETS
from bastion.store import UNCHANGED, ApiKey, StoreError
from bastion.views import key_json, new_key_json


def key_row(key: ApiKey, config: Config) -> dict[str, Any]:
    """The key as the admin API lists it, plus its state: active, expired or revoked."""
    row = key_json(key, config)
    expired = key.expires_at is not None and key.expires_at <= time.time_ns() // 1000
    row["state"] = "revoked" if key.revoked else "expired" if expired else "active"
    row["rpm_set"] = "" if key.rpm is None else str(key.rpm)  # the form's value: blank = default
    row["tpm_set"] = "" if key.tpm is None else str(key.tpm)
    return row


class KeyPages:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.store = site.store
        self.config = site.config

    def choices(self) -> dict[str, Any]:
        return {"models": list(self.config.models), "resets": RESETS}

    async def index(
        self, request: web.Request, view: View, error: APIError | None = None,
        form: Form | None = None,
    ) -> web.StreamResponse:  # fmt: skip
        account = request.query.get("account") or None
        try:
            keys = await self.store.list_keys(account)
        except StoreError as exc:
            return self.site.failed(view, refused(exc), "error.html")
        context: dict[str, Any] = {
            "keys": [key_row(k, self.config) for k in keys],
            "accounts": [a.name for a in await self.store.list_accounts()],
            "account": account,
            "form": form or {},
            **self.choices(),
        }
        return self.site.show("keys.html", view, error, **context)

    async def create(self, request: web.Request, view: View, form: Form) -> web.StreamResponse:
        try:
            account = text(form, "account")
            if not account:
                raise invalid("Choose the account the key is for.", "account")
            rpm, tpm = per_minute(form, "rpm"), per_minute(form, "tpm")
            controls = key_controls(form, self.config)
            not_past(controls.get("expires_at"))
            try:
                key, plaintext = await self.store.create_key(
                    account, text(form, "name"), rpm, tpm,
                    spend_limit=controls.get("spend_limit"),
                    limit_reset=controls.get("limit_reset") or "never",
                    expires_at=controls.get("expires_at"), models=controls.get("models"),
                )  # fmt: skip
            except StoreError as exc:
                raise refused(exc) from None
        except APIError as exc:
            return await self.index(request, view, exc, form)
        created = new_key_json(key, plaintext, self.config)
        return self.site.render("key_created.html", view, key=created)

    async def find(self, key_id: str) -> ApiKey | None:
        return next((k for k in await self.store.list_keys() if k.id == key_id), None)

    async def show(
        self, request: web.Request, view: View, error: APIError | None = None
    ) -> web.StreamResponse:
        """The key and its limits form (after a refusal: as stored, since nothing changed)."""
        key = await self.find(request.match_info["id"])
        if key is None:
            return self.site.failed(view, APIError(404, "refused", "No such key."), "error.html")
        context = {"key": key_row(key, self.config), **self.choices()}
        return self.site.show("key.html", view, error, **context)

    async def update(self, request: web.Request, view: View, form: Form) -> web.StreamResponse:
        """Every field of the form is applied: a blank limit or expiry clears it, a blank
        rpm/tpm leaves it as it is (the store cannot set a key back to the default)."""
        key_id = request.match_info["id"]
        try:
            rpm, tpm = per_minute(form, "rpm"), per_minute(form, "tpm")
            controls = key_controls(form, self.config)
            try:
                await self.store.update_key(
                    key_id, rpm, tpm,
                    spend_limit=controls.get("spend_limit", UNCHANGED),
                    limit_reset=controls.get("limit_reset"),
                    expires_at=controls.get("expires_at", UNCHANGED),
                    models=controls.get("models", UNCHANGED),
                )  # fmt: skip
            except StoreError as exc:
                raise refused(exc) from None
        except APIError as exc:
            return await self.show(request, view, exc)
        return redirect(f"/console/keys/{key_id}?ok=updated")

    async def confirm_revoke(self, request: web.Request, view: View) -> web.StreamResponse:
        key = await self.find(request.match_info["id"])
        if key is None:
            return self.site.failed(view, APIError(404, "refused", "No such key."), "error.html")
        return self.site.render("key_revoke.html", view, key=key_row(key, self.config))

    async def revoke(self, request: web.Request, view: View, form: Form) -> web.StreamResponse:
        key_id = request.match_info["id"]
        try:
            await self.store.revoke_key(key_id)
        except StoreError as exc:
            return self.site.failed(view, refused(exc), "error.html")
        return redirect(f"/console/keys/{key_id}?ok=revoked")
