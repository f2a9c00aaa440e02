"""Streams' inter-token gaps while hostile bodies arrive, with and without the body guard.

    python -m bench.hostile_bodies                  # 40 streams at 20 tok/s, 20 s per run
    python -m bench.hostile_bodies --seconds 10 --bodies 6_000_000

One gateway (SQLite, memory limiter) in front of the simulator at 20 tokens/s: each
stream's deltas are due 50 ms apart. Three runs, each with a fresh gateway:

- ``quiet``: the streams alone, the baseline;
- ``guarded``: the same streams while one client posts bodies of ``{"a": []}`` items
  (``--bodies`` bytes each, back to back), which ``server.max_json_containers`` refuses;
- ``unguarded``: the same with the guard set out of reach, so every body is parsed.

Printed per run: the gaps' excess over 50 ms (p50, p99, max) and how many hostile bodies
were answered. The issue's target: with hostile bodies arriving, the p99 excess stays
under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from bench import common

TOML = """
[server]
port = {port}
max_body_bytes = 20_000_000
max_json_containers = {limit}

[database]
url = "sqlite:///{db}"

[ratelimit]
default_rpm = 0
default_tpm = 0

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"

[[models]]
id = "m"
upstreams = ["sim"]
input_price = "0.01"
output_price = "0.01"
max_output_tokens = 100000
"""

GAP_S = 0.05  # 20 tokens/s


async def stream(c: httpx.AsyncClient, url: str, tokens: int, gaps: list[float]) -> None:
    body = {"model": "m", "input": "x", "stream": True, "sim": {"tokens": tokens}}
    async with c.stream("POST", url, json=body) as r:
        last = None
        async for chunk in r.aiter_raw():
            now = time.monotonic()
            if last is not None and b"output_text.delta" in chunk:
                gaps.append(now - last - GAP_S)
            last = now


async def hostile(c: httpx.AsyncClient, url: str, body: bytes, until: float) -> int:
    sent = 0
    while time.monotonic() < until:
        await c.post(url, content=body, timeout=120)
        sent += 1
    return sent


async def load(url: str, key: str, streams: int, seconds: float, body: bytes | None) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    gaps: list[float] = []
    async with httpx.AsyncClient(headers=headers, timeout=120) as c:
        tokens = int(seconds / GAP_S)
        tasks = [stream(c, url, tokens, gaps) for _ in range(streams)]
        if body is not None:
            tasks.append(hostile(c, url, body, time.monotonic() + seconds))
        done = await asyncio.gather(*tasks)
    gaps.sort()
    return {
        "p50_ms": 1000 * statistics.median(gaps),
        "p99_ms": 1000 * gaps[int(len(gaps) * 0.99)],
        "max_ms": 1000 * gaps[-1],
        "gaps": len(gaps),
        "bodies": done[-1] if body is not None else 0,
    }


def run(name: str, limit: int, args: argparse.Namespace, body: bytes | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bastion-hostile-{name}-"))
    procs = common.Procs(tmp)
    try:
        sim_port, port = common.free_port(), common.free_port()
        sim = procs.start(
            "sim", [common.PYTHON, "-m", "bastion", "sim", "--port", str(sim_port),
                    "--tokens-per-s", str(1 / GAP_S)], "1",
        )  # fmt: skip
        common.wait_until(lambda: common.http_ok(f"http://127.0.0.1:{sim_port}/health"), sim,
                          20, "sim")  # fmt: skip
        config = tmp / "bastion.toml"
        db = tmp / "bastion.db"
        config.write_text(TOML.format(port=port, limit=limit, db=db, sim=sim_port))
        key = common.make_key(f"sqlite:///{db}", "1000", 0, 0)
        serve = [common.PYTHON, "-m", "bastion", "serve", "--config", str(config)]
        gw = procs.start("gateway", serve, "0")
        common.wait_until(lambda: common.http_ok(f"http://127.0.0.1:{port}/healthz"), gw,
                          20, "gateway")  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/responses"
        result = asyncio.run(load(url, key, args.streams, args.seconds, body))
        print(
            f"{name:10} gap excess p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:7.1f} ms"
            f"  max {result['max_ms']:7.1f} ms  ({result['gaps']} gaps,"
            f" {result['bodies']} hostile bodies answered)",
            flush=True,
        )
        return result
    finally:
        procs.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--bodies", type=int, default=6_000_000, help="bytes per hostile body")
    args = ap.parse_args()
    body = orjson.dumps({"model": "m", "input": [{"a": []}] * (args.bodies // 9)})
    print(f"hostile body: {len(body):,} bytes, {args.bodies // 9:,} items")
    run("quiet", 20_000, args, None)
    run("guarded", 20_000, args, body)
    run("unguarded", 10**9, args, body)


if __name__ == "__main__":
    main()
