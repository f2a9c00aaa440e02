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
from faultproxy import FaultProxy
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


# ---- Redis unreachable: failover, outage, recovery -----------------------------------
# A FaultProxy in front of the real Redis refuses or black-holes on demand. The fallback
# mirrors what Redis last said of each key, so the tests first let Redis see the key
# (an admit, or a peek to learn it is at full budget), then take Redis away.


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    parts = urlsplit(REDIS_URL)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy


async def until(condition: Callable[[], bool], within: float = 5.0) -> float:
    """Poll ``condition`` every 10 ms; how long it took to hold."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def redis_tat_ahead_s(client: Redis, key: str) -> float:
    """How far a stored TAT is ahead of the Redis clock, in seconds (0: no key)."""
    stored = await client.get(key)
    now_s, now_us = await client.time()
    return max(0, int(stored or 0) - (now_s * 1_000_000 + now_us)) / 1_000_000


async def test_fallback_enforces_a_share_of_the_limits(make: MakeLimiter, proxy: FaultProxy):
    limiter = make(proxy.url_for(REDIS_URL), replicas=2)
    await limiter.peek("k", 10, 1000)  # Redis says: full budget
    await limiter.peek("other", 0, 1000)
    proxy.refuse()
    decisions = [await limiter.admit("k", 10, 1000, 1) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[0].headers["x-ratelimit-limit-requests"] == "5"
    assert decisions[0].headers["x-ratelimit-limit-tokens"] == "500"
    assert 11.9 < decisions[-1].retry_after_s <= 12.0
    assert limiter.degraded and limiter.outages == 1 and limiter.fallbacks == 6
    # bigger than this replica's share of 500 tokens, yet within the key's 1000
    assert (await limiter.admit("other", 0, 1000, 800)).allowed


async def test_failover_starts_from_the_last_known_state(make: MakeLimiter, proxy: FaultProxy):
    """8 of 10 used in Redis: each of 2 replicas may admit its half of the 2 left, not 5."""
    limiter = make(proxy.url_for(REDIS_URL), replicas=2)
    for _ in range(8):
        assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert (await limiter.admit("t", 0, 1000, 800)).allowed  # tokens: 200 left
    proxy.refuse()
    decisions = [await limiter.admit("k", 10, 0, 1) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, False, False]
    assert limiter.degraded and limiter.outages == 1
    assert decisions[0].headers["x-ratelimit-remaining-requests"] == "0"
    assert 11.9 < decisions[1].retry_after_s <= 12.0  # one every 60 / 5 s from here
    assert (await limiter.admit("t", 0, 1000, 100)).allowed  # its half of the 200 left
    assert not (await limiter.admit("t", 0, 1000, 100)).allowed


async def test_a_key_never_seen_starts_spent_during_an_outage(make: MakeLimiter):
    """No state to start from: its share's steady rate, but no burst."""
    limiter = make(f"redis://127.0.0.1:{free_port()}/0", replicas=2)
    refused = await limiter.admit("k", 10, 0, 1)
    assert not refused.allowed and refused.reason == "requests"
    assert 11.9 < refused.retry_after_s <= 12.0
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert limiter.degraded and limiter.fallbacks == 1


