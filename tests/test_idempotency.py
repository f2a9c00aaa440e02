"""Idempotent top-ups: a credit sent twice under one Idempotency-Key is applied once.

On both stores (SQLite file, fresh PostgreSQL database), then through two real gateway
replicas on one PostgreSQL, where the same top-up arrives at both at the same moment.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import PG_ADMIN_URL, Gateway, _pg_admin, free_port, start, stop

from bastion.store import Conflict, NotFound, Store, StoreError, open_store
from bastion.store.idempotency import KEEP_US, KeyReused
from bastion.store.sqlite import sqlite_path

USD = 1_000_000_000


async def sql(url: str, statement: str) -> list[tuple[Any, ...]]:
    """One statement straight on the database, behind the store's back."""
    if url.startswith("sqlite:"):
        with closing(sqlite3.connect(sqlite_path(url))) as conn, conn:
            return [tuple(r) for r in conn.execute(statement)]
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(statement)]
    finally:
        await conn.close()


async def grants(url: str, account_id: str) -> int:
    [(count,)] = await sql(url, f"SELECT COUNT(*) FROM credits WHERE account_id = '{account_id}'")
    return int(count)


# ---- the store -----------------------------------------------------------------------


async def test_the_same_top_up_twice_credits_once(store: Store, db_url: str) -> None:
    acme = await store.create_account("acme")
    first = await store.credit_account("acme", 10 * USD, idempotency_key="order-1")
    again = await store.credit_account("acme", 10 * USD, idempotency_key="order-1")
    assert first.balance == 10 * USD and not first.replayed
    assert again == first and again.replayed  # the first answer, word for word
    assert (await store.get_account("acme")).balance == 10 * USD
    assert await grants(db_url, acme.id) == 1


async def test_a_replay_is_the_first_answer_even_after_the_balance_moved(store: Store) -> None:
    await store.create_account("acme")
    first = await store.credit_account("acme", 5 * USD, idempotency_key="k")
    await store.credit_account("acme", 1 * USD)  # something else happened since
    again = await store.credit_account("acme", 5 * USD, idempotency_key="k")
    assert again == first and again.balance == 5 * USD
    assert (await store.get_account("acme")).balance == 6 * USD


async def test_a_different_top_up_under_a_used_key_is_refused(store: Store) -> None:
    await store.create_account("acme")
    await store.create_account("beta")
    await store.credit_account("acme", 10 * USD, idempotency_key="order-1")
    with pytest.raises(KeyReused, match="'order-1' was already used for another top-up"):
        await store.credit_account("acme", 11 * USD, idempotency_key="order-1")
    with pytest.raises(Conflict, match="already used"):  # KeyReused is a Conflict
        await store.credit_account("beta", 10 * USD, idempotency_key="order-1")
    assert (await store.get_account("acme")).balance == 10 * USD
    assert (await store.get_account("beta")).balance == 0


async def test_keys_are_separate_and_a_top_up_without_one_is_never_deduplicated(
    store: Store,
) -> None:
    await store.create_account("acme")
    await store.credit_account("acme", USD, idempotency_key="a")
    await store.credit_account("acme", USD, idempotency_key="b")
    await store.credit_account("acme", USD)
    await store.credit_account("acme", USD)
    assert (await store.get_account("acme")).balance == 4 * USD


async def test_a_refused_top_up_is_not_remembered(store: Store) -> None:
    """Nothing was applied, so retrying under the same key is safe and may succeed."""
    await store.create_account("acme")
    with pytest.raises(Conflict, match="cannot take back"):
        await store.credit_account("acme", -USD, idempotency_key="take")
    with pytest.raises(NotFound):
        await store.credit_account("ghost", USD, idempotency_key="ghost-1")
    await store.credit_account("acme", 2 * USD)
    taken = await store.credit_account("acme", -USD, idempotency_key="take")
    assert taken.balance == USD and not taken.replayed
    await store.create_account("ghost")
    assert not (await store.credit_account("ghost", USD, idempotency_key="ghost-1")).replayed


async def test_bad_keys_are_refused(store: Store) -> None:
    await store.create_account("acme")
    for bad in ("", " ", "x" * 256, "line\nbreak"):
        with pytest.raises(StoreError, match="idempotency key"):
            await store.credit_account("acme", USD, idempotency_key=bad)
    assert (await store.get_account("acme")).balance == 0
    longest = "k" * 255
    assert (await store.credit_account("acme", USD, idempotency_key=longest)).balance == USD


