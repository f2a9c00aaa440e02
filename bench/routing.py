"""Does routing pay? Each policy against the same open-loop load on four simulated vLLM
replicas, with shared system prompts and without.

    .venv/bin/python -m bench.routing                  # 7 runs of ~55 s each, ~7 min
    .venv/bin/python -m bench.routing --quick          # a smoke run, ~2 min
    .venv/bin/python -m bench.routing --rate 50 --duration 60 --seed 7

Per (workload, policy) it starts four fresh `bastion sim` replicas with the load model
on and one fresh gateway (SQLite, a funded key, high limits) whose only model routes
over them with that policy; fresh, so no run inherits another's prefix cache. Each
replica has a batch of 8, prefills 20,000 tokens/s, decodes 100 tokens/s per sequence,
and has a prefix cache of 10,000 tokens: five of the twenty applications' system
prompts, so the fleet holds all of them only if the placement partitions them.

The offered rate is 65 % of the fleet's capacity with nothing cached: 4 replicas × 8
slots ÷ the mean time a request holds a slot (its prompt ÷ the prefill speed, plus its
output ÷ the decode speed), from the planned requests (bench/routing_workload.py). The
client sends them with the official `openai` SDK, streaming, and records TTFT,
end-to-end time and usage per request (bench/routing_client.py). Neither the gateway
nor the simulator says which replica served a request, so the split per replica comes
from the replicas' own counters (and the gateway's). Results:
bench/results/routing-latest.md, .json and -requests.json.gz (bench/routing_report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import gzip
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop

from bench import common
from bench.routing_client import Outcome, by_label, counters, run_plan, scrape, total
from bench.routing_report import brief, markdown, summarize, targets
from bench.routing_workload import MODEL, WORKLOADS, Plan, SimShape, capacity, plan
from bench.run import CREDIT_USD, KEY_RPM, KEY_TPM, bastion_commit, cpu_model

POLICIES = ("least_outstanding", "load_aware", "prefix_affinity")
KEYED = {"shared-prefix+key": ("prefix_affinity",)}  # only prefix_affinity reads the key
REPLICAS = 4
UTILIZATION = 0.65  # offered load, as a share of the capacity with nothing cached
RESULTS = common.ROOT / "bench" / "results"
GATEWAY_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
max_body_bytes = 4_000_000

[database]
url = "sqlite:///{tmp}/{name}.db"

[ratelimit]
url = "memory://"

{upstreams}
[[models]]
id = "{model}"
endpoints = ["chat"]
upstreams = [{names}]
routing = "{policy}"
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 4096
"""
UPSTREAM_TOML = """\
[[upstreams]]
name = "{name}"
url = "http://127.0.0.1:{port}/v1"
read_timeout_s = 120
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sim_figures(samples: dict[tuple[str, str], float]) -> dict[str, float]:
    """What the report needs from one replica's /metrics."""
    return {
        "requests": total(samples, "vllm:request_success_total"),
        "prefix_queries": total(samples, "vllm:prefix_cache_queries_total"),
        "prefix_hits": total(samples, "vllm:prefix_cache_hits_total"),
        "e2e_sum": total(samples, "vllm:e2e_request_latency_seconds_sum"),
        "queue_sum": total(samples, "vllm:request_queue_time_seconds_sum"),
        "queue_count": total(samples, "vllm:request_queue_time_seconds_count"),
        "ttft_sum": total(samples, "vllm:time_to_first_token_seconds_sum"),
        "ttft_count": total(samples, "vllm:time_to_first_token_seconds_count"),
    }


def gateway_figures(samples: dict[tuple[str, str], float]) -> dict[str, dict[str, int]]:
    """The gateway's own account of its choices: attempts per replica, fallbacks, spills."""

    def ints(values: dict[str, float]) -> dict[str, int]:
        return {k: round(v) for k, v in values.items()}

    return {
        "attempts": ints(by_label(samples, "bastion_upstream_requests_total", "upstream")),
        "fallbacks": ints(by_label(samples, "bastion_routing_fallbacks_total", "reason")),
        "spills": {"total": round(total(samples, "bastion_routing_affinity_spills_total"))},
    }


