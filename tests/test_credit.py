"""The credit book: admission against leased credit, and leases topped up before they run dry."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import replace

import pytest

from bastion.credit import CreditBook, StoreUnavailable
from bastion.ledger import LedgerWriter
from bastion.store import LedgerRow, Store, open_store

WORST = 1_000_000  # one request's worst case, nano-dollars
_ids = itertools.count()


async def setup(tmp_path, credit: int) -> tuple[Store, CreditBook, LedgerWriter, str, str]:
    store = open_store(f"sqlite:///{tmp_path / 'credit.db'}")
    await store.migrate()
    account = await store.create_account("acme", credit)
    key, _ = await store.create_key("acme")
    book = CreditBook(store, "gw_test")
    book.trust(time.monotonic() + 60)  # as after a heartbeat

    async def no_keys() -> None:
        return None

    return store, book, LedgerWriter(store, book, no_keys), account.id, key.id


async def burst(book: CreditBook, writer: LedgerWriter, acct: str, key_id: str) -> None:
    """64 requests at once, each charged its whole worst case, then a group commit."""
    held = [await book.reserve(acct, WORST) for _ in range(64)]
    assert all(held)
    for reservation in held:
        assert reservation is not None
        leased = book.settle(reservation, WORST)
        request_id = f"req_{next(_ids)}"
        row = LedgerRow(request_id, acct, key_id, "m", "chat", 1, 1, WORST, False, "200", 0)
        writer.append(replace(row, leased=leased), reservation.epoch)
    await writer.flush()


async def test_after_a_commit_the_lease_is_topped_up_so_the_next_burst_never_waits(tmp_path):
    store, book, writer, acct, key_id = await setup(tmp_path, 10_000 * WORST)
    await burst(book, writer, acct, key_id)
    assert book.waits > 0  # the account's first burst asks the store, as it must
    assert book.free(acct) < 64 * WORST  # the commit spent most of the lease
    waits = book.waits
    await book.top_up()  # what the writer task does after each group commit
    assert book.topups == 1 and book.free(acct) >= 64 * WORST
    await burst(book, writer, acct, key_id)
    assert book.waits == waits  # the second burst found its credit already leased
    assert (await store.get_account("acme")).spent == 128 * WORST
    await store.close()


async def test_top_ups_never_lease_more_than_the_balance(tmp_path):
    store, book, _, acct, _ = await setup(tmp_path, 10 * WORST)
    held = [await book.reserve(acct, WORST) for _ in range(10)]
    assert all(held) and await book.reserve(acct, WORST) is None  # the balance is used up
    await book.top_up()
    assert book.lease[acct] == 10 * WORST and book.available(acct) == 0
    await store.close()


class SlowGrants:
    """The real store, with lease grants that take a while (a client can leave meanwhile)."""

    def __init__(self, store: Store, delay: float) -> None:
        self.store, self.delay = store, delay

    async def lease(self, gateway_id: str, account_id: str, want: int) -> tuple[int, int]:
        await asyncio.sleep(self.delay)
        return await self.store.lease(gateway_id, account_id, want)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


async def test_a_client_that_leaves_during_a_grant_strands_no_credit(tmp_path):
    store, _, _, acct, _ = await setup(tmp_path, 100 * WORST)
    book = CreditBook(SlowGrants(store, 0.2), "gw_test")  # type: ignore[arg-type]
    book.trust(time.monotonic() + 60)
    waiting = asyncio.create_task(book.reserve(acct, WORST))
    await asyncio.sleep(0.05)
    waiting.cancel()  # the client went away while the store was granting
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.3)
    held = (await store.get_account("acme")).reserved
    assert held > 0 and book.lease[acct] == held  # the grant is in the book, not stranded
    assert book.free(acct) == held  # and nothing is reserved for the request that left
    await store.close()


class FailingReleases:
    """The real store, whose next release fails after it was applied (an answer lost)."""

    def __init__(self, store: Store) -> None:
        self.store, self.fail_next = store, True

    async def release(self, gateway_id: str, amounts: dict[str, int]) -> None:
        await self.store.release(gateway_id, amounts)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionResetError("answer lost")

    def __getattr__(self, name: str):
        return getattr(self.store, name)


class LostReleases(FailingReleases):
    """The real store, whose next release never arrives."""

    async def release(self, gateway_id: str, amounts: dict[str, int]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionResetError("not sent")
        await self.store.release(gateway_id, amounts)


@pytest.mark.parametrize("flaky", [FailingReleases, LostReleases])
async def test_a_failed_release_is_resynced_so_credit_comes_back(tmp_path, monkeypatch, flaky):
    store, _, _, acct, _ = await setup(tmp_path, 100 * WORST)
    shaky = flaky(store)
    book = CreditBook(shaky, "gw_test")  # type: ignore[arg-type]
    writer = LedgerWriter(shaky, book, _no_keys)  # type: ignore[arg-type]
    await writer.refresh()
    reservation = await book.reserve(acct, WORST)
    assert reservation is not None
    book.release(reservation)
    monkeypatch.setattr("bastion.credit.IDLE_RELEASE_S", 0.0)
    with pytest.raises(ConnectionResetError):
        await writer.refresh()  # the idle lease goes back... or not: the answer never came
    assert acct in book.doubtful
    await book.resync()
    assert (await store.get_account("acme")).reserved == book.lease.get(acct, 0) == 0
    assert not book.doubtful
    await store.close()


async def _no_keys() -> None:
    return None


async def test_a_cost_above_the_free_lease_is_backed_only_as_far_as_the_lease_goes(tmp_path):
    store, book, writer, acct, key_id = await setup(tmp_path, 3 * WORST)
    reservation = await book.reserve(acct, WORST)
    assert reservation is not None and book.lease[acct] == 3 * WORST  # all there is
    leased = book.settle(reservation, 5 * WORST)  # the upstream reported more than possible
    assert leased == 3 * WORST
    row = LedgerRow("big", acct, key_id, "m", "chat", 1, 1, 5 * WORST, False, "200", 0)
    writer.append(replace(row, leased=leased), reservation.epoch)
    await writer.flush()
    [stored] = await store.usage("acme")
    assert (stored.cost, stored.uncharged) == (5 * WORST, 2 * WORST)  # exact, never hidden
    assert (await store.get_account("acme")).balance == 0
    assert book.lease.get(acct, 0) == book.pending.get(acct, 0) == 0 and not book.doubtful
    await store.close()


async def test_given_up_leases_end_streams_and_their_costs_need_no_lease(tmp_path):
    store, book, writer, acct, key_id = await setup(tmp_path, 10 * WORST)
    ended: list[str] = []
    book.on_distrust = ended.append
    old_id = book.gateway_id
    reservation = await book.reserve(acct, WORST)
    assert reservation is not None
    book.trust(time.monotonic() - 1)  # no heartbeat answered in time
    with pytest.raises(StoreUnavailable):
        await book.reserve(acct, WORST)
    assert ended and book.gateway_id != old_id and old_id in book.retired
    assert book.settle(reservation, WORST) == 0  # backed by no lease any more
    row = LedgerRow("late", acct, key_id, "m", "chat", 1, 1, WORST, False, "200", 0)
    writer.append(row, reservation.epoch)
    await writer.refresh()  # the store answers again: the old identity's leases go back
    assert book.retired == [] and book.trusted
    await writer.flush()
    acct_now = await store.get_account("acme")
    assert acct_now.balance == 9 * WORST and acct_now.reserved == 0 and acct_now.uncharged == 0
    await store.close()


async def test_a_reaped_gateway_stops_trusting_what_it_held(tmp_path):
    store, book, writer, acct, _ = await setup(tmp_path, 10 * WORST)
    await book.reserve(acct, WORST)
    held = book.lease[acct]
    await store.retire(book.gateway_id)  # as another replica's reaper would
    await writer.refresh()
    assert book.lease == {} and book.distrusts == 1  # it re-leases before admitting again
    assert await book.reserve(acct, WORST) is not None
    assert (await store.get_account("acme")).reserved == book.lease[acct] <= held + 5 * WORST
    await store.close()


async def test_a_burst_on_a_rich_account_is_never_refused_while_credit_is_unleased(tmp_path):
    """Requests that wait for a grant must not lose it to others admitted meanwhile: a
    rich account's burst is never refused (found by the soak: 1 in ~150,000 got 402)."""
    store, _, _, acct, _ = await setup(tmp_path, 10**15)
    refused = 0
    for trial in range(40):
        book = CreditBook(store, f"gw_{trial}")
        book.trust(time.monotonic() + 60)
        rng = random.Random(trial)

        async def one(book: CreditBook, rng: random.Random) -> None:
            nonlocal refused
            await asyncio.sleep(rng.uniform(0, 0.02))
            amount = rng.choice([46_000] * 6 + [238_000])
            reservation = await book.reserve(acct, amount)
            if reservation is None:
                refused += 1
                return
            await asyncio.sleep(rng.uniform(0, 0.05))
            book.settle(reservation, amount // 3)

        await asyncio.gather(*(one(book, rng) for _ in range(64)))
        await store.retire(book.gateway_id)
    assert refused == 0
    await store.close()


async def test_a_request_waiting_on_a_stuck_store_gives_up_when_trust_ends(tmp_path):
    """A grant the store does not answer (here: another process holds the database's write
    lock) must not hold the request past the moment its leases could not be used anyway:
    it is refused (503) at the end of trust, not after the store's own timeouts."""
    import sqlite3

    store, book, _, acct, _ = await setup(tmp_path, 100 * WORST)
    book.trust(time.monotonic() + 0.5)
    blocker = sqlite3.connect(tmp_path / "credit.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # every lease grant now waits for the busy timeout
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await book.reserve(acct, WORST)
        assert time.monotonic() - started < 2.0  # not the 10 s busy timeout
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await store.close()
