"""Scale-out (docs/deploy.md): two replicas on one PostgreSQL and one Redis keep every invariant."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import openai
import pytest
from conftest import (
    PG_ADMIN_URL,
    Gateway,
    _pg_admin,
    free_port,
    limiter_fell_back,
    mixed_burst,
    shared_store_toml,
    start,
    start_replicas,
    stop,
)
from openai import OpenAI

from bastion.money import cost_nanos, parse_usd


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    name = f"bastion_t_{uuid.uuid4().hex[:16]}"
    try:
        _pg_admin(f"CREATE DATABASE {name}")
    except Exception as exc:
        pytest.fail(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
    yield urllib.parse.urlsplit(PG_ADMIN_URL)._replace(path=f"/{name}").geturl()
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, pg: str, sim_port: int) -> Iterator[tuple[Gateway, Gateway]]:
    """Two `bastion serve` processes, same config, same PostgreSQL and Redis."""
    tmp = tmp_path_factory.mktemp("scaleout")
    config = tmp / "bastion.toml"
    config.write_text(shared_store_toml(pg, sim_port))
    gateways = start_replicas(config, pg, env={"BASTION_ADMIN_TOKEN": "admin-secret"})
    yield gateways[0], gateways[1]
    for gw in gateways:
        stop(gw.proc)


def test_invariants_hold_under_200_concurrent_requests_over_both(replicas):
    a, b = replicas
    key, account = a.new_key(credit="0.10")
    b.wait_for_key(key)
    each = cost_nanos(0, 1000, parse_usd("1.00"), parse_usd("2.00"))  # $0.002: ≤ 50 fit

    outcomes = [o.split()[0] for o in mixed_burst(a, b, key)]  # statuses: "402"
    served = outcomes.count("ok")
    allowed = {"ok", "402"} | ({"429"} if limiter_fell_back(a.root, b.root) else set())
    assert set(outcomes) <= allowed, outcomes
    assert 1 <= served <= parse_usd("0.10") // each
    rows = a.settled(account, served)
    assert len(rows) == served == len({r.request_id for r in rows})
    acct = a.account(account)
    assert acct.balance >= 0
    assert acct.balance == parse_usd("0.10") - sum(r.cost for r in rows)


def test_rpm_10_across_both_replicas_admits_exactly_10(replicas):
    a, b = replicas
    key, _ = a.new_key(rpm=10)
    b.wait_for_key(key)
    body = {"model": "m", "input": "x", "max_output_tokens": 16}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as c:
            urls = [a.url, b.url] * 15
            answers = await asyncio.gather(*(c.post(u + "/responses", json=body) for u in urls))
            return [r.status_code for r in answers]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 10 and statuses.count(429) == 20


def test_revoked_through_one_replica_is_refused_by_the_other_within_5s(replicas):
    a, b = replicas
    key, _ = a.new_key()
    b.wait_for_key(key)
    admin = {"Authorization": "Bearer admin-secret"}
    keys = httpx.get(a.root + "/admin/v1/keys", headers=admin).json()
    [key_id] = [k["id"] for k in keys if key.startswith(k["prefix"])]
    revoked_at = time.monotonic()
    assert httpx.post(a.root + f"/admin/v1/keys/{key_id}/revoke", headers=admin).status_code == 200
    b.wait_for_key(key, present=False, timeout=5)
    assert time.monotonic() - revoked_at < 5
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=b.url, api_key=key, max_retries=0).models.list()


@pytest.mark.timeout(90)
def test_workers_2_serves_from_two_processes(tmp_path, pg_url: str, sim_port: int):
    pg = pg_url  # a database of its own: the gateways heartbeating in it are these workers
    config = tmp_path / "bastion.toml"
    config.write_text(shared_store_toml(pg, sim_port))
    port = free_port()
    proc = start(
        ["serve", "--config", str(config), "--port", str(port), "--workers", "2"],
        f"http://127.0.0.1:{port}/healthz",
    )
    gw = Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config, pg, proc)
    try:
        key, account = gw.new_key()
        time.sleep(1.5)  # one worker knows the key; give the other its refresh (0.5 s) too
        client = OpenAI(base_url=gw.url, api_key=key, max_retries=0)
        for i in range(20):
            assert client.responses.create(model="m", input=f"Reply with: w{i}").output_text == (
                f"w{i}"
            )
        assert len(gw.settled(account, 20)) == 20

        async def live_gateways() -> int:
            conn = await asyncpg.connect(pg)
            try:
                return await conn.fetchval(
                    "SELECT COUNT(*) FROM gateways WHERE seen_at > $1",
                    (time.time() - 5) * 1_000_000,
                )
            finally:
                await conn.close()

        assert asyncio.run(live_gateways()) == 2
    finally:
        stop(proc)
        assert proc.returncode is not None


def test_workers_refused_on_sqlite_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bastion", "serve", "--workers", "2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=30,
    )
    assert result.returncode == 1
    assert "needs PostgreSQL and Redis" in result.stderr
    assert "postgresql://" in result.stderr and "redis://" in result.stderr
