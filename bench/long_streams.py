"""Long streams through Bastion: inter-token delay added by the gateway, and its memory.

    python -m bench.long_streams                          # 2,000 streams × 60 s (3,000 tokens)
    python -m bench.long_streams --streams 50 --seconds 5 # a quick check
    python -m bench.long_streams --streams 500,2000 --direct   # + the same load without Bastion

The upstream is the simulator (`python -m bastion.sim --tokens-per-s 50`) pinned to
core 1; one Bastion worker (SQLite + memory limiter) is pinned to core 0; the client
(a bare asyncio protocol, no HTTP parsing on the hot path) runs on core 1 with the
simulator. Every stream is one POST /v1/responses with `stream: true` asking the
simulator (through the body's `sim` object, which Bastion passes through) for
`seconds × 50` tokens, so each delta is due 20 ms after the previous one.

Per delta the client records its arrival time. Reported, over all deltas of all streams:
- gap excess = (arrival − previous arrival) − 20 ms: the inter-token delay added on top of
  the simulator's schedule (negative when a late delta is followed by one that catches up);
- lateness = arrival − (first delta's arrival + i × 20 ms): drift from the schedule;
and per stream the end lag (last delta − first − (n−1) × 20 ms), time to first byte, and
whether the stream completed (every delta, `response.completed`, the closing chunk).
The gateway's RSS is sampled every second (max, and at the end while the streams are
still open). `--direct` runs the same load straight to the simulator first, as the
baseline of what the simulator and the client add themselves (both share core 1).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

import uvloop

from bench import common

HERE = Path(__file__).resolve().parent
MARK = b"event: response.output_text.delta\n"
BASTION_TOML = """\
[server]
host = "127.0.0.1"
port = {port}

[database]
url = "sqlite:///{tmp}/long.db"

[ratelimit]
url = "memory://"

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"
read_timeout_s = 300

