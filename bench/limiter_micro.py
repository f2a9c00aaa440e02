"""CPU cost of one rate-limit decision + refund, in memory and in Redis.

    taskset -c 0 .venv/bin/python -m bench.limiter_micro [redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time

import uvloop

from bastion.ratelimit import Limiter, MemoryLimiter
from bastion.ratelimit_redis import RedisLimiter

N = 20_000
TASKS = 16


async def measure(name: str, limiter: Limiter) -> None:
    await limiter.admit("warm", 10**9, 10**12, 1)

    async def worker(n: int) -> None:
        for i in range(n):
            key = f"k{i % 100}"
            await limiter.admit(key, 10**9, 10**12, 100)
            limiter.refund(key, 10**12, 50)

    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker(N // TASKS) for _ in range(TASKS)))
    elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"{name:7s} {N / elapsed:9,.0f} decisions/s  {cpu / N * 1e6:6.1f} µs CPU each")
    await limiter.close()


async def main(url: str) -> None:
    await measure("memory", MemoryLimiter())
    await measure("redis", RedisLimiter(url, prefix="bench:rl:"))


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"))
