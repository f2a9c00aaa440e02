"""Answers the gateway's own handlers send: JSON with a request id, OpenAI-shaped errors.

Shared by the API, the admin API and the key holders' endpoints, so every answer
Bastion writes itself carries an ``x-request-id`` and the same error object.
"""

from __future__ import annotations

import os

import orjson
from aiohttp import web

from bastion.errors import APIError


def new_request_id() -> str:
    """``req_`` and 32 hex digits: unique without coordination between replicas."""
    return "req_" + os.urandom(16).hex()


def json_response(obj: object, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj),
        status=status,
        content_type="application/json",
        headers={"x-request-id": request_id},
    )


def error_response(exc: APIError, request_id: str) -> web.Response:
    return web.Response(
        body=exc.body(),
        status=exc.status,
        content_type="application/json",
        headers={"x-request-id": request_id, **exc.headers},
    )
