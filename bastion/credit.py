"""Prepaid credit: admission against credit leased from the store, held in memory.

A gateway admits a request only against credit it has *leased* from the store: the
live gateways' leases never add up to more than an account's balance, so any number
of replicas admit locally, with no round trip per request, and still never
overspend (see ``store/migrations/0002_leases.sql``). Per account the book holds the
lease, the part of settled-but-unwritten costs that the lease backs (``pending``) and
the worst case of requests in flight (``reserved``); free = lease − pending − reserved.

Leases are topped up *before* they run dry, off the request path (``top_up``, run by
the ledger writer after each group commit). A request awaits the store only when its
account's credit is really short, or on the account's first request.

Trust. A lease is used only while the store answers heartbeats: ``trusted_until`` is
half the lease TTL after the last heartbeat began, and the store reclaims a lease a
whole TTL after the last heartbeat it saw (database clock). When trust lapses, or the
store says it reclaimed our leases, the book ``distrust``s: it forgets every lease,
takes a new gateway identity (the old one's leases are given back once the store
answers), and ends the streams admitted under the old leases. Costs settled from
then on for those requests are written without a lease: the store collects them
from credit nobody holds, and what it cannot cover is recorded as ``uncharged``, so
a balance never goes below zero.

Doubt. When the book and the store may disagree about a lease (a grant whose answer
was lost, a release that failed), the account is marked and the ledger writer
``resync``s it: both sides take the smaller value, so no credit stays stranded.

Key spend limits. What is left of a key's limit in one period is leased exactly like
an account's credit (``store/migrations/0008_key_budgets.sql``), so the book holds
both kinds of *bucket*: an account id, or a (key id, period start) pair. A request of
a key with a limit holds its worst case in the key's bucket first, then in the
account's (``Reservation.key``); top-ups, idle release, resync, trust and distrust
treat both alike, under the same gateway identity.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bastion.store import LedgerRow, Store

log = logging.getLogger("bastion.credit")

HEADROOM = 4  # a lease grows by what is missing + 4 worst cases, or + what is in use if larger
IDLE_RELEASE_S = 2.0  # an account unused this long gives its free lease back
GROW_ROUNDS = 3  # lease grants one waiting request may ask for before it is refused


Bucket = str | tuple[str, int]
"""What a lease is on: an account id, or (key id, period start) for a key's spend limit."""


class StoreUnavailable(Exception):
    """Credit cannot be confirmed: the store has not answered a heartbeat for too long."""


@dataclass(slots=True)
class Reservation:
    bucket: Bucket
    amount: int
    epoch: int  # the lease generation it was taken from (see ``CreditBook.distrust``)
    key: Reservation | None = None  # the same worst case, held in the key's budget


def new_gateway_id() -> str:
    return "gw_" + secrets.token_hex(6)


