"""Per-key rate limits: requests and tokens per minute, smooth (GCRA), never a minute reset.

GCRA keeps one "theoretical arrival time" (TAT) per key and dimension. A key with
``rpm = N`` may send N requests at once; after that, one more every 60/N seconds.
Tokens work the same with the request's worst case as its weight, corrected at
settlement by ``refund``. The in-process limiter is exact for one process; the
Redis limiter (scale-out) runs the same arithmetic server-side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

PERIOD_S = 60.0
# Float TATs: k × (60/k) can come out a hair over 60, which would refuse the last unit
# of a full budget or report one unit less remaining. A nanosecond (and a millionth of
# a unit) of slack absorbs the rounding; no real request is that close to the edge.
_SLACK_S = 1e-9
_SLACK_UNITS = 1e-6


@dataclass(slots=True)
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after_s: float = 0.0
    reason: str = ""  # "requests" | "tokens" when refused


class Limiter(Protocol):
    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Decision: ...
    async def peek(self, key_id: str, rpm: int, tpm: int) -> dict[str, str]: ...
    def refund(self, key_id: str, tpm: int, tokens: int) -> None: ...
    async def close(self) -> None: ...


def duration(seconds: float) -> str:
    """OpenAI's reset format: '17ms', '1s', '6m0s', '2.5s'."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{secs_text}s" if minutes else f"{secs_text}s"


def gcra(
    tat: float, now: float, limit: int, weight: int, period: float = PERIOD_S
) -> tuple[bool, float]:
    """One GCRA step: (allowed, new TAT). ``weight`` units of a ``limit``/period budget."""
    interval = period / limit
    new_tat = max(tat, now) + weight * interval
    return new_tat - now <= period + _SLACK_S, new_tat


def headers_for(
    suffix: str,
    limit: int,
    tat: float,
    now: float,
    out: dict[str, str],
    period: float = PERIOD_S,
) -> None:
    """x-ratelimit-{limit,remaining,reset}-{suffix} from a TAT; nothing for unlimited.

    Shared by both limiters so a client sees the same headers whichever one answered.
    """
    if not limit:
        return
    used = max(0.0, tat - now)
    remaining = int((period - used) * limit / period + _SLACK_UNITS)
    out[f"x-ratelimit-limit-{suffix}"] = str(limit)
    out[f"x-ratelimit-remaining-{suffix}"] = str(max(0, remaining))
    out[f"x-ratelimit-reset-{suffix}"] = duration(used)


class MemoryLimiter:
    """Exact GCRA in one process: a dict of TATs, no locks (one event loop)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, period_s: float = PERIOD_S
    ) -> None:
        # period_s: 60 in production; shorter only so tests can watch a refill
        self._clock = clock
        self._period = period_s
        self._req: dict[str, float] = {}
        self._tok: dict[str, float] = {}

    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Decision:
        now = self._clock()
        req_tat = self._req.get(key_id, now)
        tok_tat = self._tok.get(key_id, now)
        period = self._period
        ok_req, new_req = gcra(req_tat, now, rpm, 1, period) if rpm else (True, req_tat)
        ok_tok, new_tok = gcra(tok_tat, now, tpm, tokens, period) if tpm else (True, tok_tat)
        decision = Decision(ok_req and ok_tok)
        if decision.allowed:
            if rpm:
                self._req[key_id] = new_req
                req_tat = new_req
            if tpm:
                self._tok[key_id] = new_tok
                tok_tat = new_tok
        else:
            decision.reason = "requests" if not ok_req else "tokens"
            waits = []
            if not ok_req:
                waits.append(new_req - now - period)
            if not ok_tok:
                waits.append(new_tok - now - period)
            decision.retry_after_s = max(waits)
        headers_for("requests", rpm, req_tat, now, decision.headers, period)
        headers_for("tokens", tpm, tok_tat, now, decision.headers, period)
        return decision

    async def peek(self, key_id: str, rpm: int, tpm: int) -> dict[str, str]:
        """The key's x-ratelimit-* headers now, charging nothing (for refused requests)."""
        now = self._clock()
        headers: dict[str, str] = {}
        headers_for("requests", rpm, self._req.get(key_id, now), now, headers, self._period)
        headers_for("tokens", tpm, self._tok.get(key_id, now), now, headers, self._period)
        return headers

    def refund(self, key_id: str, tpm: int, tokens: int) -> None:
        """Give back tokens reserved at admission but not used (or charge extra if < 0)."""
        if tpm and tokens and key_id in self._tok:
            self._tok[key_id] -= tokens * self._period / tpm

    def get_state(self, key_id: str) -> tuple[float, float] | None:
        """The key's (request, token) TATs as seconds from now; None for a key never seen.

        With ``set_state``, what the Redis limiter's fallback hands over across an outage.
        """
        if key_id not in self._req and key_id not in self._tok:
            return None
        now = self._clock()
        return self._req.get(key_id, now) - now, self._tok.get(key_id, now) - now

    def set_state(self, key_id: str, req_in_s: float, tok_in_s: float) -> None:
        """Set the key's TATs, as seconds from now (how Redis reports them)."""
        now = self._clock()
        self._req[key_id] = now + req_in_s
        self._tok[key_id] = now + tok_in_s

    async def close(self) -> None:
        return None


def open_limiter(url: str, replicas: int = 1) -> Limiter:
    """The limiter for ``ratelimit.url``.

    ``replicas``: how many gateway processes share the Redis limiter; only used to
    divide the limits of the per-process fallback while Redis is unreachable.
    """
    if url.startswith("memory:"):
        return MemoryLimiter()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from bastion.ratelimit_redis import RedisLimiter  # redis is an optional extra

        return RedisLimiter(url, replicas=replicas)
    raise ValueError(f"unsupported ratelimit url {url!r}: use memory:// or redis://…")
