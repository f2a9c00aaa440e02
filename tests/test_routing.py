"""Fleet-aware routing: the policies, the load signals, and the whole path end to end.

Unit tests drive each policy on a real pool with scripted signals. The parser reads
real vLLM /metrics answers (tests/data/) and is checked against prometheus_client's
parser. The scraper runs against real HTTP servers that serve, refuse, hang and come
back. End to end, a real gateway process routes the official openai SDK's requests to
real `bastion sim` processes (with their vLLM load model); which replica served a
request is read from the gateway's own per-upstream counters.
"""

from __future__ import annotations

import asyncio
import math
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from conftest import Gateway, free_port, stop, wait_http
from multidict import CIMultiDict
from openai import OpenAI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bastion.config import ConfigError, ModelConfig, RoutingConfig, UpstreamConfig, parse_config
from bastion.routing import Router, RoutingCollector
from bastion.routing.affinity import affinity_key, hash64, prompt_prefix, rank
from bastion.routing.parse import parse_load_header, parse_metrics
from bastion.routing.policies import LoadAware, PrefixAffinity
from bastion.routing.signals import metrics_url
from bastion.sim.loadmetrics import orca_value
from bastion.upstreams import UpstreamPool

DATA = Path(__file__).parent / "data"
NAMES = ("a", "b", "c", "d")


def make_router(policy: str, names: tuple[str, ...] = NAMES, **routing: float) -> Router:
    pool = UpstreamPool({n: UpstreamConfig(n, f"http://127.0.0.1:1/{n}/v1") for n in names})
    model = ModelConfig("m", "m", frozenset({"chat"}), names, 1, 1, 16, routing=policy)
    return Router(pool, {"m": model}, RoutingConfig(**routing))


def model_of(router: Router) -> ModelConfig:
    return ModelConfig("m", "m", frozenset({"chat"}), tuple(router.pool.replicas), 1, 1, 16)


def signal(router: Router, name: str, waiting: float, running: float, kv: float) -> None:
    router.board.update(name, {"waiting": waiting, "running": running, "kv": kv}, time.monotonic())


def pick(router: Router, key: int = 0, exclude: set[str] | None = None) -> str:
    """One pick, as the relay makes it; the attempt stays outstanding."""
    policy = router.policy(model_of(router))
    replica = policy.pick(tuple(router.pool.replicas), exclude or set(), key)
    assert replica is not None
    replica.outstanding += 1
    return replica.config.name


# ---- configuration ---------------------------------------------------------------------


def config_with(model: dict | None = None, **sections: dict) -> dict:
    raw = {
        "upstreams": [{"name": "a", "url": "http://h:8000/v1"}],
        "models": [
            {
                "id": "m",
                "upstreams": ["a"],
                "input_price": "1",
                "output_price": "1",
                "max_output_tokens": 8,
                **(model or {}),
            }
        ],
    }
    return {**raw, **sections}


def test_routing_is_chosen_per_model_and_an_unknown_policy_names_the_choices():
    assert parse_config(config_with()).models["m"].routing == "least_outstanding"
    for policy in ("load_aware", "prefix_affinity"):
        assert parse_config(config_with({"routing": policy})).models["m"].routing == policy
    with pytest.raises(ConfigError) as bad:
        parse_config(config_with({"routing": "round_robin"}))
    message = str(bad.value)
    assert "models[0].routing" in message and "round_robin" in message
    assert all(p in message for p in ("least_outstanding", "load_aware", "prefix_affinity"))


@pytest.mark.parametrize(
    ("routing", "complaint"),
    [
        ({"stale_after_s": 1.0}, "stale_after_s"),  # not longer than the interval
        ({"scrape_timeout_s": 2.0}, "scrape_timeout_s"),  # longer than the interval
        ({"scrape_interval_s": 0}, "scrape_interval_s"),
        ({"affinity_bound": 0.9}, "affinity_bound"),
        ({"affinity_prefix_chars": 0}, "affinity_prefix_chars"),
        ({"affinity_bonud": 2.0}, "unknown keys"),
    ],
)
def test_bad_routing_settings_are_refused_with_the_key_named(routing: dict, complaint: str):
    with pytest.raises(ConfigError, match=complaint):
        parse_config(config_with(routing=routing))