class Bench:
    """Processes and temporary files of one benchmark invocation."""

    def __init__(self, args: argparse.Namespace, shape: SimShape) -> None:
        self.args = args
        self.shape = shape
        self.tmp = Path(tempfile.mkdtemp(prefix="bastion-routing-"))
        self.procs = common.Procs(self.tmp)

    def start_fleet(self, label: str, policy: str) -> tuple[dict[str, str], str, str]:
        """Four fresh replicas and a gateway routing over them, started together: (replica
        → its /metrics URL, gateway URL, key). The gateway's first health check comes after
        its interval (5 s), when the replicas are up. Ready when the gateway has every
        replica in rotation and, for the policies that read them, a load reading of each."""
        sims: dict[str, str] = {}
        blocks = []
        started = []
        for i in range(REPLICAS):
            name, port = f"r{i + 1}", common.free_port()
            cmd = [common.PYTHON, "-m", "bastion.sim", "--port", str(port), *self.shape.args()]
            started.append(self.procs.start(f"{label}-{name}", cmd, None))
            sims[name] = f"http://127.0.0.1:{port}/metrics"
            blocks.append(UPSTREAM_TOML.format(name=name, port=port))
        port = common.free_port()
        config = self.tmp / f"{label}.toml"
        config.write_text(
            GATEWAY_TOML.format(
                port=port,
                tmp=self.tmp,
                name=label,
                upstreams="\n".join(blocks),
                model=MODEL,
                names=", ".join(f'"{n}"' for n in sims),
                policy=policy,
            )
        )
        key = common.make_key(f"sqlite:///{self.tmp}/{label}.db", CREDIT_USD, KEY_RPM, KEY_TPM)
        cmd = [common.PYTHON, "-m", "bastion", "serve", "--config", str(config)]
        proc = self.procs.start(f"{label}-gateway", cmd, None, cwd=self.tmp)
        url = f"http://127.0.0.1:{port}"
        for sim, (name, metrics) in zip(started, sims.items(), strict=True):
            health = metrics.removesuffix("/metrics") + "/health"
            common.wait_until(lambda u=health: common.http_ok(u), sim, 30, name)
        common.wait_until(lambda: self.ready(url, policy), proc, 30, f"{label} fleet")
        return sims, url, key

    @staticmethod
    def ready(url: str, policy: str) -> bool:
        """Every replica in rotation (health checked), with a load reading if needed."""
        try:
            samples = counters(httpx.get(url + "/metrics", timeout=5).text)
        except httpx.HTTPError:
            return False
        up = by_label(samples, "bastion_upstream_available", "upstream")
        if len(up) < REPLICAS or min(up.values()) < 1:
            return False
        read = by_label(samples, "bastion_upstream_load_running", "upstream")
        return policy == "least_outstanding" or len(read) == REPLICAS

    def run(self, workload: str, policy: str, requests: Plan) -> dict[str, Any]:
        """One (workload, policy): a fresh fleet, the plan sent, the fleet stopped."""
        label = f"{workload}-{policy}".replace("+", "-")
        if self.args.max_wait > 0:
            common.wait_quiet(self.args.max_wait, log)
        try:
            sims, url, key = self.start_fleet(label, policy)
        except RuntimeError:
            for proc in self.procs.running:
                log(f"{proc.bench_name}: {self.procs.log_tail(proc, 1500)}")  # type: ignore[attr-defined]
            raise
        foreign = common.ForeignCPU()
        cpu0, wall0 = self.cpu(), time.monotonic()
        snapshot: dict[str, Any] = {}

        async def go() -> list[Any]:
            async with httpx.AsyncClient() as http:

                async def sims_now() -> dict[str, dict[str, float]]:
                    got = await asyncio.gather(*(scrape(http, u) for u in sims.values()))
                    return {n: sim_figures(s) for n, s in zip(sims, got, strict=True)}

                async def window_starts() -> None:
                    snapshot["t"] = time.monotonic()
                    snapshot["sims_start"] = await sims_now()

                outcomes = await run_plan(
                    url + "/v1", key, requests, {self.args.warmup: window_starts}
                )
                snapshot["sims_end"] = await sims_now()
                snapshot["wall"] = time.monotonic() - snapshot["t"]
                gw = await scrape(http, url + "/metrics")
                snapshot["gateway"] = gateway_figures(gw)
                return outcomes

        try:
            outcomes = uvloop.run(go())
            wall = time.monotonic() - wall0
            cores = {k: round((v - cpu0[k]) / wall, 2) for k, v in self.cpu().items()}
        finally:
            for proc in list(self.procs.running):
                self.procs.stop(proc)
        return {
            "workload": workload,
            "policy": policy,
            "outcomes": [o.row() for o in outcomes],
            "sims_start": snapshot["sims_start"],
            "sims_end": snapshot["sims_end"],
            "snapshot_wall_s": snapshot["wall"],
            "gateway": snapshot["gateway"],
            "foreign_cpu_cores": round(foreign.cores(), 2),
            "cpu_cores": cores,
        }

    def close(self) -> None:
        """Stop whatever still runs; remove the temporary files (configs, stores, logs)."""
        self.procs.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far: this process (the client), the gateway, the replicas."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {"client": usage.ru_utime + usage.ru_stime, "gateway": 0.0, "replicas": 0.0}
        for proc in self.procs.running:
            name = "gateway" if getattr(proc, "bench_name", "").endswith("-gateway") else "replicas"
            out[name] += common.cpu_s(proc.pid)
        return out


