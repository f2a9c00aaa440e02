"""Soak test: one Bastion gateway under a steady mixed load for a long time.

    python -m bench.soak                        # 30 minutes (make soak)
    python -m bench.soak --minutes 2            # a quick check that everything works
    python -m bench.soak --postgres postgresql://postgres@127.0.0.1:5432/test \\
        --redis redis://127.0.0.1:6379/0 --workers 2     # the scaled setup

What runs: the simulator (`python -m bastion sim`, 200 tokens/s, 20 ms to the first
token) as the upstream, and one `bastion serve` on a fresh SQLite file (or a fresh,
throw-away PostgreSQL database + Redis) with an account holding $1,000,000 and a key
whose limits never bite. An asyncio client (httpx) keeps a fixed number of requests in
flight (`--concurrency`, 32), each one drawn from this mix:

- 93 %: /v1/responses or /v1/chat/completions (1:1), JSON or stream (1:1), a short
  answer (16 tokens, ~0.1 s) or, one time in seven, a long one (400 tokens, ~2 s);
- 5 %: a 400-token stream the client drops 0.1–1.5 s after its first byte;
- 2 %: a model whose upstream fails (the simulator's `@500` and `@cut` faults, set by
  `upstream_model`; each on its own upstream entry so its ejections touch no one else).

Every minute one line is printed and recorded: requests finished in that minute by
outcome, the gateway's RSS (VmRSS, MB) and open fds (its whole process tree), its CPU,
the client-side p50/p99 latency of short JSON answers (to the last byte) and
time-to-first-byte of streams, and `bastion_ledger_queue` from /metrics.

How to read it: minutes 1–5 are the warm-up (caches, pools, the allocator's arenas).
After that, a gateway that does not leak holds its RSS and fds flat. The summary gives
the RSS drift: the highest and lowest RSS of minutes 6..N against minute 5, in percent
(target: within ±5 %), the same for fds, the p99 trend (least-squares slope over
minutes 6..N, ms per minute, and first vs last five minutes), every error by kind
(expected ones come from the faults and the dropped streams; any other is a bug), and
the money check after the gateway has drained and stopped: one ledger row for at least
every 200 answer, and `bastion audit --json` ok. The exit status is non-zero if the RSS
drift or the money check fails. Latencies depend on the machine's other load (the
gateway, the simulator and the client are not pinned); compare minutes with each other.

The series goes to bench/results/soak-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop

from bench import common
from bench.run import bastion_commit, cpu_model

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SIM_TOKENS_PER_S = 200
SIM_TTFT_MS = 20
SHORT_TOKENS = 16
LONG_TOKENS = 400
LONG_SHARE = 1 / 7  # of the ordinary requests
DISCONNECT_SHARE = 0.05
FAULT_SHARE = 0.02
FAULTS = ("500", "cut")
WARMUP_MINUTES = 5
RSS_TARGET_PCT = 5.0
CREDIT_USD = "1000000"
KEY_RPM = 100_000_000
KEY_TPM = 1_000_000_000_000

GATEWAY_TOML = """\
refresh_interval_s = 1.0

[server]
host = "127.0.0.1"
port = {port}
drain_timeout_s = 10

[database]
url = "{db}"

[ratelimit]
url = "{ratelimit}"

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"

