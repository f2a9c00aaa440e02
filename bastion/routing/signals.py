"""Each replica's load, as vLLM reports it: scraped in the background, read by the policies.

A task per pool GETs ``<server root><metrics_path>`` of every replica a load-aware or
prefix-affinity model uses, every ``scrape_interval_s`` (all replicas at once, each under
``scrape_timeout_s``), off the request path. A reading is the replica's queue
(``waiting``), its batch (``running``) and its KV-cache usage, with the time it was
taken and this gateway's outstanding requests to the replica at that time: what was
sent since is known here, not there yet, and the policies add it (``pending``).

A failed scrape (refused, hung, not 200, no vLLM gauges) keeps the last reading,
which goes stale after ``stale_after_s``; a stale or missing reading is not used
(the policies fall back to this gateway's own outstanding counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from bastion.config import RoutingConfig, UpstreamConfig
from bastion.routing.parse import parse_metrics
from bastion.upstreams import Replica, at_root

log = logging.getLogger("bastion.routing")


def metrics_url(config: UpstreamConfig) -> str:
    """``metrics_path`` at the server root: ``http://h:8000/v1`` → ``http://h:8000/metrics``."""
    return at_root(config.url, config.metrics_path)


@dataclass(slots=True)
class Signal:
    """One replica's last load reading, and how its scrapes go."""

    url: str
    replica: Replica
    waiting: float = 0.0
    running: float = 0.0
    kv: float = 0.0  # KV-cache usage, 0 to 1
    at: float = 0.0  # time.monotonic() of the reading; 0: none yet
    base: int = 0  # this gateway's outstanding requests to the replica at that time
    failures: int = 0  # scrapes that failed, ever
    error: str = ""  # why the last scrape failed; "" if it worked

    @property
    def pending(self) -> int:
        """Requests this gateway sent the replica since the reading, less those that ended."""
        return self.replica.outstanding - self.base


class SignalBoard:
    """The readings of the replicas being scraped, by upstream name."""

    def __init__(self, replicas: Mapping[str, Replica], stale_after_s: float) -> None:
        self.signals = {
            name: Signal(metrics_url(replica.config), replica) for name, replica in replicas.items()
        }
        self.stale_after_s = stale_after_s

    def readings(self, replicas: list[Replica], now: float) -> list[Signal] | str:
        """The readings of ``replicas``, in their order, if every one is younger than
        ``stale_after_s``; else why not: 'missing' (never read, not scraped) or 'stale'."""
        oldest = now - self.stale_after_s
        signals = self.signals
        found = []
        for replica in replicas:
            signal = signals.get(replica.config.name)
            if signal is None or not signal.at:
                return "missing"
            if signal.at < oldest:
                return "stale"
            found.append(signal)
        return found

    def update(self, name: str, values: Mapping[str, float], now: float) -> bool:
        """Take a reading (all or part of waiting, running, kv); False if ``name`` is not
        scraped. A part (the ORCA header carries no ``running``) keeps the other figures."""
        signal = self.signals.get(name)
        if signal is None:
            return False
        signal.waiting = values.get("waiting", signal.waiting)
        signal.running = values.get("running", signal.running)
        signal.kv = min(values.get("kv", signal.kv), 1.0)
        signal.at = now
        signal.base = signal.replica.outstanding
        return True


class Scraper:
    """The background task that keeps the board's readings fresh."""

    def __init__(self, board: SignalBoard, config: RoutingConfig) -> None:
        self.board = board
        self.interval_s = config.scrape_interval_s
        self.timeout = aiohttp.ClientTimeout(total=config.scrape_timeout_s)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self, session: aiohttp.ClientSession) -> None:
        if self.board.signals:
            self._task = asyncio.create_task(self._run(session), name="load-signals")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.scrape_all(session)
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))

    async def scrape_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.scrape(session, s) for s in self.board.signals.values()))

    async def scrape(self, session: aiohttp.ClientSession, signal: Signal) -> None:
        """One replica: its reading, or a failure noted (logged once per outage)."""
        name = signal.replica.config.name
        try:
            async with session.get(signal.url, timeout=self.timeout) as resp:
                body = await resp.read()
                why = f"answered {resp.status}" if resp.status != 200 else ""
        except TimeoutError:
            why = f"unanswered in {self.timeout.total:g}s"
        except aiohttp.ClientError as exc:
            why = str(exc) or type(exc).__name__
        if not why:
            values = parse_metrics(body)
            if "waiting" in values and "running" in values:
                if signal.error:
                    log.info("upstream %s: load signals back", name)
                signal.error = ""
                self.board.update(name, values, time.monotonic())
                return
            why = "no vllm:num_requests_waiting/running gauges in the answer"
        signal.failures += 1
        if not signal.error:
            log.warning("upstream %s: load signals unavailable (%s): %s", name, signal.url, why)
        signal.error = why
