"""The rate limiter: which one, is Redis answering, and do the default limits limit.

``memory://`` counts per gateway process, which is right for one process and wrong
for several (each would allow the full limit), so ``bastion serve --workers N`` with
N > 1 refuses it; doctor says the same for ``server.workers``. Redis is PINGed once
with a bounded timeout: a gateway whose Redis is down still serves, but enforces each
limit only approximately (a share per replica), so an unreachable Redis is an error.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from bastion.cli.storeopen import masked
from bastion.config import Config
from bastion.doctor.findings import Finding, error, ok, warning

REDIS_TIMEOUT_S = 2.0
CHECK = "ratelimit"
URL_FIX = "correct ratelimit.url (or BASTION_REDIS_URL)"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


async def check_ratelimit(config: Config) -> list[Finding]:
    url = config.ratelimit.url
    if url.startswith("memory:"):
        found = [_memory(config.server.workers)]
    elif url.startswith(REDIS_SCHEMES):
        found = [await _ping(url)]
    else:
        found = [
            error(
                CHECK,
                "unsupported limiter URL",
                f"{masked(url)}: the gateway refuses to start",
                f"{URL_FIX}: memory:// (one process) or redis://host:6379/0",
            )
        ]
    return found + default_limit_findings(config)


def _memory(workers: int) -> Finding:
    if workers > 1:
        return error(
            CHECK,
            "in-process limiter with several workers",
            f"ratelimit.url is memory:// and server.workers = {workers}: each worker would"
            " allow the full limit, so `bastion serve` refuses to start",
            "set ratelimit.url (or BASTION_REDIS_URL) to redis://…, or server.workers = 1",
        )
    return ok(
        CHECK,
        "in-process limiter",
        "memory://: limits are counted in this one gateway process; several processes or"
        " hosts need a shared redis:// limiter",
    )


async def _ping(url: str) -> Finding:
    shown = masked(url)
    try:
        client = Redis.from_url(
            url,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:
        return error(CHECK, "bad Redis URL", f"{shown}: {exc}", URL_FIX)
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S * 2):
            await client.ping()
    except AuthenticationError as exc:
        return error(
            CHECK,
            "Redis refused the login",
            f"{shown}: {exc}",
            "check the user and password in ratelimit.url (or BASTION_REDIS_URL)",
        )
    except (TimeoutError, RedisError, OSError) as exc:
        reason = str(exc).rstrip(".") or f"no answer within {REDIS_TIMEOUT_S:g} s"
        return error(
            CHECK,
            "Redis unreachable",
            f"{shown}: {reason}. The gateway still serves, but each replica then enforces"
            " only its share of every limit",
            f"start Redis there, or {URL_FIX}",
        )
    finally:
        await client.aclose()
    return ok(CHECK, "Redis answers", f"{shown}: PING answered; limits are shared by replicas")


def default_limit_findings(config: Config) -> list[Finding]:
    """0 means unlimited: fine for a key chosen so, surprising as everyone's default."""
    found = []
    for name, what in (("default_rpm", "requests"), ("default_tpm", "tokens")):
        if getattr(config.ratelimit, name) == 0:
            found.append(
                warning(
                    CHECK,
                    f"{name} is 0 (unlimited)",
                    f"keys without their own limit may send any number of {what} per minute",
                    f"set ratelimit.{name} to a limit; give unlimited keys 0 one by one"
                    " (bastion keys update ID --rpm 0 --tpm 0)",
                )
            )
    return found
