"""Drive the candidate benchmarks: start each server pinned to core 0, load it with wrk pinned
to core 1 (with the upstream), 3 runs each, print markdown tables of medians.

    python run.py [A] [B] [S]      # default: all three; see run.sh
Only 127.0.0.1 is targeted; every process started here is killed on exit.
"""

import atexit
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DUR = int(os.environ.get("DUR", "6"))  # seconds per measured run
REPS = int(os.environ.get("REPS", "3"))
SUT, UP_JSON, UP_SSE = 9200, 9100, 9101  # server under test, nginx upstream, SSE upstream
TMP = Path(tempfile.mkdtemp(prefix="bastion-cand-"))
_procs: list[subprocess.Popen] = []

sys.path.insert(0, str(HERE))
from payloads import REQUEST_BYTES, RESPONSE_BYTES  # noqa: E402

BODY_FILE = TMP / "body.json"
BODY_FILE.write_bytes(REQUEST_BYTES)


def _cleanup(*_):
    for p in list(_procs):
        stop(p)
    shutil.rmtree(TMP, ignore_errors=True)
    if _:
        sys.exit(1)


atexit.register(_cleanup)
signal.signal(signal.SIGTERM, _cleanup)
signal.signal(signal.SIGINT, _cleanup)


def start(cmd: list[str], core: int, port: int, env: dict | None = None) -> subprocess.Popen:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is already in use: stop that server first")
    p = subprocess.Popen(["taskset", "-c", str(core), *cmd], cwd=HERE, start_new_session=True,
                         env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                         stderr=open(TMP / f"{port}.log", "ab"))
    _procs.append(p)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            if p.poll() is not None:
                raise RuntimeError(f"{cmd} exited; see {TMP}/{port}.log") from None
            time.sleep(0.05)
    raise RuntimeError(f"{cmd} did not listen on {port}")


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p in _procs:
        _procs.remove(p)


def wrk(url: str, conns: int, post: bool, dur: int) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{dur}s", "--timeout", "5s",
         "-s", str(HERE / "wrk.lua"), url],
        env={**os.environ, "WRK_BODY_FILE": str(BODY_FILE) if post else ""},
        capture_output=True, text=True, check=True).stdout
    rps, p50, p99, err, non2xx = out.split("RESULT ")[1].split()
    return float(rps), float(p50), float(p99), int(err) + int(non2xx)


def cpu_seconds(pgid: int) -> float:
    """user+system CPU of every process in the group (all threads; granian's worker too)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(11) stime(12)
            ticks += int(f[11]) + int(f[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def bench(cands: dict, cells: list, core: int = 0) -> dict:
    """Round-robin REPS times over candidates (so background noise hits all alike); per rep,
    start each server fresh, warm up, run every cell. Returns medians per candidate and cell.
    cands: name -> (cmd, env, port); cmd None means an already running server (a baseline).
    cells: (key, path, connections, post)."""
    raw: dict = {n: {c[0]: [] for c in cells} for n in cands}
    for _ in range(REPS):
        for name, (cmd, env, port) in cands.items():
            p = start(cmd, core, port, env) if cmd else None
            try:
                for key, path, conns, post in cells:
                    url = f"http://127.0.0.1:{port}{path}"
                    wrk(url, conns, post, 1)  # warm-up
                    cpu0 = cpu_seconds(p.pid) if p else 0.0
                    rps, p50, p99, err = wrk(url, conns, post, DUR)
                    # CPU µs per request: insensitive to other load on the machine
                    cpu = (cpu_seconds(p.pid) - cpu0) * 1e6 / (rps * DUR) if p else 0.0
                    raw[name][key].append((rps, p50, p99, err, cpu))
            finally:
                if p:
                    stop(p)
    med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    return {n: {k: {"rps": med(v, 0), "p50": med(v, 1), "p99": med(v, 2), "cpu": med(v, 4),
                    "err": sum(r[3] for r in v)} for k, v in cs.items()}
            for n, cs in raw.items()}


def py(*a):
    return [str(BIN / "python"), *a]


def granian(iface: str, app: str, port: int = SUT):
    return [str(BIN / "granian"), "--interface", iface, "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--loop", "uvloop", "--no-access-log", "--log-level", "warning", app]


def uvicorn(app: str):
    return [str(BIN / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(SUT), "--loop",
            "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]


SERVERS = {
    "aiohttp.web + uvloop": py("servers.py", "aiohttp", str(SUT)),
    "uvicorn + httptools + uvloop (bare ASGI)": uvicorn("servers:asgi_app"),
    "granian ASGI (uvloop)": granian("asgi", "servers:asgi_app"),
    "granian RSGI (uvloop)": granian("rsgi", "servers:rsgi_app"),
}
FRONTS = {
    "aiohttp.web": py("proxies.py", "aiohttp", str(SUT)),
    "granian RSGI": granian("rsgi", "proxies:rsgi_app"),
    "uvicorn ASGI": uvicorn("proxies:asgi_app"),
}
COMBOS = [(f, c) for f in ("aiohttp.web", "granian RSGI")
          for c in ("aiohttp", "httpcore", "pyreqwest", "httpx")]
COMBOS += [("uvicorn ASGI", "aiohttp"), ("aiohttp.web", "aiohttp/asyncio")]
if os.environ.get("ONLY"):  # e.g. ONLY="aiohttp.web + aiohttp,granian RSGI + pyreqwest"
    COMBOS = [c for c in COMBOS if " + ".join(c) in os.environ["ONLY"].split(",")]
STREAM_COMBOS = [("aiohttp.web", "aiohttp"), ("granian RSGI", "aiohttp"),
                 ("aiohttp.web", "pyreqwest"), ("granian RSGI", "pyreqwest")]


def nginx() -> subprocess.Popen:
    conf = TMP / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; master_process off;
pid {TMP}/nginx.pid; error_log {TMP}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 75s;
  client_body_temp_path {TMP}; proxy_temp_path {TMP}; fastcgi_temp_path {TMP};
  uwsgi_temp_path {TMP}; scgi_temp_path {TMP};
  server {{ listen 127.0.0.1:{UP_JSON};
    location / {{ default_type application/json; return 200 '{RESPONSE_BYTES.decode()}'; }} }}
}}""")
    return start(["nginx", "-p", str(TMP), "-c", str(conf)], 1, UP_JSON)