def test_routing_settings_and_the_metrics_path():
    config = parse_config(config_with(routing={"stale_after_s": 5, "affinity_bound": 2}))
    assert config.routing == RoutingConfig(stale_after_s=5.0, affinity_bound=2.0)
    assert metrics_url(config.upstreams["a"]) == "http://h:8000/metrics"
    custom = UpstreamConfig("x", "https://gpu.internal/prefix/v1", metrics_path="/stats/prom")
    assert metrics_url(custom) == "https://gpu.internal/stats/prom"


# ---- the /metrics parser and the ORCA header ---------------------------------------------


def reference(text: str) -> dict[str, float]:
    """What prometheus_client's full parser reads: the same figures, the slow way."""
    series: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not math.isnan(sample.value):
                series.setdefault(sample.name, []).append(sample.value)
    found = {}
    for ours, name in (("waiting", "num_requests_waiting"), ("running", "num_requests_running")):
        if f"vllm:{name}" in series:
            found[ours] = sum(series[f"vllm:{name}"])
    kv = series.get("vllm:kv_cache_usage_perc") or series.get("vllm:gpu_cache_usage_perc")
    if kv:
        found["kv"] = sum(kv) / len(kv)
    return found


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("vllm_metrics_v0.8.txt", {"waiting": 0.0, "running": 0.0, "kv": 0.0}),
        ("vllm_metrics_v0.10.txt", {"kv": 9.75010481363281e-06}),
        ("vllm_metrics_docs.txt", {}),
    ],
)
def test_the_parser_reads_real_vllm_answers_as_prometheus_client_does(sample, expected):
    body = (DATA / sample).read_bytes()
    assert parse_metrics(body) == expected == reference(body.decode())


SERIES = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0 1700000000000
# HELP vllm:num_requests_waiting_by_reason Requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 7.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="odd } name"} 5.0
vllm:num_requests_running{engine="1",model_name="m"} 6.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 2.5e-1
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
"""


def test_series_are_summed_kv_averaged_and_lookalike_names_skipped():
    """Two data-parallel engines: queues add up, each engine's KV cache is its own."""
    assert parse_metrics(SERIES.encode()) == {"waiting": 7.0, "running": 11.0, "kv": 0.375}
    assert reference(SERIES) == parse_metrics(SERIES.encode())
    old = "vllm:gpu_cache_usage_perc 0.8\nvllm:num_requests_waiting NaN\n"
    assert parse_metrics(old.encode()) == {"kv": 0.8}  # the old name; NaN is no reading
    assert parse_metrics(b"") == {}
    assert parse_metrics(b"vllm:num_requests_waiting{broken 3\n") == {}


def test_the_load_header_in_vllms_text_and_json_forms():
    text = "TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3.0"
    assert parse_load_header(text) == {"kv": 0.4, "waiting": 3.0}
    as_json = 'JSON {"named_metrics": {"kv_cache_usage_perc": 0.4, "num_requests_running": 8}}'
    assert parse_load_header(as_json) == {"kv": 0.4, "running": 8.0}
    for fmt in ("text", "json"):  # what the simulator sends, as vLLM does
        value = orca_value(fmt, 3, 0.4)
        assert value is not None and parse_load_header(value) == {"waiting": 3.0, "kv": 0.4}
    for junk in ("BIN CZqZmZmZmbk/MQ==", "JSON {not json", "TEXT named_metrics.x=1", ""):
        assert parse_load_header(junk) == {}
    bad_values = (
        'JSON {"named_metrics": {"num_requests_waiting": "many", "kv_cache_usage_perc": -1}}'
    )
    assert parse_load_header(bad_values) == {}


