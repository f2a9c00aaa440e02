"""Two versions of Bastion on one core at the same time: which serves more for the same CPU?

    .venv/bin/python -m bench.duel HEAD~1 HEAD                  # responses JSON, c=64
    .venv/bin/python -m bench.duel main WORKTREE --mode stream  # WORKTREE = uncommitted code

On a shared VM, single runs of the same code move by ±30 % with the host's load, which
hides a 10 % change. Here both gateways (each from its own `git worktree` of the
revision, SQLite + memory limiter, the benchmark's settings) are pinned to core 0
together, each with its own `wrk` on core 1 against one static nginx upstream, started
in the same second: the scheduler gives both the same CPU and the host's noise hits
both alike, so the ratio of their throughputs is the inverse ratio of their CPU per
request. Prints each round and the median ratio B ÷ A.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import common
from bench.run import BASTION_TOML, CREDIT_USD, KEY_RPM, KEY_TPM, run_wrk
from bench.upstream import PATHS, REQUESTS, write_configs


def checkout(rev: str, into: Path) -> Path:
    """The bastion/ package of ``rev`` (WORKTREE: the working tree as it is)."""
    if rev == "WORKTREE":
        return common.ROOT
    subprocess.run(
        ["git", "-C", str(common.ROOT), "worktree", "add", "--detach", "-f", str(into), rev],
        check=True,
        capture_output=True,
    )
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("a", help="git revision, or WORKTREE")
    ap.add_argument("b", help="git revision, or WORKTREE")
    ap.add_argument("--endpoint", default="responses", choices=["responses", "chat"])
    ap.add_argument("--mode", default="json", choices=["json", "stream"])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bastion-duel-"))
    procs = common.Procs(tmp)
    trees: list[Path] = []
    try:
        upstream = common.free_port()
        up_conf, _ = write_configs(tmp, upstream, common.free_port())
        nginx = procs.start("nginx", ["nginx", "-p", str(tmp), "-c", str(up_conf)], "1")
        common.wait_until(lambda: common.port_open(upstream), nginx, 10, "nginx upstream")
        body = tmp / "request.json"
        body.write_bytes(json.dumps(REQUESTS[args.endpoint, args.mode]).encode())
        sides = []
        for name, rev in (("A", args.a), ("B", args.b)):
            code = checkout(rev, tmp / f"tree-{name}")
            if code != common.ROOT:
                trees.append(code)
            port, db = common.free_port(), f"sqlite:///{tmp}/{name}.db"
            config = tmp / f"{name}.toml"
            config.write_text(
                BASTION_TOML.format(port=port, db=db, ratelimit="memory://", upstream=upstream)
            )
            key = common.make_key(db, CREDIT_USD, KEY_RPM, KEY_TPM)
            cmd = [common.PYTHON, "-m", "bastion", "serve", "--config", str(config)]
            proc = procs.start(name, cmd, "0", env={"PYTHONPATH": str(code)}, cwd=tmp)
            url = f"http://127.0.0.1:{port}"
            common.wait_until(lambda u=url: common.http_ok(u + "/healthz"), proc, 30, name)
            sides.append((f"{name} {rev}", url + PATHS[args.endpoint], key))

        ratios = []
        for round_ in range(args.rounds + 1):  # round 0 warms both up
            seconds = 2 if round_ == 0 else args.duration
            results: dict[str, dict] = {}

            def load(
                label: str, url: str, key: str, out: dict[str, dict] = results, s: int = seconds
            ) -> None:
                out[label] = run_wrk(url, body, key, args.concurrency, s)

            threads = [threading.Thread(target=load, args=side) for side in sides]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if round_ == 0:
                continue
            (la, ra), (lb, rb) = ((s[0], results[s[0]]) for s in sides)
            ratio = rb["rps"] / ra["rps"]
            ratios.append(ratio)
            print(
                f"round {round_}: {la}: {ra['rps']:,.0f}/s   {lb}: {rb['rps']:,.0f}/s   "
                f"B ÷ A = {ratio:.2f}",
                flush=True,
            )
        print(
            f"median B ÷ A = {statistics.median(ratios):.2f} "
            f"({args.endpoint} {args.mode}, c={args.concurrency}, same core, same time)"
        )
    finally:
        procs.stop_all()
        for tree in trees:
            subprocess.run(
                ["git", "-C", str(common.ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
            )


if __name__ == "__main__":
    sys.exit(main())