def row(name: str, *cells) -> None:
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def fmt(m: dict, lat=True) -> list[str]:
    cells = [f"{m['rps']:,.0f}"] + ([f"{m['p50']:.2f}", f"{m['p99']:.2f}"] if lat else [])
    return [*cells, str(m["err"])]


def load() -> str:
    return "load average " + Path("/proc/loadavg").read_text().split(" ", 3)[2]


def cpu(m: dict) -> str:
    return f"{m['cpu']:.0f}" if m["cpu"] else "-"


def section_a() -> None:
    print(f"\n### A. Servers (server on core 0, wrk on core 1; {load()})\n")
    print("| server | c=1 req/s | c=1 p50 ms | c=1 p99 ms | c=64 req/s | c=64 p50 ms "
          "| c=64 p99 ms | c=64 CPU µs/req | SSE c=16 streams/s | SSE CPU µs/stream | errors |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|")
    cands = {n: (cmd, None, SUT) for n, cmd in SERVERS.items()}
    cands["aiohttp.web + stdlib asyncio loop"] = (SERVERS["aiohttp.web + uvloop"],
                                                  {"LOOP": "asyncio"}, SUT)
    res = bench(cands,
                [("c1", "/", 1, True), ("c64", "/", 64, True), ("sse", "/sse", 16, False)])
    for name, r in res.items():
        row(name, *fmt(r["c1"])[:3], *fmt(r["c64"])[:3], f"{r['c64']['cpu']:.0f}",
            fmt(r["sse"], False)[0], f"{r['sse']['cpu']:.0f}",
            str(sum(m["err"] for m in r.values())))


def section_b() -> None:
    print(f"\n### B. Proxy to nginx upstream (proxy on core 0; nginx + wrk on core 1; {load()})\n")
    print("| front + upstream client | c=1 req/s | c=1 p50 ms | c=64 req/s | c=64 p50 ms "
          "| c=64 p99 ms | c=64 CPU µs/req | errors |\n|---|---|---|---|---|---|---|---|")
    up = nginx()
    cands = {"(direct to nginx, baseline)": (None, None, UP_JSON)}
    for front, client in COMBOS:  # "aiohttp/asyncio": aiohttp client on the stdlib loop
        cands[f"{front} + {client}"] = (FRONTS[front], {
            "PROXY_CLIENT": client.split("/")[0], "LOOP": client.partition("/")[2],
            "UPSTREAM": f"http://127.0.0.1:{UP_JSON}/"}, SUT)
    try:
        res = bench(cands, [("c1", "/", 1, True), ("c64", "/", 64, True)])
    finally:
        stop(up)
    for name, r in res.items():
        row(name, *fmt(r["c1"])[:2], *fmt(r["c64"])[:3], cpu(r["c64"]),
            str(r["c1"]["err"] + r["c64"]["err"]))


def section_s() -> None:
    print("\n### S. Streaming proxy, 50 SSE events relayed chunk by chunk, c=16 "
          f"(upstream: granian RSGI /sse on core 1 with wrk; {load()})\n")
    print("| front + upstream client | streams/s | p50 ms | p99 ms | CPU µs/stream | errors |"
          "\n|---|---|---|---|---|---|")
    up = start(granian("rsgi", "servers:rsgi_app", UP_SSE), 1, UP_SSE)
    cands = {"(direct to upstream, baseline)": (None, None, UP_SSE)}
    for front, client in STREAM_COMBOS:
        cands[f"{front} + {client}"] = (FRONTS[front], {
            "PROXY_CLIENT": client, "UPSTREAM_SSE": f"http://127.0.0.1:{UP_SSE}/sse"}, SUT)
    try:
        res = bench(cands, [("sse", "/sse", 16, False)])
    finally:
        stop(up)
    for name, r in res.items():
        row(name, *fmt(r["sse"])[:3], cpu(r["sse"]), str(r["sse"]["err"]))


if __name__ == "__main__":
    which = sys.argv[1:] or ["A", "B", "S"]
    print(f"wrk -t1, {REPS} rounds x {DUR}s (+1s warm-up) per cell, round-robin over candidates, "
          "medians; latency in ms")
    for s in which:
        {"A": section_a, "B": section_b, "S": section_s}[s]()
    print(f"\n({load()} at end)")
