"""The shared rate limiter: GCRA in Redis, exact across any number of gateway replicas.

Each decision is one Lua script run atomically on the Redis server, with the server's
own clock (``TIME``), so replicas never race each other and their clocks never matter.
TATs are integer microseconds: no float drift however long a key lives. When Redis is
unreachable, every replica falls back to an in-process ``MemoryLimiter`` enforcing
1/replicas of each limit, so the fleet as a whole stays near the configured limit and
the gateway keeps serving. The limit holds across the transitions too: the fallback
starts from the TATs Redis last reported (not a full budget), Redis is declared back
only after several probes in a row succeed, and it is first handed what was admitted
locally (docs/ratelimit.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from bastion.ratelimit import PERIOD_S, Decision, MemoryLimiter, headers_for

log = logging.getLogger("bastion.ratelimit")

REFUND_BATCH_S = 0.005  # refunds gather this long, then go to Redis in one pipeline
HAND_BACK_BATCH = 500  # keys per pipelined round trip when handing local TATs back

# KEYS: request TAT, token TAT. ARGV: period_us, rpm, tpm, tokens, peek (1: decide nothing).
# A TAT is absolute microseconds on this server's clock; an absent key means "now".
# Both dimensions are checked first; the new TATs are stored only if both pass.
# Reply: {allowed, reason (1 requests, 2 tokens), req TAT - now, tok TAT - now, retry_us}.
ADMIT_LUA = """
local period = tonumber(ARGV[1])
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local weights = {1, tonumber(ARGV[4])}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = {now, now}
local new = {now, now}
local allowed, reason, retry = 1, 0, 0
local peek = ARGV[5] == '1'
for i = 1, 2 do
  if limits[i] > 0 then
    local stored = tonumber(redis.call('GET', KEYS[i]) or now)
    if stored > now then tat[i] = stored end
    new[i] = tat[i] + math.floor(weights[i] * period / limits[i])
    local over = new[i] - now - period
    if over > 0 then
      allowed = 0
      if reason == 0 then reason = i end
      if over > retry then retry = over end
    end
  end
end
if peek then
  return {1, 0, tat[1] - now, tat[2] - now, 0}
end
if allowed == 1 then
  for i = 1, 2 do
    if limits[i] > 0 and new[i] > now then
      redis.call('SET', KEYS[i], string.format('%d', new[i]),
                 'PX', math.ceil((new[i] - now) / 1000))
    end
    tat[i] = new[i]
  end
end
return {allowed, reason, tat[1] - now, tat[2] - now, retry}
"""

# KEYS: token TAT. ARGV: period_us, tpm, tokens (negative charges extra).
# A TAT at or below now means a full budget, so the key is deleted rather than lowered
# further: a refund can never leave more than the limit available.
REFUND_LUA = """
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new = tonumber(stored)
  - math.floor(tonumber(ARGV[3]) * tonumber(ARGV[1]) / tonumber(ARGV[2]))
if new <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil((new - now) / 1000))
return new - now
"""

# KEYS: request TAT, token TAT. ARGV: each TAT as µs from now, as the fallback left it.
# Raises a stored TAT to that, never lowers it: after an outage Redis has refilled, so it
# must learn what the replicas admitted meanwhile or it would grant a fresh burst.
RAISE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, 2 do
  local ahead = tonumber(ARGV[i])
  if ahead > 0 and tonumber(redis.call('GET', KEYS[i]) or 0) < now + ahead then
    redis.call('SET', KEYS[i], string.format('%d', now + ahead), 'PX', math.ceil(ahead / 1000))
  end
end
return 0
"""

_FAILURES = (RedisError, OSError)  # OSError covers TimeoutError from asyncio.timeout


