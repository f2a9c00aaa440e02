"""The benchmark: Bastion vs a plain nginx proxy vs LiteLLM, in front of a near-free upstream.

    python -m bench.run                 # full: 3 repeats x 5 s, c = 1, 16, 64  (~15 min)
    python -m bench.run --quick         # 1 repeat x 3 s, c = 1 and 64          (~3 min)
    python -m bench.run --scale         # also Bastion on PostgreSQL + Redis, 1 and 2 workers
    make bench ARGS="--quick --scale"

Layout (2 cores): the upstream (nginx, 1 worker, fixed bodies rendered by the simulator,
see bench/upstream.py) and the load generator (wrk, 1 thread) share core 1; the system
under test runs alone on core 0. Targets, all measured in the same invocation:

  direct        wrk -> nginx upstream                       (the floor)
  nginx-proxy   wrk -> nginx proxy_pass (core 0) -> upstream  (the plain-proxy baseline)
  bastion       wrk -> bastion serve (core 0, SQLite, memory limiter) -> upstream
  litellm       wrk -> LiteLLM proxy (core 0, 1 worker, no DB) -> upstream
  --scale:
  bastion-pg-w1 wrk -> bastion serve --workers 1 (core 0, PostgreSQL + Redis)
  bastion-pg-w2 wrk -> bastion serve --workers 2 (cores 0 AND 1: shares core 1 with wrk + nginx)

Scenarios: {responses, chat} x {json, stream} x concurrency. Repeats go round-robin
over the targets (each started fresh per repeat, warmed up), and the table reports
medians. Before every measurement the run waits until no other benchmark process
(`wrk`, `bench/candidates`) is running on the machine. Results: bench/results/latest.md,
latest.json and <timestamp>.json. Only 127.0.0.1 is used; every process started here
is stopped on exit.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import common, litellm
from bench.upstream import PATHS, REQUESTS, upstream_path, write_configs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GATEWAY_CORE = "0"
LOAD_CORE = "1"  # wrk + the nginx upstream
PG_ADMIN_URL = os.environ.get("BASTION_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BASTION_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# The bench key: limits high enough never to bite, finite so the limiter really runs.
KEY_RPM = 100_000_000
KEY_TPM = 1_000_000_000_000
CREDIT_USD = "1000000"

BASTION_TOML = """\
refresh_interval_s = 1.0

[server]
host = "127.0.0.1"
port = {port}
max_body_bytes = 1_000_000

[database]
url = "{db}"

[ratelimit]
url = "{ratelimit}"

[[upstreams]]
name = "nginx"
url = "http://127.0.0.1:{upstream}/v1"

[[upstreams]]
name = "nginx-stream"
url = "http://127.0.0.1:{upstream}/stream/v1"

