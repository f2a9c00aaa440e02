"""The ledger writer: settled rows to the store in group commits, and the book's upkeep.

One background task alternates between writing settled rows in batches (group
commit: rows gather for 10 ms, and whatever queues while a commit runs goes in the
next one), the credit book's upkeep (lease top-ups, resyncing doubtful leases, giving
back the leases of a retired identity and of idle accounts) and the periodic refresh
(keys, heartbeat). Serialised in one task, the book stays exact: no ledger write
moves a lease while the book reasons about it.

A batch the store refuses for its data (``RowRejected``: a value no column holds) is
written row by row; a row still refused goes to the dead-letter table, is counted and
logged, and the writer carries on with the others. A store that cannot be reached
keeps the rows queued until it answers.

A watchdog ends the book's trust at ``trusted_until`` even while the writer is stuck
on an unresponsive store, so streams admitted under a lease the store may reclaim are
ended in time.

Crashes. A process killed outright loses what only it knew. Streams in flight are
checkpointed: a new stream is recorded at the next commit, and every stream's tokens so
far at each refresh. The gateway that next sits in the same seat (host:port/worker)
reclaims the dead one's leases as it starts, and any gateway charges the checkpoints of
gateways that are gone (as ``cancelled``, ``estimated`` rows). What a crash can still
lose: rows settled in the last commit window (~10 ms), streams younger than that, and
each stream's tokens since its last checkpoint (≤ ``refresh_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from bastion.credit import CreditBook, split
from bastion.money import format_usd
from bastion.store import LEASE_TTL_US, LedgerRow, RowRejected, Store

log = logging.getLogger("bastion.ledger")

COMMIT_WINDOW_S = 0.01  # settled rows gather this long before a commit: fewer, larger fsyncs


class LedgerWriter:
    def __init__(
        self,
        store: Store,
        book: CreditBook,
        refresh_keys: Callable[[], Awaitable[None]],
        refresh_s: float = 1.0,
        lease_ttl_s: float = LEASE_TTL_US / 1e6,
        on_written: Callable[[list[LedgerRow]], None] = lambda rows: None,
        seat: str = "",
        inflight: Callable[[set[str]], tuple[list[LedgerRow], set[str]]] = lambda skip: (
            [],
            set(),
        ),
    ) -> None:
        self.store = store
        self.book = book
        self.refresh_keys = refresh_keys
        self.refresh_s = refresh_s
        self.trust_s = lease_ttl_s / 2  # a lease is used only this long after a heartbeat
        self.on_written = on_written
        self.queue: list[tuple[LedgerRow, int]] = []  # (row, the book's epoch when settled)
        self.dead_letters = 0  # rows the store refused (metric)
        self.seat = seat
        self.inflight = inflight
        self.checkpointed: set[str] = set()  # request ids with a checkpoint in the store
        self.progress_at = 0.0  # when every checkpoint was last brought up to date
        self.reclaimed_gateways = 0  # dead predecessors whose leases this gateway reclaimed
        self.reclaimed_streams = 0  # checkpoints of dead gateways charged by this one
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._failing = False
        self.last_refresh = 0.0

    def append(self, row: LedgerRow, epoch: int) -> None:
        self.queue.append((row, epoch))
        self._wake.set()

    async def start(self) -> None:
        if self.seat:
            for dead in await self.store.reclaim_seat(self.seat, self.book.gateway_id):
                self.reclaimed_gateways += 1
                log.warning(
                    "gateway %s, which served here (%s) before, stopped without a clean"
                    " shutdown (last heartbeat %.1f s ago): its credit leases (%s USD) are"
                    " back; rows it settled in its last commit window (~%d ms) may be missing,"
                    " its streams are charged from their last checkpoint",
                    dead.gateway_id, self.seat, time.time() - dead.seen_at / 1e6,
                    format_usd(dead.leased), COMMIT_WINDOW_S * 1000,
                )  # fmt: skip
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._run(), name="ledger-writer"),
            asyncio.create_task(self._watch(), name="lease-watchdog"),
        ]

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            if task.get_name() == "lease-watchdog":
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()
        for gateway_id in [*self.book.retired, self.book.gateway_id]:
            await self.store.retire(gateway_id)

    async def flush(self) -> None:
        if not self.queue:
            return
        entries, self.queue = self.queue, []
        epoch, gateway_id = self.book.epoch, self.book.gateway_id
        # rows settled under leases since given up are backed by no lease
        sent = [row if e == epoch else replace(row, leased=0, key_leased=0) for row, e in entries]
        refused: list[LedgerRow] = []
        try:
            stored = await self.store.write_ledger(sent, gateway_id)
        except RowRejected:
            stored = await self._one_by_one(sent, entries, gateway_id, refused)
        except BaseException:
            self.queue[:0] = entries
            raise
        self._done(sent, stored, epoch, refused)

    async def _one_by_one(
        self,
        sent: list[LedgerRow],
        entries: list[tuple[LedgerRow, int]],
        gateway_id: str,
        refused: list[LedgerRow],
    ) -> list[LedgerRow]:
        """A refused batch: write each row alone; dead-letter the ones still refused."""
        stored: list[LedgerRow] = []
        epoch = self.book.epoch
        for i, row in enumerate(sent):
            try:
                stored += await self.store.write_ledger([row], gateway_id)
            except RowRejected as exc:
                try:
                    await self.store.dead_letter(row, str(exc))
                except BaseException:
                    self.queue[:0] = entries[i:]
                    self._done(sent[:i], stored, epoch, refused)
                    raise
                refused.append(row)
                self.dead_letters += 1
                log.error(
                    "ledger row %s refused by the store (%s): kept as a dead letter;"
                    " `bastion audit` lists it",
                    row.request_id,
                    exc,
                )
            except BaseException:
                self.queue[:0] = entries[i:]
                self._done(sent[:i], stored, epoch, refused)
                raise
        return stored

    def _done(
        self, sent: list[LedgerRow], stored: list[LedgerRow], epoch: int, refused: list[LedgerRow]
    ) -> None:
        if self.book.epoch == epoch:  # else the book was reset meanwhile: nothing to undo
            done = {id(row) for row in refused}
            self.book.written([r for r in sent if id(r) not in done], stored, refused)
        if stored:
            self.on_written(stored)

    async def refresh(self) -> None:
        """Heartbeat (and learn whether our leases survived), give back what is not used."""
        book = self.book
        for old in list(book.retired):
            await self.store.retire(old)
            book.retired.remove(old)
        started = time.monotonic()
        known = await self.store.heartbeat(book.gateway_id, self.seat)
        if not known and book.holds_leases():
            book.distrust("the store reclaimed this gateway's leases")
            await self.store.heartbeat(book.gateway_id, self.seat)
        book.trust(started + self.trust_s)
        if rows := await self.store.reclaim_checkpoints():
            self.reclaimed_streams += len(rows)
            self.on_written(rows)
            log.warning(
                "charged %d streams of gateways that stopped without a clean shutdown, from"
                " their last checkpoint: %s",
                len(rows), ", ".join(r.request_id for r in rows[:10]),
            )  # fmt: skip
        await self.refresh_keys()
        if idle := book.idle():
            accounts, keys = split(idle)
            try:
                await self.store.release(book.gateway_id, accounts)
                await self.store.release_keys(book.gateway_id, keys)
            except BaseException:
                book.doubtful.update(idle)  # released or not: resync says which
                raise
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
                await self.checkpoint()
                if self.book.doubtful:
                    await self.book.resync()
                await self.book.top_up()
                if time.monotonic() - self.last_refresh >= self.refresh_s:
                    await self.refresh()
                backoff = 0.0
                if self._failing:
                    self._failing = False
                    log.warning("credit store reachable again; ledger writes resumed")
            except Exception as exc:
                if not self._failing:  # said once per outage, not once per retry
                    self._failing = True
                    log.warning(
                        "credit store unavailable (%s: %s); %d ledger rows queued",
                        type(exc).__name__,
                        exc,
                        len(self.queue),
                    )
                backoff = min(5.0, backoff * 2 or 0.1)

    async def checkpoint(self) -> None:
        """Record new streams at once, and every stream's progress once per refresh."""
        due = time.monotonic() - self.progress_at >= self.refresh_s
        if due:
            self.progress_at = time.monotonic()
        rows, current = self.inflight(set() if due else self.checkpointed)
        gone = list(self.checkpointed - current)
        if rows or gone:
            await self.store.checkpoint(self.book.gateway_id, rows, gone)
            self.checkpointed = current

    async def _watch(self) -> None:
        """End the book's trust on time, whatever the writer is waiting for."""
        while not self._closing:
            left = self.book.trusted_until - time.monotonic()
            if left > 0:
                await asyncio.sleep(left + 0.001)
            elif not self.book.distrusted:
                self.book.distrust("the credit store has not answered a heartbeat in time")
            else:
                await asyncio.sleep(0.05)
