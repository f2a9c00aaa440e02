"""API keys: how they are made and recognised, and the in-memory table the hot path reads.

A key is ``qbt_`` + 43 URL-safe characters (256 random bits). Only its SHA-256 is
stored; the gateway looks the hash up in a dict refreshed from the store
(``KeyTable``), so authenticating a request never touches the database.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion.store import ApiKey, Store

KEY_PREFIX = "qbt_"
_KEY_SHAPE = re.compile(r"^qbt_[A-Za-z0-9_-]{32,128}$")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def well_formed(key: str) -> bool:
    return _KEY_SHAPE.match(key) is not None


class KeyTable:
    """Every key the store knows, by hash, refreshed from the store in the background.

    Revoked keys stay in the table, so that a revoked key is told so and its refusals
    are counted against its account.

    After one full load, each refresh reads only the keys changed since the last one
    (revocations included), looking back an extra minute so that clock skew between
    the machine that made a change and this one cannot hide it; a full reload every
    five minutes is the safety net.
    """

    OVERLAP_US = 60_000_000
    FULL_RELOAD_S = 300.0

    def __init__(self) -> None:
        self.by_hash: dict[str, ApiKey] = {}
        self._since_us: int | None = None
        self._full_at = 0.0

    def get(self, key: str) -> ApiKey | None:
        return self.by_hash.get(hash_key(key))

    async def refresh(self, store: Store) -> None:
        started_us = time.time_ns() // 1000
        if self._since_us is None or time.monotonic() - self._full_at > self.FULL_RELOAD_S:
            self.by_hash = dict((await store.snapshot()).keys)
            self._full_at = time.monotonic()
        else:
            for key in await store.keys_changed(self._since_us):
                self.by_hash[key.key_hash] = key
        self._since_us = started_us - self.OVERLAP_US
