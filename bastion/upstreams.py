"""Upstream replicas: which one gets the next request, and which are out of rotation.

Least outstanding requests picks the replica (ties go to the one used least
recently). Two things take a replica out of rotation:

- A failed request (connection refused or broken, a 5xx answer, a timeout, an answer
  that is not HTTP) ejects it for a backoff that doubles with each consecutive failure
  (1 s … 30 s), and holds it out until a health check, sent at once, answers.
- A failed health check holds it out until a check passes, however long that takes:
  the backoff running out does not bring back a replica that hangs. The check is
  ``GET <server root><health_path>`` (vLLM's ``/health``), every
  ``health_check_interval_s`` and after every failed request.

A passing check ends the hold; if a check had failed, the replica is back at once
(within one interval of recovering), else the backoff of its failed requests still
runs (it answers checks but not requests). A request that succeeds clears both. If
every replica of a model is out, one is tried anyway (the backoff that ends first,
a replica a check found down last): failing fast with a 502 helps nobody when the
alternative might work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from bastion.config import UpstreamConfig

log = logging.getLogger("bastion.upstreams")

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
CHECK_TIMEOUT_S = 2.0  # a health check slower than this failed (a hung server never answers)


def health_url(config: UpstreamConfig) -> str:
    """``health_path`` at the server root: ``http://h:8000/v1`` → ``http://h:8000/health``."""
    return at_root(config.url, config.health_path)


def at_root(base: str, path: str) -> str:
    """``path`` at the server root of the upstream URL ``base`` (its own path dropped)."""
    url = urlsplit(base)
    return urlunsplit((url.scheme, url.netloc, path, "", ""))


@dataclass(slots=True)
class Replica:
    config: UpstreamConfig
    outstanding: int = 0
    failures: int = 0  # consecutive
    ejected_until: float = 0.0
    held: bool = False  # out until a health check passes
    last_used: float = 0.0
    ejections: int = 0
    attempts: int = 0  # requests sent (counters read by the metrics collector)
    errors: int = 0
    health_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.health_url = health_url(self.config)

    @property
    def available(self) -> bool:
        return not self.held and time.monotonic() >= self.ejected_until

    @property
    def down(self) -> bool:
        """A health check failed and none has passed since (the hold replaced the backoff)."""
        return self.held and self.ejected_until == 0.0


class UpstreamPool:
    def __init__(
        self, upstreams: dict[str, UpstreamConfig], health_interval_s: float = 5.0
    ) -> None:
        self.replicas = {name: Replica(u) for name, u in upstreams.items()}
        self.health_interval_s = health_interval_s
        self._session: aiohttp.ClientSession | None = None  # set while checks run
        self._task: asyncio.Task[None] | None = None
        self._checks: dict[str, asyncio.Task[None]] = {}  # one check at a time per replica

    def pick(self, names: tuple[str, ...], exclude: set[str]) -> Replica | None:
        """The replica for the next attempt, or None when every one was tried."""
        candidates = self.candidates(names, exclude)
        if not candidates:
            return None
        return self.chosen(min(candidates, key=lambda r: (r.outstanding, r.last_used)))

    def candidates(self, names: tuple[str, ...], exclude: set[str]) -> list[Replica]:
        """The replicas a policy may choose from: those not tried yet and in rotation; if
        none is in rotation, the one most likely back (every routing policy shares this)."""
        candidates = [self.replicas[n] for n in names if n not in exclude]
        if len(candidates) > 1:
            healthy = [r for r in candidates if r.available]
            candidates = healthy or [min(candidates, key=lambda r: (r.down, r.ejected_until))]
        return candidates

    @staticmethod
    def chosen(replica: Replica) -> Replica:
        """Note that ``replica`` gets the next attempt (least recently used breaks ties)."""
        replica.last_used = time.monotonic()
        replica.attempts += 1
        return replica

    def succeeded(self, replica: Replica) -> None:
        if replica.failures or replica.held:
            log.info("upstream %s is back", replica.config.name)
        replica.failures = 0
        replica.ejected_until = 0.0
        replica.held = False

    def failed(self, replica: Replica, why: str) -> None:
        """Eject for a backoff that grows with consecutive failures; hold until checked."""
        backoff = BACKOFF_S[min(replica.failures, len(BACKOFF_S) - 1)]
        replica.failures += 1
        replica.errors += 1
        replica.ejections += 1
        replica.ejected_until = time.monotonic() + backoff
        log.warning("upstream %s ejected for %gs: %s", replica.config.name, backoff, why)
        if self._session is not None:
            replica.held = True  # the backoff may end before the check does
            self.check(replica)

    def checked(self, replica: Replica, ok: bool, why: str = "") -> None:
        """A health check's verdict: a failure holds the replica out until one passes."""
        if ok:
            if replica.down:
                log.info("upstream %s passed its health check", replica.config.name)
            replica.held = False
            return
        if not replica.down:  # counted once per outage, not per check while it lasts
            log.warning("upstream %s out until healthy: %s", replica.config.name, why)
            replica.errors += 1
            replica.ejections += 1
        replica.held = True
        replica.ejected_until = 0.0  # the hold replaces the backoff: back when a check passes

    def check(self, replica: Replica) -> None:
        """Health-check ``replica`` now, unless a check of it is already under way."""
        name = replica.config.name
        if self._session is None or name in self._checks:
            return
        task = asyncio.get_running_loop().create_task(self._check(replica, self._session))
        self._checks[name] = task
        task.add_done_callback(lambda _: self._checks.pop(name, None))

    async def _check(self, replica: Replica, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)
        try:
            async with session.get(replica.health_url, timeout=timeout) as resp:
                ok, why = resp.status < 500, f"health check answered {resp.status}"
        except TimeoutError:
            ok, why = False, f"health check unanswered in {CHECK_TIMEOUT_S:g}s"
        except aiohttp.ClientError as exc:
            ok, why = False, f"health check failed: {exc}"
        self.checked(replica, ok, why)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._task = asyncio.create_task(self._health_checks(), name="health-checks")

    async def close(self) -> None:
        self._session = None
        for task in [self._task, *self._checks.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _health_checks(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            for replica in self.replicas.values():
                self.check(replica)
