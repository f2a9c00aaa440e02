"""Per-account ``cache_salt`` for models with ``cache_isolation = "account"``.

vLLM keys its prefix cache by the tokens and the request's ``cache_salt``: requests
with different salts never share cached blocks, so one tenant cannot learn, from how
fast a prompt is answered, whether another tenant sent the same prefix. The salt is
HMAC-SHA256(``server.cache_salt_secret``, account id), base64url without padding: 43
characters (256 bits, as vLLM recommends), the same on every replica and after every
restart (so an account keeps its own cache hits), and unguessable without the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


class CacheSalts:
    """account id -> its salt, computed once per account: the request path only looks up."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()
        self._salts: dict[str, str] = {}

    def __call__(self, account_id: str) -> str:
        salt = self._salts.get(account_id)
        if salt is None:
            mac = hmac.new(self._key, account_id.encode(), hashlib.sha256).digest()
            salt = self._salts[account_id] = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        return salt