def test_a_load_header_refreshes_a_reading_and_keeps_what_it_does_not_carry():
    router = make_router("load_aware")
    signal(router, "a", 1, 9, 0.2)
    before = router.board.signals["a"].at
    time.sleep(0.001)
    assert router.load_header("a", "TEXT named_metrics.num_requests_waiting=4.0")
    a = router.board.signals["a"]
    assert (a.waiting, a.running, a.kv) == (4.0, 9.0, 0.2) and a.at > before
    assert not router.load_header("a", "BIN xyz")
    assert not router.load_header("z", "TEXT named_metrics.num_requests_waiting=1")


# ---- the policies, on scripted signals ---------------------------------------------------


def test_least_outstanding_is_the_pools_own_choice():
    router = make_router("least_outstanding")
    assert [pick(router) for _ in NAMES] == list(NAMES)  # none busy: least recently used
    router.pool.replicas["c"].outstanding = 0
    assert pick(router) == "c"
    assert not router.board.signals  # nothing to scrape


def test_load_aware_ranks_queue_then_kv_band_then_batch():
    router = make_router("load_aware")
    signal(router, "a", 5, 10, 0.20)  # queueing: last, however empty its cache
    signal(router, "b", 0, 30, 0.70)
    signal(router, "c", 0, 10, 0.75)  # same 10 % KV band as b and d, smallest batch
    signal(router, "d", 0, 50, 0.71)
    assert pick(router) == "c"
    router.pool.replicas["c"].outstanding = 0
    signal(router, "b", 0, 40, 0.35)  # a lower KV band wins over a smaller batch
    assert pick(router) == "b"
    assert pick(router, exclude={"b"}) == "c"  # a retry: the next in that order
    assert not router.fallbacks


def test_load_aware_counts_what_it_sent_since_the_signal():
    """Between two scrapes the reports do not move: without counting its own sends the
    gateway would send everything to the replica that looked best (herding)."""
    router = make_router("load_aware")
    signal(router, "a", 2, 8, 0.9)
    signal(router, "b", 0, 4, 0.1)
    signal(router, "c", 0, 5, 0.1)
    signal(router, "d", 2, 8, 0.9)
    picks = [pick(router) for _ in range(8)]
    assert set(picks) == {"b", "c"} and Counter(picks) == {"b": 4, "c": 4}
    signal(router, "b", 0, 8, 0.2)  # a new reading starts the count again
    assert router.board.signals["b"].pending == 0


def test_load_aware_joins_the_queue_of_a_queueing_replica():
    router = make_router("load_aware", names=("a", "b"))
    signal(router, "a", 1, 8, 1.0)
    signal(router, "b", 3, 8, 1.0)
    # a's queue grows 1, 2, 3 with what it is sent; at 3 = 3, b's smaller batch wins
    assert [pick(router) for _ in range(4)] == ["a", "a", "b", "a"]


def test_load_aware_falls_back_to_least_outstanding_when_signals_are_missing_or_stale():
    router = make_router("load_aware")
    for name in "abc":
        signal(router, name, 0, 1, 0.1)
    router.pool.replicas["a"].outstanding = 3
    assert pick(router) == "b"  # d has no reading: least outstanding (b, c, d: b first)
    assert router.fallbacks == {("m", "load_aware", "missing"): 1}
    signal(router, "d", 9, 9, 0.9)
    router.board.signals["c"].at -= 10  # older than stale_after_s
    assert pick(router) == "c"
    assert router.fallbacks[("m", "load_aware", "stale")] == 1
    router.pool.failed(router.pool.replicas["c"], "refused")  # out of rotation: not asked
    signal(router, "a", 0, 0, 0.0)
    assert pick(router) == "a" and sum(router.fallbacks.values()) == 2


def test_one_candidate_needs_no_signals():
    router = make_router("load_aware", names=("a",))
    assert pick(router) == "a" and not router.fallbacks


def keyed(router: Router, body: dict, headers: dict | None = None) -> int:
    policy = router.policy(model_of(router))
    assert isinstance(policy, PrefixAffinity)
    return policy.key(body, CIMultiDict(headers or {}))


