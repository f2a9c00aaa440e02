"""The live view: what this replica is doing now, read from its metrics and upstream pool.

Nothing here runs per API request: the figures are the counters and histogram the hot
path already keeps, read when the page polls (every ~2 s). Rates and latency
percentiles are over the last ``WINDOW_S`` seconds, from the differences between now
and a sample taken then; the samples are kept here, per replica, a few dozen at most.
Each replica counts only what it served, so the view is of the replica that answered.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.app import Gateway
from bastion.views import iso_time

WINDOW_S = 10.0  # rates and percentiles over about this much of the recent past
KEEP_S = 60.0
MIN_GAP_S = 0.5  # viewers polling together share a sample


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    requests: int
    errors: int
    buckets: tuple[tuple[float, int], ...]  # (upper bound, cumulative count), +Inf last


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative histogram buckets, interpolated linearly inside the
    bucket it falls in, as Prometheus' ``histogram_quantile`` does: the lowest bucket
    starts at 0, and a rank in the +Inf bucket answers the highest finite bound.
    None when there are no observations."""
    if not 0 < q <= 1 or not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if upper <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def bucket_delta(
    now: Sequence[tuple[float, int]], then: Sequence[tuple[float, int]]
) -> list[tuple[float, int]]:
    """Observations between two readings of the same cumulative buckets."""
    return [(bound, count - old) for (bound, count), (_, old) in zip(now, then, strict=True)]


class Live:
    def __init__(self, gateway: Gateway, clock: Callable[[], float] = time.monotonic) -> None:
        self.gateway = gateway
        self.clock = clock
        self.samples: deque[Sample] = deque()
        self.replica = f"{socket.gethostname()} pid {os.getpid()} ({gateway.book.gateway_id})"

    def sample(self) -> Sample:
        """The counters now: requests answered (every status), errors (4xx/5xx), and the
        added-latency histogram summed over endpoints."""
        requests = errors = 0
        for (_, status), n in self.gateway.metrics.requests.items():
            requests += n
            errors += n if status[:1] in ("4", "5") else 0
        sums: dict[float, int] = {}
        for child in self.gateway.metrics.overhead.values():
            for family in child.collect():
                for s in family.samples:
                    if s.name.endswith("_bucket"):
                        bound = float(s.labels["le"])
                        sums[bound] = sums.get(bound, 0) + int(s.value)
        return Sample(self.clock(), requests, errors, tuple(sorted(sums.items())))

    def snapshot(self) -> dict[str, Any]:
        """What /console/live.json answers (and the live page shows before its first poll)."""
        now = self.sample()
        past = self._past(now.at)
        if not self.samples or now.at - self.samples[-1].at >= MIN_GAP_S:
            self.samples.append(now)
        while len(self.samples) > 1 and now.at - self.samples[0].at > KEEP_S:
            self.samples.popleft()
        m = self.gateway.metrics
        rate = errors = p50 = p99 = None
        window = None
        if past is not None and now.at > past.at:
            window = now.at - past.at
            rate = (now.requests - past.requests) / window
            errors = (now.errors - past.errors) / window
            recent = bucket_delta(now.buckets, past.buckets)
            p50, p99 = histogram_quantile(0.5, recent), histogram_quantile(0.99, recent)
        book = m.book
        return {
            "replica": self.replica,
            "time": iso_time(time.time_ns() // 1000),
            "window_s": None if window is None else round(window, 1),
            "requests_per_s": _round(rate),
            "errors_per_s": _round(errors),
            "requests_total": now.requests,
            "errors_total": now.errors,
            "in_flight": m.in_flight,
            "overhead_p50_ms": _ms(p50),
            "overhead_p99_ms": _ms(p99),
            "overhead_p50_ms_all": _ms(histogram_quantile(0.5, now.buckets)),
            "overhead_p99_ms_all": _ms(histogram_quantile(0.99, now.buckets)),
            "ledger_queue": m.ledger_queue(),
            "credit_trusted": bool(book and book.trusted),
            "upstreams": self.upstreams(),
        }

    def upstreams(self) -> list[dict[str, Any]]:
        """Each upstream replica: in rotation, ejected after failures, or failing its
        health checks; and the models it serves."""
        models = self.gateway.config.models.values()
        out = []
        for name, r in self.gateway.relay.pool.replicas.items():
            state = "up" if r.available else "down" if r.down else "ejected"
            out.append({
                "name": name,
                "url": r.config.url,
                "state": state,
                "outstanding": r.outstanding,
                "attempts": r.attempts,
                "errors": r.errors,
                "consecutive_failures": r.failures,
                "models": [m.id for m in models if name in m.upstreams],
            })  # fmt: skip
        return out

    def _past(self, now: float) -> Sample | None:
        """The oldest sample within the window, else the newest before it."""
        older = None
        for s in self.samples:
            if now - s.at <= WINDOW_S:
                return s if now > s.at else older
            older = s
        return older


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
