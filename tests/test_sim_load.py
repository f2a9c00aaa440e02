"""The simulator's load model (docs/simulator.md, "Load model"): batch, queue, prefill,
prefix cache, KV usage, `/metrics` and the ORCA header, seen through the `openai` SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import free_port, start, stop
from prometheus_client.parser import text_string_to_metric_families
from simhelpers import SimServer

from bastion.sim import LoadConfig, input_tokens_for
from bastion.sim.prefixcache import BLOCK_TOKENS, PrefixCache, token_count, token_records

REQUIRED = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}
SYSTEM_2000 = " ".join(f"w{i:05d}" for i in range(1334))[:8000]
"""8,000 bytes: 2,000 tokens of system prompt by the simulator's usage formula."""


def _chat(system: str, user: str = "hi") -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }


async def scrape(sim: SimServer) -> dict[str, float]:
    """`/metrics` parsed by prometheus_client: sample name (+ finished_reason) -> value."""
    async with httpx.AsyncClient() as http:
        r = await http.get(sim.url + "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            assert s.labels["model_name"] == "bastion-sim" and s.labels["engine"] == "0"
            reason = s.labels.get("finished_reason")
            out[s.name + (f"[{reason}]" if reason else "")] = s.value
    return out


async def wait_for(
    sim: SimServer, check: Callable[[dict[str, float]], bool], what: str
) -> dict[str, float]:
    """Poll `/metrics` until `check` holds (bounded: fails after 10 s)."""
    for _ in range(1000):
        m = await scrape(sim)
        if check(m):
            return m
        await asyncio.sleep(0.01)
    raise AssertionError(f"never saw {what}: {m}")


def _state(running: int, waiting: int) -> Callable[[dict[str, float]], bool]:
    return lambda m: (
        m["vllm:num_requests_running"] == running and m["vllm:num_requests_waiting"] == waiting
    )


def _client(sim: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0)


# ---------------------------------------------------------------- tokens


def test_prompt_tokens_match_the_usage_formula() -> None:
    """The cache's token sequence has exactly the input tokens the answer reports."""
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    bodies: list[tuple[dict[str, Any], str]] = [
        (_chat(SYSTEM_2000), "chat"),
        (_chat("é" * 7, "ünï"), "chat"),
        ({"model": "m", "input": "x"}, "responses"),
        ({"model": "m", "instructions": "Be brief.", "input": "abc", "tools": tools}, "responses"),
        (
            {
                "model": "m",
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "abcde"}]},
                    {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"},
                    {"type": "function_call_output", "call_id": "c", "output": "42"},
                ],
            },
            "responses",
        ),
    ]
    for body, endpoint in bodies:
        assert token_count(token_records(body, endpoint)) == input_tokens_for(body, endpoint)
    a = token_records(_chat(SYSTEM_2000, "one question"), "chat")
    b = token_records(_chat(SYSTEM_2000, "another question"), "chat")
    shared = next(i for i in range(len(a)) if a[i] != b[i]) // 5
    assert shared >= 2000  # the whole system prompt is a common prefix


def test_prefix_cache_evicts_tail_blocks_first() -> None:
    keys_a = [bytes([1, i]) for i in range(8)]
    keys_b = [bytes([2, i]) for i in range(8)]
    cache = PrefixCache(10 * BLOCK_TOKENS)
    assert cache.lookup(keys_a, 200) == 0
    cache.insert(keys_a)
    assert cache.lookup(keys_a, 200) == 8 * BLOCK_TOKENS
    assert cache.lookup(keys_a, 8 * BLOCK_TOKENS) == 7 * BLOCK_TOKENS  # the last token computes
    cache.insert(keys_b)  # 16 blocks > 10: A's last six go, its first two stay
    assert cache.tokens == 10 * BLOCK_TOKENS
    assert cache.lookup(keys_a, 200) == 2 * BLOCK_TOKENS
    assert keys_b[-1] in cache and keys_a[2] not in cache


# ---------------------------------------------------------------- queue and batch