[[models]]
id = "bench-long"
endpoints = ["responses", "chat"]
upstreams = ["sim"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 100000
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


class StreamClient(asyncio.Protocol):
    """One request (`Connection: close`); the arrival time of every delta event."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.times = array("d")
        self.first_byte = 0.0
        self.tail = b""
        self.end = b""
        self.completed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.first_byte:
            self.first_byte = now
        window = self.tail + data
        n = window.count(MARK)
        if n:
            self.times.extend([now] * n)
        self.tail = window[-(len(MARK) - 1) :]
        if b"response.completed" in window:
            self.completed = True
        self.end = (self.end + data)[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def load(
    port: int, auth: str, streams: int, tokens: int, rate: float, ramp: float, on_tick
) -> dict:
    body = json.dumps(
        {
            "model": "bench-long",
            "input": "Tell a long story.",
            "store": False,
            "stream": True,
            "max_output_tokens": tokens + 16,
            "sim": {"tokens": tokens},
        }
    ).encode()
    head = (
        f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    )
    if auth:
        head += f"Authorization: Bearer {auth}\r\n"
    request = (head + "\r\n").encode() + body
    loop = asyncio.get_running_loop()
    clients: list[tuple[float, StreamClient]] = []

    async def one(i: int) -> None:
        await asyncio.sleep(ramp * i / streams)
        done: asyncio.Future[None] = loop.create_future()
        client = StreamClient(request, done)
        clients.append((time.monotonic(), client))
        try:
            await loop.create_connection(lambda: client, "127.0.0.1", port)
        except OSError:
            return
        await done

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1)
            on_tick()

    tick = asyncio.create_task(ticker())
    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.monotonic() - start
    tick.cancel()

    interval = 1 / rate
    ideal = (tokens - 1) * interval
    gap_excess: array = array("d")
    lateness: array = array("d")
    end_lags, ttfb, short = [], [], 0
    for sent, c in clients:
        t = c.times
        if len(t) != tokens or not c.completed or not c.end.endswith(b"0\r\n\r\n"):
            short += 1
        if c.first_byte:
            ttfb.append(c.first_byte - sent)
        if len(t) < 2:
            continue
        t0 = t[0]
        gap_excess.extend(t[i] - t[i - 1] - interval for i in range(1, len(t)))
        lateness.extend(t[i] - t0 - i * interval for i in range(1, len(t)))
        end_lags.append(t[-1] - t0 - ideal)
    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    return {
        "streams": streams,
        "tokens": tokens,
        "rate": rate,
        "ramp_s": ramp,
        "wall_s": round(wall, 1),
        "incomplete": short,
        "deltas": len(gap_excess) + len(end_lags),
        "gap_excess_ms": {
            "p50": ms(pct(gap_excess, 50)),
            "p90": ms(pct(gap_excess, 90)),
            "p99": ms(pct(gap_excess, 99)),
            "p999": ms(pct(gap_excess, 99.9)),
            "max": ms(max(gap_excess, default=0)),
        },
        "lateness_ms": {
            "p50": ms(pct(lateness, 50)),
            "p99": ms(pct(lateness, 99)),
            "max": ms(max(lateness, default=0)),
        },
        "end_lag_ms": {
            "p50": ms(statistics.median(end_lags)) if end_lags else None,
            "p99": ms(pct(end_lags, 99)),
            "max": ms(max(end_lags, default=0)),
        },
        "ttfb_ms": {"p50": ms(pct(ttfb, 50)), "p99": ms(pct(ttfb, 99)), "max": ms(max(ttfb))},
    }


def run_one(args, procs: common.Procs, tmp: Path, streams: int, direct: bool) -> dict:
    tokens = int(args.seconds * args.rate)
    sim_port = common.free_port()
    sim = procs.start(
        "sim",
        [
            common.PYTHON,
            "-m",
            "bastion.sim",
            "--port",
            str(sim_port),
            "--tokens-per-s",
            str(args.rate),
        ],
        "1",
    )
    common.wait_until(lambda: common.http_ok(f"http://127.0.0.1:{sim_port}/health"), sim, 20, "sim")
    gw = None
    port, auth = sim_port, ""
    if not direct:
        port = common.free_port()
        (tmp / "long.db").unlink(missing_ok=True)
        config = tmp / "long.toml"
        config.write_text(BASTION_TOML.format(port=port, tmp=tmp, sim=sim_port))
        auth = common.make_key(f"sqlite:///{tmp}/long.db", "1000000", 10_000_000, 10**12)
        gw = procs.start(
            "bastion", [common.PYTHON, "-m", "bastion", "serve", "--config", str(config)], "0"
        )
        common.wait_until(
            lambda: common.http_ok(f"http://127.0.0.1:{port}/healthz"), gw, 30, "bastion"
        )
    watched = gw or sim
    rss = {"idle_kb": common.rss_kb(watched.pid), "max_kb": 0, "last_kb": 0}
    cpu0 = common.cpu_s(watched.pid), common.cpu_s(sim.pid)

    def tick() -> None:
        kb = common.rss_kb(watched.pid)
        rss["max_kb"] = max(rss["max_kb"], kb)
        # "at the end": the last sample taken while most streams are still open
        rss["last_kb"] = kb if kb else rss["last_kb"]

    common.wait_quiet(args.max_wait, log)
    log(
        f"{'direct' if direct else 'bastion'}: {streams} streams × {tokens} tokens "
        f"at {args.rate:g}/s, ramp {args.ramp:g} s"
    )
    t = time.monotonic()
    result = uvloop.run(load(port, auth, streams, tokens, args.rate, args.ramp, tick))
    wall = time.monotonic() - t
    result["target"] = "direct" if direct else "bastion"
    result["rss_mb"] = {k.replace("_kb", ""): round(v / 1024, 1) for k, v in rss.items()}
    result["rss_after_mb"] = round(common.rss_kb(watched.pid) / 1024, 1)
    result["cpu_pct"] = {
        "gateway": round(100 * (common.cpu_s(gw.pid) - cpu0[0]) / wall, 1) if gw else None,
        "sim": round(100 * (common.cpu_s(sim.pid) - cpu0[1]) / wall, 1),
    }
    if gw:
        time.sleep(1.5)
        result["account"] = common.account(f"sqlite:///{tmp}/long.db")
        procs.stop(gw)
    procs.stop(sim)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", default="2000", help="comma-separated stream counts")
    ap.add_argument("--seconds", type=float, default=60, help="length of each stream")
    ap.add_argument("--rate", type=float, default=50, help="tokens per second per stream")
    ap.add_argument("--ramp", type=float, default=5, help="seconds over which streams start")
    ap.add_argument("--direct", action="store_true", help="also run straight to the simulator")
    ap.add_argument("--max-wait", type=float, default=1800)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="bastion-long-"))
    procs = common.Procs(tmp)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup below
    results = []
    try:
        for streams in (int(s) for s in args.streams.split(",")):
            for direct in ([True] if args.direct else []) + [False]:
                r = run_one(args, procs, tmp, streams, direct)
                log(json.dumps(r))
                results.append(r)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"Long streams ({stamp}): {args.seconds:g} s streams at {args.rate:g} tokens/s "
        f"(ideal gap {1000 / args.rate:g} ms), started over {args.ramp:g} s; simulator + "
        "client on core 1, Bastion (1 worker, SQLite) on core 0.",
        "",
        "| target | streams | incomplete | gap excess p50 / p99 / p99.9 ms | lateness p50 / p99 "
        "ms | end lag p50 / p99 ms | TTFB p50 / p99 ms | gateway CPU | RSS idle → max → end MB |",
        "|---|---:|---:|---|---|---|---|---:|---|",
    ]
    for r in results:
        g, late, e, f = r["gap_excess_ms"], r["lateness_ms"], r["end_lag_ms"], r["ttfb_ms"]
        cpu = r["cpu_pct"]["gateway"]
        rss = r["rss_mb"]
        lines.append(
            f"| {r['target']} | {r['streams']:,} | {r['incomplete']} | {g['p50']} / {g['p99']} / "
            f"{g['p999']} | {late['p50']} / {late['p99']} | {e['p50']} / {e['p99']} | "
            f"{f['p50']} / {f['p99']} | {'' if cpu is None else f'{cpu:.0f} %'} | "
            f"{rss['idle']} → {rss['max']} → {rss['last']} |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.no_save:
        out = HERE / "results" / f"long_streams-{stamp}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "results": results, "table": md}, indent=1))
        log(f"saved {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
