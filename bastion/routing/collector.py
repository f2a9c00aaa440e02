"""Routing figures for ``GET /metrics``, read from the router at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bastion.routing.router import Router
from bastion.routing.signals import Signal

READINGS: tuple[tuple[str, str, Callable[[Signal], float]], ...] = (
    ("waiting", "Requests the replica reported queued", lambda s: s.waiting),
    ("running", "Requests the replica reported running", lambda s: s.running),
    ("kv_cache_usage", "KV-cache usage the replica reported, 0 to 1", lambda s: s.kv),
)
"""The per-replica reading gauges: bastion_upstream_load_<name>{upstream}."""


class RoutingCollector(Collector):
    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        router = self.router
        fallbacks = CounterMetricFamily(
            "bastion_routing_fallbacks",
            "Picks that could not use load signals (missing or stale) and used this gateway's"
            " outstanding requests instead",
            labels=["model", "policy", "reason"],
        )
        for (model, policy, reason), n in sorted(router.fallbacks.items()):
            fallbacks.add_metric([model, policy, reason], n)
        spills = CounterMetricFamily(
            "bastion_routing_affinity_spills",
            "prefix_affinity picks past the key's first replica (it was over the load bound)",
            labels=["model"],
        )
        for model, n in sorted(router.spills.items()):
            spills.add_metric([model], n)
        yield from (fallbacks, spills)
        signals = sorted(router.board.signals.items())
        failures = CounterMetricFamily(
            "bastion_upstream_load_scrape_failures",
            "Scrapes of the replica's /metrics that failed (refused, timed out, not 200,"
            " no vLLM gauges)",
            labels=["upstream"],
        )
        age = GaugeMetricFamily(
            "bastion_upstream_load_signal_age_seconds",
            "Seconds since the replica's load signals were last read (scrape or load header)",
            labels=["upstream"],
        )
        now = time.monotonic()
        for name, signal in signals:
            failures.add_metric([name], signal.failures)
            if signal.at:
                age.add_metric([name], now - signal.at)
        yield from (failures, age)
        for suffix, doc, read in READINGS:
            family = GaugeMetricFamily(f"bastion_upstream_load_{suffix}", doc, labels=["upstream"])
            for name, signal in signals:
                if signal.at:
                    family.add_metric([name], read(signal))
            yield family
