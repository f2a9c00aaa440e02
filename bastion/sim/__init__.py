"""Upstream simulator: a vLLM-like OpenAI-compatible server for tests and benchmarks.

What it serves and how it models an inference server: docs/simulator.md.

Public API:
- `create_app(ttft_ms, tokens_per_s, load)` / `run(host, port, ttft_ms, tokens_per_s, load)`:
  the server; `load` is a `LoadConfig` (batch size, prefill speed, prefix cache, KV capacity).
- `reply_text(body, endpoint=None, tokens=None)`: the exact text it answers.
- `usage_for(body, endpoint=None, tokens=None)`: (input_tokens, output_tokens) it reports.
- `reported_usage(body, endpoint=None, tokens=None, cached_tokens=None, reasoning_tokens=None)`:
  the whole reported `Usage` (cached and reasoning tokens too, `sim.report` applied).
- `plan_reply(...)`: the whole planned answer (text pieces or function call, truncation).
- `input_tokens_for(body, endpoint=None)`: the input-token formula alone.

`endpoint` is "responses" or "chat" (default: "chat" when the body has `messages`);
`tokens` is the `x-sim-tokens` header value, when the request sends one.
See docs/simulator.md.
"""

from bastion.sim.engine import LoadConfig
from bastion.sim.reply import (
    DEFAULT_TOKENS,
    Reply,
    Usage,
    input_tokens_for,
    last_user_text,
    plan_reply,
    reply_text,
    reported_usage,
    usage_for,
)
from bastion.sim.server import FAULTS, create_app, run

__all__ = [
    "DEFAULT_TOKENS",
    "FAULTS",
    "LoadConfig",
    "Reply",
    "Usage",
    "create_app",
    "input_tokens_for",
    "last_user_text",
    "plan_reply",
    "reply_text",
    "reported_usage",
    "run",
    "usage_for",
]