[[models]]
id = "soak"
upstreams = ["sim"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 4096
"""

FAULT_TOML = """
[[upstreams]]
name = "sim-{fault}"
url = "http://127.0.0.1:{sim}/v1"

[[models]]
id = "soak-{fault}"
upstream_model = "soak@{fault}"
upstreams = ["sim-{fault}"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 4096
"""

PATHS = {"responses": "/v1/responses", "chat": "/v1/chat/completions"}
# What ends a complete stream, and what an error event looks like, per endpoint.
DONE_MARK = {"responses": b"event: response.completed", "chat": b"data: [DONE]"}
ERROR_MARK = {"responses": b"event: error", "chat": b'data: {"error"'}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the request mix -----------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    endpoint: str  # responses | chat
    stream: bool
    tokens: int
    model: str = "soak"
    disconnect: bool = False  # the client drops the stream midway

    @property
    def expected_error(self) -> bool:
        return self.model != "soak" or self.disconnect


def pick_kind(rng: random.Random) -> Kind:
    endpoint = rng.choice(("responses", "chat"))
    roll = rng.random()
    if roll < FAULT_SHARE:
        return Kind(endpoint, rng.random() < 0.5, SHORT_TOKENS, f"soak-{rng.choice(FAULTS)}")
    if roll < FAULT_SHARE + DISCONNECT_SHARE:
        return Kind(endpoint, True, LONG_TOKENS, disconnect=True)
    tokens = LONG_TOKENS if rng.random() < LONG_SHARE else SHORT_TOKENS
    return Kind(endpoint, rng.random() < 0.5, tokens)


def request_body(kind: Kind) -> dict:
    text = "Tell me about the weather in Paris."
    body: dict = {"model": kind.model, "stream": kind.stream, "sim": {"tokens": kind.tokens}}
    if kind.endpoint == "responses":
        body |= {"input": text, "store": False, "max_output_tokens": kind.tokens + 16}
    else:
        body |= {"messages": [{"role": "user", "content": text}], "max_tokens": kind.tokens + 16}
        if kind.stream:
            body["stream_options"] = {"include_usage": True}
    return body


# ---- one request ---------------------------------------------------------------------


@dataclass
class Outcome:
    kind: Kind
    label: str  # "200", "502", "disconnect", "200+error-event", "timeout", …
    status: int = 0  # HTTP status, 0 if none arrived
    latency: float = 0.0  # to the last byte (JSON), seconds
    ttfb: float | None = None  # streams: to the first body byte, seconds


async def send(client: httpx.AsyncClient, kind: Kind, rng: random.Random) -> Outcome:
    t0 = time.perf_counter()
    try:
        if kind.stream:
            return await _stream(client, kind, rng, t0)
        r = await client.post(PATHS[kind.endpoint], json=request_body(kind))
        latency = time.perf_counter() - t0
        label = str(r.status_code)
        if r.status_code == 200 and b'"usage"' not in r.content:
            label = "200-no-usage"
        return Outcome(kind, label, r.status_code, latency)
    except httpx.TimeoutException:
        return Outcome(kind, "timeout")
    except httpx.RemoteProtocolError:
        return Outcome(kind, "connection-closed")
    except httpx.TransportError as exc:
        return Outcome(kind, f"transport-{type(exc).__name__}")


async def _stream(client: httpx.AsyncClient, kind: Kind, rng: random.Random, t0: float) -> Outcome:
    drop_after = rng.uniform(0.1, 1.5) if kind.disconnect else None
    done_mark, error_mark = DONE_MARK[kind.endpoint], ERROR_MARK[kind.endpoint]
    keep = max(len(done_mark), len(error_mark))
    async with client.stream("POST", PATHS[kind.endpoint], json=request_body(kind)) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(kind, str(r.status_code), r.status_code, time.perf_counter() - t0)
        ttfb: float | None = None
        tail, done, errored = b"", False, False
        async for chunk in r.aiter_raw():
            now = time.perf_counter() - t0
            if ttfb is None:
                ttfb = now
            if drop_after is not None and now - ttfb >= drop_after:
                return Outcome(kind, "disconnect", 200, now, ttfb)  # closes the connection
            window = tail + chunk
            done = done or done_mark in window
            errored = errored or error_mark in window
            tail = window[-keep:]
    label = "200+error-event" if errored else ("200" if done else "200-truncated")
    return Outcome(kind, label, 200, time.perf_counter() - t0, ttfb)


# ---- the per-minute record ------------------------------------------------------------


@dataclass
class Bucket:
    """What finished within one minute."""

    outcomes: Counter = field(default_factory=Counter)
    json_latency: list[float] = field(default_factory=list)  # short JSON 200s
    ttfb: list[float] = field(default_factory=list)  # 200 streams of the ordinary model

    def add(self, o: Outcome) -> None:
        self.outcomes[o.label] += 1
        if o.status != 200 or o.kind.model != "soak":
            return
        if o.kind.stream and o.ttfb is not None:
            self.ttfb.append(o.ttfb)
        elif not o.kind.stream and o.kind.tokens == SHORT_TOKENS and o.label == "200":
            self.json_latency.append(o.latency)


class Recorder:
    def __init__(self) -> None:
        self.bucket = Bucket()
        self.answers_200 = 0  # answers that started with a 200 (each owes a ledger row)
        self.errors: dict[str, Counter] = {"expected": Counter(), "unexpected": Counter()}
        self.by_kind: Counter = Counter()

    def add(self, o: Outcome) -> None:
        self.bucket.add(o)
        self.answers_200 += o.status == 200
        kind = "stream" if o.kind.stream else "json"
        what = f"{o.kind.model} {o.kind.endpoint} {kind}"
        what += " dropped" if o.kind.disconnect else ""
        self.by_kind[what] += 1
        if o.label != "200":
            side = "expected" if o.kind.expected_error else "unexpected"
            self.errors[side][f"{what}: {o.label}"] += 1

    def take(self) -> Bucket:
        bucket, self.bucket = self.bucket, Bucket()
        return bucket


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# ---- the gateway, seen from outside -----------------------------------------------------


def fds(pid: int) -> int:
    total = 0
    for p in common.tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


async def ledger_queue(client: httpx.AsyncClient) -> float | None:
    try:
        text = (await client.get("/metrics", timeout=5)).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("bastion_ledger_queue "):
            return float(line.split()[1])
    return None


async def minute_row(
    minute: int, bucket: Bucket, pid: int, metrics: httpx.AsyncClient, cpu: list[float]
) -> dict:
    """One minute's figures; `cpu` holds the gateway's CPU seconds at the last sample."""
    used = common.cpu_s(pid)
    cpu_pct = round(100 * (used - cpu[0]) / 60, 1)
    cpu[0] = used
    return {
        "minute": minute,
        "requests": sum(bucket.outcomes.values()),
        "outcomes": dict(sorted(bucket.outcomes.items())),
        "rss_mb": round(common.rss_kb(pid) / 1024, 1),
        "fds": fds(pid),
        "cpu_pct": cpu_pct,
        "json_p50_ms": ms(pct(bucket.json_latency, 50)),
        "json_p99_ms": ms(pct(bucket.json_latency, 99)),
        "ttfb_p50_ms": ms(pct(bucket.ttfb, 50)),
        "ttfb_p99_ms": ms(pct(bucket.ttfb, 99)),
        "ledger_queue": await ledger_queue(metrics),
    }


def minute_line(row: dict) -> str:
    outcomes = ", ".join(f"{k} {v:,}" for k, v in row["outcomes"].items())
    return (
        f"min {row['minute']:3d} | {row['requests']:6,} done ({outcomes}) | "
        f"RSS {row['rss_mb']:6.1f} MB | fds {row['fds']:4d} | CPU {row['cpu_pct']:5.1f} % | "
        f"JSON p50/p99 {row['json_p50_ms']}/{row['json_p99_ms']} ms | "
        f"TTFB p50/p99 {row['ttfb_p50_ms']}/{row['ttfb_p99_ms']} ms | "
        f"ledger_queue {row['ledger_queue']}"
    )


# ---- the load ------------------------------------------------------------------------


class Pacer:
    """Spaces request starts at most `rate` per second over all clients (0: no cap)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1 / rate if rate > 0 else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        at = max(self.next, now)
        self.next = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


async def client_loop(
    client: httpx.AsyncClient, rec: Recorder, pacer: Pacer, stop: asyncio.Event, seed: int
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        await pacer.wait()
        if stop.is_set():
            break
        rec.add(await send(client, pick_kind(rng), rng))


async def load(args: argparse.Namespace, base: str, key: str, pid: int) -> tuple[list, Recorder]:
    """Runs the mix for args.minutes; returns the per-minute rows and the totals."""
    rec, stop, pacer = Recorder(), asyncio.Event(), Pacer(args.rate)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=None)
    timeout = httpx.Timeout(60, connect=10)
    headers = {"Authorization": f"Bearer {key}"}
    rows: list[dict] = [
        {"minute": 0, "rss_mb": round(common.rss_kb(pid) / 1024, 1), "fds": fds(pid)}
    ]
    log(f"minute 0 (idle): RSS {rows[0]['rss_mb']} MB, fds {rows[0]['fds']}")
    async with (
        httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=timeout) as client,
        httpx.AsyncClient(base_url=base) as metrics,
    ):
        clients = [
            asyncio.create_task(client_loop(client, rec, pacer, stop, args.seed + i))
            for i in range(args.concurrency)
        ]
        start, cpu = time.monotonic(), [common.cpu_s(pid)]
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(max(0.0, start + 60 * minute - time.monotonic()))
            row = await minute_row(minute, rec.take(), pid, metrics, cpu)
            rows.append(row)
            print(minute_line(row), flush=True)
        stop.set()
        await asyncio.gather(*clients)  # in-flight requests finish (they count in the totals)
        drained = rec.take()
        log(f"after the last minute: {sum(drained.outcomes.values())} in-flight requests finished")
    return rows, rec


# ---- setup ---------------------------------------------------------------------------


@dataclass
class Setup:
    tmp: Path
    procs: common.Procs
    code_env: dict[str, str]
    config: Path
    base: str = ""
    key: str = ""
    gateway: subprocess.Popen | None = None
    pg_db: str = ""  # throw-away PostgreSQL database to drop at the end


def new_setup() -> Setup:
    """A temporary directory with a snapshot of Bastion's code, so the whole run (the audit
    included) uses one revision even if the working tree changes meanwhile (as bench/run.py
    does: PYTHONPATH beats the editable install)."""
    tmp = Path(tempfile.mkdtemp(prefix="bastion-soak-"))
    shutil.copytree(
        common.ROOT / "bastion",
        tmp / "code" / "bastion",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return Setup(tmp, common.Procs(tmp), {"PYTHONPATH": str(tmp / "code")}, tmp / "soak.toml")


def start(setup: Setup, args: argparse.Namespace) -> None:
    """The simulator, the gateway's config and database, the funded key, the gateway."""
    tmp = setup.tmp
    sim_port, port = common.free_port(), common.free_port()
    sim = setup.procs.start(
        "sim",
        [common.PYTHON, "-m", "bastion", "sim", "--port", str(sim_port),
         "--tokens-per-s", str(SIM_TOKENS_PER_S), "--ttft-ms", str(SIM_TTFT_MS)],
        None, env=setup.code_env, cwd=tmp,
    )  # fmt: skip
    common.wait_until(lambda: common.http_ok(f"http://127.0.0.1:{sim_port}/health"), sim, 20, "sim")
    if args.postgres:
        setup.pg_db = f"soak_{uuid.uuid4().hex[:12]}"
        common.pg_admin(args.postgres, f"CREATE DATABASE {setup.pg_db}")
        db_url = args.postgres.rsplit("/", 1)[0] + "/" + setup.pg_db
    else:
        db_url = f"sqlite:///{tmp}/soak.db"
    text = GATEWAY_TOML.format(
        port=port, db=db_url, ratelimit=args.redis or "memory://", sim=sim_port
    )
    text += "".join(FAULT_TOML.format(fault=f, sim=sim_port) for f in FAULTS)
    setup.config.write_text(text)
    setup.key = common.make_key(db_url, CREDIT_USD, KEY_RPM, KEY_TPM)
    setup.base = f"http://127.0.0.1:{port}"
    cmd = [common.PYTHON, "-m", "bastion", "serve", "--config", str(setup.config),
           "--workers", str(args.workers)]  # fmt: skip
    setup.gateway = setup.procs.start("gateway", cmd, None, env=setup.code_env, cwd=tmp)
    common.wait_until(
        lambda: common.http_ok(setup.base + "/healthz"), setup.gateway, 30, "bastion serve"
    )


def cleanup(setup: Setup, args: argparse.Namespace) -> None:
    setup.procs.stop_all()
    if setup.pg_db:
        try:
            common.pg_admin(args.postgres, f"DROP DATABASE IF EXISTS {setup.pg_db} WITH (FORCE)")
        except Exception as exc:  # report and go on cleaning
            log(f"could not drop database {setup.pg_db}: {exc}")
    if args.keep_tmp:
        log(f"kept {setup.tmp}")
    else:
        shutil.rmtree(setup.tmp, ignore_errors=True)


# ---- the summary ---------------------------------------------------------------------


def drift(rows: list[dict], key: str, base_minute: int) -> dict:
    """Max and min of `key` over the minutes after `base_minute`, relative to it."""
    base = rows[base_minute][key]
    later = [r[key] for r in rows[base_minute + 1 :]]
    if not later or not base:
        return {"base": base, "max": None, "min": None, "max_pct": None, "min_pct": None}
    hi, lo = max(later), min(later)
    return {
        "base": base,
        "max": hi,
        "min": lo,
        "max_pct": round(100 * (hi - base) / base, 2),
        "min_pct": round(100 * (lo - base) / base, 2),
    }


def trend(rows: list[dict], key: str, base_minute: int) -> dict:
    """Least-squares slope of `key` over the minutes after `base_minute` (per minute),
    and the mean of the first and the last five minutes of the run."""
    points = [(r["minute"], r[key]) for r in rows[base_minute + 1 :] if r.get(key) is not None]
    slope = None
    if len(points) >= 2:
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        sxx = sum((x - mx) ** 2 for x, _ in points)
        slope = round(sum((x - mx) * (y - my) for x, y in points) / sxx, 3)
    values = [r[key] for r in rows[1:] if r.get(key) is not None]

    def mean(v: list[float]) -> float | None:
        return round(sum(v) / len(v), 1) if v else None

    return {
        "slope_per_min": slope,
        "first5_mean": mean(values[:5]),
        "last5_mean": mean(values[-5:]),
    }


def audit(setup: Setup) -> dict:
    """`bastion audit --json` on the gateway's config, after the gateway has stopped."""
    out = subprocess.run(
        [common.PYTHON, "-m", "bastion", "audit", "--json", "--config", str(setup.config)],
        cwd=setup.tmp,
        env={**os.environ, **setup.code_env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        report = json.loads(out.stdout)
    except ValueError:
        report = {"ok": False, "problems": [f"not JSON: {(out.stdout + out.stderr)[-500:]}"]}
    report["exit_code"] = out.returncode
    return report


def money(setup: Setup, rec: Recorder) -> dict:
    report = audit(setup)
    account = next((a for a in report.get("accounts", []) if a["name"] == "bench"), {})
    rows = account.get("rows", 0)
    return {
        "answers_200": rec.answers_200,
        "ledger_rows": rows,
        "estimated_rows": account.get("estimated_rows"),
        "spent_usd": account.get("spent"),
        "uncharged_usd": account.get("uncharged"),
        "dead_letters": report.get("dead_letters"),
        "audit_ok": bool(report.get("ok")) and report["exit_code"] == 0,
        "audit_problems": report.get("problems", [])
        + [p for a in report.get("accounts", []) for p in a.get("problems", [])],
        "rows_ok": rows >= rec.answers_200,
    }


def summarize(rows: list[dict], rec: Recorder, money_check: dict, minutes: int) -> dict:
    base_minute = min(WARMUP_MINUTES, max(1, minutes - 1))
    rss = drift(rows, "rss_mb", base_minute)
    ok_rss = (
        rss["max_pct"] is not None
        and max(abs(rss["max_pct"]), abs(rss["min_pct"])) <= RSS_TARGET_PCT
    )
    return {
        "base_minute": base_minute,
        "rss_drift": rss | {"target_pct": RSS_TARGET_PCT, "ok": ok_rss},
        "fds_drift": drift(rows, "fds", base_minute),
        "json_p99_trend_ms": trend(rows, "json_p99_ms", base_minute),
        "ttfb_p99_trend_ms": trend(rows, "ttfb_p99_ms", base_minute),
        "total_requests": sum(rec.by_kind.values()),
        "requests_by_kind": dict(sorted(rec.by_kind.items())),
        "errors": {side: dict(sorted(c.items())) for side, c in rec.errors.items()},
        "money": money_check,
        "ok": ok_rss and money_check["audit_ok"] and money_check["rows_ok"],
    }


def _drift_text(d: dict, unit: str) -> str:
    return (
        f"{d['base']}{unit} → max {d['max']}{unit} ({d['max_pct']:+} %), "
        f"min {d['min']}{unit} ({d['min_pct']:+} %)"
    )


def _trend_text(t: dict, base_minute: int) -> str:
    return (
        f"first 5 min {t['first5_mean']} ms, last 5 min {t['last5_mean']} ms, "
        f"slope after minute {base_minute} {t['slope_per_min']} ms/min"
    )


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "none"


def summary_text(s: dict) -> str:
    rss, m = s["rss_drift"], s["money"]
    verdict = "met" if rss["ok"] else "MISSED"
    audit_text = "ok" if m["audit_ok"] else f"FAILED: {m['audit_problems']}"
    lines = [
        f"RSS drift after minute {s['base_minute']}: {_drift_text(rss, ' MB')}; "
        f"target ±{rss['target_pct']:g} %: {verdict}",
        f"fds drift: {_drift_text(s['fds_drift'], '')}",
        f"JSON p99: {_trend_text(s['json_p99_trend_ms'], s['base_minute'])}",
        f"stream TTFB p99: {_trend_text(s['ttfb_p99_trend_ms'], s['base_minute'])}",
        f"requests: {s['total_requests']:,}",
        f"expected errors (faults, dropped streams): {_counts_text(s['errors']['expected'])}",
        f"unexpected errors: {_counts_text(s['errors']['unexpected'])}",
        f"money: {m['ledger_rows']:,} ledger rows for {m['answers_200']:,} answers with 200 "
        f"({'ok' if m['rows_ok'] else 'MISSING ROWS'}); spent ${m['spent_usd']}, "
        f"uncharged ${m['uncharged_usd']}, dead letters {m['dead_letters']}; audit {audit_text}",
        "result: " + ("ok" if s["ok"] else "FAILED"),
    ]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=int, default=30, help="length of the load (default 30)")
    ap.add_argument("--workers", type=int, default=1, help="gateway workers (>1 needs --postgres)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    ap.add_argument(
        "--rate", type=float, default=0, help="cap on request starts per second (0: none)"
    )
    ap.add_argument("--postgres", help="PostgreSQL admin URL: a throw-away database is made there")
    ap.add_argument("--redis", help="Redis URL for the rate limiter (default: in memory)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs, logs and the database")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = ap.parse_args()
    if args.minutes < 2:
        ap.error("--minutes must be at least 2 (one to compare against)")
    if args.workers > 1 and not (args.postgres and args.redis):
        ap.error("--workers > 1 needs --postgres and --redis")
    return args


def main() -> None:
    args = parse_args()
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup below
    commit = bastion_commit()  # of the code copied next
    setup = new_setup()
    try:
        start(setup, args)
        assert setup.gateway is not None
        store = "PostgreSQL + Redis" if args.postgres else "SQLite + memory limiter"
        log(
            f"gateway {setup.base} ({store}, {args.workers} worker(s)), simulator "
            f"{SIM_TOKENS_PER_S} tokens/s, ttft {SIM_TTFT_MS} ms; {args.concurrency} in flight "
            f"for {args.minutes} min; files in {setup.tmp}"
        )
        rows, rec = uvloop.run(load(args, setup.base, setup.key, setup.gateway.pid))
        setup.procs.stop(setup.gateway)  # SIGTERM: drains, writes every ledger row, exits
        summary = summarize(rows, rec, money(setup, rec), args.minutes)
    finally:
        cleanup(setup, args)
    print(summary_text(summary), flush=True)
    if not args.no_save:
        result = {
            "meta": {
                "started": started.isoformat(),
                "argv": sys.argv[1:],
                "args": vars(args),
                "bastion_commit": commit,
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "setup": {
                    "simulator": {"tokens_per_s": SIM_TOKENS_PER_S, "ttft_ms": SIM_TTFT_MS},
                    "store": "postgres+redis" if args.postgres else "sqlite+memory",
                    "mix": {
                        "short_tokens": SHORT_TOKENS,
                        "long_tokens": LONG_TOKENS,
                        "long_share": round(LONG_SHARE, 3),
                        "disconnect_share": DISCONNECT_SHARE,
                        "fault_share": FAULT_SHARE,
                        "faults": FAULTS,
                    },
                },
            },
            "minutes": rows,
            "summary": summary,
        }
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.write_text(json.dumps(result, indent=1))
        log(f"saved {out.relative_to(HERE.parent)}")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