def per_request(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Every request's outcome, by run, as columns and rows (times in seconds, 0.1 ms)."""
    columns = list(Outcome.__dataclass_fields__)
    out: dict[str, Any] = {"columns": columns}
    for run, _ in runs:
        out[f"{run['workload']}/{run['policy']}"] = [
            [round(v, 4) if isinstance(v, float) else v for v in (o[c] for c in columns)]
            for o in run["outcomes"]
        ]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 s warm-up, 10 s measured")
    ap.add_argument("--duration", type=float, help="seconds measured per run (default 40)")
    ap.add_argument("--warmup", type=float, help="seconds of load before the window (default 10)")
    ap.add_argument(
        "--rate", type=float, help=f"requests/s (default {UTILIZATION:.0%} of capacity)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--max-wait", type=float, default=300, help="longest wait for a quiet machine")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where routing-latest.* go")
    ap.add_argument("--no-save", action="store_true", help="print the report only")
    args = ap.parse_args(argv)
    args.duration = args.duration or (10.0 if args.quick else 40.0)
    args.warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    policies = args.policies.split(",")
    workloads = args.workloads.split(",")
    for p in policies:
        if p not in POLICIES:
            sys.exit(f"unknown policy {p!r}; one of {', '.join(POLICIES)}")
    for w in workloads:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w!r}; one of {', '.join(WORKLOADS)}")
    shape = SimShape()
    seconds = args.warmup + args.duration
    nominal = capacity(shape, REPLICAS, plan("shared-prefix", 50, seconds, args.seed).requests())
    rate = args.rate or round(UTILIZATION * nominal["capacity_rps_cold"], 1)
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    bench = Bench(args, shape)
    atexit.register(bench.close)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    log(f"{rate} req/s offered; capacity with nothing cached {nominal['capacity_rps_cold']} req/s")
    runs = []
    for workload in workloads:
        requests = plan(workload, rate, seconds, args.seed)
        for policy in policies:
            if policy not in KEYED.get(workload, POLICIES):
                continue
            log(f"{workload} / {policy}: {len(requests.requests())} requests over {seconds:g} s")
            run = bench.run(workload, policy, requests)
            row = summarize(run, (args.warmup, seconds), shape)
            log("  " + brief(row))
            runs.append((run, row))
    rows = [row for _, row in runs]
    cap = capacity(shape, REPLICAS, plan("shared-prefix", rate, seconds, args.seed).requests())
    result = {
        "meta": {
            "command": shlex.join(["python", "-m", "bench.routing", *(argv or sys.argv[1:])]),
            "started": started.isoformat(),
            "bastion_commit": bastion_commit(),
            "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, shared with other work "
            "(processes not pinned; gateway, replicas and client share the cores)",
            "seed": args.seed,
            "rate": rate,
            "rate_note": "--rate"
            if args.rate
            else f"{UTILIZATION:.0%} of the capacity with nothing cached",
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "workloads": workloads,
            "policies": policies,
            "setup": {
                "replicas": REPLICAS,
                "sim_args": shape.args(),
                "max_num_seqs": shape.max_num_seqs,
                "prefill_tokens_per_s": shape.prefill_tokens_per_s,
                "tokens_per_s": shape.tokens_per_s,
                "routing_defaults": "scrape 1 s, stale after 3 s, affinity bound 1.25, "
                "affinity prefix 4,096 characters",
                **cap,
            },
        },
        "rows": rows,
        "targets": targets(rows),
    }
    text = markdown(result)
    print(text)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routing-latest.md").write_text(text)
        (args.out / "routing-latest.json").write_text(json.dumps(result, indent=1))
        with gzip.open(args.out / "routing-latest-requests.json.gz", "wt") as f:
            json.dump(per_request(runs), f)
        log(f"saved {args.out}/routing-latest.md, .json and -requests.json.gz")
    return result


if __name__ == "__main__":
    main()
