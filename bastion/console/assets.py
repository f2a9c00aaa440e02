"""The console's templates and static files, both shipped inside the package.

Static files are read once, at start-up, and served under a URL holding a hash of
their content (``/console/static/<hash>/console.css``): a browser may keep them for a
year, and a new release changes the URL instead of waiting for caches to expire. No
CDN, no build step: the gateway works without internet.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

import jinja2
from aiohttp import web

from bastion.money import format_usd

HERE = Path(__file__).parent
STATIC_PREFIX = "/console/static"

SECURITY_HEADERS = {
    # only this origin's files; no inline script or style; forms post only here
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on a
    # form post, and the origin check would refuse the console's own forms
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}

_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


class Assets:
    """The static files by name: their bytes, type and content hash."""

    def __init__(self, directory: Path = HERE / "static") -> None:
        self.files: dict[str, tuple[str, bytes, str]] = {}
        for path in sorted(directory.iterdir()):
            if path.is_file():
                body = path.read_bytes()
                digest = hashlib.sha256(body).hexdigest()[:12]
                kind = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or ""
                self.files[path.name] = (digest, body, kind or "application/octet-stream")

    def url(self, name: str) -> str:
        """The versioned URL templates link to (a missing file fails the render, loudly)."""
        return f"{STATIC_PREFIX}/{self.files[name][0]}/{name}"

    async def serve(self, request: web.Request) -> web.Response:
        """Only files that exist, under their current hash: anything else is 404."""
        found = self.files.get(request.match_info["name"])
        if found is None or found[0] != request.match_info["digest"]:
            raise web.HTTPNotFound(headers=SECURITY_HEADERS)
        _, body, kind = found
        headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=31536000, immutable"}
        return web.Response(body=body, content_type=kind, headers=headers)


def environment(assets: Assets) -> jinja2.Environment:
    """Jinja2 with autoescape on for every template: an account named ``<script>`` is text."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["static"] = assets.url
    env.filters["usd"] = format_usd
    env.filters["num"] = lambda n: f"{n:,}"
    return env
