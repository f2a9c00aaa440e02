"""Redis lost under `bastion serve --workers 2`: the rate limit holds through failover and
recovery, whether Redis refuses connections or is black-holed, and the books still balance.

The gateway (two worker processes on one port, PostgreSQL direct) reaches Redis through a
FaultProxy. One key with rpm = 60; a client opens with a burst of 40, then sends ~3 requests/s
plus a burst of 6 every 2 s, each on a new connection so the kernel spreads them over both
workers (the key stays drained: about 6 requests/s against 1/s allowed). Redis is healthy for 8 s,
down for 20 s, then back for 12 s.

What the limit allows: GCRA with rpm = 60 admits 60 at once, then one per second. The key
is fresh, so over the whole ~40 s run at most 60 + 40 = 100 requests may pass, whatever
happens to Redis. Before the fix the fleet admitted 177 here, refused or black-holed alike
(a full share per worker at failover, a refilled bucket at recovery); now 99-100.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import Gateway, free_port, shared_store_toml, start, stop
from faultproxy import FaultProxy

from bastion.money import parse_usd
from bastion.store import open_store

RPM = 60
HEALTHY_S, OUTAGE_S, AFTER_S = 8.0, 20.0, 12.0
TOTAL_S = HEALTHY_S + OUTAGE_S + AFTER_S
STEADY_HZ = 3.0
OPENING = 40  # a first burst: the bucket is about empty when Redis goes
BURST_EVERY_S, BURST = 2.0, 6
# What may pass beyond 60 + elapsed: at failover each worker starts from the TAT it last
# saw (the other worker may have admitted ~1 since); at recovery the two workers come
# back up to 1 s apart, and meanwhile the one still local admits its share (0.5/s). So
# a handful at most; measured 0-1 over the limit.
TOLERANCE = 5
CREDIT = "10.00"
BODY = {"model": "m", "input": "x", "max_output_tokens": 16, "sim": {"tokens": 4}}


@dataclass
class Served:
    at: float  # sent, seconds since the run started
    status: int  # 0: no HTTP answer
    took: float


@pytest.fixture
def fleet(tmp_path: Path, pg_url: str, sim_port: int) -> Iterator[tuple[Gateway, FaultProxy, Path]]:
    """`bastion serve --workers 2` on a fresh database, its Redis behind a FaultProxy."""
    proxy = FaultProxy("127.0.0.1", 6379).start()
    config = tmp_path / "bastion.toml"
    redis_url = proxy.url_for("redis://127.0.0.1:6379/0")
    config.write_text(shared_store_toml(pg_url, sim_port, redis_url, max_output_tokens=100))
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        proc = start(
            ["serve", "--config", str(config), "--port", str(port), "--workers", "2"],
            f"http://127.0.0.1:{port}/healthz",
            stderr=stderr,
        )
    root = f"http://127.0.0.1:{port}"
    try:
        yield Gateway(f"{root}/v1", root, config, pg_url, proc), proxy, log
    finally:
        stop(proc)
        proxy.stop()


async def drive(
    url: str, key: str, outage: Callable[[], None], back: Callable[[], None]
) -> list[Served]:
    """Steady traffic plus bursts for TOTAL_S; Redis goes at HEALTHY_S, back OUTAGE_S later."""
    served: list[Served] = []
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_keepalive_connections=0)  # a new connection: either worker
    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {key}"}, timeout=10, limits=limits
    ) as client:
        t0 = time.monotonic()

        async def one() -> None:
            sent = time.monotonic()
            try:
                status = (await client.post(f"{url}/responses", json=BODY)).status_code
            except httpx.HTTPError:
                status = 0
            served.append(Served(sent - t0, status, time.monotonic() - sent))

        async def at(offset: float) -> None:
            await asyncio.sleep(max(0.0, offset - (time.monotonic() - t0)))

        async def fire(every: float, count: int, first: float) -> None:
            offset = first
            while offset < TOTAL_S:
                await at(offset)
                tasks.extend(asyncio.create_task(one()) for _ in range(count))
                offset += every

        async def faults() -> None:
            await at(HEALTHY_S)
            outage()
            await at(HEALTHY_S + OUTAGE_S)
            back()

        tasks.extend(asyncio.create_task(one()) for _ in range(OPENING))
        await asyncio.gather(fire(1 / STEADY_HZ, 1, 0.0), fire(BURST_EVERY_S, BURST, 0.5), faults())
        await asyncio.gather(*tasks)
    return sorted(served, key=lambda s: s.at)


def phases(served: list[Served]) -> dict[str, int]:
    """200s per phase: to read where a leak happened (failover, outage, recovery)."""
    edges = {
        "healthy": (0, HEALTHY_S),
        "failover 0-3s": (HEALTHY_S, HEALTHY_S + 3),
        "outage": (HEALTHY_S + 3, HEALTHY_S + OUTAGE_S),
        "recovery 0-5s": (HEALTHY_S + OUTAGE_S, HEALTHY_S + OUTAGE_S + 5),
        "after": (HEALTHY_S + OUTAGE_S + 5, math.inf),
    }
    return {
        name: sum(1 for s in served if lo <= s.at < hi and s.status == 200)
        for name, (lo, hi) in edges.items()
    }


def check_books(gw: Gateway, account: str, admitted: int) -> None:
    """balance = credit − Σ (cost − uncharged), one ledger row per admitted request."""

    async def read() -> tuple:
        store = open_store(gw.db_url)
        try:
            deadline = time.monotonic() + 10
            while len(rows := await store.usage(account)) < admitted:
                assert time.monotonic() < deadline, f"{len(rows)} of {admitted} rows written"
                await asyncio.sleep(0.1)
            return await store.get_account(account), rows
        finally:
            await store.close()

    acct, rows = asyncio.run(read())
    assert len(rows) == admitted == len({r.request_id for r in rows})
    assert acct.balance == parse_usd(CREDIT) - sum(r.cost - r.uncharged for r in rows)
    assert acct.balance >= 0


def run_scenario(fleet: tuple[Gateway, FaultProxy, Path], fault: str) -> None:
    gw, proxy, log = fleet
    key, account = gw.new_key(credit=CREDIT, rpm=RPM)
    time.sleep(1.5)  # one worker knows the key; give the other its refresh (0.5 s) too
    outage = proxy.refuse if fault == "refuse" else proxy.blackhole
    served = asyncio.run(drive(gw.url, key, outage, proxy.passing))

    admitted = sum(1 for s in served if s.status == 200)
    elapsed = max(s.at + s.took for s in served if s.status == 200)
    allowed = RPM + math.floor(elapsed * RPM / 60)  # a full burst, then one per second
    slowest = max(s.took for s in served)
    log_text = log.read_text()
    lost, back = (len(re.findall(m, log_text)) for m in ("Redis unreachable", "Redis is back"))
    report = (
        f"{fault}: admitted {admitted} of {len(served)}, allowed {allowed} in {elapsed:.1f}s, "
        f"{phases(served)}, slowest {slowest:.2f}s, lost/back logged {lost}/{back}"
    )
    print(report)
    assert {s.status for s in served} <= {200, 429}, report
    assert admitted <= allowed + TOLERANCE, report
    # and it kept serving: ~1/s while Redis was away, and again once it was back
    by_phase = phases(served)
    assert by_phase["outage"] >= 10, report
    assert by_phase["recovery 0-5s"] + by_phase["after"] >= 8, report
    assert slowest < 2.0, report
    # one outage and one recovery per worker: no flapping after Redis returned
    assert lost == back == 2, f"{report}\n{log_text}"
    check_books(gw, account, admitted)


@pytest.mark.timeout(60)
def test_redis_refused_for_20s_the_limit_holds(fleet):
    run_scenario(fleet, "refuse")


@pytest.mark.timeout(60)
def test_redis_blackholed_for_20s_the_limit_holds_and_requests_answer_promptly(fleet):
    run_scenario(fleet, "blackhole")
