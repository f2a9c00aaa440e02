"""Load signals out of vLLM's own reports: its Prometheus /metrics text and its ORCA header.

Only four gauges matter to routing, so the /metrics parser looks for just their sample
lines (``bytes.find`` per name, then the line's value) instead of parsing the whole
exposition: a real vLLM answer is 30-100 KB of histograms that routing never reads.
docs/choices.md (section P) has the numbers against prometheus_client's parser.

A vLLM process serves one model, but may report several series per gauge: one per
data-parallel engine (the ``engine`` label), or per ``model_name``. Queue lengths are
summed over them; KV-cache usage is averaged (each engine has its own cache, so 0.5
on two engines is half full, not full).
"""

from __future__ import annotations

import math

import orjson

WAITING = b"vllm:num_requests_waiting"
RUNNING = b"vllm:num_requests_running"
KV = b"vllm:kv_cache_usage_perc"
KV_OLD = b"vllm:gpu_cache_usage_perc"  # its name before vLLM 0.10; read when KV is absent
_HEADER_NAMES = {  # ORCA named_metrics → our names
    "num_requests_waiting": "waiting",
    "num_requests_running": "running",
    "kv_cache_usage_perc": "kv",
    "gpu_cache_usage_perc": "kv",
}


def parse_metrics(body: bytes) -> dict[str, float]:
    """``waiting``, ``running`` and ``kv`` (0 to 1) from a /metrics answer: those found."""
    found: dict[str, float] = {}
    if (waiting := _total(body, WAITING)) is not None:
        found["waiting"] = waiting[0]
    if (running := _total(body, RUNNING)) is not None:
        found["running"] = running[0]
    kv = _total(body, KV) or _total(body, KV_OLD)
    if kv is not None:
        found["kv"] = kv[0] / kv[1]
    return found


def _total(body: bytes, name: bytes) -> tuple[float, int] | None:
    """The sum of the samples of gauge ``name`` and how many there were; None if none.

    A sample line starts with the name, then ``{labels}`` or a blank, then the value
    (and maybe a timestamp). "# HELP name" and longer names (``name_by_reason``) are
    not sample lines of it."""
    total, count, size = 0.0, 0, len(name)
    at = body.find(name)
    while at >= 0:
        after = at + size
        if at == 0 or body[at - 1] == 10:  # at a line start
            end = body.find(b"\n", after)
            line = body[after:] if end < 0 else body[after:end]
            value = _value(line)
            if value is not None:
                total += value
                count += 1
        at = body.find(name, after)
    return (total, count) if count else None


def _value(rest: bytes) -> float | None:
    """The value in what follows a sample's name: ``{labels} value [timestamp]``."""
    if rest[:1] == b"{":
        close = rest.rfind(b"}")  # label values may hold "}" only inside quotes, before it
        if close < 0:
            return None
        rest = rest[close + 1 :]
    elif rest[:1] not in (b" ", b"\t"):
        return None  # another metric whose name starts with this one
    fields = rest.split()
    if not fields:
        return None
    try:
        value = float(fields[0])
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_load_header(value: str) -> dict[str, float]:
    """vLLM's ORCA ``endpoint-load-metrics`` response header, TEXT or JSON form:

    ``TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3.0``
    ``JSON {"named_metrics": {"kv_cache_usage_perc": 0.4, "num_requests_waiting": 3.0}}``

    Returns the load figures it carries (vLLM sends waiting and KV usage; running when
    a server adds it); {} for anything else (BIN, or malformed)."""
    kind, _, data = value.strip().partition(" ")
    named: dict[str, object] = {}
    if kind.upper() == "TEXT":
        for pair in data.split(","):
            key, eq, number = pair.strip().partition("=")
            if eq and key.startswith("named_metrics."):
                named[key[14:]] = number.strip()
    elif kind.upper() == "JSON":
        try:
            report = orjson.loads(data)
        except orjson.JSONDecodeError:
            return {}
        inner = report.get("named_metrics") if isinstance(report, dict) else None
        named = inner if isinstance(inner, dict) else {}
    found: dict[str, float] = {}
    for key, raw in named.items():
        ours = _HEADER_NAMES.get(key)
        if ours is None or isinstance(raw, bool) or not isinstance(raw, str | int | float):
            continue
        try:
            number = float(raw)
        except ValueError:
            continue
        if math.isfinite(number) and number >= 0:
            found[ours] = number
    return found
