"""The Redis limiter against a real Redis: the MemoryLimiter's behaviour, exact across
replicas, and a per-replica fallback while Redis is unreachable.

Redis must be running (CI has it; locally `redis-server --save "" --appendonly no`):
these tests fail, never skip, without it. Each test writes only under its own random
key prefix and deletes exactly those keys afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import free_port
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bastion.ratelimit import MemoryLimiter, open_limiter
from bastion.ratelimit_redis import RedisLimiter

REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

MakeLimiter = Callable[..., RedisLimiter]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = f"bastion-test:{uuid.uuid4().hex}:"
    yield prefix
    async with Redis.from_url(REDIS_URL) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)


@pytest.fixture
async def client(prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=1, decode_responses=True)
    try:
        await client.ping()
    except RedisError as exc:
        raise RuntimeError(
            f"the Redis limiter tests need a Redis at {REDIS_URL} (set "
            "BASTION_TEST_REDIS_URL, or run `redis-server --save '' --appendonly no`)"
        ) from exc
    yield client
    await client.aclose()


@pytest.fixture
async def make(client: Redis, prefix: str) -> AsyncIterator[MakeLimiter]:
    """RedisLimiter factory: same test prefix, each instance its own connection pool."""
    made: list[RedisLimiter] = []

    def build(url: str = REDIS_URL, **kwargs: Any) -> RedisLimiter:
        kwargs.setdefault("prefix", prefix)
        limiter = RedisLimiter(url, **kwargs)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.close()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: a hung Redis."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


async def test_burst_of_n_then_refused_with_retry_after(make: MakeLimiter):
    limiter = make()
    for i in range(10):
        decision = await limiter.admit("k", rpm=10, tpm=0, tokens=1)
        assert decision.allowed, i
        assert decision.headers["x-ratelimit-remaining-requests"] == str(9 - i)
    refused = await limiter.admit("k", rpm=10, tpm=0, tokens=1)
    assert not refused.allowed and refused.reason == "requests"
    assert 5.9 < refused.retry_after_s <= 6.0  # one slot frees every 6 s
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_headers_match_the_memory_limiter(make: MakeLimiter):
    shared = await make().admit("k", 10, 1000, 800)
    local = await MemoryLimiter().admit("k", 10, 1000, 800)
    assert shared.headers == local.headers
    assert shared.headers["x-ratelimit-reset-requests"] == "6s"
    assert shared.headers["x-ratelimit-remaining-tokens"] == "200"


async def test_smooth_refill_not_a_period_reset(make: MakeLimiter):
    limiter = make(period_s=1.0)  # rpm=10 per 1 s: one slot every 100 ms
    for _ in range(10):
        assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert not (await limiter.admit("k", 10, 0, 1)).allowed
    await asyncio.sleep(0.15)
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert not (await limiter.admit("k", 10, 0, 1)).allowed


async def test_tokens_are_charged_worst_case_and_refunded(make: MakeLimiter):
    limiter = make()
    assert (await limiter.admit("k", 0, 1000, 800)).allowed
    assert not (await limiter.admit("k", 0, 1000, 300)).allowed
    limiter.refund("k", 1000, 700)  # the first request used 100 of its 800
    await limiter.drain()
    second = await limiter.admit("k", 0, 1000, 300)
    assert second.allowed
    # 600, or 601 if a slow machine let 60 ms of refill pass
    assert second.headers["x-ratelimit-remaining-tokens"] in ("600", "601")


async def test_a_refund_never_leaves_more_than_the_limit(make: MakeLimiter, client: Redis):
    limiter = make()
    assert (await limiter.admit("k", 0, 1000, 100)).allowed
    limiter.refund("k", 1000, 5000)
    await limiter.drain()
    assert not await client.exists(limiter.keys("k")[1])  # a full budget is no key
    after = await limiter.admit("k", 0, 1000, 100)
    assert after.headers["x-ratelimit-remaining-tokens"] == "900"


async def test_a_negative_refund_charges_the_excess(make: MakeLimiter):
    limiter = make()
    assert (await limiter.admit("k", 0, 1000, 100)).allowed
    limiter.refund("k", 1000, -300)  # used 400 of a 100 estimate
    await limiter.drain()
    after = await limiter.admit("k", 0, 1000, 0)
    assert after.headers["x-ratelimit-remaining-tokens"] in ("600", "601")


async def test_both_limits_must_pass_and_nothing_is_taken_on_refusal(
    make: MakeLimiter, client: Redis
):
    limiter = make()
    refused = await limiter.admit("k", 5, 100, 500)
    assert not refused.allowed and refused.reason == "tokens"
    assert not await client.exists(*limiter.keys("k"))
    assert (await limiter.admit("k", 5, 100, 100)).allowed  # requests were not consumed


async def test_unlimited_sends_no_headers_for_that_dimension(make: MakeLimiter, client: Redis):
    limiter = make()
    decision = await limiter.admit("k", 0, 50, 1)
    assert "x-ratelimit-limit-requests" not in decision.headers
    assert decision.headers["x-ratelimit-limit-tokens"] == "50"
    assert not await client.exists(limiter.keys("k")[0])


async def test_key_layout_integer_microseconds_and_expiry(
    make: MakeLimiter, client: Redis, prefix: str
):
    limiter = make()
    assert limiter.keys("abc") == (f"{prefix}{{abc}}:req", f"{prefix}{{abc}}:tok")
    await limiter.admit("abc", 10, 1000, 500)
    req, tok = limiter.keys("abc")
    now_s, now_us = await client.time()
    now = now_s * 1_000_000 + now_us
    assert 5_900_000 < int(await client.get(req)) - now <= 6_000_000
    assert 29_900_000 < int(await client.get(tok)) - now <= 30_000_000
    assert 5_900 < await client.pttl(req) <= 6_000  # gone once the budget is full again
    assert 29_900 < await client.pttl(tok) <= 30_000


async def test_exact_across_replicas(make: MakeLimiter):
    """Two limiters, two connection pools, one key, hammered at once: exactly rpm pass."""
    # a generous timeout: this is about the script's atomicity, and a loaded CI box can
    # take longer than 0.25 s to open 100 connections (that path is the fallback's test)
    first, second = make(timeout_s=5), make(timeout_s=5)
    decisions = await asyncio.gather(
        *(limiter.admit("k", 10, 0, 1) for _ in range(50) for limiter in (first, second))
    )
    assert sum(d.allowed for d in decisions) == 10
    assert not first.degraded and not second.degraded


async def test_unreachable_redis_falls_back_to_a_share_of_the_limits(make: MakeLimiter):
    limiter = make(f"redis://127.0.0.1:{free_port()}/0", replicas=2)
    decisions = [await limiter.admit("k", 10, 1000, 1) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[0].headers["x-ratelimit-limit-requests"] == "5"
    assert decisions[0].headers["x-ratelimit-limit-tokens"] == "500"
    assert 11.9 < decisions[-1].retry_after_s <= 12.0
    assert limiter.degraded and limiter.outages == 1 and limiter.fallbacks == 6
    # bigger than this replica's share of 500 tokens, yet within the key's 1000
    assert (await limiter.admit("other", 0, 1000, 800)).allowed


async def test_a_hung_redis_costs_one_timeout_per_retry_interval(make: MakeLimiter, blackhole: int):
    limiter = make(f"redis://127.0.0.1:{blackhole}/0", timeout_s=0.2, retry_s=60)
    started = time.monotonic()
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert 0.15 < time.monotonic() - started < 1.0
    assert limiter.degraded
    started = time.monotonic()
    for _ in range(20):
        await limiter.admit("k", 10, 0, 1)
    assert time.monotonic() - started < 0.1  # no Redis round trip until retry_s passes
    assert limiter.fallbacks == 21


async def test_refunds_never_block_and_failures_are_counted(make: MakeLimiter):
    limiter = make(f"redis://127.0.0.1:{free_port()}/0")
    limiter.refund("k", 1000, 500)  # not degraded yet: goes to Redis, in the background
    assert len(limiter._tasks) == 1
    await limiter.drain()
    assert limiter.refund_failures == 1 and not limiter._tasks


async def test_refunds_during_an_outage_go_to_the_fallback(make: MakeLimiter):
    limiter = make(f"redis://127.0.0.1:{free_port()}/0")
    assert (await limiter.admit("k", 0, 1000, 800)).allowed
    limiter.refund("k", 1000, 700)
    assert not limiter._tasks
    assert (await limiter.admit("k", 0, 1000, 300)).allowed


class Proxy:
    """A TCP proxy to the real Redis that can be taken down and brought back."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def test_outage_and_recovery(make: MakeLimiter, client: Redis):
    proxy = Proxy(REDIS_URL)
    limiter = make(f"redis://127.0.0.1:{proxy.port}/0", retry_s=0.1)
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert limiter.degraded and limiter.outages == 1  # nothing listening yet
    await proxy.up()
    try:
        await asyncio.sleep(0.15)
        assert (await limiter.admit("k", 10, 0, 1)).allowed
        assert not limiter.degraded
        assert await client.exists(limiter.keys("k")[0])  # this one went to Redis
        await proxy.down()
        assert (await limiter.admit("k", 10, 0, 1)).allowed
        assert limiter.degraded and limiter.outages == 2
    finally:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.down()


async def test_open_limiter_builds_the_redis_limiter():
    limiter = open_limiter(REDIS_URL, replicas=4)
    try:
        assert isinstance(limiter, RedisLimiter)
        assert limiter._replicas == 4
    finally:
        await limiter.close()


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_peek_reports_without_charging(make: MakeLimiter, kind: str):
    limiter = make() if kind == "redis" else MemoryLimiter()
    assert await limiter.peek("p", 10, 1000) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "0ms",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "0ms",
    }
    await limiter.admit("p", 10, 1000, 100)
    for _ in range(3):
        headers = await limiter.peek("p", 10, 1000)
        assert headers["x-ratelimit-remaining-requests"] == "9"
        assert headers["x-ratelimit-remaining-tokens"] == "900"
