"""Load the upstream simulator alone, to show it is not the bottleneck of a benchmark.

    # non-stream throughput: W keep-alive workers for D seconds
    python bench/sim_load.py json --url http://127.0.0.1:8011 --workers 64 --duration 10
    # paced streams: S streams of T tokens at R tokens/s, all started at once
    python bench/sim_load.py streams --url http://127.0.0.1:8011 --streams 2000 --rate 50

The stream client is a bare asyncio protocol (no HTTP parsing while receiving) so that
one client core can take 100k+ events/s; it checks every stream got all its deltas and
reports how late each stream finished against the ideal (ttft + (T-1)/R after its
first byte). Results go to stdout as JSON lines. See docs/simulator.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from urllib.parse import urlsplit

import aiohttp
import uvloop

BODY_RESPONSES = {"model": "gpt-oss-120b", "input": "Reply with: ok", "store": False}
BODY_CHAT = {"model": "gpt-oss-120b", "messages": [{"role": "user", "content": "Reply with: ok"}]}


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc), 0 without a pid."""
    if not pid:
        return 0.0
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


async def json_load(url: str, endpoint: str, workers: int, duration: float) -> dict[str, object]:
    """W workers, each sending one request after another on a keep-alive connection."""
    path = "/v1/responses" if endpoint == "responses" else "/v1/chat/completions"
    body = json.dumps(BODY_RESPONSES if endpoint == "responses" else BODY_CHAT).encode()
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def worker() -> None:
            nonlocal errors
            while (t := time.monotonic()) < stop:
                async with http.post(url + path, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.monotonic() - t)

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.monotonic() - start
    return {
        "mode": "json",
        "endpoint": endpoint,
        "workers": workers,
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(_pct(latencies, 50) * 1000, 2),
        "p99_ms": round(_pct(latencies, 99) * 1000, 2),
    }


class _StreamClient(asyncio.Protocol):
    """Sends one request with `Connection: close`; records first/last byte times."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.chunks: list[bytes] = []
        self.first = 0.0
        self.last = 0.0
        self.connected = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected = time.monotonic()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.last = time.monotonic()
        if not self.chunks:
            self.first = self.last
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def streams_load(
    url: str, streams: int, tokens: int, rate: float, ttft_ms: float, ramp: float
) -> dict[str, object]:
    """S streams started evenly over `ramp` seconds; each must get T deltas at R tokens/s."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps({**BODY_RESPONSES, "input": "stream", "stream": True}).encode()
    request = (
        f"POST /v1/responses HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nx-sim-tokens: {tokens}\r\n"
        f"x-sim-tokens-per-s: {rate}\r\nx-sim-ttft-ms: {ttft_ms}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    clients: list[_StreamClient] = []
    sent: list[float] = []

    async def one(i: int) -> None:
        await asyncio.sleep(ramp * i / streams)
        done: asyncio.Future[None] = loop.create_future()
        client = _StreamClient(request, done)
        clients.append(client)
        sent.append(time.monotonic())
        await loop.create_connection(lambda: client, host, port)
        await done

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.monotonic() - start
    ideal = ttft_ms / 1000 + (tokens - 1) / rate
    lags, short = [], 0
    for c in clients:
        data = b"".join(c.chunks)
        if data.count(b"event: response.output_text.delta\n") != tokens or not data.endswith(
            b"0\r\n\r\n"
        ):
            short += 1
        lags.append(c.last - c.first - ideal)
    first_bytes = [c.first - s for c, s in zip(clients, sent, strict=True)]
    return {
        "mode": "streams",
        "streams": streams,
        "ramp_s": ramp,
        "tokens": tokens,
        "rate": rate,
        "incomplete": short,
        "ideal_s": round(ideal, 3),
        "wall_s": round(wall, 3),
        "lag_p50_ms": round(statistics.median(lags) * 1000, 1),
        "lag_p99_ms": round(_pct(lags, 99) * 1000, 1),
        "lag_max_ms": round(max(lags) * 1000, 1),
        "first_byte_p50_ms": round(statistics.median(first_bytes) * 1000, 1),
        "first_byte_max_ms": round(max(first_bytes) * 1000, 1),
        "connect_p50_ms": round(
            statistics.median(c.connected - s for c, s in zip(clients, sent, strict=True)) * 1000,
            1,
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["json", "streams"])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--endpoint", choices=["responses", "chat"], default="responses")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--ramp", type=float, default=1.0, help="seconds to start all streams")
    ap.add_argument("--server-pid", type=int, help="report this process's CPU use")
    args = ap.parse_args()
    if args.mode == "json":
        coro = json_load(args.url, args.endpoint, args.workers, args.duration)
    else:
        coro = streams_load(args.url, args.streams, args.tokens, args.rate, args.ttft_ms, args.ramp)
    cpu, t, own = _cpu_s(args.server_pid), time.monotonic(), time.process_time()
    result = uvloop.run(coro)
    result["client_cpu_pct"] = round(100 * (time.process_time() - own) / (time.monotonic() - t))
    if args.server_pid:
        used = _cpu_s(args.server_pid) - cpu
        result["server_cpu_s"] = round(used, 2)
        result["server_cpu_pct"] = round(100 * used / (time.monotonic() - t), 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
