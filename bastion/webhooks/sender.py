"""The delivery loop: claim due events from the store's outbox, POST them, settle them.

One asyncio task per gateway with ``[webhooks] url`` set. It never touches the request
path: it talks only to the store and the receiver. Each round claims up to ``BATCH``
due events (oldest first) for ``timeout_s + CLAIM_MARGIN_S``, POSTs them at once, and
marks each delivered (any 2xx) or failed, to be retried after an exponential backoff
with jitter (1 s, 2 s, 4 s, … capped at 10 minutes; each delay drawn from its upper
half). An event still undelivered ``max_age_s`` after it was made is given up.

Delivery is at least once: a sender that dies after POSTing but before marking leaves
the claim to run out, and the event is sent again (by any gateway). So the receiver
dedupes by the event's ``id``. Under normal operation each event is sent once, by one
gateway: a claim is exclusive (``FOR UPDATE SKIP LOCKED`` on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bastion import __version__
from bastion.config import WebhooksConfig
from bastion.store import Store
from bastion.store.outbox import OutboxEvent
from bastion.webhooks.sign import HEADER, sign

log = logging.getLogger("bastion.webhooks")

BATCH = 16  # events claimed, and POSTed concurrently, per round
CLAIM_MARGIN_S = 30.0  # beyond the attempt's timeout: time to mark it before the claim runs out
RETRY_BASE_S = 1.0
RETRY_CAP_S = 600.0
KEEP_S = 7 * 86_400  # delivered and given-up events are deleted after a week
PRUNE_EVERY_S = 3_600.0
CLOSE_GRACE_S = 5.0  # on shutdown: deliveries under way may finish this long

# (event type, result): result is "delivered", "failed" (an attempt; retried) or "given_up"
Tally = Counter[tuple[str, str]]


def retry_delay(attempts: int, rand: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (1, 2, 4 … ≤ 600),
    drawn from the upper half so that a receiver coming back is not hit all at once."""
    ceiling = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(attempts - 1, 30))
    return ceiling * (0.5 + (rand or random).random() / 2)


class WebhookSender:
    def __init__(self, store: Store, config: WebhooksConfig) -> None:
        self.store = store
        self.config = config
        self.claimer = "whs_" + secrets.token_hex(6)  # this sender's name on its claims
        self.deliveries: Tally = Counter()
        self._held: set[str] = set()  # claimed, not yet marked
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()  # set by close: no waiting out the poll interval
        self._pruned_at = 0.0
        self._store_failing = False

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers={"user-agent": f"Bastion-Webhooks/{__version__}"},
        )
        self._task = asyncio.create_task(self._run(), name="bastion-webhooks")

    async def close(self) -> None:
        """Stop claiming; let deliveries under way finish briefly; hand back the rest."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_GRACE_S)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for event_id in list(self._held):  # due again at once, for whoever runs next
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store.event_failed(event_id, self.claimer, None, 0), 2)
        if self._session is not None:
            await self._session.close()

    # ---- the loop ------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._closing:
            try:
                if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                    self._pruned_at = time.monotonic()
                    if pruned := await self.store.prune_events(KEEP_S * 1_000_000):
                        log.info("webhooks: pruned %d events settled over a week ago", pruned)
                claimed = await self.run_once()
                self._store_failing = False
            except Exception as exc:  # the store is away: the events wait in it
                if not self._store_failing:
                    log.warning("webhooks: cannot reach the outbox (%s); will retry", exc)
                self._store_failing = True
                claimed = 0
            if claimed < BATCH:  # a full batch: more may be due, claim again at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s)

    async def run_once(self) -> int:
        """Claim one batch of due events and deliver it; returns how many were claimed."""
        hold_us = int((self.config.timeout_s + CLAIM_MARGIN_S) * 1_000_000)
        events = await self.store.claim_events(self.claimer, BATCH, hold_us)
        self._held.update(e.id for e in events)
        await asyncio.gather(*(self.deliver(e) for e in events))
        return len(events)

    async def deliver(self, event: OutboxEvent) -> None:
        """One attempt, then its outcome in the store (a store error leaves the claim to
        run out: the event is sent again later, never lost)."""
        age_s = time.time() - event.created_at / 1e6
        error: str | None = "too old to deliver"
        if age_s <= self.config.max_age_s:
            error = await self.post(event)
        try:
            if error is None:
                await self.store.event_delivered(event.id)
                self.deliveries[event.type, "delivered"] += 1
                return
            delay = retry_delay(event.attempts)
            if age_s + delay > self.config.max_age_s:
                await self.store.event_failed(event.id, self.claimer, error, None)
                self.deliveries[event.type, "given_up"] += 1
                log.error(
                    "webhook %s (%s) given up after %d attempts over %.0f s: %s",
                    event.id, event.type, event.attempts, age_s, error,
                )  # fmt: skip
                return
            await self.store.event_failed(
                event.id, self.claimer, error, int(delay * 1_000_000)
            )
            self.deliveries[event.type, "failed"] += 1
            log.warning(
                "webhook %s (%s) attempt %d failed: %s; next attempt in %.1f s",
                event.id, event.type, event.attempts, error, delay,
            )  # fmt: skip
        except Exception as exc:
            log.warning("webhook %s: outcome not recorded (%s); sent again later", event.id, exc)
        finally:
            self._held.discard(event.id)

    async def post(self, event: OutboxEvent) -> str | None:
        """POST the event's body, signed now: None if the receiver answered 2xx, else why not."""
        assert self._session is not None
        body = event.body.encode()
        headers = {"content-type": "application/json", HEADER: sign(self.config.secret, body)}
        try:
            async with self._session.post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {self.config.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]


class WebhookCollector(Collector):
    """``bastion_webhook_deliveries_total{type,result}``, read at scrape time."""

    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "bastion_webhook_deliveries",
            "Webhook delivery attempts by event type and result: delivered (2xx), failed"
            " (retried later), given_up (older than webhooks.max_age_s)",
            labels=["type", "result"],
        )
        for (type_, result), n in sorted(self.sender.deliveries.items()):
            family.add_metric([type_, result], n)
        yield family


def webhook_sender(
    store: Store, config: WebhooksConfig, registry: CollectorRegistry
) -> WebhookSender | None:
    """The gateway's sender, its metric registered; None when ``[webhooks] url`` is empty."""
    if not config.url:
        return None
    sender = WebhookSender(store, config)
    registry.register(WebhookCollector(sender))
    return sender
