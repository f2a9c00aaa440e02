"""Hot-path cost of routing: µs per pick for each policy on 4 replicas, µs per affinity
key, and the /metrics parser against prometheus_client's (per scrape, off the path).

    taskset -c 0 .venv/bin/python -m bench.routing_micro

Each figure is the best of 5 rounds (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from bastion.config import ModelConfig, RoutingConfig, UpstreamConfig
from bastion.routing import Router
from bastion.routing.parse import parse_metrics
from bastion.upstreams import UpstreamPool

NAMES = ("r1", "r2", "r3", "r4")
ROUNDS = 5


def best_us(fn: Callable[[], object], n: int) -> float:
    """µs per call of ``fn``: the best of ``ROUNDS`` rounds of ``n`` calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


def router() -> Router:
    pool = UpstreamPool(
        {n: UpstreamConfig(n, f"http://10.0.0.{i}:8000/v1") for i, n in enumerate(NAMES)}
    )
    models = {
        policy: ModelConfig(policy, policy, frozenset({"chat"}), NAMES, 1, 1, 16, routing=policy)
        for policy in ("least_outstanding", "load_aware", "prefix_affinity")
    }
    r = Router(pool, models, RoutingConfig(stale_after_s=1e9))  # readings stay fresh
    for i, name in enumerate(NAMES):  # fresh signals: the full decision, no fallback
        r.board.update(
            name, {"waiting": i % 2, "running": 8 + i, "kv": 0.3 + i / 10}, time.monotonic()
        )
    return r


def picks(r: Router) -> None:
    exclude: set[str] = set()
    us = best_us(lambda: r.pool.pick(NAMES, exclude), 50_000)
    print(f"pick  {'UpstreamPool.pick':18s} {us:6.2f} µs  (before routing: the same choice)")
    for policy_name in ("least_outstanding", "load_aware", "prefix_affinity"):
        policy = r.policies[policy_name]
        key = policy.key({"user": "alice"}, None)
        us = best_us(lambda p=policy, k=key: p.pick(NAMES, exclude, k), 50_000)
        print(f"pick  {policy_name:18s} {us:6.2f} µs")
    assert not r.fallbacks, r.fallbacks


def keys(r: Router) -> None:
    policy = r.policies["prefix_affinity"]
    system = "You are the support assistant of ACME Corp. Answer briefly and politely. " * 60
    chat = {
        "messages": [{"role": "system", "content": system}]
        + [
            {"role": "user" if i % 2 else "assistant", "content": f"message {i} " * 20}
            for i in range(10)
        ]
    }
    short = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    tools = [
        {
            "type": "function",
            "name": f"tool_{i}",
            "parameters": {"type": "object", "properties": {}},
        }
        for i in range(8)
    ]
    responses = {"instructions": "Be brief.", "tools": tools, "input": "Plan my trip to Lyon."}
    cases = {
        "prompt_cache_key": {"prompt_cache_key": "tenant-7/conversation-42", **chat},
        "prefix, short chat": short,
        "prefix, 4.4 KB system + 10 msgs": chat,
        "prefix, responses + 8 tools": responses,
    }
    for label, body in cases.items():
        us = best_us(lambda b=body: policy.key(b, None), 20_000)
        print(f"key   {label:32s} {us:6.2f} µs")


def vllm_metrics() -> bytes:
    """A /metrics answer shaped like one vLLM engine's: its gauges, counters with _created,
    fourteen histograms with vLLM's bucket sets, and the Python process collectors."""
    registry = CollectorRegistry()
    labels = ["engine", "model_name"]
    values = ("0", "Qwen/Qwen3-32B")
    for name, value in (
        ("num_requests_running", 12),
        ("num_requests_waiting", 3),
        ("kv_cache_usage_perc", 0.42),
    ):
        Gauge(f"vllm:{name}", name, labels, registry=registry).labels(*values).set(value)
    for name in (
        "num_preemptions",
        "prompt_tokens",
        "generation_tokens",
        "prefix_cache_queries",
        "prefix_cache_hits",
    ):
        Counter(f"vllm:{name}", name, labels, registry=registry).labels(*values).inc(1234)
    seconds = (
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        40.0,
        80.0,
        160.0,
        640.0,
        2560.0,
    )
    tokens = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
    for i, name in enumerate(
        (
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
            "request_inference_time_seconds",
            "request_prefill_time_seconds",
            "request_decode_time_seconds",
            "request_time_per_output_token_seconds",
            "iteration_tokens_total",
            "request_prompt_tokens",
            "request_generation_tokens",
            "request_max_num_generation_tokens",
            "request_params_max_tokens",
            "request_params_n",
        )
    ):
        buckets = seconds if name.endswith("seconds") else tokens
        h = Histogram(f"vllm:{name}", name, labels, buckets=buckets, registry=registry)
        for v in range(50):
            h.labels(*values).observe(buckets[(v * 7 + i) % len(buckets)])
    return generate_latest(REGISTRY) + generate_latest(registry)


def reference(body: bytes) -> dict[str, float]:
    wanted = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def parsers() -> None:
    body = vllm_metrics()
    assert parse_metrics(body) == {"waiting": 3.0, "running": 12.0, "kv": 0.42}
    ours = best_us(lambda: parse_metrics(body), 2_000)
    theirs = best_us(lambda: reference(body), 50)
    size = len(body) / 1024
    print(
        f"parse {size:.1f} KB /metrics: ours {ours:7.1f} µs,"
        f" prometheus_client {theirs:8.1f} µs ({theirs / ours:.0f}×)"
    )


def main() -> None:
    r = router()
    picks(r)
    keys(r)
    parsers()


if __name__ == "__main__":
    main()
