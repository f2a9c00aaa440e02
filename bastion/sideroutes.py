"""The gateway's endpoints besides the two POSTs: models, probes, metrics, and 404s.

None of them is on the hot path; they read the gateway's state and answer at once.
``/readyz`` asks the store (at most every 2 s) and the upstream pool whether a request
could be served now; ``/healthz`` only says the process answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from aiohttp import web

from bastion.answers import error_response, json_response, new_request_id
from bastion.errors import APIError

if TYPE_CHECKING:
    from bastion.app import Gateway

ENDPOINT_PATHS = {"responses": "/v1/responses", "chat": "/v1/chat/completions"}
ENDPOINT_ORDER = ("responses", "chat")


class SideEndpoints:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._ready: tuple[float, bool] = (0.0, False)  # when readiness was last checked

    def add_routes(self, app: web.Application) -> None:
        """Everything but the catch-all 404, which ``create_app`` adds last."""
        r = app.router
        r.add_get("/v1/models", self.models)
        r.add_route("*", "/v1/responses/{id}", self.stored)
        r.add_route("*", "/v1/responses/{id}/{rest:.*}", self.stored)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)

    async def models(self, request: web.Request) -> web.Response:
        request_id = new_request_id()
        try:
            key = self.gateway.authenticate(request)
        except APIError as exc:
            return error_response(exc, request_id)
        allowed = key.models
        data = [
            {
                "id": m.id,
                "object": "model",
                "created": self.gateway.created,
                "owned_by": "bastion",
                "endpoints": [ENDPOINT_PATHS[e] for e in ENDPOINT_ORDER if e in m.endpoints],
            }
            for m in self.gateway.config.models.values()
            if allowed is None or m.id in allowed
        ]
        return json_response({"object": "list", "data": data}, request_id)

    async def stored(self, request: web.Request) -> web.Response:
        return error_response(
            APIError(
                404,
                "not_found",
                "Bastion is stateless: it stores no responses, so there is nothing to retrieve, "
                'delete or list. Send "store": false and keep the output yourself.',
            ),
            new_request_id(),
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(
            APIError(
                404,
                "not_found",
                f"Unknown path: {request.method} {request.path}",
            ),
            new_request_id(),
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"}, new_request_id())

    async def readyz(self, request: web.Request) -> web.Response:
        if self.gateway.draining:
            return json_response({"status": "draining"}, new_request_id(), 503)
        checked, ok = self._ready
        if time.monotonic() - checked > 2.0:
            ok = await self._check_ready()
            self._ready = (time.monotonic(), ok)
        body = {"status": "ready" if ok else "not ready"}
        return json_response(body, new_request_id(), 200 if ok else 503)

    async def _check_ready(self) -> bool:
        try:
            await asyncio.wait_for(self.gateway.store.ping(), 2.0)
        except Exception:
            return False
        # the replicas' own health checks (GET <root>/health) say which are in rotation
        return any(replica.available for replica in self.gateway.relay.pool.replicas.values())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.gateway.metrics.render(),
            headers={
                "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                "x-request-id": new_request_id(),
            },
        )
