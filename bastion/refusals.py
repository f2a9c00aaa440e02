"""Requests Bastion refused for the customer's own reasons, counted per account and key.

A 401 (revoked key), 402 (no credit), 403 (model not allowed) or 429 (rate limit)
writes no ledger row; these counts are how an operator sees a customer being refused.
They show in ``/metrics`` at once (``bastion_refusals_total``) and reach the store every
few seconds, summed per hour, for ``bastion refusals`` and the admin API. Counting costs
the refused path a dict update; a served request pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bastion.store import Refusal, Store

log = logging.getLogger("bastion")

COUNTED = frozenset({401, 402, 403, 429})

# (account_id, key_id, status, code); '' ids: no key was recognised
Kind = tuple[str, str, int, str]


class RefusalCounter:
    """Counts since start (for /metrics) and counts not yet in the store (for the flush)."""

    def __init__(self, store: Store, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self.total: Counter[Kind] = Counter()
        self.names: dict[str, str] = {}  # account_id -> name, for metric labels
        self._pending: Counter[Kind] = Counter()
        self._last: dict[Kind, int] = {}  # µs since epoch of the latest of each kind
        self._task: asyncio.Task[None] | None = None

    def count(self, status: int, code: str, account_id: str = "", name: str = "",
              key_id: str = "") -> None:  # fmt: skip
        kind = (account_id, key_id, status, code)
        self.total[kind] += 1
        self._pending[kind] += 1
        self._last[kind] = time.time_ns() // 1000
        if account_id:
            self.names[account_id] = name

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bastion-refusals")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 5.0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception as exc:  # the store is away: the counts wait for the next try
                log.debug("refusal counts not written yet: %s", exc)

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, Counter()
        rows = [Refusal(*kind, n, self._last[kind]) for kind, n in pending.items()]
        try:
            await self.store.add_refusals(rows)
        except BaseException:
            self._pending.update(pending)  # kept, not lost, not counted twice
            raise


class RefusalCollector(Collector):
    def __init__(self, counter: RefusalCounter) -> None:
        self.counter = counter

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "bastion_refusals",
            "Requests refused for the customer's reasons (401, 402, 403, 429) per account and"
            " key; empty labels: no key recognised",
            labels=["account", "key", "status", "code"],
        )
        names = self.counter.names
        for (account_id, key_id, status, code), n in sorted(self.counter.total.items()):
            family.add_metric([names.get(account_id, account_id), key_id, str(status), code], n)
        yield family
