"""Prometheus metrics, one registry per gateway so tests can run several in a process.

The hot path only bumps plain integers and observes two histograms; the counters are
turned into Prometheus families at scrape time by collectors, so a request pays
no label lookups and no locks for them.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bastion.credit import CreditBook
from bastion.ledger import LedgerWriter
from bastion.upstreams import UpstreamPool

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ENDPOINTS = ("responses", "chat")

Family = CounterMetricFamily | GaugeMetricFamily


class Metrics:
    def __init__(self, pool: UpstreamPool | None = None, limiter: object = None) -> None:
        self.registry = CollectorRegistry()
        self.requests: Tally[tuple[str, str]] = Tally()  # (endpoint, status) -> count
        self.tokens: Tally[tuple[str, str]] = Tally()  # (model, direction) -> tokens
        self.cost: Tally[str] = Tally()  # model -> nano-dollars
        self.estimated = 0
        self.usage_rejected = 0  # upstream usage reports above what the request could use
        self.uncharged = 0  # nano-dollars served that no balance could cover
        self.store_refusals = 0  # 503s: credit could not be checked
        self.in_flight = 0
        self.ledger_queue = lambda: 0
        self.models: dict[str, tuple[str, ...]] = {}  # model id -> its upstreams (config)
        self.book: CreditBook | None = None
        self.writer: LedgerWriter | None = None
        overhead = Histogram(
            "bastion_overhead_seconds",
            "Time Bastion adds to a request, upstream time excluded",
            ["endpoint"], buckets=_FAST, registry=self.registry,
        )  # fmt: skip
        ttft = Histogram(
            "bastion_time_to_first_byte_seconds",
            "From request arrival to the upstream's first byte",
            ["endpoint"], buckets=_SLOW, registry=self.registry,
        )  # fmt: skip
        self.overhead = {e: overhead.labels(e) for e in ENDPOINTS}
        self.ttft = {e: ttft.labels(e) for e in ENDPOINTS}
        self.registry.register(_GatewayCollector(self))
        if pool is not None:
            self.registry.register(_UpstreamCollector(pool))
        if limiter is not None:
            self.registry.register(_LimiterCollector(limiter))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GatewayCollector(Collector):
    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Family]:
        m = self.m
        requests = CounterMetricFamily(
            "bastion_requests", "Client requests by endpoint and status",
            labels=["endpoint", "status"],
        )  # fmt: skip
        for (endpoint, status), n in sorted(m.requests.items()):
            requests.add_metric([endpoint, status], n)
        tokens = CounterMetricFamily(
            "bastion_tokens", "Tokens metered", labels=["model", "direction"]
        )
        for (model, direction), n in sorted(m.tokens.items()):
            tokens.add_metric([model, direction], n)
        cost = CounterMetricFamily("bastion_cost_nanodollars", "Charged", labels=["model"])
        for model, n in sorted(m.cost.items()):
            cost.add_metric([model], n)
        yield from (requests, tokens, cost)
        yield CounterMetricFamily(
            "bastion_estimated_charges", "Ledger rows charged from an estimate",
            value=m.estimated,
        )  # fmt: skip
        yield GaugeMetricFamily("bastion_in_flight", "Requests in flight", value=m.in_flight)
        yield GaugeMetricFamily(
            "bastion_ledger_queue", "Settled rows waiting to be written", value=m.ledger_queue()
        )
        yield CounterMetricFamily(
            "bastion_usage_rejected",
            "Upstream usage reports above what the request could use (charged the worst case)",
            value=m.usage_rejected,
        )
        yield CounterMetricFamily(
            "bastion_uncharged_nanodollars",
            "Cost of served requests that no balance could cover (ledger rows' uncharged)",
            value=m.uncharged,
        )
        writer = m.writer
        yield CounterMetricFamily(
            "bastion_ledger_dead_letters",
            "Settled rows the store refused, kept in the dead-letter table",
            value=writer.dead_letters if writer else 0,
        )
        yield CounterMetricFamily(
            "bastion_reclaimed_gateways",
            "Gateways that died in this seat before this one started; their leases reclaimed",
            value=writer.reclaimed_gateways if writer else 0,
        )
        yield CounterMetricFamily(
            "bastion_reclaimed_streams",
            "Streams of gateways that died, charged by this one from their last checkpoint",
            value=writer.reclaimed_streams if writer else 0,
        )
        yield CounterMetricFamily(
            "bastion_credit_unavailable",
            "Requests refused with 503 because credit could not be checked",
            value=m.store_refusals,
        )
        book = m.book
        yield CounterMetricFamily(
            "bastion_credit_lease_waits",
            "Requests that waited for the store to grow their account's credit lease",
            value=book.waits if book else 0,
        )
        yield CounterMetricFamily(
            "bastion_credit_lease_topups",
            "Credit leases grown in the background, before requests needed it",
            value=book.topups if book else 0,
        )
        yield CounterMetricFamily(
            "bastion_credit_leases_given_up",
            "Times this gateway gave up its leases (store unreachable or leases reclaimed)",
            value=book.distrusts if book else 0,
        )
        yield GaugeMetricFamily(
            "bastion_credit_trusted",
            "1 while this gateway's credit leases are confirmed by recent heartbeats",
            value=1 if book and book.trusted else 0,
        )
        age = GaugeMetricFamily(
            "bastion_store_refresh_age_seconds",
            "Seconds since the store last answered a whole refresh (heartbeat, keys); grows"
            " while it cannot be reached, long before the leases are given up",
            labels=[],
        )
        if writer is not None and writer.last_refresh:
            age.add_metric([], time.monotonic() - writer.last_refresh)
        served = GaugeMetricFamily(
            "bastion_model_upstream_info",
            "1 per model and upstream replica serving it: joined with bastion_upstream_available"
            " it tells when every replica of a model is out",
            labels=["model", "upstream"],
        )
        for model, upstreams in sorted(m.models.items()):
            for upstream in upstreams:
                served.add_metric([model, upstream], 1)
        yield from (age, served)


class _UpstreamCollector(Collector):
    """Per-upstream figures read from the pool at scrape time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Family]:
        labels = ["upstream"]
        attempts = CounterMetricFamily("bastion_upstream_requests", "Attempts sent", labels=labels)
        errors = CounterMetricFamily(
            "bastion_upstream_failures",
            "Refused, broken, timed out, not HTTP, 5xx, or out after a failed health check",
            labels=labels,
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


class _LimiterCollector(Collector):
    """The Redis limiter's health (the in-process limiter reads as healthy)."""

    def __init__(self, limiter: object) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[Family]:
        get = self.limiter.__dict__.get
        yield GaugeMetricFamily(
            "bastion_ratelimit_degraded",
            "1 while Redis is unreachable and limits are enforced per process",
            value=1 if getattr(self.limiter, "degraded", False) else 0,
        )
        yield CounterMetricFamily(
            "bastion_ratelimit_fallbacks", "Decisions answered without Redis",
            value=get("fallbacks", 0),
        )  # fmt: skip
        yield CounterMetricFamily(
            "bastion_ratelimit_outages", "Times Redis was lost", value=get("outages", 0)
        )
