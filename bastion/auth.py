"""API keys: how they are made and recognised, and the in-memory table the hot path reads.

A key is ``qbt_`` + 43 URL-safe characters (256 random bits). Only its SHA-256 is
stored; the gateway looks the hash up in a dict refreshed from the store, so
authenticating a request never touches the database.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "qbt_"
_KEY_SHAPE = re.compile(r"^qbt_[A-Za-z0-9_-]{32,128}$")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def well_formed(key: str) -> bool:
    return _KEY_SHAPE.match(key) is not None