def test_prefix_affinity_sends_a_key_to_its_first_replica_and_spreads_keys():
    router = make_router("prefix_affinity")
    seeds = {n: hash64(n) for n in NAMES}
    key = keyed(router, {"prompt_cache_key": "tenant-7/chat-42"})
    first = rank(key, seeds, NAMES)[0]
    for _ in range(5):
        assert pick(router, key) == first
        router.pool.replicas[first].outstanding -= 1
    spread = Counter()
    for i in range(400):
        k = keyed(router, {"prompt_cache_key": f"conversation-{i}"})
        spread[pick(router, k)] += 1
        for replica in router.pool.replicas.values():
            replica.outstanding = 0
    assert set(spread) == set(NAMES) and max(spread.values()) < 1.6 * min(spread.values())
    assert not router.spills


def test_removing_a_replica_moves_only_its_keys():
    rng = random.Random(20261206)
    names = ("r1", "r2", "r3", "r4", "r5")
    seeds = {n: hash64(n) for n in names}
    for _ in range(300):
        key = rng.getrandbits(64)
        full = rank(key, seeds, names)
        gone = rng.choice(names)
        assert rank(key, seeds, [n for n in names if n != gone]) == [n for n in full if n != gone]


def test_an_ejected_first_choice_sends_its_keys_to_their_second():
    router = make_router("prefix_affinity")
    seeds = {n: hash64(n) for n in NAMES}
    key = keyed(router, {"user": "alice"})
    first, second = rank(key, seeds, NAMES)[:2]
    router.pool.failed(router.pool.replicas[first], "refused")
    assert pick(router, key) == second
    assert pick(router, key, exclude={second}) == rank(key, seeds, NAMES)[2]


def test_bounded_load_skips_a_first_choice_over_the_bound():
    router = make_router("prefix_affinity", affinity_bound=1.25)
    seeds = {n: hash64(n) for n in NAMES}
    key = keyed(router, {"user": "bob"})
    first, second = rank(key, seeds, NAMES)[:2]
    router.pool.replicas[first].outstanding = 2  # cap: ceil(1.25 × 3 / 4) = 1; 2 + 1 > 1
    assert pick(router, key) == second and router.spills == {"m": 1}
    assert router.fallbacks == {("m", "prefix_affinity", "missing"): 1}  # no signals: ours
    router.pool.replicas[first].outstanding = 0
    router.pool.replicas[second].outstanding = 0
    for name in NAMES:  # with fresh signals the bound reads the replicas' own loads
        signal(router, name, 0, 1, 0.1)
    signal(router, first, 6, 8, 0.9)  # 14 of 17: over 1.25 × 18 / 4
    assert pick(router, key) == second and router.spills == {"m": 2}
    signal(router, first, 0, 1, 0.1)  # as loaded as the others again: its keys come back
    router.pool.replicas[second].outstanding = 0
    assert pick(router, key) == first and router.spills == {"m": 2}
    assert router.fallbacks == {("m", "prefix_affinity", "missing"): 1}


def test_the_affinity_key_prefers_the_cache_key_then_user_then_session_then_prompt():
    router = make_router("prefix_affinity")
    body = {"prompt_cache_key": "k", "user": "u", "messages": [{"role": "user", "content": "x"}]}
    headers = {"X-Session-Id": "s"}
    assert keyed(router, body, headers) == hash64("prompt_cache_key\0k")
    del body["prompt_cache_key"]
    assert keyed(router, body, headers) == hash64("user\0u")
    del body["user"]
    assert keyed(router, body, headers) == hash64("session\0s")  # any case of the header
    assert keyed(router, body) == hash64("prefix\0user:x\n")
    assert keyed(router, {"prompt_cache_key": "", "user": 7}) == hash64("prefix\0")
    salted = {"user": "u", "cache_salt": "acct-1"}  # cache_isolation = "account"
    assert keyed(router, salted) == hash64("acct-1\0user\0u")
    assert keyed(router, salted) != keyed(router, {**salted, "cache_salt": "acct-2"})