class CreditBook:
    def __init__(self, store: Store, gateway_id: str | None = None) -> None:
        self.store = store
        self.gateway_id = gateway_id or new_gateway_id()
        self.lease: dict[Bucket, int] = {}
        self.pending: dict[Bucket, int] = {}
        self.reserved: dict[Bucket, int] = {}
        self.unleased: dict[Bucket, int] = {}  # last seen, for 402 messages
        self.last_used: dict[Bucket, float] = {}
        self.peak: dict[Bucket, int] = {}  # most in use (reserved + pending) since the last top-up
        self.limits: dict[Bucket, int] = {}  # a key bucket's limit as last seen (``limit``)
        self.returning: dict[Bucket, int] = {}  # free lease to give back at the next refresh
        self.trusted_until = 0.0
        self.distrusted = False
        self.epoch = 0
        self.retired: list[str] = []  # identities whose leases go back when the store answers
        self.doubtful: set[Bucket] = set()  # buckets whose lease the store may see otherwise
        self.on_distrust: Callable[[str], None] = lambda why: None
        self.waits = 0  # requests that waited for a lease grant (metric)
        self.topups = 0  # background top-ups (metric)
        self.distrusts = 0  # times the leases were given up (metric)
        self._locks: dict[Bucket, asyncio.Lock] = {}

    def free(self, bucket: Bucket) -> int:
        return (
            self.lease.get(bucket, 0) - self.pending.get(bucket, 0) - self.reserved.get(bucket, 0)
        )

    def available(self, bucket: Bucket) -> int:
        """What the account (or key) could still spend: our free lease + what nobody leased."""
        return max(0, self.free(bucket)) + self.unleased.get(bucket, 0)

    @property
    def trusted(self) -> bool:
        return time.monotonic() <= self.trusted_until

    async def reserve(self, bucket: Bucket, amount: int) -> Reservation | None:
        """Hold ``amount`` for a request, or None if the account (or key) cannot cover it."""
        now = time.monotonic()
        if now > self.trusted_until:
            self.distrust("the credit store has not answered a heartbeat in time")
            raise StoreUnavailable
        self.last_used[bucket] = now
        if amount <= self.free(bucket):
            return self._take(bucket, amount)
        self.waits += 1
        # Waiting on the store, or behind a top-up that is, ends with trust: a store that
        # stopped answering refuses the request (503) when the leases could not be used
        # anyway, not after its own connection and command timeouts.
        try:
            async with asyncio.timeout(max(0.0, self.trusted_until - now)):
                return await self._reserve_waiting(bucket, amount, self.epoch)
        except TimeoutError:
            raise StoreUnavailable from None

    async def _reserve_waiting(self, bucket: Bucket, amount: int, epoch: int) -> Reservation | None:
        async with self._lock(bucket):
            # Requests admitted on the fast path meanwhile may take what a grant brought:
            # grow again while the store still has unleased credit (a few rounds at most)
            for round_ in range(GROW_ROUNDS):
                missing = amount - self.free(bucket)
                if missing <= 0 or (round_ and self.unleased.get(bucket) == 0):
                    break  # it fits, or the store has nothing more to lease
                headroom = max(HEADROOM * amount, self.in_use(bucket))
                await self._grow(bucket, missing + headroom)
                if self.epoch != epoch:
                    raise StoreUnavailable  # the leases were given up while we waited
            if amount <= self.free(bucket):
                return self._take(bucket, amount)
        return None

    def limit(self, bucket: Bucket, limit: int) -> None:
        """A key's spend limit as this gateway sees it now. Lowered: the free part of the
        bucket's lease goes back at the next refresh, so that admission follows the new
        limit within seconds (the store grants only against it); requests in flight keep
        what they hold."""
        seen = self.limits.get(bucket)
        if seen == limit:
            return
        self.limits[bucket] = limit
        if seen is not None and limit < seen and (free := self.free(bucket)) > 0:
            _add(self.lease, bucket, -free)
            _add(self.returning, bucket, free)

    def in_use(self, bucket: Bucket) -> int:
        return self.reserved.get(bucket, 0) + self.pending.get(bucket, 0)

    async def top_up(self) -> None:
        """Grow the lease of every busy account whose free part fell below its recent peak.

        Runs in the writer task, so requests find credit already leased."""
        for bucket, peak in list(self.peak.items()):
            self.peak[bucket] = self.in_use(bucket)
            free = self.free(bucket)
            lock = self._locks.get(bucket)
            if free >= peak or (lock is not None and lock.locked()):
                continue  # enough headroom, or a request is growing it right now
            if self.unleased.get(bucket) == 0:
                continue  # nothing left to lease: a request that needs more will ask
            async with self._lock(bucket):
                await self._grow(bucket, 2 * peak - free)
            self.topups += 1

    async def _grow(self, bucket: Bucket, want: int) -> None:
        """Lease more. Shielded: a caller that leaves mid-grant must not strand the grant."""
        epoch, gateway_id = self.epoch, self.gateway_id

        async def grant() -> None:
            try:
                if isinstance(bucket, str):
                    granted, unleased = await self.store.lease(gateway_id, bucket, want)
                else:
                    granted, unleased = await self.store.lease_key(gateway_id, *bucket, want)
            except BaseException:
                self.doubtful.add(bucket)  # it may have been granted all the same
                raise
            if self.epoch == epoch:  # else the old identity's leases are being given back
                self.lease[bucket] = self.lease.get(bucket, 0) + granted
                self.unleased[bucket] = unleased

        task = asyncio.ensure_future(grant())
        task.add_done_callback(_seen)  # a caller gone at the trust deadline never awaits it
        await asyncio.shield(task)

    def _lock(self, bucket: Bucket) -> asyncio.Lock:
        return self._locks.setdefault(bucket, asyncio.Lock())

    def _take(self, bucket: Bucket, amount: int) -> Reservation:
        reserved = self.reserved.get(bucket, 0) + amount
        self.reserved[bucket] = reserved
        in_use = reserved + self.pending.get(bucket, 0)
        if in_use > self.peak.get(bucket, 0):
            self.peak[bucket] = in_use
        return Reservation(bucket, amount, self.epoch)

    def release(self, reservation: Reservation) -> None:
        """Give the hold back whole (the key budget's with it): nothing was spent."""
        self._unhold(reservation)
        if reservation.key is not None:
            self._unhold(reservation.key)

    def _unhold(self, reservation: Reservation) -> None:
        if reservation.epoch == self.epoch:
            _add(self.reserved, reservation.bucket, -reservation.amount)
        reservation.amount = 0

    def settle(self, reservation: Reservation, cost: int) -> int:
        """Swap the reservation for the actual cost; returns the part our lease backs.

        The whole cost is always recorded; a part the lease cannot back (only an upstream
        that reports more than the admitted worst case asks for more, or a lease given
        up since admission) is collected by the store from unleased credit, or is
        ``uncharged``."""
        if reservation.epoch != self.epoch:
            reservation.amount = 0
            return 0
        bucket = reservation.bucket
        self._unhold(reservation)
        leased = max(0, min(cost, self.free(bucket)))
        _add(self.pending, bucket, leased)
        return leased

    def written(
        self, sent: list[LedgerRow], stored: list[LedgerRow], refused: Sequence[LedgerRow] = ()
    ) -> None:
        """Rows are durable: what each took from our leases has left the leases and pending.

        ``sent`` is what the writer sent (``leased``, ``key_leased`` = the parts we counted
        as pending), ``stored`` what the store wrote (the same fields = what it took from
        the leases). A difference means the store's lease is not what we think: the
        bucket is resynced. ``refused`` rows (dead letters) took nothing: what they held
        goes back to free.
        """
        for bucket, amount in _leased(refused).items():
            _add(self.pending, bucket, -amount)
        taken = _leased(stored)
        for bucket, amount in _leased(sent).items():
            _add(self.pending, bucket, -amount)
            took = taken.pop(bucket, 0)
            _add(self.lease, bucket, -took)
            if took != amount:
                self.doubtful.add(bucket)
        for bucket in taken:  # taken from a lease we did not count on: cannot be
            self.doubtful.add(bucket)

    def idle(self) -> dict[Bucket, int]:
        """Take the free lease of buckets unused for a while (and any lease a lowered key
        limit gave back) out of the book, for the store to have back."""
        cutoff = time.monotonic() - IDLE_RELEASE_S
        amounts, self.returning = self.returning, {}
        for bucket, used in list(self.last_used.items()):
            if used < cutoff and (free := self.free(bucket)) > 0:
                _add(amounts, bucket, free)
                _add(self.lease, bucket, -free)
            if used < cutoff:
                self.peak.pop(bucket, None)  # no top-ups for an idle bucket
            if used < cutoff and not self.lease.get(bucket):
                del self.last_used[bucket]
                self._locks.pop(bucket, None)
                self.limits.pop(bucket, None)
        return amounts

    async def resync(self) -> None:
        """Agree with the store on every doubtful lease: both keep the smaller value.

        Runs in the writer task between commits, so no ledger write moves the lease
        meanwhile; the bucket's lock keeps grants out."""
        for bucket in list(self.doubtful):
            async with self._lock(bucket):
                epoch = self.epoch
                mine = self.lease.get(bucket, 0)
                if isinstance(bucket, str):
                    agreed = await self.store.sync_lease(self.gateway_id, bucket, mine)
                else:
                    agreed = await self.store.sync_key_lease(self.gateway_id, *bucket, mine)
                if self.epoch == epoch:
                    _add(self.lease, bucket, agreed - mine)
                self.doubtful.discard(bucket)

    def holds_leases(self) -> bool:
        return bool(self.lease or self.pending or self.reserved)

    def trust(self, until: float) -> None:
        """The store answered a heartbeat: leases may be used until ``until`` (monotonic)."""
        self.trusted_until = until
        self.distrusted = False

    def distrust(self, why: str) -> None:
        """Give up every lease: forget them, take a new identity, end what used them."""
        if self.distrusted:
            return
        self.distrusted = True
        log.warning("credit leases given up (%s); requests get 503 until the store answers", why)
        self.distrusts += 1
        self.retired.append(self.gateway_id)
        self.gateway_id = new_gateway_id()
        self.epoch += 1
        self.trusted_until = 0.0
        for table in (self.lease, self.pending, self.reserved, self.peak, self.unleased):
            table.clear()
        self.limits.clear()
        self.returning.clear()  # part of the old identity's leases, which all go back
        self.doubtful.clear()
        self.on_distrust(why)


