"""The routing policies: which replica gets the next attempt of a request.

Each model gets one policy object when the config is loaded; the relay calls its
``pick`` once per attempt, with the replicas already tried excluded (a retry takes the
next in the policy's order). Every policy chooses among ``UpstreamPool.candidates``:
ejected and unhealthy replicas are skipped exactly as before, whatever the policy.

- ``least_outstanding``: fewest requests in flight from this gateway, ties to the least
  recently used (the pool's own ``pick``).
- ``load_aware``: the replica's own report (queue, KV-cache usage, batch), corrected by
  what this gateway sent it since the report (``load_rank``).
- ``prefix_affinity``: the replica the request's affinity key ranks first, unless that
  replica carries over ``affinity_bound`` × the mean load: then the next in the key's
  order (consistent hashing with bounded loads).

When the signals a choice needs are missing or stale, that choice falls back to this
gateway's outstanding counts and is counted (``fallbacks``, by model, policy, reason).
"""

from __future__ import annotations

import math
import time
from collections import Counter as Tally
from collections.abc import Mapping

from bastion.config import ModelConfig, RoutingConfig
from bastion.routing.affinity import affinity_key, hash64, mix
from bastion.routing.signals import Signal, SignalBoard
from bastion.upstreams import Replica, UpstreamPool

KV_BANDS = 10  # KV usage compared in 10 % bands: closer than that, the batch size decides


def least_loaded(candidates: list[Replica]) -> Replica:
    return min(candidates, key=lambda r: (r.outstanding, r.last_used))


class LeastOutstanding:
    """Today's choice: the pool's least-outstanding pick."""

    name = "least_outstanding"
    keyed = False  # needs no affinity key

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def key(self, body: dict | None, headers: Mapping[str, str] | None) -> int:
        return 0

    def pick(self, names: tuple[str, ...], exclude: set[str], key: int) -> Replica | None:
        return self.pool.pick(names, exclude)


class LoadAware:
    """The least loaded replica by its own report; see ``load_rank``."""

    name = "load_aware"
    keyed = False

    def __init__(
        self, model: str, pool: UpstreamPool, board: SignalBoard, fallbacks: Tally
    ) -> None:
        self.model = model
        self.pool = pool
        self.board = board
        self.fallbacks = fallbacks

    def key(self, body: dict | None, headers: Mapping[str, str] | None) -> int:
        return 0

    def pick(self, names: tuple[str, ...], exclude: set[str], key: int) -> Replica | None:
        candidates = self.pool.candidates(names, exclude)
        if len(candidates) <= 1:
            return self.pool.chosen(candidates[0]) if candidates else None
        signals = self.board.readings(candidates, time.monotonic())
        if isinstance(signals, str):
            self.fallbacks[self.model, self.name, signals] += 1
            return self.pool.chosen(least_loaded(candidates))
        ranks = list(map(load_rank, signals, candidates))
        return self.pool.chosen(candidates[ranks.index(min(ranks))])


def load_rank(signal: Signal, replica: Replica) -> tuple[float, int, float, float]:
    """load_aware's order, lower first: (queue, KV band, batch, last used).

    1. The queue: a request that queues waits for a slot, the largest part of its time
       to first token. What this gateway sent since the report joins the queue if the
       replica was queueing (then it has no free slot).
    2. KV-cache pressure, in 10 % bands: a replica near full preempts or queues soon.
       The usage is projected by what was sent since the report (each running request
       holds kv / running of the cache on average). Within a band the next key decides.
    3. The batch: running plus sent since, fewest first (a smaller batch decodes
       faster); last, the least recently used.
    """
    pending = replica.outstanding - signal.base
    waiting = signal.waiting
    running = signal.running
    kv = signal.kv
    if pending:
        if running > 0:
            kv += pending * kv / running
        if waiting > 0 and pending > 0:
            waiting += pending
        running += pending
    band = int(kv * KV_BANDS)  # (plain comparisons: min and max calls cost more here)
    if band > KV_BANDS:
        band = KV_BANDS
    elif band < 0:
        band = 0
    return (waiting, band, running if running > 0 else 0.0, replica.last_used)


class PrefixAffinity:
    """Consistent hashing (rendezvous) on the affinity key, with bounded loads."""

    name = "prefix_affinity"
    keyed = True

    def __init__(
        self,
        model: str,
        pool: UpstreamPool,
        board: SignalBoard,
        config: RoutingConfig,
        fallbacks: Tally,
        spills: Tally,
    ) -> None:
        self.model = model
        self.pool = pool
        self.board = board
        self.bound = config.affinity_bound
        self.prefix_chars = config.affinity_prefix_chars
        self.fallbacks = fallbacks
        self.spills = spills
        self.seeds = {name: hash64(name) for name in pool.replicas}

    def key(self, body: dict | None, headers: Mapping[str, str] | None) -> int:
        return affinity_key(body, headers, self.prefix_chars)

    def pick(self, names: tuple[str, ...], exclude: set[str], key: int) -> Replica | None:
        candidates = self.pool.candidates(names, exclude)
        if len(candidates) <= 1:
            return self.pool.chosen(candidates[0]) if candidates else None
        loads = self.loads(candidates)
        # the bound of Mirrokni et al.: no replica above ceil(c × (total + 1) / n)
        cap = math.ceil(self.bound * (sum(loads) + 1) / len(candidates))
        seeds = self.seeds
        weights = [mix(key ^ seeds[r.config.name]) for r in candidates]
        first = weights.index(max(weights))
        if loads[first] + 1 <= cap:  # the common case: the key's own replica
            return self.pool.chosen(candidates[first])
        self.spills[self.model] += 1
        for i in sorted(range(len(candidates)), key=weights.__getitem__, reverse=True):
            if loads[i] + 1 <= cap:
                return self.pool.chosen(candidates[i])
        return self.pool.chosen(candidates[loads.index(min(loads))])  # not whole numbers

    def loads(self, candidates: list[Replica]) -> list[float]:
        """Each candidate's load: requests its report says it holds (queued and running)
        plus what this gateway sent it since; without fresh reports, this gateway's own
        outstanding requests (counted as a fallback)."""
        signals = self.board.readings(candidates, time.monotonic())
        if isinstance(signals, str):
            self.fallbacks[self.model, self.name, signals] += 1
            return [float(r.outstanding) for r in candidates]
        return [
            max(s.waiting + s.running + r.outstanding - s.base, 0.0)
            for s, r in zip(signals, candidates, strict=True)
        ]


Policy = LeastOutstanding | LoadAware | PrefixAffinity


def make_policy(
    model: ModelConfig,
    pool: UpstreamPool,
    board: SignalBoard,
    config: RoutingConfig,
    fallbacks: Tally,
    spills: Tally,
) -> Policy:
    """The policy object of ``model`` (its ``routing`` was checked when the config loaded)."""
    if model.routing == "load_aware":
        return LoadAware(model.id, pool, board, fallbacks)
    if model.routing == "prefix_affinity":
        return PrefixAffinity(model.id, pool, board, config, fallbacks, spills)
    return LeastOutstanding(pool)