async def test_third_request_waits_for_a_place() -> None:
    with SimServer(tokens_per_s=40, load=LoadConfig(max_num_seqs=2)) as sim:
        client = _client(sim)
        order: list[str] = []

        async def run(name: str, tokens: int = 16) -> None:
            stream = await client.chat.completions.create(
                **_chat("s", "go"), stream=True, extra_headers={"x-sim-tokens": str(tokens)}
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and name + "+" not in order:
                    order.append(name + "+")  # first token
            order.append(name + ".")  # last chunk

        first = [asyncio.create_task(run(n)) for n in ("a", "b")]
        await wait_for(sim, _state(2, 0), "two running")
        third = asyncio.create_task(run("c", 2))
        m = await wait_for(sim, _state(2, 1), "two running, one waiting")
        assert 0 < m["vllm:kv_cache_usage_perc"] == m["vllm:gpu_cache_usage_perc"] < 1
        await asyncio.gather(*first, third)
        # c's first token came only after a or b had finished
        assert order.index("c+") > min(order.index("a."), order.index("b."))
        m = await wait_for(sim, _state(0, 0), "idle")
        assert m["vllm:request_success_total[stop]"] == 3
        assert m["vllm:generation_tokens_total"] == 16 + 16 + 2
        assert m["vllm:request_queue_time_seconds_count"] == 3
        assert m["vllm:e2e_request_latency_seconds_count"] == 3
        assert m["vllm:kv_cache_usage_perc"] == 0


async def test_kv_capacity_queues_requests_too() -> None:
    body = _chat("x" * 200)  # 59 prompt tokens: + 16 and + 2 output is over 100
    with SimServer(tokens_per_s=40, load=LoadConfig(kv_cache_tokens=100)) as sim:
        client = _client(sim)
        calls = [
            asyncio.create_task(
                client.chat.completions.create(**body, extra_headers={"x-sim-tokens": n})
            )
            for n in ("16", "2")
        ]
        await wait_for(sim, _state(1, 1), "one running, one waiting on KV")
        answers = await asyncio.gather(*calls)
        assert [a.usage.prompt_tokens for a in answers] == [input_tokens_for(body)] * 2 == [59, 59]


async def test_client_leaving_the_queue_frees_its_place() -> None:
    with SimServer(tokens_per_s=40, load=LoadConfig(max_num_seqs=1)) as sim:
        client = _client(sim)
        slow = {"x-sim-tokens": "24"}
        a = asyncio.create_task(client.chat.completions.create(**_chat("a"), extra_headers=slow))
        await wait_for(sim, _state(1, 0), "a running")
        b = asyncio.create_task(client.chat.completions.create(**_chat("b"), extra_headers=slow))
        await wait_for(sim, _state(1, 1), "b waiting")
        b.cancel()  # the client hangs up while queued
        with pytest.raises(asyncio.CancelledError):
            await b
        await wait_for(sim, _state(1, 0), "b gone from the queue")
        quick = {"x-sim-tokens": "2"}
        c = asyncio.create_task(client.chat.completions.create(**_chat("c"), extra_headers=quick))
        await wait_for(sim, _state(1, 1), "only c waiting")
        assert not a.done()
        await asyncio.gather(a, c)
        m = await wait_for(sim, _state(0, 0), "idle")
        assert m["vllm:request_success_total[stop]"] == 2  # a and c; b never ran
        assert m["vllm:request_success_total[abort]"] == 0
        assert m["vllm:generation_tokens_total"] == 24 + 2


# ---------------------------------------------------------------- prefix cache


async def test_repeated_prefix_is_cached_on_both_endpoints() -> None:
    with SimServer(load=LoadConfig(prefix_cache_tokens=100_000)) as sim:
        client = _client(sim)
        body = _chat(SYSTEM_2000)
        first = await client.chat.completions.create(**body)
        assert first.usage.prompt_tokens_details is None  # nothing cached: left out, as vLLM
        before = await scrape(sim)
        second = await client.chat.completions.create(**body)
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached % BLOCK_TOKENS == 0 and 2000 <= cached < second.usage.prompt_tokens
        after = await scrape(sim)
        assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == (
            cached
        )
        queries = (
            after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
        )
        assert queries == second.usage.prompt_tokens
        assert after["vllm:prompt_tokens_total"] == 2 * second.usage.prompt_tokens

        # same system prompt, new question: the shared prefix only
        other_q = await client.chat.completions.create(**_chat(SYSTEM_2000, "what else?"))
        part = other_q.usage.prompt_tokens_details.cached_tokens
        assert part % BLOCK_TOKENS == 0 and 1984 <= part <= cached
        # a different prompt does not hit
        other = await client.chat.completions.create(**_chat(SYSTEM_2000[::-1]))
        assert other.usage.prompt_tokens_details is None

        # the stream's usage chunk reports the same
        stream = await client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached

        # responses: JSON and stream agree
        rbody = {"model": "m", "instructions": SYSTEM_2000, "input": "hi"}
        r1 = await client.responses.create(**rbody)
        assert r1.usage.input_tokens_details.cached_tokens == 0
        r2 = await client.responses.create(**rbody)
        rcached = r2.usage.input_tokens_details.cached_tokens
        assert rcached % BLOCK_TOKENS == 0 and 2000 <= rcached < r2.usage.input_tokens
        events = [e async for e in await client.responses.create(**rbody, stream=True)]
        assert events[-1].type == "response.completed"
        assert events[-1].response.usage.input_tokens_details.cached_tokens == rcached

        # a count the request sets itself still wins over the model's
        forced = await client.chat.completions.create(
            **body, extra_body={"sim": {"cached_tokens": 7}}
        )
        assert forced.usage.prompt_tokens_details.cached_tokens == 7


async def test_small_cache_evicts_least_recent() -> None:
    a, b = _chat("a" * 600), _chat("b" * 600)  # 150 + 8 = 158 tokens: 9 full blocks each
    with SimServer(load=LoadConfig(prefix_cache_tokens=12 * BLOCK_TOKENS)) as sim:
        client = _client(sim)

        async def cached(body: dict[str, Any]) -> int:
            r = await client.chat.completions.create(**body)
            details = r.usage.prompt_tokens_details
            return details.cached_tokens if details else 0

        assert await cached(a) == 0
        assert await cached(a) == 9 * BLOCK_TOKENS
        assert await cached(b) == 0  # b's 9 blocks push out a's last 6
        assert await cached(a) == 3 * BLOCK_TOKENS  # a's beginning outlived its end
        assert await cached(b) == 3 * BLOCK_TOKENS  # ... and now b's tail went the same way


async def test_cached_prefix_shortens_ttft() -> None:
    """The model's figures, with a wide margin: 2,000 uncached tokens at 2,000/s ≈ 1 s."""
    load = LoadConfig(prefill_tokens_per_s=2000, prefix_cache_tokens=100_000)
    with SimServer(load=load) as sim:
        client = _client(sim)

        async def ttft() -> float:
            t0 = time.monotonic()
            first: float | None = None
            stream = await client.chat.completions.create(**_chat(SYSTEM_2000), stream=True)
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - t0
            assert first is not None
            return first

        first = await ttft()
        repeat = await ttft()
        assert first >= 0.8
        assert repeat < first / 2
        m = await scrape(sim)
        assert m["vllm:time_to_first_token_seconds_count"] == 2
        assert m["vllm:time_to_first_token_seconds_sum"] >= 0.8  # the first one alone


# ---------------------------------------------------------------- /metrics and ORCA


async def test_metrics_have_vllm_names_and_types() -> None:
    with SimServer(load=LoadConfig(max_num_seqs=4)) as sim:
        async with httpx.AsyncClient() as http:
            text = (await http.get(sim.url + "/metrics")).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in REQUIRED.items():
        assert families.get(name) == kind, name
    for sample in ("vllm:prefix_cache_queries_total", "vllm:prompt_tokens_total"):
        assert f"\n{sample}{{" in text
    with SimServer() as off:  # no load option: nothing is tracked
        async with httpx.AsyncClient() as http:
            r = await http.get(off.url + "/metrics")
    assert r.status_code == 404 and "load option" in r.json()["error"]["message"]


async def test_orca_header_only_when_asked() -> None:
    header = "endpoint-load-metrics"
    with SimServer(load=LoadConfig(max_num_seqs=1)) as sim:
        client = _client(sim)
        plain = await client.chat.completions.with_raw_response.create(**_chat("s"))
        assert header not in plain.headers
        text = await client.chat.completions.with_raw_response.create(
            **_chat("s"), extra_headers={"endpoint-load-metrics-format": "text"}
        )
        assert text.headers[header] == (
            "TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=0.0"
        )
        raw = await client.responses.with_raw_response.create(
            model="m", input="hi", extra_headers={"endpoint-load-metrics-format": "JSON"}
        )
        kind, _, payload = raw.headers[header].partition(" ")
        assert kind == "JSON"
        assert json.loads(payload) == {
            "named_metrics": {"num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}
        }
        odd = await client.chat.completions.with_raw_response.create(
            **_chat("s"), extra_headers={"endpoint-load-metrics-format": "bin"}
        )
        assert header not in odd.headers
        # a stream's headers go out on arrival, with the queue as it was then
        running = asyncio.create_task(
            client.chat.completions.create(**_chat("s"), extra_headers={"x-sim-tokens-per-s": "40"})
        )
        await wait_for(sim, _state(1, 0), "one running")
        async with httpx.AsyncClient() as http:
            queued = asyncio.create_task(
                http.post(
                    sim.base_url + "/chat/completions",
                    json={**_chat("s"), "stream": True},
                    headers={"endpoint-load-metrics-format": "text"},
                )
            )
            await wait_for(sim, _state(1, 1), "one waiting")
            streamed = await queued
        await running
        assert streamed.headers[header].startswith("TEXT named_metrics.num_requests_waiting=")
        assert "data: [DONE]" in streamed.text
    with SimServer() as off:
        client = _client(off)
        raw = await client.chat.completions.with_raw_response.create(
            **_chat("s"), extra_headers={"endpoint-load-metrics-format": "text"}
        )
        assert header not in raw.headers


def test_cli_options_reach_the_server() -> None:
    """`bastion sim` with the load options, as a real process."""
    port = free_port()
    args = ["sim", "--port", str(port), "--max-num-seqs", "3", "--prefix-cache-tokens", "64"]
    proc = start([*args, "--served-model-name", "Qwen3-32B"], f"http://127.0.0.1:{port}/health")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        stop(proc)
    assert 'vllm:num_requests_running{engine="0",model_name="Qwen3-32B"} 0.0' in text