def split(amounts: dict[Bucket, int]) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Amounts per bucket as (per account, per key budget): the store keeps them apart."""
    accounts: dict[str, int] = {}
    keys: dict[tuple[str, int], int] = {}
    for bucket, amount in amounts.items():
        if isinstance(bucket, str):
            accounts[bucket] = amount
        else:
            keys[bucket] = amount
    return accounts, keys


def _leased(rows: Sequence[LedgerRow]) -> dict[Bucket, int]:
    """Σ the leased parts of the rows' costs, per bucket: ``leased`` of the account's
    lease, ``key_leased`` of the key budget's (rows with a ``key_period``)."""
    total: dict[Bucket, int] = {}
    for row in rows:
        if row.leased:
            total[row.account_id] = total.get(row.account_id, 0) + row.leased
        if row.key_leased and row.key_period is not None:
            bucket = (row.key_id, row.key_period)
            total[bucket] = total.get(bucket, 0) + row.key_leased
    return total


def _add(table: dict[Bucket, int], key: Bucket, delta: int) -> None:
    value = table.get(key, 0) + delta
    if value:
        table[key] = value
    else:
        table.pop(key, None)


def _seen(task: asyncio.Future[None]) -> None:
    """Retrieve a shielded grant's failure: it is handled (the bucket is marked doubtful)."""
    if not task.cancelled():
        task.exception()
