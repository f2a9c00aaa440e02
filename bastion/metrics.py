"""Prometheus metrics, one registry per gateway so tests can run several in a process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bastion.upstreams import UpstreamPool

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class UpstreamCollector(Collector):
    """Per-upstream figures read from the pool at scrape time: nothing on the hot path."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["upstream"]
        attempts = CounterMetricFamily("bastion_upstream_requests", "Attempts sent", labels=labels)
        errors = CounterMetricFamily(
            "bastion_upstream_failures", "Connect errors and 5xx answers", labels=labels
        )
        outstanding = GaugeMetricFamily(
            "bastion_upstream_outstanding", "Requests in flight", labels=labels
        )
        available = GaugeMetricFamily(
            "bastion_upstream_available", "1 in rotation, 0 ejected", labels=labels
        )
        for name, replica in self.pool.replicas.items():
            attempts.add_metric([name], replica.attempts)
            errors.add_metric([name], replica.errors)
            outstanding.add_metric([name], replica.outstanding)
            available.add_metric([name], 1 if replica.available else 0)
        yield from (attempts, errors, outstanding, available)


class LimiterCollector(Collector):
    """The Redis limiter's health (absent counters read as 0 for the in-process one)."""

    def __init__(self, limiter: object) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        get = self.limiter.__dict__.get
        yield GaugeMetricFamily(
            "bastion_ratelimit_degraded",
            "1 while Redis is unreachable and limits are enforced per process",
            value=1 if getattr(self.limiter, "degraded", False) else 0,
        )
        yield CounterMetricFamily(
            "bastion_ratelimit_fallbacks",
            "Decisions answered without Redis",
            value=get("fallbacks", 0),
        )
        yield CounterMetricFamily(
            "bastion_ratelimit_outages", "Times Redis was lost", value=get("outages", 0)
        )


class Metrics:
    def __init__(self, pool: UpstreamPool | None = None, limiter: object = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if pool is not None:
            r.register(UpstreamCollector(pool))
        if limiter is not None:
            r.register(LimiterCollector(limiter))
        self.requests = Counter(
            "bastion_requests",
            "Client requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "bastion_tokens", "Tokens metered", ["model", "direction"], registry=r
        )
        self.cost = Counter(
            "bastion_cost_nanodollars", "Nano-dollars charged", ["model"], registry=r
        )
        self.estimated = Counter(
            "bastion_estimated_charges", "Ledger rows charged from an estimate", registry=r
        )
        self.overhead = Histogram(
            "bastion_overhead_seconds",
            "Time Bastion adds to a request, upstream time excluded",
            ["endpoint"],
            buckets=_FAST,
            registry=r,
        )
        self.ttft = Histogram(
            "bastion_time_to_first_byte_seconds",
            "From request arrival to the upstream's first byte",
            ["endpoint"],
            buckets=_SLOW,
            registry=r,
        )
        self.in_flight = Gauge("bastion_in_flight", "Requests in flight", registry=r)
        self.ledger_queue = Gauge(
            "bastion_ledger_queue", "Settled rows waiting to be written", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
