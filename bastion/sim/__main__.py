"""`python -m bastion.sim`: the simulator without the operator CLI (benchmarks, subprocesses)."""

import argparse

from bastion.sim.engine import DEFAULT_MODEL_NAME, LoadConfig
from bastion.sim.server import run

parser = argparse.ArgumentParser(prog="python -m bastion.sim", description=__doc__)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--ttft-ms", type=float, default=0.0)
parser.add_argument("--tokens-per-s", type=float, default=0.0)
parser.add_argument("--max-num-seqs", type=int, default=0)
parser.add_argument("--prefill-tokens-per-s", type=float, default=0.0)
parser.add_argument("--prefix-cache-tokens", type=int, default=0)
parser.add_argument("--kv-cache-tokens", type=int, default=0)
parser.add_argument("--served-model-name", default=DEFAULT_MODEL_NAME)
args = parser.parse_args()
try:
    load = LoadConfig(
        max_num_seqs=args.max_num_seqs,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        prefix_cache_tokens=args.prefix_cache_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
        served_model_name=args.served_model_name,
    )
except ValueError as e:
    parser.error(str(e))
run(host=args.host, port=args.port, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, load=load)