async def test_recovery_hands_the_fallbacks_admissions_to_redis(
    make: MakeLimiter, client: Redis, proxy: FaultProxy
):
    limiter = make(proxy.url_for(REDIS_URL), retry_s=0.05)
    await limiter.peek("k", 10, 1000)
    proxy.refuse()
    decisions = [await limiter.admit("k", 10, 1000, 100) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    req, tok = limiter.keys("k")
    assert not await client.exists(req, tok)  # Redis saw none of them
    proxy.passing()
    await until(lambda: not limiter.degraded)
    # now it knows all ten (less the second or so the recovery took)
    assert 58.5 < await redis_tat_ahead_s(client, req) <= 60
    assert 58.5 < await redis_tat_ahead_s(client, tok) <= 60
    refused = await limiter.admit("k", 10, 1000, 100)
    assert not refused.allowed  # no refilled burst: Redis went on from the fallback
    assert 4.5 < refused.retry_after_s <= 6.0
    assert limiter.outages == 1 and limiter.fallbacks == 11


async def test_recovery_never_lowers_what_redis_holds(
    make: MakeLimiter, client: Redis, proxy: FaultProxy
):
    """The hand-back is a max(): another replica, still on Redis, used more meanwhile."""
    cut_off = make(proxy.url_for(REDIS_URL), replicas=2, retry_s=0.05)
    other = make()  # reaches Redis directly
    await cut_off.peek("k", 10, 0)
    proxy.refuse()
    assert (await cut_off.admit("k", 10, 0, 1)).allowed  # locally: 12 s of its share
    for _ in range(10):
        assert (await other.admit("k", 10, 0, 1)).allowed
    proxy.passing()
    await until(lambda: not cut_off.degraded)
    assert 58.5 < await redis_tat_ahead_s(client, cut_off.keys("k")[0]) <= 60


async def test_flapping_redis_is_debounced(make: MakeLimiter, proxy: FaultProxy):
    """Up for less than ``recover_after`` probes at a time: still one outage, still local."""
    limiter = make(proxy.url_for(REDIS_URL), retry_s=0.2, recover_after=3)
    await limiter.peek("k", 10, 0)
    proxy.refuse()
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    for _ in range(4):  # up 0.3 s (at most 2 probes), down 0.3 s
        proxy.passing()
        await asyncio.sleep(0.3)
        assert limiter.degraded
        proxy.refuse()
        await asyncio.sleep(0.3)
    proxy.passing()
    took = await until(lambda: not limiter.degraded)
    assert 0.4 < took < 2.0  # three probes 0.2 s apart, the first up to 0.2 s after
    assert limiter.outages == 1


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
async def test_no_flapping_after_recovery(make: MakeLimiter, proxy: FaultProxy, fault: str):
    """Connections pooled before the outage are dropped: none fails the first calls after."""
    limiter = make(proxy.url_for(REDIS_URL), retry_s=0.05, timeout_s=1)
    await asyncio.gather(*(limiter.admit(f"k{i}", 1000, 0, 1) for i in range(20)))
    assert not limiter.degraded  # 20 connections in the pool
    proxy.refuse() if fault == "refuse" else proxy.blackhole()
    await limiter.admit("k", 1000, 0, 1)
    assert limiter.degraded
    proxy.passing()
    await until(lambda: not limiter.degraded)
    fallbacks = limiter.fallbacks
    for _ in range(3):
        await asyncio.gather(*(limiter.admit(f"k{i}", 1000, 0, 1) for i in range(20)))
    assert limiter.fallbacks == fallbacks and limiter.outages == 1


async def test_a_hung_redis_costs_one_timeout_then_nothing(make: MakeLimiter, blackhole: int):
    limiter = make(f"redis://127.0.0.1:{blackhole}/0", timeout_s=0.2, retry_s=0.05)
    started = time.monotonic()
    await limiter.admit("k", 10, 0, 1)
    assert 0.15 < time.monotonic() - started < 1.0
    assert limiter.degraded
    started = time.monotonic()
    for _ in range(20):  # probes (each a 0.2 s timeout) run in the background meanwhile
        await limiter.admit("k", 10, 0, 1)
        await asyncio.sleep(0.01)
    assert time.monotonic() - started < 0.5
    assert limiter.fallbacks == 21


async def test_refunds_never_block_and_failures_are_counted(make: MakeLimiter):
    limiter = make(f"redis://127.0.0.1:{free_port()}/0")
    limiter.refund("k", 1000, 500)  # not degraded yet: goes to Redis, in the background
    assert len(limiter._tasks) == 1
    await limiter.drain()
    assert limiter.refund_failures == 1 and not limiter._tasks


async def test_refunds_during_an_outage_go_to_the_fallback(make: MakeLimiter, proxy: FaultProxy):
    limiter = make(proxy.url_for(REDIS_URL))
    await limiter.peek("k", 0, 1000)
    proxy.refuse()
    assert (await limiter.admit("k", 0, 1000, 800)).allowed
    limiter.refund("k", 1000, 700)
    assert not limiter._tasks
    assert (await limiter.admit("k", 0, 1000, 300)).allowed


async def test_outage_and_recovery(make: MakeLimiter, client: Redis, proxy: FaultProxy):
    limiter = make(proxy.url_for(REDIS_URL), retry_s=0.05)
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert await client.exists(limiter.keys("k")[0])
    await client.delete(limiter.keys("k")[0])
    proxy.refuse()
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert limiter.degraded and limiter.outages == 1
    proxy.passing()
    await until(lambda: not limiter.degraded)
    assert await client.exists(limiter.keys("k")[0])  # handed back on recovery
    assert (await limiter.admit("k", 10, 0, 1)).allowed  # and this one went to Redis
    assert limiter.fallbacks == 1
    proxy.refuse()
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert limiter.degraded and limiter.outages == 2


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