def test_the_prompt_prefix_is_instructions_tools_then_messages_up_to_the_cap():
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    body = {
        "instructions": "Be brief. ",
        "tools": tools,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Paris?"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
    }
    whole = prompt_prefix(body, 10_000)
    assert whole.startswith("Be brief. [{") and whole.endswith("user:Paris?\nsunny\n")
    assert prompt_prefix(body, 5) == "Be br"
    system = "You are the support assistant of ACME. " * 30  # 1,170 characters
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "reset my password"}]
    other = [chat[0], {"role": "user", "content": "where is my order"}]
    router = make_router("prefix_affinity", affinity_prefix_chars=1000)
    assert keyed(router, {"messages": chat}) == keyed(router, {"messages": other})
    router = make_router("prefix_affinity", affinity_prefix_chars=4096)
    assert keyed(router, {"messages": chat}) != keyed(router, {"messages": other})
    assert prompt_prefix({"input": "hello"}, 100) == "hello"


# ---- the scraper, against real HTTP servers ----------------------------------------------


class MetricsServer:
    """An aiohttp server whose GET /metrics answers ``text``, on a fixed port."""

    def __init__(self, port: int, text: str) -> None:
        self.port = port
        self.text = text
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.text, content_type="text/plain")

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def vllm_text(waiting: int, running: int, kv: float) -> str:
    labels = '{engine="0",model_name="m"}'
    return (
        f"vllm:num_requests_running{labels} {running:.1f}\n"
        f"vllm:num_requests_waiting{labels} {waiting:.1f}\n"
        f"vllm:kv_cache_usage_perc{labels} {kv}\n"
    )


