"""Prepaid credit in memory, the ledger on disk: admission and settlement in microseconds.

Per account the book holds the balance last read from the store, the cost of
requests settled but not yet written (``pending``), and the worst-case cost of
requests in flight (``reserved``). Available = balance − pending − reserved, and a
request is admitted only if its worst case fits, so the balance never drops below
zero. One background task alternates between writing settled rows in batches
(group commit: whatever queued while the last commit ran goes in the next) and
re-reading keys and balances, so CLI and admin changes land within a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bastion.store import LedgerRow, Snapshot, Store

log = logging.getLogger("bastion.credit")


@dataclass(slots=True)
class Reservation:
    account_id: str
    amount: int


class CreditBook:
    def __init__(self) -> None:
        self.balance: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.reserved: dict[str, int] = {}

    def available(self, account_id: str) -> int:
        return (
            self.balance.get(account_id, 0)
            - self.pending.get(account_id, 0)
            - self.reserved.get(account_id, 0)
        )

    def reserve(self, account_id: str, amount: int) -> Reservation | None:
        if amount > self.available(account_id):
            return None
        self.reserved[account_id] = self.reserved.get(account_id, 0) + amount
        return Reservation(account_id, amount)

    def release(self, reservation: Reservation) -> None:
        left = self.reserved[reservation.account_id] - reservation.amount
        if left:
            self.reserved[reservation.account_id] = left
        else:
            del self.reserved[reservation.account_id]
        reservation.amount = 0

    def settle(self, reservation: Reservation, cost: int) -> int:
        """Swap the reservation for the actual cost; returns what is charged.

        The charge never exceeds what the account can pay (only an upstream that
        reports more than the admitted worst case could ask for more)."""
        account_id = reservation.account_id
        self.release(reservation)
        charged = max(0, min(cost, self.available(account_id)))
        if charged:
            self.pending[account_id] = self.pending.get(account_id, 0) + charged
        return charged

    def written(self, rows: list[LedgerRow]) -> None:
        """Rows are durable: their cost moves from pending into the stored balance."""
        for row in rows:
            left = self.pending.get(row.account_id, 0) - row.cost
            if left:
                self.pending[row.account_id] = left
            else:
                self.pending.pop(row.account_id, None)

    def load(self, balances: dict[str, int]) -> None:
        self.balance = balances


class LedgerWriter:
    """Group commit + periodic refresh, serialised in one task so the book stays exact."""

    def __init__(
        self,
        store: Store,
        book: CreditBook,
        on_snapshot: Callable[[Snapshot], None],
        gateway_id: str,
        refresh_s: float = 1.0,
    ) -> None:
        self.store = store
        self.book = book
        self.on_snapshot = on_snapshot
        self.gateway_id = gateway_id
        self.refresh_s = refresh_s
        self.queue: list[LedgerRow] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_refresh = 0.0
        self.write_errors = 0

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
        await self.store.set_reservations(self.gateway_id, {})

    async def flush(self) -> None:
        if not self.queue:
            return
        rows, self.queue = self.queue, []
        try:
            await self.store.write_ledger(rows)
        except Exception:
            self.write_errors += 1
            log.exception("ledger write failed; %d rows kept for retry", len(rows))
            self.queue[:0] = rows
            raise
        self.book.written(rows)

    async def refresh(self) -> None:
        snapshot = await self.store.snapshot()
        self.book.load(snapshot.balances)
        self.on_snapshot(snapshot)
        await self.store.set_reservations(self.gateway_id, dict(self.book.reserved))
        self.last_refresh = time.monotonic()

    async def _run(self) -> None:
        backoff = 0.0
        while not self._closing:
            timeout = max(0.0, self.last_refresh + self.refresh_s - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout + backoff)
            self._wake.clear()
            try:
                await self.flush()
                if time.monotonic() - self.last_refresh >= self.refresh_s:
                    await self.refresh()
                backoff = 0.0
            except Exception:
                log.exception("store unavailable; retrying")
                backoff = min(5.0, backoff * 2 or 0.1)
