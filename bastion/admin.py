"""Placeholder: the admin API is being written."""

from aiohttp import web


def add_admin_routes(app: web.Application, gateway: object) -> None:
    return None
