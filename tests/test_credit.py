"""The credit book: admission against leased credit, and leases topped up before they run dry."""

from __future__ import annotations

import itertools
import time

from bastion.credit import CreditBook, LedgerWriter
from bastion.store import LedgerRow, Store, open_store

WORST = 1_000_000  # one request's worst case, nano-dollars
_ids = itertools.count()


async def setup(tmp_path, credit: int) -> tuple[Store, CreditBook, LedgerWriter, str, str]:
    store = open_store(f"sqlite:///{tmp_path / 'credit.db'}")
    await store.migrate()
    account = await store.create_account("acme", credit)
    key, _ = await store.create_key("acme")
    book = CreditBook(store, "gw_test")
    book.trusted_until = time.monotonic() + 60  # as after a heartbeat

    async def no_keys() -> None:
        return None

    return store, book, LedgerWriter(store, book, no_keys), account.id, key.id


async def burst(book: CreditBook, writer: LedgerWriter, acct: str, key_id: str) -> None:
    """64 requests at once, each charged its whole worst case, then a group commit."""
    held = [await book.reserve(acct, WORST) for _ in range(64)]
    assert all(held)
    for reservation in held:
        assert reservation is not None
        charged = book.settle(reservation, WORST)
        request_id = f"req_{next(_ids)}"
        writer.append(
            LedgerRow(request_id, acct, key_id, "m", "chat", 1, 1, charged, False, "200", 0)
        )
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