async def until(condition, what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {within}s")
        await asyncio.sleep(0.02)


async def test_the_scraper_follows_a_metrics_endpoint_that_dies_hangs_and_comes_back():
    ports = {"a": free_port(), "b": free_port()}
    servers = {"a": MetricsServer(ports["a"], vllm_text(5, 8, 0.9))}
    servers["b"] = MetricsServer(ports["b"], vllm_text(0, 2, 0.1))
    for server in servers.values():
        await server.start()
    ups = {n: UpstreamConfig(n, f"http://127.0.0.1:{p}/v1") for n, p in ports.items()}
    pool = UpstreamPool(ups)
    model = ModelConfig("m", "m", frozenset({"chat"}), ("a", "b"), 1, 1, 16, routing="load_aware")
    config = RoutingConfig(scrape_interval_s=0.1, scrape_timeout_s=0.1, stale_after_s=0.4)
    router = Router(pool, {"m": model}, config)
    policy = router.policy(model)
    assert isinstance(policy, LoadAware)
    a, b = router.board.signals["a"], router.board.signals["b"]
    registry = CollectorRegistry()
    registry.register(RoutingCollector(router))
    hung: asyncio.Server | None = None
    session = aiohttp.ClientSession()
    router.start(session)
    try:
        await until(lambda: a.at and b.at, "read")
        assert (a.waiting, a.running, a.kv) == (5.0, 8.0, 0.9)
        assert policy.pick(("a", "b"), set(), 0) is pool.replicas["b"]  # a is queueing
        assert not router.fallbacks

        await servers["a"].stop()  # refused
        await until(lambda: "Cannot connect" in a.error or "refused" in a.error, "refused")
        await until(lambda: time.monotonic() - a.at > config.stale_after_s, "stale")
        assert policy.pick(("a", "b"), set(), 0) is pool.replicas["a"]  # least outstanding
        assert router.fallbacks == {("m", "load_aware", "stale"): 1}

        async def never_answer(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await reader.read()  # reads the request, answers nothing, until the scraper leaves
            w.close()

        hung = await asyncio.start_server(never_answer, "127.0.0.1", ports["a"])
        await until(lambda: "unanswered" in a.error, "timed out")
        failures = a.failures
        assert policy.pick(("a", "b"), set(), 0) is not None
        assert router.fallbacks == {("m", "load_aware", "stale"): 2}

        hung.close()
        await hung.wait_closed()
        hung = None
        servers["a"] = MetricsServer(ports["a"], vllm_text(0, 1, 0.05))
        await servers["a"].start()
        await until(lambda: not a.error and a.waiting == 0.0, "back")
        pool.replicas["a"].outstanding = pool.replicas["b"].outstanding = 0
        assert policy.pick(("a", "b"), set(), 0) is pool.replicas["a"]  # by its report
        assert router.fallbacks == {("m", "load_aware", "stale"): 2}
        assert a.failures >= failures + 1 and b.failures == 0

        families = {
            f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
        }
        fallbacks = families["bastion_routing_fallbacks"].samples
        assert [(s.labels, s.value) for s in fallbacks] == [
            ({"model": "m", "policy": "load_aware", "reason": "stale"}, 2.0)
        ]
        ages = {
            s.labels["upstream"]: s.value
            for s in families["bastion_upstream_load_signal_age_seconds"].samples
        }
        assert set(ages) == {"a", "b"} and all(
            0 <= age < config.stale_after_s for age in ages.values()
        )
        kv = {
            s.labels["upstream"]: s.value
            for s in families["bastion_upstream_load_kv_cache_usage"].samples
        }
        assert kv == {"a": 0.05, "b": 0.1}
        scrape_failures = {
            s.labels["upstream"]: s.value
            for s in families["bastion_upstream_load_scrape_failures"].samples
        }
        assert scrape_failures["a"] >= 2 and scrape_failures["b"] == 0
    finally:
        await router.close()
        await session.close()
        if hung is not None:
            hung.close()
        for server in servers.values():
            if server.runner is not None:
                await server.stop()


async def test_a_router_without_signal_policies_starts_no_scraper():
    router = make_router("least_outstanding")
    async with aiohttp.ClientSession() as session:
        router.start(session)
        assert not router.scraper.running
        await router.close()


# ---- end to end: a gateway process, `bastion sim` processes, the openai SDK --------------

SIMS = ("s1", "s2", "s3")
DEAD = {"plain-dead": "dead_lo", "load-dead": "dead_la", "affinity-dead": "dead_pa"}
POLICIES = {"plain": "least_outstanding", "load": "load_aware", "affinity": "prefix_affinity"}
FAST = {"sim": {"tokens": 1}}  # one output token: replies come at once at any sim speed

FLEET_TOML = """
refresh_interval_s = 0.2
health_check_interval_s = 3600  # the dead replicas are found by requests, not before

[database]
url = "sqlite:///{db}"

[server]
port = {port}  # on the default host, 127.0.0.1

[ratelimit]  # unlimited: these tests count replicas, not requests
default_rpm = 0
default_tpm = 0

[routing]
scrape_interval_s = 0.1
scrape_timeout_s = 0.1
stale_after_s = 1.0
affinity_prefix_chars = 1024
"""

UPSTREAM = """
[[upstreams]]
name = "{name}"
url = "http://127.0.0.1:{port}/v1"
connect_timeout_s = 1
"""

MODEL = """
[[models]]
id = "{id}"
endpoints = ["responses", "chat"]
upstreams = {upstreams}
input_price = "0.10"
output_price = "0.10"
max_output_tokens = 256
routing = "{routing}"
"""


@dataclass
class Fleet:
    gateway: Gateway  # the process: its url, root and new_key
    sims: dict[str, int]  # name -> port
    client: OpenAI

    def counters(self, family: str) -> Counter:
        """The gateway's samples of ``family``: by upstream, else by their label values."""
        text = httpx.get(f"{self.gateway.root}/metrics").text
        out: Counter = Counter()
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == family:
                    labels = sample.labels
                    out[labels.get("upstream") or tuple(labels.values())] += sample.value
        return out

    def served(self, send) -> Counter:
        """Which replicas the requests ``send()`` makes were sent to (attempts, by upstream)."""
        before = self.counters("bastion_upstream_requests_total")
        send()
        after = self.counters("bastion_upstream_requests_total")
        return Counter({n: after[n] - before[n] for n in after if after[n] != before[n]})


def start_all(commands: list[tuple[list[str], str]]) -> list[subprocess.Popen]:
    """Start the processes at once, then wait for each to answer (faster than one by one)."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "bastion", *args], stdout=subprocess.DEVNULL)
        for args, _ in commands
    ]
    try:
        for proc, (_, health) in zip(procs, commands, strict=True):
            wait_http(health, proc)
    except BaseException:
        for proc in procs:
            stop(proc)
        raise
    return procs


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    sims = {name: free_port() for name in SIMS}
    tmp = tmp_path_factory.mktemp("routing")
    port = free_port()
    text = FLEET_TOML.format(port=port, db=tmp / "bastion.db")
    ports = {**sims, **{dead: free_port() for dead in DEAD.values()}}
    text += "".join(UPSTREAM.format(name=n, port=p) for n, p in ports.items())
    for model, routing in POLICIES.items():
        text += MODEL.format(id=model, upstreams=list(SIMS), routing=routing)
        dead = DEAD[f"{model}-dead"]
        text += MODEL.format(id=f"{model}-dead", upstreams=[dead, "s1", "s2"], routing=routing)
    config = tmp / "bastion.toml"
    config.write_text(text.replace("'", '"'))
    root = f"http://127.0.0.1:{port}"
    sim_args = ["--max-num-seqs", "1", "--tokens-per-s", "40", "--prefix-cache-tokens", "65536"]
    commands = [
        (["sim", "--port", str(p), *sim_args], f"http://127.0.0.1:{p}/health")
        for p in sims.values()
    ]
    # the gateway starts beside its upstreams: it needs none of them to come up
    procs = start_all([(["serve", "--config", str(config)], f"{root}/healthz"), *commands])
    try:
        gateway = Gateway(f"{root}/v1", root, config, f"sqlite:///{tmp / 'bastion.db'}", procs[0])
        key, _ = gateway.new_key("100.00")
        fleet = Fleet(gateway, sims, OpenAI(base_url=gateway.url, api_key=key, max_retries=0))
        deadline = time.monotonic() + 10
        while set(fleet.counters("bastion_upstream_load_signal_age_seconds")) < set(SIMS):
            assert time.monotonic() < deadline, "the gateway never read the simulators' /metrics"
            time.sleep(0.05)
        yield fleet
    finally:
        for proc in procs:
            stop(proc)


def chat(fleet: Fleet, model: str, text: str = "hello", **kwargs: object):
    extra = {**FAST, **kwargs.pop("extra_body", {})}  # type: ignore[dict-item]
    return fleet.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        extra_body=extra,
        **kwargs,  # type: ignore[arg-type]
    )


def first_choice(body: dict, headers: dict | None, names: tuple[str, ...]) -> tuple[str, ...]:
    key = affinity_key(body, CIMultiDict(headers or {}), 1024)
    return tuple(rank(key, {n: hash64(n) for n in names}, names))


def test_e2e_the_same_cache_key_user_or_session_stays_on_one_replica(fleet: Fleet):
    chosen = set()
    for i in range(3):
        cases = [
            (
                {"prompt_cache_key": f"conv-{i}"},
                None,
                {"extra_body": {"prompt_cache_key": f"conv-{i}"}},
            ),
            ({"user": f"user-{i}"}, None, {"user": f"user-{i}"}),
            ({}, {"x-session-id": f"sess-{i}"}, {"extra_headers": {"x-session-id": f"sess-{i}"}}),
        ]
        for body, headers, kwargs in cases:
            expected = first_choice(body, headers, SIMS)[0]
            served = fleet.served(
                lambda kw=kwargs: [chat(fleet, "affinity", f"turn {t}", **kw) for t in range(2)]
            )
            assert served == {expected: 2}, (body, headers)
            chosen.add(expected)
    assert len(chosen) >= 2  # nine keys: spread over the fleet, not all on one replica
    fallbacks = fleet.counters("bastion_routing_fallbacks_total")
    assert not [k for k in fallbacks if k[0] == "affinity"]  # the sims' /metrics were read


def test_e2e_prefix_affinity_gets_cached_tokens_where_least_outstanding_does_not(fleet: Fleet):
    """No key sent: the shared system prompt (over affinity_prefix_chars) is the key."""

    def cached(model: str) -> list[int]:
        system = f"[{uuid.uuid4()}] You answer questions about ACME's orders. " * 25
        out = []
        for question in ("Where is my order?", "Can I return it?", "Who pays shipping?"):
            reply = fleet.client.chat.completions.create(
                model=model,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                extra_body=FAST,
            )
            details = reply.usage.prompt_tokens_details if reply.usage else None
            out.append((details.cached_tokens or 0) if details else 0)
        return out

    affinity = cached("affinity")
    assert affinity[0] == 0 and all(n > 200 for n in affinity[1:]), affinity
    assert cached("plain") == [0, 0, 0]  # each went to another replica, cold for it


def test_e2e_responses_requests_are_keyed_by_their_instructions(fleet: Fleet):
    instructions = f"[{uuid.uuid4()}] Reply in French. " * 60  # over 1024 characters
    expected = first_choice({"instructions": instructions}, None, SIMS)[0]

    def send() -> None:
        for question in ("Bonjour?", "Quelle heure est-il?"):
            fleet.client.responses.create(
                model="affinity", instructions=instructions, input=question, extra_body=FAST
            )

    assert fleet.served(send) == {expected: 2}


def test_e2e_load_aware_avoids_a_replica_with_a_long_queue(fleet: Fleet):
    """Five slow requests straight to s1 (one running, four queued: it has one seat)."""
    url = f"http://127.0.0.1:{fleet.sims['s1']}/v1/chat/completions"
    slow = {"model": "m", "messages": [{"role": "user", "content": "x"}], "sim": {"tokens": 20}}

    async def queue_on_s1() -> Counter:
        async with httpx.AsyncClient(timeout=30) as direct:
            load = [asyncio.create_task(direct.post(url, json=slow)) for _ in range(5)]
            deadline = time.monotonic() + 5
            while fleet.counters("bastion_upstream_load_waiting")["s1"] < 2:
                assert time.monotonic() < deadline, "the gateway never saw s1's queue"
                await asyncio.sleep(0.05)
            served = await asyncio.to_thread(
                fleet.served, lambda: [chat(fleet, "load", f"q{i}") for i in range(6)]
            )
            assert not any(task.done() and task.exception() for task in load)
            for task in load:  # leave: s1 drops them (as vLLM does) and is idle again
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
            return served

    served = asyncio.run(queue_on_s1())
    assert served["s1"] == 0 and sum(served.values()) == 6 and set(served) <= {"s2", "s3"}
    assert not [k for k in fleet.counters("bastion_routing_fallbacks_total") if k[0] == "load"]


@pytest.mark.parametrize("model", ["plain-dead", "load-dead", "affinity-dead"])
def test_e2e_a_dead_replica_is_retried_around_under_every_policy(fleet: Fleet, model: str):
    dead = DEAD[model]
    names = (dead, "s1", "s2")
    kwargs: dict = {}
    expected = None
    if model == "affinity-dead":  # a key that ranks the dead replica first
        key = next(
            f"k{i}" for i in range(100) if first_choice({"user": f"k{i}"}, None, names)[0] == dead
        )
        kwargs = {"user": key}
        expected = first_choice({"user": key}, None, names)[1]
    served = fleet.served(lambda: [chat(fleet, model, f"q{i}", **kwargs) for i in range(3)])
    assert served[dead] == 1  # tried once, then out of rotation
    assert sum(served.values()) == 4 and served[dead] + served["s1"] + served["s2"] == 4
    if expected is not None:
        assert served[expected] == 3  # the key's second choice, every time
    assert fleet.counters("bastion_upstream_failures_total")[dead] >= 1
    if model == "load-dead":  # the dead replica has no /metrics: counted, not hidden
        fallbacks = fleet.counters("bastion_routing_fallbacks_total")
        assert fallbacks[("load-dead", "load_aware", "missing")] >= 1
