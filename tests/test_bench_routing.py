"""The routing benchmark (bench/routing.py) end to end in a tiny configuration, and its
workload planner.

The run is the real command: four `bastion sim` replicas and a gateway per (workload,
policy), the `openai` SDK as client, about a second of load each. It checks that the
report has every policy and workload, that the numbers hang together (the usage and the
replicas' own counters agree, the answers are the planned ones), never how fast anything
was: that is what the full benchmark is for.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bastion.sim.prefixcache import block_hashes, token_records
from bench.routing import KEYED, POLICIES
from bench.routing_workload import APPS, WORKLOADS, plan

ROOT = Path(__file__).resolve().parent.parent
CELLS = [(w, p) for w in WORKLOADS for p in POLICIES if p in KEYED.get(w, POLICIES)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("routing")
    argv = ["--duration", "0.6", "--warmup", "0.4", "--rate", "20", "--seed", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.routing", *argv, "--max-wait", "0", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "routing-latest.json").read_text())
    with gzip.open(out / "routing-latest-requests.json.gz", "rt") as f:
        result["requests"] = json.load(f)
    result["markdown"] = (out / "routing-latest.md").read_text()
    return result


def test_the_benchmark_reports_every_policy_and_workload_with_consistent_numbers(
    report: dict[str, Any],
) -> None:
    """One test (one run of the benchmark, also under pytest-xdist, where a module
    fixture would run once per worker that gets a test of the module)."""
    assert [(r["workload"], r["policy"]) for r in report["rows"]] == CELLS
    runs = sorted(k for k in report["requests"] if k != "columns")
    assert runs == sorted(f"{w}/{p}" for w, p in CELLS)
    md = report["markdown"]
    for workload in WORKLOADS:
        assert f"## {workload}\n" in md
    for policy in POLICIES:
        assert f"| {policy} |" in md
    assert "--rate 20" in md and report["meta"]["rate"] == 20
    # the three targets (uniform for each of two policies), each decided, and two
    # reference lines; whether they pass is not asserted here
    decided = [t for t in report["targets"] if t["pass"] is not None]
    assert len(decided) == 4 and all(isinstance(t["pass"], bool) for t in decided)
    assert len(report["targets"]) == 6
    assert md.count("**PASS**") + md.count("**FAIL**") == 4

    for row in report["rows"]:
        cell = f"{row['workload']}/{row['policy']}"
        assert row["requests"] > 0, cell
        assert row["errors"] == 0, (cell, row["error_samples"])
        assert row["text_mismatches"] == 0, cell
        t = row["ttft_ms"]
        assert 0 < t["p50"] <= t["p90"] <= t["p99"], cell
        assert t["p50"] < row["e2e_ms"]["p50"], cell
        assert 1_800 < row["mean_prompt_tokens"] < 2_800, cell
        # the usage and the replicas' prefix-cache counters count the same tokens
        assert row["cache_hit_rate_run_usage"] == row["cache_hit_rate_run_sims"], cell
        # every request of the run went to exactly one replica, once
        outcomes = report["requests"][cell]
        assert len(outcomes[0]) == len(report["requests"]["columns"])
        assert sum(row["gateway_attempts"].values()) == len(outcomes), cell
        assert set(row["gateway_attempts"]) == {"r1", "r2", "r3", "r4"}, cell
        assert 0 < row["slot_utilization"] < 1, cell
        if row["workload"] == "uniform":
            assert row["cache_hit_rate_run_usage"] == 0, cell
        if row["policy"] == "least_outstanding":
            assert sum(row["fallbacks"].values()) == 0 and row["spills"]["total"] == 0, cell


def test_the_plan_is_deterministic_and_workloads_differ_only_in_sharing() -> None:
    sessions = plan("shared-prefix", 30, 8, seed=5).sessions
    shared = [r for s in sessions for r in s]
    assert [(r.at, r.body) for r in shared] == [
        (r.at, r.body) for r in plan("shared-prefix", 30, 8, seed=5).requests()
    ]
    uniform = plan("uniform", 30, 8, seed=5).requests()
    keyed = plan("shared-prefix+key", 30, 8, seed=5).requests()
    assert [r.at for r in uniform] == [r.at for r in shared] == [r.at for r in keyed]
    # the same sizes: the system prompt's text is replaced by text of the same length
    assert [len(r.body["messages"][0]["content"]) for r in uniform] == [
        len(r.body["messages"][0]["content"]) for r in shared
    ]
    assert {r.body["prompt_cache_key"] for r in keyed} == {f"session-{r.session}" for r in keyed}
    assert all("prompt_cache_key" not in r.body for r in shared + uniform)

    def first_block(body: dict[str, Any]) -> bytes:
        return block_hashes(token_records(body, "chat"))[0]

    # uniform: no two requests share even their first 16-token block; shared: one per app
    assert len({first_block(r.body) for r in uniform}) == len(uniform)
    assert len({first_block(r.body) for r in shared}) == len({r.app for r in shared})
    # Zipf: the first application is the most popular, and many are used
    counts = [sum(1 for r in shared if r.app == a) for a in range(APPS)]
    assert counts[0] == max(counts) and sum(1 for c in counts if c) >= APPS // 2
    # sessions have 2 to 4 turns, each one message pair longer than the last
    for session in sessions:
        sizes = [len(r.body["messages"]) for r in session]
        assert sizes == [2 + 2 * i for i in range(len(session))]
