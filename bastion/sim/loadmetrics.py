"""The simulator's load figures as vLLM publishes them: `/metrics` and the ORCA header.

Names, types, labels (`model_name`, `engine`) and histogram buckets are vLLM's
(`PrometheusStatLogger`), so a router or dashboard built against the simulator reads a
real vLLM server the same way. Counters and histograms are plain numbers turned into
families at scrape time (no locks or label lookups per request); the gauges are
computed from the engine's state when scraped.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ORCA_REQUEST_HEADER = "endpoint-load-metrics-format"
ORCA_RESPONSE_HEADER = "endpoint-load-metrics"

_LABELS = ("model_name", "engine")
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")

Gauges = Callable[[], tuple[int, int, float]]
"""() -> (running, waiting, KV usage 0..1), read at scrape time."""
Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily


class Histogram:
    """A Prometheus histogram as bucket counts (`le` inclusive) and a sum."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, labels: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=_LABELS)
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            total += n
            cumulative.append((bound, total))
        family.add_metric(labels, cumulative, self.sum)
        return family


class LoadMetrics:
    """One simulator's vLLM metrics, in its own registry (several simulators per process)."""

    def __init__(self, model_name: str, gauges: Gauges) -> None:
        self.labels = (model_name, "0")
        self.gauges = gauges
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _LATENCY_BUCKETS,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _LATENCY_BUCKETS,
        )
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def orca_header(self, fmt: str) -> str | None:
        """vLLM's `endpoint-load-metrics` value for `text` or `json` (any case), else None."""
        _, waiting, kv = self.gauges()
        return orca_value(fmt, waiting, kv)


def orca_value(fmt: str, waiting: int, kv_usage: float) -> str | None:
    """`TEXT named_metrics.a=1.0, named_metrics.b=0.5` or `JSON {"named_metrics": {...}}`.

    vLLM reports these two gauges, in this order, as floats; other formats get nothing.
    """
    named = {"num_requests_waiting": float(waiting), "kv_cache_usage_perc": float(kv_usage)}
    kind = fmt.strip().lower()
    if kind == "text":
        return "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in named.items())
    if kind == "json":
        return "JSON " + json.dumps({"named_metrics": named})
    return None


class _Collector(Collector):
    def __init__(self, m: LoadMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Family]:
        m = self.m
        labels = list(m.labels)
        running, waiting, kv = m.gauges()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(labels, value)
            return family

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting
        )
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv)
        yield gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage (older name of kv_cache_usage_perc).",
            kv,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_hits,
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*_LABELS, "finished_reason"],
        )
        for reason, n in m.success.items():
            success.add_metric([*labels, reason], n)
        yield success
        for histogram in (m.ttft, m.e2e, m.queue_time):
            yield histogram.family(labels)
