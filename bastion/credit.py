"""Prepaid credit: admission against leased credit in memory, the ledger written in batches.

A gateway admits a request only against credit it has *leased* from the store: the
live gateways' leases never add up to more than an account's balance, so any number
of replicas admit locally, with no round trip per request, and still never
overspend (see ``store/migrations/0002_leases.sql``). Per account the book holds the
lease, the cost of requests settled but not yet written (``pending``) and the worst
case of requests in flight (``reserved``); free = lease − pending − reserved.

Leases are topped up *before* they run dry, off the request path: after each group
commit the writer task tops up every busy account whose free lease fell below the
most it had in use (reserved + pending) since the last check, to twice that. So a
request awaits the store only when its account's credit is really short, or on the
account's first request; then the lease grows by one store round trip (serialised
per account) by what is missing plus as much again as is in use. Leases of idle
accounts go back after a few seconds, so credit a replica holds but does not use
is soon available to the others.

One background task alternates between writing settled rows in batches (group
commit: rows gather for 10 ms, and whatever queues while a commit runs goes in the
next one; the cost leaves the balance and the lease together), the lease top-ups,
and the periodic refresh: keys, heartbeat, idle leases back. A gateway whose
heartbeats fail stops trusting its leases before the store would reclaim them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bastion.store import LEASE_TTL_US, LedgerRow, Store

log = logging.getLogger("bastion.credit")

HEADROOM = 4  # a lease grows by what is missing + 4 worst cases, or + what is in use if larger
IDLE_RELEASE_S = 2.0  # an account unused this long gives its free lease back
TRUST_S = LEASE_TTL_US / 1_000_000 / 2  # leases are used only this long after a heartbeat
COMMIT_WINDOW_S = 0.01  # settled rows gather this long before a commit: fewer, larger fsyncs


class StoreUnavailable(Exception):
    """Credit cannot be confirmed: the store has not answered a heartbeat for too long."""


@dataclass(slots=True)
class Reservation:
    account_id: str
    amount: int


class CreditBook:
    def __init__(self, store: Store, gateway_id: str) -> None:
        self.store = store
        self.gateway_id = gateway_id
        self.lease: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.unleased: dict[str, int] = {}  # last seen, for 402 messages
        self.last_used: dict[str, float] = {}
        self.peak: dict[str, int] = {}  # most in use (reserved + pending) since the last top-up
        self.trusted_until = 0.0
        self.waits = 0  # requests that waited for a lease grant (metric)
        self.topups = 0  # background top-ups (metric)
        self._locks: dict[str, asyncio.Lock] = {}

    def free(self, account_id: str) -> int:
        return (
            self.lease.get(account_id, 0)
            - self.pending.get(account_id, 0)
            - self.reserved.get(account_id, 0)
        )

    def available(self, account_id: str) -> int:
        """What the account could still spend: our free lease + what nobody has leased."""
        return max(0, self.free(account_id)) + self.unleased.get(account_id, 0)

    async def reserve(self, account_id: str, amount: int) -> Reservation | None:
        """Hold ``amount`` for a request, or None if the account cannot cover it."""
        now = time.monotonic()
        if now > self.trusted_until:
            raise StoreUnavailable
        self.last_used[account_id] = now
        if amount <= self.free(account_id):
            return self._take(account_id, amount)
        self.waits += 1
        async with self._lock(account_id):
            missing = amount - self.free(account_id)
            if missing > 0:
                headroom = max(HEADROOM * amount, self.in_use(account_id))
                await self._grow(account_id, missing + headroom)
            if amount <= self.free(account_id):
                return self._take(account_id, amount)
        return None

    def in_use(self, account_id: str) -> int:
        return self.reserved.get(account_id, 0) + self.pending.get(account_id, 0)

    async def top_up(self) -> None:
        """Grow the lease of every busy account whose free part fell below its recent peak.

        Runs in the writer task, so requests find credit already leased."""
        for account_id, peak in list(self.peak.items()):
            self.peak[account_id] = self.in_use(account_id)
            free = self.free(account_id)
            lock = self._locks.get(account_id)
            if free >= peak or (lock is not None and lock.locked()):
                continue  # enough headroom, or a request is growing it right now
            if self.unleased.get(account_id) == 0:
                continue  # nothing left to lease: a request that needs more will ask
            async with self._lock(account_id):
                await self._grow(account_id, 2 * peak - free)
            self.topups += 1

    async def _grow(self, account_id: str, want: int) -> None:
        granted, unleased = await self.store.lease(self.gateway_id, account_id, want)
        self.lease[account_id] = self.lease.get(account_id, 0) + granted
        self.unleased[account_id] = unleased

    def _lock(self, account_id: str) -> asyncio.Lock:
        return self._locks.setdefault(account_id, asyncio.Lock())

    def _take(self, account_id: str, amount: int) -> Reservation:
        reserved = self.reserved.get(account_id, 0) + amount
        self.reserved[account_id] = reserved
        in_use = reserved + self.pending.get(account_id, 0)
        if in_use > self.peak.get(account_id, 0):
            self.peak[account_id] = in_use
        return Reservation(account_id, amount)

    def release(self, reservation: Reservation) -> None:
        _add(self.reserved, reservation.account_id, -reservation.amount)
        reservation.amount = 0

    def settle(self, reservation: Reservation, cost: int) -> int:
        """Swap the reservation for the actual cost; returns what is charged.

        The charge never exceeds the free lease (only an upstream that reports more
        than the admitted worst case could ask for more)."""
        account_id = reservation.account_id
        self.release(reservation)
        charged = max(0, min(cost, self.free(account_id)))
        _add(self.pending, account_id, charged)
        return charged

    def written(self, rows: list[LedgerRow]) -> None:
        """Rows are durable: their cost has left the stored balance and our lease."""
        for row in rows:
            _add(self.pending, row.account_id, -row.cost)
            _add(self.lease, row.account_id, -row.cost)

    def idle(self) -> dict[str, int]:
        """Take the free lease of accounts unused for a while out of the book."""
        cutoff = time.monotonic() - IDLE_RELEASE_S
        amounts = {}
        for account_id, used in list(self.last_used.items()):
            if used < cutoff and (free := self.free(account_id)) > 0:
                amounts[account_id] = free
                _add(self.lease, account_id, -free)
            if used < cutoff:
                self.peak.pop(account_id, None)  # no top-ups for an idle account
            if used < cutoff and not self.lease.get(account_id):
                del self.last_used[account_id]
                self._locks.pop(account_id, None)
        return amounts


def _add(table: dict[str, int], key: str, delta: int) -> None:
    value = table.get(key, 0) + delta
    if value:
        table[key] = value
    else:
        table.pop(key, None)


class LedgerWriter:
    """Group commit + periodic refresh, serialised in one task so the book stays exact."""

    def __init__(
        self,
        store: Store,
        book: CreditBook,
        refresh_keys: Callable[[], Awaitable[None]],
        refresh_s: float = 1.0,
    ) -> None:
        self.store = store
        self.book = book
        self.refresh_keys = refresh_keys
        self.refresh_s = refresh_s
        self.queue: list[LedgerRow] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_refresh = 0.0

    def append(self, row: LedgerRow) -> None:
        self.queue.append(row)
        self._wake.set()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        await self.store.retire(self.book.gateway_id)

    async def flush(self) -> None:
        if not self.queue:
            return
        rows, self.queue = self.queue, []
        try:
            await self.store.write_ledger(rows, self.book.gateway_id)
        except BaseException:
            self.queue[:0] = rows
            raise
        self.book.written(rows)

    async def refresh(self) -> None:
        started = time.monotonic()
        await self.store.heartbeat(self.book.gateway_id)
        self.book.trusted_until = started + TRUST_S
        await self.refresh_keys()
        if idle := self.book.idle():
            await self.store.release(self.book.gateway_id, idle)
        self.last_refresh = time.monotonic()

    async def _run(self) -> None:
        backoff = 0.0
        while not self._closing:
            timeout = max(0.0, self.last_refresh + self.refresh_s - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout + backoff)
            self._wake.clear()
            if self.queue and not self._closing:
                await asyncio.sleep(COMMIT_WINDOW_S)
            try:
                await self.flush()
                await self.book.top_up()
                if time.monotonic() - self.last_refresh >= self.refresh_s:
                    await self.refresh()
                backoff = 0.0
            except Exception:
                log.exception("store unavailable; %d ledger rows queued", len(self.queue))
                backoff = min(5.0, backoff * 2 or 0.1)
