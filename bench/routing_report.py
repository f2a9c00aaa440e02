"""The routing benchmark's figures per (workload, policy), its targets, and its markdown.

Latency and cache figures come from the requests sent in the measurement window (after
the warm-up); the per-replica split and the slot utilization from the replicas' own
counters between the start of the window and the end of the run; the whole-run cache hit
rate from the usage is cross-checked with the replicas' `vllm:prefix_cache_*` counters
(they count the same tokens, so they must agree).
"""

from __future__ import annotations

from typing import Any

from bench.routing_workload import SimShape

BASELINE = "least_outstanding"
TTFT_GAIN = 0.30  # the target: at least 30 % lower p50 TTFT than the baseline on shared-prefix
UNIFORM_SLACK = 0.05  # and no more than 5 % higher on uniform
SPREAD_LIMIT = 1.5  # no replica above 1.5 × the mean load


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile, nearest rank (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n × p / 100), at least 1
    return ordered[int(rank) - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def summarize(run: dict[str, Any], window: tuple[float, float], shape: SimShape) -> dict[str, Any]:
    """One run's figures. ``run`` holds ``outcomes`` (rows), the replicas' counters at the
    start of the window (``sims_start``) and at the end (``sims_end``), the gateway's
    counters at the end (``gateway``), and the wall time between the two snapshots."""
    start, end = window
    seconds = end - start
    rows = run["outcomes"]
    inside = [o for o in rows if start <= o["at"] < end]
    ok = [o for o in inside if not o["error"]]
    ttft = [o["ttft"] for o in ok if o["ttft"] is not None]
    e2e = [o["e2e"] for o in ok if o["e2e"] is not None]
    prefill = [(o["prompt_tokens"] - o["cached_tokens"]) / shape.prefill_tokens_per_s for o in ok]
    warm = [o for o in ok if o["cached_tokens"] * 2 >= o["prompt_tokens"]]
    cold = [o for o in ok if o["cached_tokens"] * 2 < o["prompt_tokens"]]
    done = [o for o in rows if not o["error"]]
    sims0, sims1 = run["sims_start"], run["sims_end"]
    names = sorted(sims1)
    served = {n: round(sims1[n]["requests"] - sims0.get(n, {}).get("requests", 0)) for n in names}
    mean_served = sum(served.values()) / max(len(served), 1)

    def delta(field: str) -> float:
        return sum(sims1[n][field] - sims0.get(n, {}).get(field, 0.0) for n in names)

    busy = delta("e2e_sum") - delta("queue_sum")
    hits = sum(s["prefix_hits"] for s in sims1.values())
    queries = sum(s["prefix_queries"] for s in sims1.values())
    gateway = run["gateway"]
    return {
        "policy": run["policy"],
        "workload": run["workload"],
        "requests": len(inside),
        "errors": len(inside) - len(ok),
        "error_samples": sorted({o["error"] for o in inside if o["error"]})[:3],
        "text_mismatches": sum(1 for o in ok if not o["text_ok"]),
        "ttft_ms": {
            "p50": ms(pct(ttft, 50)),
            "p90": ms(pct(ttft, 90)),
            "p99": ms(pct(ttft, 99)),
            "mean": ms(sum(ttft) / len(ttft)) if ttft else None,
        },
        "e2e_ms": {"p50": ms(pct(e2e, 50)), "p99": ms(pct(e2e, 99))},
        "prefill_ms_model": {"p50": ms(pct(prefill, 50)), "p99": ms(pct(prefill, 99))},
        # TTFT is bimodal: a request finds its prefix cached (a few ms) or prefills it
        "warm_share": ratio(len(warm), len(ok)),
        "ttft_ms_warm_p50": ms(pct([o["ttft"] for o in warm if o["ttft"] is not None], 50)),
        "ttft_ms_cold_p50": ms(pct([o["ttft"] for o in cold if o["ttft"] is not None], 50)),
        "completed_rps": round(len(ok) / seconds, 2),
        "output_tokens_per_s": round(sum(o["output_tokens"] for o in ok) / seconds, 1),
        "mean_prompt_tokens": round(sum(o["prompt_tokens"] for o in ok) / max(len(ok), 1), 1),
        "cache_hit_rate": ratio(
            sum(o["cached_tokens"] for o in ok), sum(o["prompt_tokens"] for o in ok)
        ),
        "cache_hit_rate_run_usage": ratio(
            sum(o["cached_tokens"] for o in done), sum(o["prompt_tokens"] for o in done)
        ),
        "cache_hit_rate_run_sims": ratio(hits, queries),
        "per_replica": served,
        "max_over_mean": ratio(max(served.values(), default=0), mean_served),
        "slot_utilization": ratio(busy, len(names) * shape.max_num_seqs * run["snapshot_wall_s"]),
        "replica_ttft_ms_mean": ms(ratio(delta("ttft_sum"), delta("ttft_count"))),
        "replica_queue_ms_mean": ms(ratio(delta("queue_sum"), delta("queue_count"))),
        "gateway_attempts": gateway["attempts"],
        "fallbacks": gateway["fallbacks"],
        "spills": gateway["spills"],
        # first turns only: later ones also wait for their session's previous answer
        "send_lag_ms_p99": ms(
            pct([o["sent"] - o["at"] for o in inside if o["sent"] and o["turn"] == 0], 99)
        ),
        "foreign_cpu_cores": run.get("foreign_cpu_cores"),
        "cpu_cores": run.get("cpu_cores"),
    }


def brief(row: dict[str, Any]) -> str:
    """One line of a run's figures, for the progress log."""
    t = row["ttft_ms"]
    return (
        f"TTFT p50 {t['p50']} ms p99 {t['p99']} ms (replicas: mean {row['replica_ttft_ms_mean']}"
        f" ms, queue {row['replica_queue_ms_mean']} ms); cache hit {row['cache_hit_rate']}; "
        f"per replica {list(row['per_replica'].values())}; slots {row['slot_utilization']}; "
        f"errors {row['errors']}; CPU {row['cpu_cores']}; send lag p99 {row['send_lag_ms_p99']} ms"
    )


def lower(value: float, base: float) -> str:
    """'47% lower' or '5% higher': how ``value`` compares with ``base``."""
    cut = 1 - value / base
    return f"{cut:.0%} lower" if cut >= 0 else f"{-cut:.0%} higher"


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The PASS/FAIL lines: each names its figures, so a FAIL says by how much."""
    cell = {(r["workload"], r["policy"]): r for r in rows}
    out: list[dict[str, Any]] = []

    def p50(workload: str, policy: str) -> float | None:
        r = cell.get((workload, policy))
        return r["ttft_ms"]["p50"] if r else None

    base = p50("shared-prefix", BASELINE)
    found = {
        p: v
        for p in ("prefix_affinity", "load_aware")
        if (v := p50("shared-prefix", p)) is not None
    }
    if base and found:
        best = min(found, key=found.__getitem__)
        cut = 1 - found[best] / base
        out.append(
            {
                "target": f"shared-prefix: prefix_affinity or load_aware p50 TTFT ≥ "
                f"{TTFT_GAIN:.0%} lower than {BASELINE}",
                "pass": cut >= TTFT_GAIN,
                "detail": ", ".join(f"{p} {v} ms" for p, v in found.items())
                + f" vs {BASELINE} {base} ms: best {best}, {lower(found[best], base)}",
            }
        )
    base_r = cell.get(("shared-prefix", BASELINE), {}).get("replica_ttft_ms_mean")
    for policy in ("prefix_affinity", "load_aware"):
        r = cell.get(("shared-prefix", policy), {}).get("replica_ttft_ms_mean")
        if base_r and r is not None:
            out.append(
                {
                    "target": f"(reference, not a target) shared-prefix: {policy} mean TTFT at "
                    "the replicas, free of the client's and the machine's noise",
                    "pass": None,
                    "detail": f"{r} ms vs {BASELINE} {base_r} ms ({lower(r, base_r)})",
                }
            )
    base_u = p50("uniform", BASELINE)
    for policy in ("load_aware", "prefix_affinity"):
        v = p50("uniform", policy)
        if base_u and v is not None:
            out.append(
                {
                    "target": f"uniform: {policy} p50 TTFT within {UNIFORM_SLACK:.0%} of "
                    f"{BASELINE} (no more than {1 + UNIFORM_SLACK:.2f}×)",
                    "pass": v <= base_u * (1 + UNIFORM_SLACK),
                    "detail": f"{v} ms vs {base_u} ms ({v / base_u:.3f}×)",
                }
            )
    worst = max(rows, key=lambda r: r["max_over_mean"] or 0.0, default=None)
    if worst is not None:
        out.append(
            {
                "target": f"no replica above {SPREAD_LIMIT}× the mean load (every run)",
                "pass": (worst["max_over_mean"] or 0.0) <= SPREAD_LIMIT,
                "detail": f"worst {worst['max_over_mean'] or 0:.2f}× ({worst['workload']}, "
                f"{worst['policy']}: {worst['per_replica']})",
            }
        )
    return out


def _v(x: object) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.1f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    setup = meta["setup"]
    window = result["rows"][0]["requests"] if result["rows"] else 0
    lines = [
        "# Routing benchmark: does the policy pay?",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['started']} (UTC); Bastion {meta['bastion_commit']}",
        f"- machine: {meta['machine']}",
        f"- fleet: {setup['replicas']} × `bastion sim {' '.join(setup['sim_args'])}`, one "
        f"gateway per run (SQLite, memory limiter), routing defaults "
        f"({setup['routing_defaults']})",
        f"- capacity with nothing cached: {setup['replicas']} replicas × "
        f"{setup['max_num_seqs']} slots ÷ {setup['service_s_cold']} s per request "
        f"(mean {setup['mean_prompt_tokens']} prompt tokens ÷ {setup['prefill_tokens_per_s']:g}"
        f" tokens/s prefill + ({setup['mean_output_tokens']} − 1) output tokens ÷ "
        f"{setup['tokens_per_s']:g} tokens/s) = **{setup['capacity_rps_cold']} req/s**",
        f"- offered load: **{meta['rate']} req/s** ({meta['rate_note']}), sessions starting as "
        f"a Poisson process (seed {meta['seed']}); warm-up {meta['warmup_s']:g} s, then "
        f"{meta['duration_s']:g} s measured per (workload, policy); with this seed, "
        f"{window:,} requests ({window / meta['duration_s']:.1f}/s) fall in each window",
        "",
        "TTFT = time to the first content delta, as the `openai` SDK client saw it. Cache hit "
        "= cached ÷ prompt tokens from the usage (window; in brackets: whole run from the "
        "usage / from the replicas' `vllm:prefix_cache_*` counters). Per replica = requests "
        "each replica completed (its `vllm:request_success_total`). Slots = mean share of "
        "the batch slots busy (prefill + decode, from the replicas' e2e − queue times). "
        "Every request's own figures are in routing-latest-requests.json.gz.",
        "",
    ]
    for workload in meta["workloads"]:
        rows = [r for r in result["rows"] if r["workload"] == workload]
        if not rows:
            continue
        lines += [
            f"## {workload}",
            "",
            "| policy | requests | errors | TTFT p50 | p90 | p99 | mean | at the replicas: "
            "TTFT mean (queue) | e2e p50 | req/s | out tok/s | cache hit | per replica "
            "| max/mean | slots | spills / fallbacks |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|--:|--:|--:|",
        ]
        for r in rows:
            t = r["ttft_ms"]
            lines.append(
                f"| {r['policy']} | {r['requests']:,} | {r['errors']} | {_v(t['p50'])} ms | "
                f"{_v(t['p90'])} | {_v(t['p99'])} | {_v(t['mean'])} | "
                f"{_v(r['replica_ttft_ms_mean'])} ({_v(r['replica_queue_ms_mean'])}) | "
                f"{_v(r['e2e_ms']['p50'])} | "
                f"{_v(r['completed_rps'])} | {_v(r['output_tokens_per_s'])} | "
                f"{_share(r['cache_hit_rate'])} ({_share(r['cache_hit_rate_run_usage'])} / "
                f"{_share(r['cache_hit_rate_run_sims'])}) | "
                f"{' '.join(str(v) for v in r['per_replica'].values())} | "
                f"{_v(r['max_over_mean'])} | {_share(r['slot_utilization'])} | "
                f"{sum(r['spills'].values()):,} / {sum(r['fallbacks'].values()):,} |"
            )
        lines.append("")
    lines += ["## Targets", ""]
    for t in result["targets"]:
        verdict = {True: "**PASS** ", False: "**FAIL** ", None: ""}[t["pass"]]
        lines.append(f"- {verdict}{t['target']}: {t['detail']}")
    notes = [
        f"- {r['workload']} / {r['policy']}: {_share(r['warm_share'])} of the requests found "
        f"at least half their prompt cached (TTFT p50 {_v(r['ttft_ms_warm_p50'])} ms), the "
        f"others {_v(r['ttft_ms_cold_p50'])} ms"
        for r in result["rows"]
        if r["workload"] != "uniform"
    ]
    notes += [
        f"- {r['workload']} / {r['policy']}: {r['text_mismatches']} answers differed from the "
        "planned text"
        for r in result["rows"]
        if r["text_mismatches"]
    ]
    notes += [
        f"- {r['workload']} / {r['policy']}: errors {r['error_samples']}"
        for r in result["rows"]
        if r["errors"]
    ]
    lags = [r["send_lag_ms_p99"] for r in result["rows"] if r["send_lag_ms_p99"] is not None]
    foreign = [r["foreign_cpu_cores"] for r in result["rows"] if r["foreign_cpu_cores"]]
    notes.append(
        f"- client send lag p99 (sent − planned, sessions' first turns): at most "
        f"{max(lags, default=0):.0f} ms; other load on the machine during the runs: up to "
        f"{max(foreign, default=0):.2f} cores"
    )
    lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"
