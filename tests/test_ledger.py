"""The ledger writer: group commits that one bad row can never stop."""

from __future__ import annotations

import time

from bastion.credit import CreditBook
from bastion.ledger import LedgerWriter
from bastion.store import LedgerRow, open_store


async def test_a_row_the_store_refuses_is_dead_lettered_and_the_rest_are_written(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    await store.migrate()
    acct = (await store.create_account("acme", 10_000)).id
    key, _ = await store.create_key("acme")
    book = CreditBook(store, "gw_test")
    book.trust(time.monotonic() + 60)

    async def no_keys() -> None:
        return None

    writer = LedgerWriter(store, book, no_keys)
    rows = []
    for i, tokens in enumerate((5, 2**63, 7)):  # the middle one fits no BIGINT column
        reservation = await book.reserve(acct, 100)
        assert reservation is not None
        leased = book.settle(reservation, 100)
        row = LedgerRow(f"r{i}", acct, key.id, "m", "chat", 1, tokens, 100, False, "200", 0)
        row.leased = leased
        rows.append(row)
        writer.append(row, reservation.epoch)
    await writer.flush()
    assert [r.request_id for r in await store.usage("acme")] == ["r0", "r2"]
    assert writer.dead_letters == 1 and writer.queue == []
    data = await store.audit_data()
    assert [d[0] for d in data.dead_letters] == ["r1"]
    # the refused row's cost went back to the lease: nothing stays pending, nothing doubtful
    assert book.pending.get(acct, 0) == 0 and not book.doubtful
    got = await store.get_account("acme")
    assert got.balance == 10_000 - 200 and got.reserved == book.lease[acct]
    await store.close()
