"""Upstream replicas: which one gets the next request, and which are out of rotation.

Least outstanding requests picks the replica (ties go to the one used least
recently). A replica that refuses connections or answers 5xx is ejected for a
backoff that doubles with each consecutive failure (1 s … 30 s); when the backoff
ends it is tried again (half-open), and an active health check (``GET /models``
every ``health_check_interval_s``) re-admits it as soon as it answers. If every replica of a
model is ejected, the least recently ejected is tried anyway: failing fast with
a 502 helps nobody when the alternative might work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiohttp

from bastion.config import UpstreamConfig

log = logging.getLogger("bastion.upstreams")

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass(slots=True)
class Replica:
    config: UpstreamConfig
    outstanding: int = 0
    failures: int = 0  # consecutive
    ejected_until: float = 0.0
    last_used: float = 0.0
    ejections: int = 0
    attempts: int = 0  # requests sent (counters read by the metrics collector)
    errors: int = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.ejected_until


class UpstreamPool:
    def __init__(
        self, upstreams: dict[str, UpstreamConfig], health_interval_s: float = 5.0
    ) -> None:
        self.replicas = {name: Replica(u) for name, u in upstreams.items()}
        self.health_interval_s = health_interval_s
        self._task: asyncio.Task[None] | None = None

    def pick(self, names: tuple[str, ...], exclude: set[str]) -> Replica | None:
        """The replica for the next attempt, or None when every one was tried."""
        candidates = [self.replicas[n] for n in names if n not in exclude]
        if not candidates:
            return None
        if len(candidates) > 1:
            healthy = [r for r in candidates if r.available]
            candidates = healthy or [min(candidates, key=lambda r: r.ejected_until)]
        replica = min(candidates, key=lambda r: (r.outstanding, r.last_used))
        replica.last_used = time.monotonic()
        replica.attempts += 1
        return replica

    def succeeded(self, replica: Replica) -> None:
        if replica.failures:
            log.info("upstream %s is back", replica.config.name)
        replica.failures = 0
        replica.ejected_until = 0.0

    def failed(self, replica: Replica, why: str) -> None:
        """Eject for a backoff that grows with consecutive failures."""
        backoff = BACKOFF_S[min(replica.failures, len(BACKOFF_S) - 1)]
        replica.failures += 1
        replica.errors += 1
        replica.ejections += 1
        replica.ejected_until = time.monotonic() + backoff
        log.warning("upstream %s ejected for %gs: %s", replica.config.name, backoff, why)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.create_task(self._health_checks(session), name="health-checks")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _health_checks(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        while True:
            await asyncio.sleep(self.health_interval_s)
            for replica in list(self.replicas.values()):
                try:
                    async with session.get(replica.config.url + "/models", timeout=timeout) as resp:
                        ok = resp.status < 500
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok and replica.failures:
                    self.succeeded(replica)
                elif not ok and replica.available:
                    self.failed(replica, "health check failed")
