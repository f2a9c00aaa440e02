"""Prometheus metrics, one registry per gateway so tests can run several in a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.upstream_errors = Counter(
            "bastion_upstream_errors", "Upstream failures", ["upstream"], registry=r
        )
        self.in_flight = Gauge("bastion_in_flight", "Requests in flight", registry=r)
        self.ledger_queue = Gauge(
            "bastion_ledger_queue", "Settled rows waiting to be written", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
