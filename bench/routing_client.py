"""The routing benchmark's client: the plan's requests sent open-loop through the official
`openai` SDK (streaming chat), and Prometheus counters read from the replicas and the gateway.

Each session is one task: every turn is sent at its planned time, or when the session's
previous answer ended if that is later (a user does not ask before reading). Nothing
else waits for the answers, so a slow policy gets the same offered load as a fast one.
Per request it records the time to the first content delta (TTFT), the end-to-end time,
the usage (prompt, cached and output tokens) and whether the text is what the simulator
was expected to answer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import openai
import orjson

from bench.routing_workload import MODEL, Plan, Planned

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.MULTILINE)


@dataclass(slots=True)
class Outcome:
    """What one request did, times in seconds (``sent`` from the run's start)."""

    session: int
    turn: int
    app: int
    at: float
    sent: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    text_ok: bool = False
    error: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


def counters(text: str) -> dict[tuple[str, str], float]:
    """Every sample of a Prometheus text answer: (name, label block) → value."""
    return {(m[1], m[2] or ""): float(m[3]) for m in _SAMPLE.finditer(text)}


def total(samples: dict[tuple[str, str], float], name: str) -> float:
    """The sum of ``name`` over all its label sets."""
    return sum(v for (n, _), v in samples.items() if n == name)


def by_label(samples: dict[tuple[str, str], float], name: str, label: str) -> dict[str, float]:
    """``name``'s samples keyed by one label's value (summed over the other labels)."""
    out: dict[str, float] = {}
    pattern = re.compile(rf'{label}="([^"]*)"')
    for (n, labels), v in samples.items():
        if n == name and (m := pattern.search(labels)):
            out[m[1]] = out.get(m[1], 0.0) + v
    return out


async def scrape(http: httpx.AsyncClient, url: str) -> dict[tuple[str, str], float]:
    response = await http.get(url, timeout=5)
    response.raise_for_status()
    return counters(response.text)


async def one(client: openai.AsyncOpenAI, req: Planned, t0: float, out: Outcome) -> None:
    """Send one streamed chat request; fill ``out`` (an error is recorded, not raised).

    The SDK sends the request and reads the stream (``with_streaming_response``); the
    chunks are parsed here with orjson instead of as the SDK's typed objects, which cost
    0.33 ms of CPU each: at 60 requests/s of 46 chunks that is most of a core, on the
    machine that also runs the gateway and the replicas, and it would delay the very
    first deltas being timed.
    """
    body = req.body
    extra: dict[str, Any] = {"sim": body["sim"]}
    if "prompt_cache_key" in body:
        extra["prompt_cache_key"] = body["prompt_cache_key"]
    started = time.monotonic()
    out.sent = started - t0
    pieces: list[str] = []
    try:
        async with client.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=body["messages"],
            max_tokens=body["max_tokens"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        ) as response:
            async for line in response.iter_lines():
                if line.startswith("data: {"):
                    read_chunk(orjson.loads(line[6:]), started, out, pieces)
        out.e2e = time.monotonic() - started
        out.text_ok = "".join(pieces) == req.reply
        if not out.error and out.output_tokens == 0:
            out.error = "no usage in the stream"
    except (openai.APIError, httpx.HTTPError, orjson.JSONDecodeError) as exc:
        out.error = f"{type(exc).__name__}: {str(exc)[:200]}"


def read_chunk(chunk: dict[str, Any], started: float, out: Outcome, pieces: list[str]) -> None:
    """One `chat.completion.chunk`: the first content delta's time, the text, the usage."""
    if "error" in chunk:
        out.error = f"error event: {str(chunk['error'])[:200]}"
        return
    choices = chunk.get("choices")
    if choices:
        content = (choices[0].get("delta") or {}).get("content")
        if content:
            if out.ttft is None:
                out.ttft = time.monotonic() - started
            pieces.append(content)
    usage = chunk.get("usage")
    if usage:
        out.prompt_tokens = usage.get("prompt_tokens", 0)
        out.output_tokens = usage.get("completion_tokens", 0)
        out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def session(
    client: openai.AsyncOpenAI, turns: list[Planned], t0: float, outcomes: list[Outcome]
) -> None:
    for req in turns:
        delay = t0 + req.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        out = Outcome(req.session, req.turn, req.app, req.at)
        outcomes.append(out)
        await one(client, req, t0, out)


async def run_plan(
    base_url: str,
    key: str,
    plan: Plan,
    marks: dict[float, Callable[[], Awaitable[None]]],
) -> list[Outcome]:
    """Send the whole plan from now; at each ``marks`` time (s from the start) await its
    callback (a snapshot of the counters). Returns one outcome per request, all finished."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    outcomes: list[Outcome] = []
    # the SDK's first request imports and builds what later ones reuse (~0.2 s): not on
    # the clock, and not to a replica (the gateway answers /v1/models itself)
    await client.models.list()
    _ = client.chat.completions.with_streaming_response
    t0 = time.monotonic() + 0.2  # the tasks are all created before the first send

    async def at(when: float, callback: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(max(0.0, t0 + when - time.monotonic()))
        await callback()

    try:
        async with asyncio.TaskGroup() as tg:
            for turns in plan.sessions:
                if turns:
                    tg.create_task(session(client, turns, t0, outcomes))
            for when, callback in marks.items():
                tg.create_task(at(when, callback))
    finally:
        await client.close()
    return outcomes
