"""The simulator's load model: a vLLM engine's batch, waiting queue, prefill and KV cache.

Without it every request is answered at once, so every replica looks alike and a router
has nothing to choose between. With it a replica has a limited batch
(`--max-num-seqs`), a FIFO queue behind it, a prefill time that grows with the prompt's
uncached tokens (`--prefill-tokens-per-s`), a prefix cache that removes that time for
a repeated prefix (`--prefix-cache-tokens`), and a KV capacity (`--kv-cache-tokens`):
what makes queue- and cache-aware routing beat least-outstanding-requests. The model
only runs when one of these options is set; otherwise the server never creates it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from bastion.sim.loadmetrics import LoadMetrics
from bastion.sim.prefixcache import PrefixCache, block_hashes, token_records
from bastion.sim.reply import Reply

DEFAULT_KV_TOKENS = 262_144
"""KV capacity when `--kv-cache-tokens` is not given (at least the prefix cache's size)."""
DEFAULT_MODEL_NAME = "bastion-sim"


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """The load options (0 = off); any of the first four turns the model on."""

    max_num_seqs: int = 0
    prefill_tokens_per_s: float = 0.0
    prefix_cache_tokens: int = 0
    kv_cache_tokens: int = 0
    served_model_name: str = DEFAULT_MODEL_NAME

    def __post_init__(self) -> None:
        numbers = (
            self.max_num_seqs,
            self.prefill_tokens_per_s,
            self.prefix_cache_tokens,
            self.kv_cache_tokens,
        )
        if any(not (n >= 0) for n in numbers):  # also refuses NaN
            raise ValueError("load options must be non-negative numbers")

    @property
    def active(self) -> bool:
        return bool(
            self.max_num_seqs
            or self.prefill_tokens_per_s
            or self.prefix_cache_tokens
            or self.kv_cache_tokens
        )

    @property
    def kv_capacity(self) -> int:
        """Tokens the running requests may hold at once."""
        return self.kv_cache_tokens or max(self.prefix_cache_tokens, DEFAULT_KV_TOKENS)

    def describe(self) -> str:
        """One line for the startup banner."""
        parts = [f"max-num-seqs {self.max_num_seqs or 'unlimited'}"]
        if self.prefill_tokens_per_s:
            parts.append(f"prefill {self.prefill_tokens_per_s:g} tokens/s")
        parts.append(f"prefix cache {self.prefix_cache_tokens} tokens")
        parts.append(f"KV {self.kv_capacity} tokens")
        return ", ".join(parts)


NEW, WAITING, RUNNING, GONE = range(4)


class Seat:
    """One request's place in the engine, from arrival to leaving."""

    __slots__ = (
        "arrived",
        "cached_tokens",
        "end_at",
        "finished",
        "first_token_at",
        "interval",
        "keys",
        "need",
        "output_tokens",
        "prompt_tokens",
        "state",
        "timer",
        "truncated",
        "ttft_s",
        "waiter",
    )

    def __init__(
        self, reply: Reply, keys: list[bytes], ttft_s: float, rate: float, now: float
    ) -> None:
        self.prompt_tokens = reply.input_tokens
        self.output_tokens = reply.output_tokens
        self.truncated = reply.truncated
        self.keys = keys
        self.need = self.prompt_tokens + self.output_tokens
        self.ttft_s = ttft_s
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.arrived = now
        self.state = NEW
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.cached_tokens = 0
        self.first_token_at = now
        self.end_at = now
        self.finished = False
        """Set by the server when the whole answer was sent (else the client left)."""

    def generated(self, now: float) -> int:
        """Output tokens produced by `now` (one at the first token, then one per interval)."""
        if self.finished:
            return self.output_tokens
        if now < self.first_token_at or not self.output_tokens:
            return 0
        if self.interval <= 0:
            return self.output_tokens
        return min(self.output_tokens, int((now - self.first_token_at) / self.interval) + 1)


class Engine:
    """Admits requests into the batch in arrival order, and times their first token."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.capacity = config.kv_capacity
        self.cache = PrefixCache(config.prefix_cache_tokens) if config.prefix_cache_tokens else None
        self.waiting: deque[Seat] = deque()
        self.running: set[Seat] = set()
        self.reserved = 0
        self.metrics = LoadMetrics(config.served_model_name, self.gauges)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def seat(
        self,
        body: dict[str, Any],
        endpoint: str,
        reply: Reply,
        ttft_ms: float,
        tokens_per_s: float,
    ) -> Seat:
        """A request arrives (its prompt's block keys are hashed only with a prefix cache)."""
        keys = block_hashes(token_records(body, endpoint)) if self.cache is not None else []
        return Seat(reply, keys, ttft_ms / 1000, tokens_per_s, self._now())

    async def admit(self, seat: Seat) -> None:
        """Return when the request runs: at once if there is room and nobody waits."""
        if not self.waiting and self._fits(seat):
            self._start(seat, self._now())
            return
        seat.state = WAITING
        seat.waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(seat)
        await seat.waiter  # a client that leaves cancels this; leave() frees the place

    def leave(self, seat: Seat) -> None:
        """The request is over (answered, or its client left): free its place."""
        state, seat.state = seat.state, GONE
        if state == WAITING:
            self.waiting.remove(seat)
        elif state == RUNNING:
            now = self._now()
            self.running.discard(seat)
            self.reserved -= seat.need
            if seat.timer is not None:  # the first token was not reached yet, or just now
                seat.timer.cancel()
                if seat.finished or now >= seat.first_token_at:
                    self._prefilled(seat)
            m = self.metrics
            m.generation_tokens += seat.generated(now)
            if seat.finished:
                m.e2e.observe(now - seat.arrived)
                m.success["length" if seat.truncated else "stop"] += 1
            else:
                m.success["abort"] += 1
        else:
            return
        self._admit_waiting()

    def gauges(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage): the usage is the running requests' prompt and
        generated tokens over the KV capacity, as vLLM's share of blocks in use."""
        now = self._now()
        held = sum(s.prompt_tokens + s.generated(now) for s in self.running)
        return len(self.running), len(self.waiting), min(held / self.capacity, 1.0)

    def _fits(self, seat: Seat) -> bool:
        """Room in the batch, and in KV for the whole sequence (or an empty batch)."""
        limit = self.config.max_num_seqs
        if limit and len(self.running) >= limit:
            return False
        return not self.running or self.reserved + seat.need <= self.capacity

    def _start(self, seat: Seat, now: float) -> None:
        seat.state = RUNNING
        self.running.add(seat)
        self.reserved += seat.need
        m = self.metrics
        m.queue_time.observe(now - seat.arrived)
        if self.cache is not None:
            seat.cached_tokens = self.cache.lookup(seat.keys, seat.prompt_tokens)
            m.prefix_queries += seat.prompt_tokens
            m.prefix_hits += seat.cached_tokens
        rate = self.config.prefill_tokens_per_s
        prefill = (seat.prompt_tokens - seat.cached_tokens) / rate if rate > 0 else 0.0
        seat.first_token_at = now + seat.ttft_s + prefill
        seat.end_at = seat.first_token_at + max(seat.output_tokens - 1, 0) * seat.interval
        loop = asyncio.get_running_loop()
        seat.timer = loop.call_at(seat.first_token_at, self._prefilled, seat)

    def _prefilled(self, seat: Seat) -> None:
        """The first token: the prompt's blocks enter the cache; TTFT is recorded."""
        seat.timer = None
        if self.cache is not None:
            self.cache.insert(seat.keys)
        m = self.metrics
        m.prompt_tokens += seat.prompt_tokens
        m.ttft.observe(seat.first_token_at - seat.arrived)

    def _admit_waiting(self) -> None:
        """Start waiting requests in arrival order while the head fits (vLLM's FCFS)."""
        now = self._now()
        while self.waiting:
            head = self.waiting[0]
            if head.waiter is not None and head.waiter.done():  # cancelled, not yet left
                self.waiting.popleft()
                head.state = GONE
                continue
            if not self._fits(head):
                return
            self.waiting.popleft()
            self._start(head, now)
            if head.waiter is not None:
                head.waiter.set_result(None)
