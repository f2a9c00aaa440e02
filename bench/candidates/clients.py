"""Upstream clients side by side: CPU per request; does a cancelled caller free the upstream?

    taskset -c 0 .venv/bin/python -m bench.candidates.clients          # Bastion's venv
    taskset -c 0 bench/.venv-candidates/bin/python -m bench.candidates.clients  # + pyreqwest

The upstream is the benchmark's static nginx (bench/upstream.py) on core 1; the client
runs here, on the core this script is pinned to, with 64 tasks POSTing the responses
request (954-byte answer) or the 57-event responses stream (15 KB), round-robin over
the clients for ``--rounds`` rounds. CPU µs/req is this process's user + system time
(every thread, so pyreqwest's Rust runtime counts) per completed request; the median
of the rounds is printed.

The cancellation check: each client POSTs to a local server that never answers, the
calling task is cancelled after 0.2 s, and the server reports whether its connection
was closed within 2 s — i.e. whether an LLM upstream would stop generating for a
client that left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from bastion.upstream_http import UpstreamClient
from bench.upstream import REQUESTS, write_configs

C = 64
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer x"}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Aiohttp:
    """As Bastion used it until 2026-12: one ClientSession, no auto headers, read whole."""

    name = "aiohttp ClientSession"

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300)

    async def post(self, path: str, body: bytes) -> bytes:
        async with self.session.post(
            self.base + path, data=body, headers={**HEADERS, "X-Request-Id": "r"},
            timeout=self.timeout,
        ) as resp:  # fmt: skip
            if path.startswith("/stream"):
                return b"".join([chunk async for chunk in resp.content.iter_any()])
            return await resp.read()

    async def close(self) -> None:
        await self.session.close()


class Lean:
    """bastion.upstream_http: keep-alive POSTs on httptools (what Bastion uses now)."""

    name = "bastion.upstream_http"

    def __init__(self, base: str) -> None:
        self.client = UpstreamClient(base, HEADERS, 5, 300)

    async def post(self, path: str, body: bytes) -> bytes:
        if path.startswith("/stream"):
            answer = await self.client.open(path, body, {"X-Request-Id": "r"})
            return b"".join([piece async for piece in _pieces(answer)])
        return (await self.client.post(path, body, {"X-Request-Id": "r"})).body

    async def close(self) -> None:
        await self.client.close()


async def _pieces(answer):  # type: ignore[no-untyped-def]
    while piece := await answer.read():
        yield piece


class Pyreqwest:
    """pyreqwest 0.15 (Rust reqwest on its own tokio thread)."""

    name = "pyreqwest"

    def __init__(self, base: str) -> None:
        from pyreqwest.client import ClientBuilder

        self.base = base
        self.client = ClientBuilder().no_proxy().build()

    async def post(self, path: str, body: bytes) -> bytes:
        req = self.client.post(self.base + path).headers(HEADERS).body_bytes(body)
        if path.startswith("/stream"):
            async with req.streamed_read_buffer_limit(0).build_streamed() as resp:
                out = []
                while (chunk := await resp.body_reader.read_chunk()) is not None:
                    out.append(chunk.to_bytes())
                return b"".join(out)
        resp = await req.build().send()
        return (await resp.bytes()).to_bytes()

    async def close(self) -> None:
        await self.client.close()


def candidates() -> list[type]:
    found: list[type] = [Aiohttp, Lean]
    try:
        import pyreqwest  # noqa: F401

        found.append(Pyreqwest)
    except ImportError:
        print("(pyreqwest not installed here: bash bench/candidates/run.sh installs it)")
    return found


async def cpu_per_request(client: object, path: str, body: bytes, n: int) -> float:
    post = client.post  # type: ignore[attr-defined]

    async def worker(k: int) -> None:
        for _ in range(k):
            await post(path, body)

    await asyncio.gather(*(worker(20) for _ in range(C)))  # warm up, fill the pool
    started = cpu()
    await asyncio.gather(*(worker(n // C) for _ in range(C)))
    return (cpu() - started) / (n // C * C) * 1e6


async def frees_the_upstream(cls: type) -> bool:
    closed = asyncio.Event()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # returns at EOF: the client closed the connection
            closed.set()
        except asyncio.CancelledError:  # still open when the run ends (pyreqwest)
            writer.close()

    server = await asyncio.start_server(never, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = cls(f"http://127.0.0.1:{port}/v1")
    task = asyncio.create_task(client.post("/responses", b"{}"))
    await asyncio.sleep(0.2)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    try:
        await asyncio.wait_for(closed.wait(), 2)
        freed = True
    except TimeoutError:
        freed = False
    await client.close()
    server.close()
    return freed


async def measure(args: argparse.Namespace) -> None:
    base = f"http://127.0.0.1:{args.port}"
    kinds = {
        "json": ("/v1/responses", REQUESTS["responses", "json"]),
        "stream": ("/stream/v1/responses", REQUESTS["responses", "stream"]),
    }
    clients = [cls(base) for cls in candidates()]
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for client in clients:
            for kind, (path, request) in kinds.items():
                n = args.requests if kind == "json" else args.requests // 4
                us = await cpu_per_request(client, path, json.dumps(request).encode(), n)
                results.setdefault((client.name, kind), []).append(us)
    print(f"\nCPU µs per request, c={C}, median of {args.rounds} rounds")
    print("| client | JSON (954 B) | stream (57 events, 15 KB) | cancel frees the upstream |")
    print("|---|---:|---:|---|")
    for client in clients:
        freed = await frees_the_upstream(type(client))
        j = statistics.median(results[client.name, "json"])
        s = statistics.median(results[client.name, "stream"])
        print(f"| {client.name} | {j:.1f} | {s:.1f} | {'yes' if freed else '**no**'} |")
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000, help="JSON requests per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=9140)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    up_conf, _ = write_configs(tmp, args.port, args.port + 1)
    nginx = subprocess.Popen(["taskset", "-c", "1", "nginx", "-p", str(tmp), "-c", str(up_conf)])
    try:
        time.sleep(0.5)
        uvloop.run(measure(args))
    finally:
        nginx.terminate()
        nginx.wait(5)


if __name__ == "__main__":
    sys.exit(main())
