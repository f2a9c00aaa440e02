"""The ``bastion-signature`` header: proof that a delivery came from this Bastion, unaltered.

``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with the secret>``. The
time is signed with the body, so a captured delivery cannot be replayed once it is
older than the receiver's tolerance. Each attempt is signed afresh (a new ``t``); the
body, and the event id in it, stay the same. A receiver needs only this module
(standard library only) or its dozen lines:

    from bastion.webhooks.sign import verify
    if not verify(SECRET, request_body_bytes, request.headers["bastion-signature"]):
        return 400
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "bastion-signature"
TOLERANCE_S = 300  # a receiver's default: refuse signatures older (or newer) than 5 minutes


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header value for ``body`` sent at ``timestamp`` (unix seconds; default: now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True if ``header`` signs exactly ``body`` with ``secret`` within ``tolerance_s``.

    ``body`` is the raw request body, before any JSON parsing (a re-serialised body
    would not match). Several ``v1=`` values are accepted, any one matching, so a
    secret can be rotated by sending both for a while. Constant-time comparison."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, body).encode()
    return any(hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in signatures)
