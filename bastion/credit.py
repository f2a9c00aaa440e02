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


class StoreUnavailable(Exception):
    """Credit cannot be confirmed: the store has not answered a heartbeat for too long."""


@dataclass(slots=True)
class Reservation:
    account_id: str
    amount: int
    epoch: int  # the lease generation it was taken from (see ``CreditBook.distrust``)


def new_gateway_id() -> str:
    return "gw_" + secrets.token_hex(6)


class CreditBook:
    def __init__(self, store: Store, gateway_id: str | None = None) -> None:
        self.store = store
        self.gateway_id = gateway_id or new_gateway_id()
        self.lease: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.unleased: dict[str, int] = {}  # last seen, for 402 messages
        self.last_used: dict[str, float] = {}
        self.peak: dict[str, int] = {}  # most in use (reserved + pending) since the last top-up
        self.trusted_until = 0.0
        self.distrusted = False
        self.epoch = 0
        self.retired: list[str] = []  # identities whose leases go back when the store answers
        self.doubtful: set[str] = set()  # accounts whose lease the store may see otherwise
        self.on_distrust: Callable[[str], None] = lambda why: None
        self.waits = 0  # requests that waited for a lease grant (metric)
        self.topups = 0  # background top-ups (metric)
        self.distrusts = 0  # times the leases were given up (metric)
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

    @property
    def trusted(self) -> bool:
        return time.monotonic() <= self.trusted_until

    async def reserve(self, account_id: str, amount: int) -> Reservation | None:
        """Hold ``amount`` for a request, or None if the account cannot cover it."""
        now = time.monotonic()
        if now > self.trusted_until:
            self.distrust("the credit store has not answered a heartbeat in time")
            raise StoreUnavailable
        self.last_used[account_id] = now
        if amount <= self.free(account_id):
            return self._take(account_id, amount)
        self.waits += 1
        epoch = self.epoch
        async with self._lock(account_id):
            # Requests admitted on the fast path meanwhile may take what a grant brought:
            # grow again while the store still has unleased credit (a few rounds at most)
            for round_ in range(GROW_ROUNDS):
                missing = amount - self.free(account_id)
                if missing <= 0 or (round_ and self.unleased.get(account_id) == 0):
                    break  # it fits, or the store has nothing more to lease
                headroom = max(HEADROOM * amount, self.in_use(account_id))
                await self._grow(account_id, missing + headroom)
                if self.epoch != epoch:
                    raise StoreUnavailable  # the leases were given up while we waited
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
        """Lease more. Shielded: a caller that leaves mid-grant must not strand the grant."""
        epoch, gateway_id = self.epoch, self.gateway_id

        async def grant() -> None:
            try:
                granted, unleased = await self.store.lease(gateway_id, account_id, want)
            except BaseException:
                self.doubtful.add(account_id)  # it may have been granted all the same
                raise
            if self.epoch == epoch:  # else the old identity's leases are being given back
                self.lease[account_id] = self.lease.get(account_id, 0) + granted
                self.unleased[account_id] = unleased

        await asyncio.shield(asyncio.ensure_future(grant()))

    def _lock(self, account_id: str) -> asyncio.Lock:
        return self._locks.setdefault(account_id, asyncio.Lock())

    def _take(self, account_id: str, amount: int) -> Reservation:
        reserved = self.reserved.get(account_id, 0) + amount
        self.reserved[account_id] = reserved
        in_use = reserved + self.pending.get(account_id, 0)
        if in_use > self.peak.get(account_id, 0):
            self.peak[account_id] = in_use
        return Reservation(account_id, amount, self.epoch)

    def release(self, reservation: Reservation) -> None:
        if reservation.epoch == self.epoch:
            _add(self.reserved, reservation.account_id, -reservation.amount)
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
        account_id = reservation.account_id
        self.release(reservation)
        leased = max(0, min(cost, self.free(account_id)))
        _add(self.pending, account_id, leased)
        return leased

    def written(
        self, sent: list[LedgerRow], stored: list[LedgerRow], refused: Sequence[LedgerRow] = ()
    ) -> None:
        """Rows are durable: what each took from our lease has left the lease and pending.

        ``sent`` is what the writer sent (``leased`` = the part we counted as pending),
        ``stored`` what the store wrote (``leased`` = what it took from the lease). A
        difference means the store's lease is not what we think: the account is resynced.
        ``refused`` rows (dead letters) took nothing: what they held goes back to free.
        """
        for row in refused:
            _add(self.pending, row.account_id, -row.leased)
        counted: dict[str, int] = {}
        for row in sent:
            if row.leased:
                counted[row.account_id] = counted.get(row.account_id, 0) + row.leased
        taken: dict[str, int] = {}
        for row in stored:
            if row.leased:
                taken[row.account_id] = taken.get(row.account_id, 0) + row.leased
        for account_id, amount in counted.items():
            _add(self.pending, account_id, -amount)
            took = taken.pop(account_id, 0)
            _add(self.lease, account_id, -took)
            if took != amount:
                self.doubtful.add(account_id)
        for account_id in taken:  # taken from a lease we did not count on: cannot be
            self.doubtful.add(account_id)

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

    async def resync(self) -> None:
        """Agree with the store on every doubtful lease: both keep the smaller value.

        Runs in the writer task between commits, so no ledger write moves the lease
        meanwhile; the account's lock keeps grants out."""
        for account_id in list(self.doubtful):
            async with self._lock(account_id):
                epoch = self.epoch
                mine = self.lease.get(account_id, 0)
                agreed = await self.store.sync_lease(self.gateway_id, account_id, mine)
                if self.epoch == epoch:
                    _add(self.lease, account_id, agreed - mine)
                self.doubtful.discard(account_id)

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
        self.doubtful.clear()
        self.on_distrust(why)


def _add(table: dict[str, int], key: str, delta: int) -> None:
    value = table.get(key, 0) + delta
    if value:
        table[key] = value
    else:
        table.pop(key, None)
