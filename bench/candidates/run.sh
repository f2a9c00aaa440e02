#!/usr/bin/env bash
# Reproduce docs/choices.md: bash bench/candidates/run.sh [A] [B] [S]   (DUR=6 REPS=3 by default)
# Needs: apt-get install -y wrk nginx; 2+ cores (server pinned to core 0, wrk + upstream to core 1).
set -euo pipefail
cd "$(dirname "$0")"
V=../.venv-candidates
if [ ! -x "$V/bin/python" ]; then
  python3 -m venv "$V"
  "$V/bin/pip" install -q aiohttp uvloop orjson msgspec uvicorn httptools granian httpx \
    'httpcore[asyncio]' anyio 'pyreqwest>=0.15,<0.16'
fi
"$V/bin/pip" list 2>/dev/null | grep -iE '^(aiohttp|uvloop|orjson|msgspec|uvicorn|httptools|granian|httpx|httpcore|pyreqwest) '
"$V/bin/python" run.py "$@"
taskset -c 0 "$V/bin/python" json_bench.py