[[models]]
id = "bench-json"
endpoints = ["responses", "chat"]
upstreams = ["nginx"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 4096

[[models]]
id = "bench-stream"
endpoints = ["responses", "chat"]
upstreams = ["nginx-stream"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 4096
"""

_t0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Target:
    name: str
    label: str
    cores: str
    start: Callable[[], subprocess.Popen | None]  # starts it, waits until ready
    url: Callable[[str, str], str]  # (endpoint, mode) -> URL
    auth: str = ""
    db_url: str = ""  # Bastion's store, to read the account after the run
    note: str = ""
    proc: subprocess.Popen | None = None
    rss_pid: int | None = None  # process tree whose RSS/CPU is reported
    na: dict[str, str] = field(default_factory=dict)  # scenario -> why not measured


def scenario_key(endpoint: str, mode: str, conc: int) -> str:
    return f"{endpoint}/{mode}/c{conc}"


# ---- load generation -----------------------------------------------------------------


def run_wrk(url: str, body: Path, auth: str, conc: int, seconds: int) -> dict:
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        "-t1",
        f"-c{conc}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(HERE / "wrk.lua"),
        url,
    ]
    env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_AUTH": auth}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        detail = (out.stderr + out.stdout)[-800:]
        raise RuntimeError(f"wrk failed ({out.returncode}): {detail}")
    return json.loads(line[6:])


def check_once(url: str, body: bytes, auth: str, mode: str) -> str:
    """One request; '' if the answer is a complete, valid one, else what is wrong."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as e:
        return f"request failed: {e}"
    text = data.decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {text[:300]}"
    if mode == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return f"not JSON: {text[:300]}"
        return "" if isinstance(obj, dict) and obj.get("usage") else f"no usage: {text[:300]}"
    if '"usage":{' not in text:
        return f"stream without usage: {text[-300:]}"
    if '"type":"response.' in text:
        deltas = text.count('"type":"response.output_text.delta"')
        ok = "response.completed" in text and deltas == 50
        return "" if ok else f"responses stream incomplete ({deltas} deltas): {text[-300:]}"
    ok = text.rstrip().endswith("data: [DONE]")
    return "" if ok else f"chat stream incomplete: {text[-300:]}"


# ---- targets -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
        self.procs = common.Procs(self.tmp)
        self.pg_dbs: list[str] = []
        self.waited_s = 0.0
        self.disturbed = 0  # measurements redone because another benchmark started meanwhile
        self.upstream_port = common.free_port()
        self.proxy_port = common.free_port()
        # Bastion's code is copied at the start, so every repeat runs the same code even if
        # the working tree changes meanwhile (PYTHONPATH beats the editable install; the
        # gateways run with cwd = tmp, so the checkout is not on their sys.path).
        self.commit = bastion_commit()
        shutil.copytree(
            common.ROOT / "bastion",
            self.tmp / "code" / "bastion",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        self.code_env = {"PYTHONPATH": str(self.tmp / "code")}
        self.bodies: dict[tuple[str, str], Path] = {}
        for (endpoint, mode), body in REQUESTS.items():
            path = self.tmp / f"request-{endpoint}-{mode}.json"
            path.write_bytes(json.dumps(body, separators=(",", ":")).encode())
            self.bodies[(endpoint, mode)] = path

    def cleanup(self) -> None:
        self.procs.stop_all()
        for name in self.pg_dbs:
            try:
                common.pg_admin(PG_ADMIN_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception as exc:  # report and go on cleaning
                log(f"could not drop database {name}: {exc}")
        self.pg_dbs.clear()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def start_upstream(self) -> None:
        up_conf, self.proxy_conf = write_configs(self.tmp, self.upstream_port, self.proxy_port)
        proc = self.procs.start(
            "nginx-upstream", ["nginx", "-p", str(self.tmp), "-c", str(up_conf)], LOAD_CORE
        )
        common.wait_until(lambda: common.port_open(self.upstream_port), proc, 10, "nginx upstream")
        self.upstream = proc
        self.body_sizes = {
            f"{e}/{m}": (self.tmp / "www" / upstream_path(e, m).lstrip("/")).stat().st_size
            for e, m in REQUESTS
        }

    # direct: nothing to start
    def direct(self) -> Target:
        base = f"http://127.0.0.1:{self.upstream_port}"
        t = Target(
            "direct",
            "nginx upstream, direct",
            LOAD_CORE,
            lambda: None,
            lambda e, m: base + upstream_path(e, m),
        )
        t.note = "the floor: wrk straight to the static nginx (which shares core 1 with wrk)"
        return t

    def nginx_proxy(self) -> Target:
        port, conf = self.proxy_port, self.proxy_conf
        t = Target(
            "nginx-proxy",
            "nginx proxy_pass",
            GATEWAY_CORE,
            lambda: None,
            lambda e, m: f"http://127.0.0.1:{port}" + upstream_path(e, m),
        )

        def start() -> subprocess.Popen:
            proc = self.procs.start(
                "nginx-proxy", ["nginx", "-p", str(self.tmp), "-c", str(conf)], GATEWAY_CORE
            )
            common.wait_until(lambda: common.port_open(port), proc, 10, "nginx proxy")
            return proc

        t.start = start
        t.note = "1 worker, proxy_buffering off, HTTP/1.1 keep-alive upstream"
        return t

    def bastion(self, name: str, db: str, ratelimit: str, workers: int, cores: str) -> Target:
        port = common.free_port()
        if db == "sqlite":
            db_url = f"sqlite:///{self.tmp}/{name}.db"
        else:
            dbname = f"bench_{uuid.uuid4().hex[:12]}"
            common.pg_admin(PG_ADMIN_URL, f"CREATE DATABASE {dbname}")
            self.pg_dbs.append(dbname)
            db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname
        config = self.tmp / f"{name}.toml"
        config.write_text(
            BASTION_TOML.format(
                port=port, db=db_url, ratelimit=ratelimit, upstream=self.upstream_port
            )
        )
        key = common.make_key(db_url, CREDIT_USD, KEY_RPM, KEY_TPM)
        base = f"http://127.0.0.1:{port}"
        store = "SQLite + memory limiter" if db == "sqlite" else "PostgreSQL + Redis"
        t = Target(
            name,
            f"Bastion, {store}, {workers} worker{'s' * (workers > 1)}",
            cores,
            lambda: None,
            lambda e, m: base + PATHS[e],
            auth=key,
            db_url=db_url,
        )

        def start() -> subprocess.Popen:
            cmd = [
                common.PYTHON,
                "-m",
                "bastion",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
                "--workers",
                str(workers),
            ]
            proc = self.procs.start(name, cmd, cores, env=self.code_env, cwd=self.tmp)
            common.wait_until(lambda: common.http_ok(base + "/healthz"), proc, 30, name)
            return proc

        t.start = start
        return t

    def litellm(self) -> Target | None:
        exe = litellm.ensure(log)
        if exe is None:
            return None
        port = common.free_port()
        config = litellm.write_config(self.tmp / "litellm.yaml", self.upstream_port)
        base = f"http://127.0.0.1:{port}"
        t = Target(
            "litellm",
            f"LiteLLM {litellm.version()} proxy, 1 worker",
            GATEWAY_CORE,
            lambda: None,
            lambda e, m: base + PATHS[e],
            auth=litellm.MASTER_KEY,
        )

        def start() -> subprocess.Popen:
            proc = self.procs.start(
                "litellm",
                litellm.command(exe, config, port),
                GATEWAY_CORE,
                env=litellm.ENV,
                cwd=self.tmp,
            )
            common.wait_until(
                lambda: common.http_ok(base + "/health/liveliness"), proc, 120, "litellm"
            )
            return proc

        t.start = start
        t.note = "no database (no spend tracking), master key auth, default settings"
        return t

    # ---- measuring -------------------------------------------------------------------

    def quiet(self) -> None:
        self.waited_s += common.wait_quiet(self.args.max_wait, log)

    def measure_target(
        self,
        t: Target,
        scenarios: list[tuple[str, str, int]],
        rep: int,
        runs: list[dict],
        info: dict,
    ) -> None:
        log(f"[rep {rep + 1}] {t.name}: starting")
        t.proc = t.start()
        pid = t.proc.pid if t.proc else self.upstream.pid
        idle_rss = common.rss_kb(pid)
        # validity of every (endpoint, mode) before timing it
        for endpoint, mode in {(e, m) for e, m, _ in scenarios}:
            body = self.bodies[(endpoint, mode)].read_bytes()
            problem = ""
            for _ in range(30):  # a fresh gateway may need a moment to load the key
                problem = check_once(t.url(endpoint, mode), body, t.auth, mode)
                if not problem or not problem.startswith("HTTP 401"):
                    break
                time.sleep(0.2)
            if problem:
                log(f"  {t.name} {endpoint}/{mode}: n/a — {problem[:200]}")
                t.na[f"{endpoint}/{mode}"] = problem[:500]
        valid = [(e, m, c) for e, m, c in scenarios if f"{e}/{m}" not in t.na]
        self.quiet()
        for endpoint, mode in sorted({(e, m) for e, m, _ in valid}):
            run_wrk(
                t.url(endpoint, mode), self.bodies[(endpoint, mode)], t.auth, 16, self.args.warmup
            )
        for endpoint, mode, conc in valid:
            for attempt in range(3):
                self.quiet()
                foreign = common.ForeignCPU()
                cpu0, w0 = common.cpu_s(pid), time.monotonic()
                r = run_wrk(
                    t.url(endpoint, mode),
                    self.bodies[(endpoint, mode)],
                    t.auth,
                    conc,
                    self.args.duration,
                )
                cpu = common.cpu_s(pid) - cpu0
                wall = time.monotonic() - w0
                other_load = foreign.cores()
                if (other_load <= common.FOREIGN_LIMIT and not common.others_running()) or (
                    attempt == 2
                ):
                    break
                # another benchmark started meanwhile: this measurement is disturbed
                log(
                    f"  {t.name} {scenario_key(endpoint, mode, conc)}: disturbed "
                    f"({other_load:.2f} cores of other load), measuring again"
                )
                self.disturbed += 1
            errors = sum(r["errors"].values())
            row = {
                "target": t.name,
                "rep": rep,
                "endpoint": endpoint,
                "mode": mode,
                "c": conc,
                "requests": r["requests"],
                "rps": round(r["rps"], 1),
                "p50_ms": r["p50_us"] / 1000,
                "p90_ms": r["p90_us"] / 1000,
                "p99_ms": r["p99_us"] / 1000,
                "max_ms": r["max_us"] / 1000,
                "errors": errors,
                "error_detail": r["errors"],
                "other_load_cores": round(other_load, 3),
                "server_cpu_s": round(cpu, 3),
                "server_cpu_pct": round(100 * cpu / wall, 1),
                "server_cpu_us_per_req": round(1e6 * cpu / r["requests"], 1)
                if r["requests"]
                else None,
            }
            runs.append(row)
            log(
                f"  {t.name:14} {scenario_key(endpoint, mode, conc):22} {row['rps']:>9,.0f}/s "
                f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                f"cpu {row['server_cpu_pct']:5.1f}%  err {errors}"
            )
        entry = info.setdefault(t.name, {"rss_idle_kb": [], "rss_after_kb": []})
        entry["rss_idle_kb"].append(idle_rss)
        entry["rss_after_kb"].append(common.rss_kb(pid))
        if t.db_url:
            time.sleep(1.5)  # let the group commit land
            entry.setdefault("account_after", []).append(common.account(t.db_url))
        if t.proc:
            self.procs.stop(t.proc)
            t.proc = None


# ---- reporting -----------------------------------------------------------------------


def summarize(runs: list[dict], targets: list[Target]) -> dict:
    out: dict[str, dict[str, dict]] = {}
    for t in targets:
        groups: dict[str, list[dict]] = {}
        for r in runs:
            if r["target"] == t.name:
                groups.setdefault(scenario_key(r["endpoint"], r["mode"], r["c"]), []).append(r)
        out[t.name] = {}
        for key, rs in groups.items():

            def med(f: str, rs: list[dict] = rs) -> float:
                return statistics.median(r[f] for r in rs)

            cpu = [r["server_cpu_us_per_req"] for r in rs if r["server_cpu_us_per_req"]]
            out[t.name][key] = {
                "rps": round(med("rps"), 1),
                "p50_ms": round(med("p50_ms"), 3),
                "p99_ms": round(med("p99_ms"), 3),
                "errors": sum(r["errors"] for r in rs),
                "requests": sum(r["requests"] for r in rs),
                "server_cpu_pct": round(med("server_cpu_pct"), 1),
                "server_cpu_us_per_req": round(statistics.median(cpu), 1) if cpu else None,
                "repeats": len(rs),
                "rps_all": [r["rps"] for r in rs],
            }
    direct = out.get("direct", {})
    for name, cells in out.items():
        for key, cell in cells.items():
            base = direct.get(key)
            if base and name != "direct":
                cell["added_p50_ms"] = round(cell["p50_ms"] - base["p50_ms"], 3)
                cell["added_p99_ms"] = round(cell["p99_ms"] - base["p99_ms"], 3)
    return out


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}×"


def markdown(result: dict, targets: list[Target], scenarios: list[tuple[str, str, int]]) -> str:
    s, meta, info = result["summary"], result["meta"], result["targets"]
    lines = [
        f"### Results {meta['started']} ({meta['mode']}: {meta['repeats']} repeat(s) × "
        f"{meta['duration_s']} s, medians)",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores; gateway on core {GATEWAY_CORE}, "
        f"wrk (1 thread) + nginx upstream on core {LOAD_CORE}. Bastion {meta['bastion_commit']}; "
        f"{meta['versions']}. Upstream bodies (bytes): "
        + ", ".join(f"{k} {v:,}" for k, v in meta["upstream_body_bytes"].items())
        + ".",
        "",
        "req/s is streams/s for stream rows (wrk times the whole response: the last byte "
        "of the stream). +p50/+p99: added latency vs direct. CPU µs/req: CPU time of the "
        "target's process tree per completed request.",
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | CPU µs/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for endpoint, mode, conc in scenarios:
        key = scenario_key(endpoint, mode, conc)
        for t in targets:
            cell = s.get(t.name, {}).get(key)
            if cell is None:
                why = t.na.get(f"{endpoint}/{mode}", "not run")
                lines.append(f"| {key} | {t.name} | n/a | | | | | | {why[:60]} |")
                continue
            lines.append(
                f"| {key} | {t.name} | {_f(cell['rps'])} | {cell['p50_ms']:.2f} | "
                f"{cell['p99_ms']:.2f} | {_f(cell.get('added_p50_ms'), '{:+.2f}')} | "
                f"{_f(cell.get('added_p99_ms'), '{:+.2f}')} | "
                f"{_f(cell['server_cpu_us_per_req'] if t.name != 'direct' else None)} | "
                f"{cell['errors']} |"
            )
    lines += [
        "",
        "**Memory** (VmRSS of the target's whole process tree, MB; max over repeats)",
        "",
        "| target | what | cores | RSS idle | RSS after the run |",
        "|---|---|---|---:|---:|",
    ]
    for t in targets:
        i = info.get(t.name, {})
        idle = max(i.get("rss_idle_kb", [0]) or [0]) / 1024
        after = max(i.get("rss_after_kb", [0]) or [0]) / 1024
        what = t.label + (f" ({t.note})" if t.note else "")
        lines.append(f"| {t.name} | {what} | {t.cores} | {idle:.1f} | {after:.1f} |")
    names = {t.name for t in targets}
    if "bastion" in names:
        lines += [
            "",
            "**Ratios** (Bastion ÷ other; throughput: > 1 is Bastion faster; "
            "added p50: < 1 is Bastion adding less)",
            "",
            "| scenario | req/s vs LiteLLM | req/s vs nginx-proxy | +p50 vs LiteLLM | "
            "+p50 vs nginx-proxy |",
            "|---|---:|---:|---:|---:|",
        ]
        for endpoint, mode, conc in scenarios:
            key = scenario_key(endpoint, mode, conc)
            b = s.get("bastion", {}).get(key, {})
            ll = s.get("litellm", {}).get(key, {})
            px = s.get("nginx-proxy", {}).get(key, {})
            lines.append(
                f"| {key} | {_ratio(b.get('rps'), ll.get('rps'))} | "
                f"{_ratio(b.get('rps'), px.get('rps'))} | "
                f"{_ratio(b.get('added_p50_ms'), ll.get('added_p50_ms'))} | "
                f"{_ratio(b.get('added_p50_ms'), px.get('added_p50_ms'))} |"
            )
    if {"bastion-pg-w1", "bastion-pg-w2"} <= names:
        lines += [
            "",
            "**Scale-out** (issue 4: one worker on SQLite vs one and two workers on "
            "PostgreSQL + Redis, same run). Caveat: with 2 workers the gateway is pinned "
            "to cores 0 AND 1, so it shares core 1 with wrk and the nginx upstream; "
            "1-worker targets have core 0 to themselves. The ratio is therefore a lower "
            "bound of what 2 dedicated cores give.",
            "",
            "| scenario | SQLite 1w req/s | PG+Redis 1w req/s | PG+Redis 2w req/s | "
            "2w ÷ 1w (PG) | PG 1w ÷ SQLite 1w |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for endpoint, mode, conc in scenarios:
            key = scenario_key(endpoint, mode, conc)
            a = s.get("bastion", {}).get(key, {}).get("rps")
            w1 = s.get("bastion-pg-w1", {}).get(key, {}).get("rps")
            w2 = s.get("bastion-pg-w2", {}).get(key, {}).get("rps")
            lines.append(
                f"| {key} | {_f(a)} | {_f(w1)} | {_f(w2)} | {_ratio(w2, w1)} | {_ratio(w1, a)} |"
            )
    na = [(t.name, k, v) for t in targets for k, v in t.na.items()]
    if na:
        lines += ["", "**Not measured**", ""]
        lines += [f"- {n} {k}: {v[:300]}" for n, k, v in na]
    if meta.get("remeasured_disturbed"):
        lines += [
            "",
            f"({meta['remeasured_disturbed']} measurement(s) were taken again because other "
            "load appeared on the machine while they ran.)",
        ]
    if meta.get("waited_for_others_s"):
        lines += [
            "",
            f"(Waited {meta['waited_for_others_s']:.0f} s in total for other "
            "benchmark processes to finish before measuring.)",
        ]
    return "\n".join(lines) + "\n"


def bastion_commit() -> str:
    """HEAD's short hash, `+dirty` if bastion/ has uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=common.ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + ("+dirty" if git("status", "--porcelain", "bastion") else "")


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        lines = (out.stdout + out.stderr).strip().splitlines()
        return lines[0].split(" Copyright")[0] if lines else "?"

    import aiohttp

    return (
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"{first_line(['nginx', '-v'])}, {first_line(['wrk', '-v'])}"
    )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 3 s, c = 1 and 64")
    ap.add_argument("--duration", type=int, help="seconds per measurement (default 5; quick 3)")
    ap.add_argument("--repeats", type=int, help="repeats per cell, medians reported (default 3)")
    ap.add_argument("--concurrency", help="comma-separated (default 1,16,64; quick 1,64)")
    ap.add_argument("--endpoints", default="responses,chat")
    ap.add_argument("--modes", default="json,stream")
    ap.add_argument(
        "--targets",
        default="direct,nginx-proxy,bastion,litellm",
        help="comma-separated subset of direct,nginx-proxy,bastion,litellm",
    )
    ap.add_argument(
        "--scale",
        action="store_true",
        help="also Bastion on PostgreSQL + Redis with 1 and 2 workers",
    )
    ap.add_argument("--warmup", type=int, default=1, help="warm-up seconds per endpoint/mode")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=1800,
        help="longest wait for other benchmarks to finish before a measurement",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = ap.parse_args()
    args.duration = args.duration or (3 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 3)
    concs = [int(c) for c in (args.concurrency or ("1,64" if args.quick else "1,16,64")).split(",")]
    scenarios = [
        (e, m, c) for e in args.endpoints.split(",") for m in args.modes.split(",") for c in concs
    ]

    missing = [tool for tool in ("wrk", "nginx", "taskset") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install -y wrk nginx util-linux)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 cores: the gateway on core 0, wrk + the upstream on core 1")

    bench = Bench(args)
    atexit.register(bench.cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    log(f"temporary files in {bench.tmp}")
    bench.start_upstream()

    wanted = args.targets.split(",")
    targets: list[Target] = []
    for name in wanted:
        if name == "direct":
            targets.append(bench.direct())
        elif name == "nginx-proxy":
            targets.append(bench.nginx_proxy())
        elif name == "bastion":
            targets.append(bench.bastion("bastion", "sqlite", "memory://", 1, GATEWAY_CORE))
        elif name == "litellm":
            t = bench.litellm()
            if t is None:
                log("LiteLLM unavailable: skipped")
            else:
                targets.append(t)
        else:
            sys.exit(f"unknown target {name!r}")
    if args.scale:
        targets.append(bench.bastion("bastion-pg-w1", "pg", REDIS_URL, 1, GATEWAY_CORE))
        targets.append(
            bench.bastion("bastion-pg-w2", "pg", REDIS_URL, 2, f"{GATEWAY_CORE},{LOAD_CORE}")
        )
        targets[-1].note = "shares core 1 with wrk + nginx (see caveat)"

    cells = len(scenarios) * len(targets) * args.repeats
    log(
        f"{len(targets)} targets × {len(scenarios)} scenarios × {args.repeats} repeats × "
        f"{args.duration} s ≈ {cells * args.duration / 60:.1f} min of measurement"
    )
    runs: list[dict] = []
    info: dict[str, dict] = {}
    for rep in range(args.repeats):
        for t in targets:
            try:
                bench.measure_target(t, scenarios, rep, runs, info)
            except RuntimeError as exc:
                log(f"  {t.name} failed: {exc}")
                if t.proc:
                    log(bench.procs.log_tail(t.proc, 1500))
                    bench.procs.stop(t.proc)
                    t.proc = None
                t.na.setdefault("all", str(exc))

    for t in targets:
        info.setdefault(t.name, {}).update(
            {"label": t.label, "cores": t.cores, "note": t.note, "na": t.na}
        )
    result = {
        "meta": {
            "started": started.isoformat(),
            "mode": "quick" if args.quick else "full",
            "duration_s": args.duration,
            "repeats": args.repeats,
            "concurrency": concs,
            "warmup_s": args.warmup,
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "layout": {"gateway": GATEWAY_CORE, "wrk+upstream": LOAD_CORE},
            "bastion_commit": bench.commit,
            "versions": versions(),
            "upstream_body_bytes": bench.body_sizes,
            "request_body_bytes": {
                f"{e}/{m}": p.stat().st_size for (e, m), p in bench.bodies.items()
            },
            "waited_for_others_s": round(bench.waited_s, 1),
            "remeasured_disturbed": bench.disturbed,
            "argv": sys.argv[1:],
        },
        "targets": info,
        "summary": summarize(runs, targets),
        "runs": runs,
    }
    md = markdown(result, targets, scenarios)
    print(md)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        text = json.dumps(result, indent=1)
        (RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json").write_text(text)
        (RESULTS / "latest.json").write_text(text)
        (RESULTS / "latest.md").write_text(md)
        log(
            f"saved bench/results/{stamp}{'-quick' if args.quick else ''}.json, latest.json, "
            "latest.md"
        )


if __name__ == "__main__":
    main()