def share(limit: int, replicas: int) -> int:
    """One replica's part of a limit during an outage; never 0, which would mean unlimited."""
    return max(1, limit // replicas) if limit else 0


class RedisLimiter:
    """GCRA in Redis, with a per-replica in-memory fallback while Redis is down.

    ``fallbacks`` (decisions answered by the fallback), ``outages`` (times Redis was
    lost), ``refund_failures`` and ``degraded`` are for the operator's metrics.

    The fallback lives as long as the limiter: while Redis is healthy it mirrors the
    TATs of every answer (a dict write, no extra round trip), so an outage goes on from
    the last known state instead of a full budget per replica.
    """

    def __init__(
        self,
        url: str,
        replicas: int = 1,
        *,
        period_s: float = PERIOD_S,
        prefix: str = "bastion:rl:",
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        recover_after: int = 3,
        max_connections: int = 64,
    ) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        # No client-side retries: the fallback is the retry, and an outage must cost
        # the hot path at most one timeout per retry_s, not ten reconnect attempts.
        # A bounded pool: a burst queues for a connection instead of opening hundreds
        # (each replica's share of Redis' maxclients stays fixed).
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            # resolved once: by default each new connection reads package metadata
            # (~2 ms with the event loop blocked; a burst of connects stalled admits)
            driver_info=DriverInfo(),
        )
        self._redis: Redis = Redis.from_pool(pool)
        self._admit_script = self._redis.register_script(ADMIT_LUA)
        self._refund_script = self._redis.register_script(REFUND_LUA)
        self._raise_script = self._redis.register_script(RAISE_LUA)
        self._replicas = replicas
        self._period = period_s
        self._period_us = round(period_s * 1_000_000)
        self._prefix = prefix
        self._timeout = timeout_s
        self._retry_s = retry_s
        self._recover_after = recover_after
        self._local = MemoryLimiter(period_s=period_s)  # the fallback, and Redis' mirror
        self._degraded = False
        self._dirty: set[str] = set()  # keys admitted locally, to hand back to Redis
        self._reconnecting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._refunds: dict[str, tuple[int, int]] = {}  # key_id -> (tpm, tokens to give back)
        self._refund_scheduled = False
        self.fallbacks = 0
        self.outages = 0
        self.refund_failures = 0

    @property
    def degraded(self) -> bool:
        """True while decisions come from the per-replica fallback."""
        return self._degraded

    def keys(self, key_id: str) -> tuple[str, str]:
        """Request and token TAT keys; the hash tag keeps both on one cluster slot."""
        base = f"{self._prefix}{{{key_id}}}"
        return f"{base}:req", f"{base}:tok"

    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Decision:
        if self._degraded:
            return await self._admit_locally(key_id, rpm, tpm, tokens)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._admit_script(
                    keys=self.keys(key_id), args=[self._period_us, rpm, tpm, tokens, 0]
                )
        except _FAILURES as exc:
            self._lost(exc)
            return await self._admit_locally(key_id, rpm, tpm, tokens)
        return self._decision(key_id, reply, rpm, tpm)

    async def peek(self, key_id: str, rpm: int, tpm: int) -> dict[str, str]:
        """The key's x-ratelimit-* headers now, charging nothing (for refused requests)."""
        if not self._degraded:
            try:
                async with asyncio.timeout(self._timeout):
                    reply = await self._admit_script(
                        keys=self.keys(key_id), args=[self._period_us, rpm, tpm, 0, 1]
                    )
                return self._decision(key_id, reply, rpm, tpm).headers
            except _FAILURES as exc:
                self._lost(exc)
        return await self._local.peek(
            key_id, share(rpm, self._replicas), share(tpm, self._replicas)
        )

    def refund(self, key_id: str, tpm: int, tokens: int) -> None:
        """Fire-and-forget: settlement never waits on Redis.

        Refunds gather for ``REFUND_BATCH_S`` (summed per key) and go in one pipelined
        round trip, so a busy gateway pays a fraction of a round trip per request."""
        if not (tpm and tokens):
            return
        if self._degraded:
            self._local.refund(key_id, share(tpm, self._replicas), tokens)
            return
        self._local.refund(key_id, tpm, tokens)  # keep the mirror as Redis will be
        queued = self._refunds.get(key_id)
        self._refunds[key_id] = (tpm, tokens + (queued[1] if queued else 0))
        if not self._refund_scheduled:
            self._refund_scheduled = True
            task = asyncio.get_running_loop().create_task(self._flush_refunds())
            self._tasks.add(task)  # the loop keeps only a weak reference to tasks
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for refunds in flight (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        await self.drain()
        await self._redis.aclose()

    async def _flush_refunds(self) -> None:
        await asyncio.sleep(REFUND_BATCH_S)
        batch, self._refunds = self._refunds, {}
        self._refund_scheduled = False  # refunds from now on go in the next batch
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._redis.pipeline(transaction=False)
                for key_id, (tpm, tokens) in batch.items():
                    await self._refund_script(
                        keys=[self.keys(key_id)[1]],
                        args=[self._period_us, tpm, tokens],
                        client=pipe,
                    )
                await pipe.execute()
        except _FAILURES as exc:
            self.refund_failures += len(batch)
            log.debug("rate limiter: %d refunds lost: %s", len(batch), _describe(exc))

    def _decision(self, key_id: str, reply: Any, rpm: int, tpm: int) -> Decision:
        allowed, reason, req_rel, tok_rel, retry_us = (int(x) for x in reply)
        if not self._degraded:  # a late answer must not undo what was admitted locally
            self._local.set_state(key_id, req_rel / 1_000_000, tok_rel / 1_000_000)
        decision = Decision(allowed == 1)
        if not decision.allowed:
            decision.reason = "requests" if reason == 1 else "tokens"
            decision.retry_after_s = retry_us / 1_000_000
        # TATs come back relative to the server's now, so "now" here is 0
        headers_for("requests", rpm, req_rel / 1_000_000, 0.0, decision.headers, self._period)
        headers_for("tokens", tpm, tok_rel / 1_000_000, 0.0, decision.headers, self._period)
        return decision

    async def _admit_locally(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Decision:
        self.fallbacks += 1
        local = self._local
        if local.get_state(key_id) is None:
            # never decided here, so its fleet-wide state is unknown: assume it is spent
            # (its share's steady rate, no burst) rather than grant a full share per replica
            local.set_state(key_id, self._period, self._period)
        rpm_local = share(rpm, self._replicas)
        tpm_local = share(tpm, self._replicas)
        # a request bigger than this replica's share may still pass, on a full budget
        weight = min(tokens, tpm_local) if tpm_local else tokens
        decision = await local.admit(key_id, rpm_local, tpm_local, weight)
        if decision.allowed:
            self._dirty.add(key_id)
        return decision

    def _lost(self, exc: BaseException) -> None:
        """Decide locally from now on; probe Redis in the background until it is back."""
        if self._degraded:
            return
        self._degraded = True
        self.outages += 1
        log.warning(
            "rate limiter: Redis unreachable (%s); enforcing 1/%d of each limit "
            "in this process, retrying Redis every %gs",
            _describe(exc),
            self._replicas,
            self._retry_s,
        )
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Off the request path: Redis is back only after ``recover_after`` probes in a row
        succeed (a flapping Redis would otherwise cost a burst per flap), and only once it
        holds what was admitted here meanwhile."""
        healthy = 0
        while True:
            if healthy == 0:  # pooled connections may be dead or hung: never reuse one
                with contextlib.suppress(*_FAILURES):
                    async with asyncio.timeout(self._timeout):
                        await self._redis.connection_pool.disconnect()
            await asyncio.sleep(self._retry_s)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._redis.ping()
                healthy += 1
                if healthy >= self._recover_after:
                    await self._hand_back()
                    break
            except _FAILURES as exc:
                healthy = 0
                log.debug("rate limiter: Redis still unreachable: %s", _describe(exc))
        self._degraded = False  # no await since the last hand-back: nothing admitted since
        self._reconnecting = None
        log.warning("rate limiter: Redis is back; shared limits restored")

    async def _hand_back(self) -> None:
        """Raise Redis' TATs to the fallback's for every key admitted locally (max())."""
        while self._dirty:
            batch = [self._dirty.pop() for _ in range(min(HAND_BACK_BATCH, len(self._dirty)))]
            try:
                async with asyncio.timeout(self._timeout):
                    pipe = self._redis.pipeline(transaction=False)
                    for key_id in batch:
                        req_s, tok_s = self._local.get_state(key_id) or (0.0, 0.0)
                        await self._raise_script(
                            keys=self.keys(key_id),
                            args=[round(req_s * 1_000_000), round(tok_s * 1_000_000)],
                            client=pipe,
                        )
                    await pipe.execute()
            except BaseException:
                self._dirty.update(batch)  # handed back on the next attempt
                raise


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