async def test_keys_are_kept_seven_days_then_forgotten(store: Store, db_url: str) -> None:
    await store.create_account("acme")
    await store.credit_account("acme", USD, idempotency_key="old")
    day = 86_400_000_000
    assert KEEP_US == 7 * day
    await sql(db_url, f"UPDATE idempotency_keys SET created_at = created_at - {KEEP_US - day}")
    assert (await store.credit_account("acme", USD, idempotency_key="old")).replayed  # day 6
    await sql(db_url, f"UPDATE idempotency_keys SET created_at = created_at - {2 * day}")
    again = await store.credit_account("acme", USD, idempotency_key="old")  # day 8: forgotten
    assert not again.replayed and again.balance == 2 * USD
    [(kept,)] = await sql(db_url, "SELECT COUNT(*) FROM idempotency_keys")
    assert kept == 1  # the expired row was pruned, the new one stays


async def test_concurrent_top_ups_under_one_key_credit_once(db_url: str) -> None:
    """Eight stores (eight connection pools on PostgreSQL) send the same top-up at once:
    the key's unique constraint lets one through, the others get its answer."""
    stores = [open_store(db_url) for _ in range(8)]
    try:
        await stores[0].migrate()
        acme = await stores[0].create_account("acme")
        for round_ in range(5):
            key = f"race-{round_}"
            answers = await asyncio.gather(
                *(s.credit_account("acme", USD, idempotency_key=key) for s in stores)
            )
            assert [a.replayed for a in answers].count(False) == 1, answers
            assert all(a == answers[0] for a in answers)
        assert (await stores[0].get_account("acme")).balance == 5 * USD
        assert await grants(db_url, acme.id) == 5
    finally:
        for s in stores:
            await s.close()


# ---- two gateway replicas on one PostgreSQL --------------------------------------------

TOKEN = "idem-admin-token"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    """Two `bastion serve` processes on one fresh PostgreSQL database, admin API on."""
    name = f"bastion_t_{uuid.uuid4().hex[:16]}"
    try:
        _pg_admin(f"CREATE DATABASE {name}")
    except Exception as exc:
        pytest.fail(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
    pg = urllib.parse.urlsplit(PG_ADMIN_URL)._replace(path=f"/{name}").geturl()
    config = tmp_path_factory.mktemp("idempotency") / "bastion.toml"
    config.write_text(f'[database]\nurl = "{pg}"\n')
    env = {**os.environ, "BASTION_ADMIN_TOKEN": TOKEN}
    gateways = []
    try:
        for _ in range(2):
            port = free_port()
            root = f"http://127.0.0.1:{port}"
            proc = start(
                ["serve", "--config", str(config), "--port", str(port)], f"{root}/healthz", env=env
            )
            gateways.append(Gateway(f"{root}/v1", root, config, pg, proc))
        yield gateways[0], gateways[1]
    finally:
        for gw in gateways:
            stop(gw.proc)
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def admin_client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"{gateway.root}/admin/v1",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )


def test_one_top_up_sent_to_both_replicas_at_once_credits_once(
    replicas: tuple[Gateway, Gateway],
) -> None:
    a, b = replicas
    name = "acct-" + uuid.uuid4().hex[:10]

    async def run() -> list[tuple[httpx.Response, httpx.Response]]:
        async with admin_client(a) as ca, admin_client(b) as cb:
            created = await ca.post("/accounts", json={"name": name})
            assert created.status_code == 201, created.text
            pairs = []
            for i in range(20):
                headers = {"Idempotency-Key": f"{name}-topup-{i}"}
                body = {"amount": f"{i + 1}.00"}
                pairs.append(
                    await asyncio.gather(
                        ca.post(f"/accounts/{name}/credit", json=body, headers=headers),
                        cb.post(f"/accounts/{name}/credit", json=body, headers=headers),
                    )
                )
            return pairs

    pairs = asyncio.run(run())
    for first, second in pairs:
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert first.json() == second.json()
        replayed = [r.headers.get("idempotent-replayed") for r in (first, second)]
        assert replayed in (["true", None], [None, "true"]), replayed  # one of them replayed
    balance = a.account(name).balance
    assert balance == sum(range(1, 21)) * USD  # $210: each top-up once
    assert pairs[-1][0].json()["balance"] == "210.00"


def test_a_used_key_with_another_amount_is_409_on_either_replica(
    replicas: tuple[Gateway, Gateway],
) -> None:
    a, b = replicas
    name = "acct-" + uuid.uuid4().hex[:10]

    async def run() -> tuple[httpx.Response, ...]:
        async with admin_client(a) as ca, admin_client(b) as cb:
            await ca.post("/accounts", json={"name": name})
            headers = {"Idempotency-Key": f"{name}-k"}
            first = await ca.post(f"/accounts/{name}/credit", json={"amount": "5"}, headers=headers)
            other = await cb.post(f"/accounts/{name}/credit", json={"amount": "6"}, headers=headers)
            same = await cb.post(f"/accounts/{name}/credit", json={"amount": "5"}, headers=headers)
            return first, other, same

    first, other, same = asyncio.run(run())
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert same.status_code == 200 and same.json() == first.json()
    assert same.headers["idempotent-replayed"] == "true"
    assert a.account(name).balance == 5 * USD
