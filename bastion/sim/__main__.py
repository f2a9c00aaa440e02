"""`python -m bastion.sim`: the simulator without the operator CLI (benchmarks, subprocesses)."""

import argparse

from bastion.sim.server import run

parser = argparse.ArgumentParser(prog="python -m bastion.sim", description=__doc__)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--ttft-ms", type=float, default=0.0)
parser.add_argument("--tokens-per-s", type=float, default=0.0)
args = parser.parse_args()
run(host=args.host, port=args.port, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s)
