"""The fault proxy against the real PostgreSQL and Redis: each mode does what outage tests
rely on. The servers must be running (CI has them): these tests fail, never skip, without.
PostgreSQL is driven from an async test (asyncpg), Redis from a sync one (redis-py), to show
that the proxy's own loop serves both kinds of test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis
from conftest import PG_ADMIN_URL
from faultproxy import FaultProxy
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# What a client may raise when the proxy resets its connection.
PG_DROPPED = (OSError, asyncpg.exceptions.InterfaceError, asyncpg.PostgresConnectionError)


def _proxy_to(url: str, default_port: int) -> Iterator[FaultProxy]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        error = f"{url} unreachable ({exc}): start the server"
    else:
        error = ""
    if error:  # outside the except: no chained traceback around the message
        pytest.fail(error, pytrace=False)
    with FaultProxy(host, port) as proxy:
        yield proxy


@pytest.fixture
def pg_proxy() -> Iterator[FaultProxy]:
    yield from _proxy_to(PG_ADMIN_URL, 5432)


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    yield from _proxy_to(REDIS_URL, 6379)


def _redis(proxy: FaultProxy) -> redis.Redis:
    """A client that gives up after 1 s and never retries: each failure shows at once."""
    return redis.Redis.from_url(
        proxy.url_for(REDIS_URL),
        socket_timeout=1,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )


def test_url_for_keeps_everything_but_host_and_port() -> None:
    proxy = FaultProxy("db", 5432)
    proxy.port = 4242
    assert proxy.url_for("postgresql://u:pw@db:5432/x?sslmode=disable") == (
        "postgresql://u:pw@127.0.0.1:4242/x?sslmode=disable"
    )
    assert proxy.url_for("postgresql://u@db/x") == "postgresql://u@127.0.0.1:4242/x"
    assert proxy.url_for("redis://10.0.0.1:6379/3") == "redis://127.0.0.1:4242/3"


@pytest.mark.timeout(30)
async def test_postgres_passing(pg_proxy: FaultProxy) -> None:
    assert pg_proxy.mode == "passing"
    conn = await asyncpg.connect(pg_proxy.url_for(PG_ADMIN_URL), timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT repeat('x', 1000000)") == "x" * 1_000_000
    finally:
        await conn.close()
    assert pg_proxy.connections == 1


@pytest.mark.timeout(30)
async def test_postgres_blackhole_hangs_until_passing(pg_proxy: FaultProxy) -> None:
    url = pg_proxy.url_for(PG_ADMIN_URL)
    conn = await asyncpg.connect(url, timeout=5)
    assert await conn.fetchval("SELECT 1") == 1
    closed = asyncio.Event()
    conn.add_termination_listener(lambda _conn: closed.set())

    pg_proxy.blackhole()
    assert pg_proxy.mode == "blackhole"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await conn.fetchval("SELECT 1", timeout=1)
    with pytest.raises(TimeoutError):  # the TCP handshake completes, the startup never does
        await asyncpg.connect(url, timeout=1)
    assert time.monotonic() - started < 4

    pg_proxy.passing()
    await asyncio.wait_for(closed.wait(), 5)  # the black-holed connection is reset
    assert conn.is_closed()
    fresh = await asyncpg.connect(url, timeout=5)
    try:
        assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await fresh.close()


@pytest.mark.timeout(30)
async def test_postgres_refuse_fails_fast_until_passing(pg_proxy: FaultProxy) -> None:
    url = pg_proxy.url_for(PG_ADMIN_URL)
    conn = await asyncpg.connect(url, timeout=5)
    assert await conn.fetchval("SELECT 1") == 1

    pg_proxy.refuse()
    assert pg_proxy.mode == "refuse"
    started = time.monotonic()
    with pytest.raises(PG_DROPPED):  # the open connection was reset
        await conn.fetchval("SELECT 1", timeout=5)
    with pytest.raises(PG_DROPPED):
        await asyncpg.connect(url, timeout=5)
    assert time.monotonic() - started < 2
    conn.terminate()

    pg_proxy.passing()
    fresh = await asyncpg.connect(url, timeout=5)
    try:
        assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await fresh.close()


@pytest.mark.timeout(30)
def test_redis_passing(redis_proxy: FaultProxy) -> None:
    with _redis(redis_proxy) as client:
        assert client.ping()
        assert client.echo(b"y" * 1_000_000) == b"y" * 1_000_000
    assert redis_proxy.connections == 1


@pytest.mark.timeout(30)
def test_redis_blackhole_hangs_until_passing(redis_proxy: FaultProxy) -> None:
    with _redis(redis_proxy) as client:
        assert client.ping()
        redis_proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):  # on the pooled connection
            client.ping()
        with pytest.raises(redis.TimeoutError):  # on a new one: accepted, never answered
            client.ping()
        assert time.monotonic() - started < 4
        assert redis_proxy.connections == 2

        redis_proxy.passing()
        assert client.ping()
        assert redis_proxy.connections == 3


@pytest.mark.timeout(30)
def test_redis_refuse_fails_fast_until_passing(redis_proxy: FaultProxy) -> None:
    with _redis(redis_proxy) as client:
        assert client.ping()
        redis_proxy.refuse()
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):  # the pooled connection was reset
            client.ping()
        with pytest.raises(redis.ConnectionError):  # a new one is reset on accept
            client.ping()
        assert time.monotonic() - started < 2

        redis_proxy.passing()
        assert client.ping()


@pytest.mark.timeout(30)
def test_stop_resets_open_connections(redis_proxy: FaultProxy) -> None:
    with _redis(redis_proxy) as client:
        assert client.ping()
        redis_proxy.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()
