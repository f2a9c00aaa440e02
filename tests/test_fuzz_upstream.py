"""Property-based fuzzing of what an upstream sends: a hostile replica behind a real gateway.

A scripted upstream (raw TCP, on its own thread) answers each request with a valid
answer from the simulator's renderers (bastion.sim.wire), streamed or JSON, for either
endpoint, mangled by hypothesis: its writes split anywhere (down to single bytes), cut
short anywhere (then closed, or silent), its SSE line ends swapped among "\\n", "\\r\\n" and
"\\r", its body framed by Content-Length, chunks or the close, its usage bogus (null,
huge, negative, strings), its headers oversized, its content type wrong, garbage bytes
in its body or in place of HTTP, an event over ``server.max_event_bytes``, stray bytes
after the answer, or a 5xx. A `bastion serve` process relays it (read timeout 2 s).

For every example: the client gets an answer in time; never a 5xx but 502
upstream_error; a 200 JSON answer is the upstream's byte for byte; a stream that was
cut or broken ends with the stream error event, and (unless garbage was injected) every
event the upstream completed reached the client byte for byte, in one prefix of what it
sent. Afterwards the books balance: each row costs exactly its tokens' price, at most
one row per request, a row for every 200, the usage a clean answer reported is what was
charged, and balance = credit - sum(cost - uncharged) >= 0.

CI runs a fixed, derandomized set of examples; ``make fuzz`` runs many more with fresh
randomness (BASTION_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import pairwise

import httpx
import orjson
import pytest
from conftest import Gateway, free_port, start, stop
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from bastion.config import ServerConfig
from bastion.money import cost_nanos, parse_usd
from bastion.sim.reply import Usage, plan_reply
from bastion.sim.wire import ChatRender, ResponsesRender, error_object
from bastion.upstream_http import MAX_HEAD

EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="BASTION_FUZZ_EXAMPLES" not in os.environ,  # CI: the same examples each run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The gateway under test bounds one event at 64 KiB, not the default 8 MiB: the bound is
# the same code either way, and an 8 MiB event in every example that draws one made the
# run depend on which examples hypothesis drew (minutes, not seconds).
LIMIT = 65_536
assert LIMIT < ServerConfig.max_event_bytes
MODEL = "fuzz-model"
CREDIT = "1000"
PRICES = {"input": "1.00", "cached": "0.25", "output": "2.00"}
ERROR_EVENT = {  # how the gateway's own stream error event starts
    "responses": b'event: error\ndata: {"type":"error","error":{"type":"upstream_error",',
    "chat": b'data: {"error":{"type":"upstream_error",',
}
REASONS = {200: b"OK", 400: b"Bad Request", 500: b"Internal Server Error",
           502: b"Bad Gateway", 503: b"Service Unavailable"}  # fmt: skip


# ---- the scripted upstream ---------------------------------------------------------------


@dataclass
class Script:
    """What the upstream does with the next request(s)."""

    wire: bytes  # status line, headers and framed body, exactly as sent
    writes: list[int]  # where the wire is cut into separate writes
    pace: bool  # pause after each write, so that the gateway reads the pieces apart
    hang: bool  # after the wire, stay silent until the gateway hangs up (else close)
    keep_alive: bool  # the answer was whole and framed: serve the next request here
    trailing: bytes = b""  # stray bytes after a whole answer, on a connection kept open


class HostileUpstream:
    """A raw-TCP upstream on its own thread: GET (health checks) gets 200, POST the script."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.loop = asyncio.new_event_loop()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    continue
                found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(found.group(1)) if found else 0)
                script = self.script
                assert script is not None
                if not await self.play(script, reader, writer):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def play(
        self, script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        data = script.wire
        bounds = sorted({p % (len(data) + 1) for p in script.writes} | {0, len(data)})
        for a, b in pairwise(bounds):
            writer.write(data[a:b])
            await writer.drain()
            if script.pace:
                await asyncio.sleep(0.001)
        if script.trailing:
            await asyncio.sleep(0.005)
            writer.write(script.trailing)
            await writer.drain()
        if script.hang:
            with contextlib.suppress(TimeoutError):
                while await asyncio.wait_for(reader.read(65536), 30):
                    pass
            return False
        return script.keep_alive

    def __enter__(self) -> HostileUpstream:
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def serve() -> int:
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            return int(self.server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


TOML = """
refresh_interval_s = 0.2
health_check_interval_s = 60

[server]
port = {port}
max_event_bytes = 65536

[database]
url = "sqlite:///{db}"

[ratelimit]
default_rpm = 1000000
default_tpm = 1000000000000

[[upstreams]]
name = "hostile"
url = "http://127.0.0.1:{up}/v1"
connect_timeout_s = 1
read_timeout_s = 2

[[models]]
id = "{model}"
endpoints = ["responses", "chat"]
upstreams = ["hostile"]
input_price = "{input}"
cached_input_price = "{cached}"
output_price = "{output}"
max_output_tokens = 64
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Iterator[tuple[Gateway, HostileUpstream, str, str]]:
    """The gateway in front of the hostile upstream, and a key (and its account) to use."""
    tmp = tmp_path_factory.mktemp("fuzz_upstream")
    with HostileUpstream() as upstream:
        port = free_port()
        config = tmp / "b.toml"
        config.write_text(
            TOML.format(port=port, db=tmp / "b.db", up=upstream.port, model=MODEL, **PRICES)
        )
        proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz")
        gw = Gateway(
            f"http://127.0.0.1:{port}/v1",
            f"http://127.0.0.1:{port}",
            config,
            f"sqlite:///{tmp / 'b.db'}",
            proc,
        )
        try:
            key, account = gw.new_key(credit=CREDIT)
            yield gw, upstream, key, account
        finally:
            stop(proc)


# ---- answers, and how they are mangled -----------------------------------------------------


@dataclass
class Case:
    """One request and the upstream's answer to it, with what the checks need to know."""

    endpoint: str
    stream: bool
    request: dict
    status: int
    body: bytes  # the answer's body, before HTTP framing
    script: Script
    head_ok: bool  # the gateway can read the status line and headers
    delivered: bytes  # the part of ``body`` that reached the gateway
    complete: bool  # the HTTP message reached the gateway whole, and ended
    sse: bool  # ``body`` is the rendered stream (else JSON, for a stream request too)
    garbage: bool  # bytes were injected into the body: only the coarse checks apply
    usage: tuple[int, int, int] | None  # (input, output, cached) reported, if well-formed


def render(endpoint: str, stream: bool, tokens: int, cached: int) -> tuple[dict, bytes, dict]:
    """The request, the simulator's answer to it, and the usage object inside that answer."""
    if endpoint == "responses":
        request = {"model": MODEL, "input": "Tell me a story", "max_output_tokens": 64}
        reply = plan_reply(request, "responses", tokens)
        usage = Usage(reply.input_tokens, reply.output_tokens, min(cached, reply.input_tokens))
        r = ResponsesRender(request, reply, 1_700_000_000, 1_700_000_002, usage)
        if stream:
            plan = r.stream(vllm_quirks=True)
            body = plan.head + b"".join(plan.units)
        else:
            body = r.json_body()
        return request | {"stream": stream}, body, r.usage()
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
               "max_completion_tokens": 64}  # fmt: skip
    if stream:
        request |= {"stream": True, "stream_options": {"include_usage": True}}
    reply = plan_reply(request, "chat", tokens)
    usage = Usage(reply.input_tokens, reply.output_tokens, min(cached, reply.input_tokens))
    c = ChatRender(request, reply, 1_700_000_000, usage)
    body = b"".join(c.stream().units) if stream else c.json_body()
    return request, body, c.usage()


def bogus(usage: dict, kind: str, endpoint: str) -> bytes:
    """``usage`` spoiled one way (json, not orjson: integers past 64 bits must go too)."""
    if kind == "null":
        return b"null"
    inp, out = ("input_tokens", "output_tokens") if endpoint == "responses" else (
        "prompt_tokens", "completion_tokens")  # fmt: skip
    field, value = {
        "missing": (out, None),
        "past-64-bits": (inp, 10**30),
        "huge": (out, 2**62),
        "negative": (out, -3),
        "string": (inp, "7"),
        "float": (out, 3.5),
    }[kind]
    spoiled = {k: v for k, v in usage.items() if k != field}
    if value is not None:
        spoiled[field] = value
    return json.dumps(spoiled, separators=(",", ":")).encode()


def with_line_ends(body: bytes, ends: list[bytes]) -> bytes:
    """The i-th "\\n" of ``body`` becomes ``ends[i % len(ends)]`` (an "\\n" after an "\\r" that
    ended the line before an empty one becomes "\\r\\n", or the two would make one line end)."""
    out: list[bytes] = []
    last = b""
    for i, part in enumerate(body.split(b"\n")):
        if i:
            end = ends[(i - 1) % len(ends)]
            last = b"\r\n" if last == b"\r" and not out[-1] and end == b"\n" else end
            out.append(last)
        out.append(part)
    return b"".join(out)


Pieces = list[tuple[int, int]]  # (where in the framed body, size) of each piece of a body


def frame(body: bytes, framing: str, cuts: list[int]) -> tuple[bytes, bytes, Pieces]:
    """(framing header, framed body, its pieces: one per chunk if chunked, else one)."""
    if framing == "length":
        return b"Content-Length: %d\r\n" % len(body), body, [(0, len(body))]
    if framing == "close":
        return b"Connection: close\r\n", body, [(0, len(body))]
    bounds = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    parts, pieces, at = [], [], 0
    for a, b in pairwise(bounds):
        size = b"%x\r\n" % (b - a)
        pieces.append((at + len(size), b - a))
        parts += [size, body[a:b], b"\r\n"]
        at += len(size) + b - a + 2
    return b"Transfer-Encoding: chunked\r\n", b"".join([*parts, b"0\r\n\r\n"]), pieces


def received(body: bytes, pieces: Pieces, cut: int) -> bytes:
    """The part of ``body`` in the first ``cut`` bytes of its framed form."""
    out, at = [], 0
    for begins, size in pieces:
        out.append(body[at : at + max(0, min(size, cut - begins))])
        at += size
    return b"".join(out)


@dataclass(frozen=True)
class Mangling:
    """Everything hypothesis chooses about one exchange (the defaults: a clean answer)."""

    endpoint: str = "responses"
    stream: bool = True
    tokens: int = 5  # output tokens
    cached: int = 0  # cached input tokens reported
    status: int = 200
    swap: bool = False  # answer with the other kind of body than the one asked for
    spoil: str = "keep"  # what to do to the usage report (``bogus``)
    line_ends: tuple[bytes, ...] = (b"\n",)  # the SSE line ends, in turn
    big_event: bool = False  # an event over max_event_bytes, after the first
    garbage: tuple[int, bytes] | None = None  # bytes injected into the body, and where
    framing: str = "chunked"  # "length", "chunked" or "close"
    chunks: tuple[int, ...] = ()  # where the body is cut into chunks, if chunked
    content_type: bytes | None = None  # None: the right one
    pad: int = 0  # bytes of an extra header
    cut: int | None = None  # where the wire is cut short (modulo its length)
    hang: bool = False  # silent after the (cut) wire, if the body cannot have ended
    trailing: bytes = b""  # stray bytes after a whole answer on a kept connection
    raw: bytes = b""  # sent instead of HTTP
    writes: tuple[int, ...] = ()  # where the wire is cut into separate writes
    pace: bool = False  # pause after each write


def rare(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` (``integers(0, n - 1) == 0`` is far likelier: hypothesis
    favours simple values)."""
    return st.sampled_from([False] * (n - 1) + [True])


def sometimes(n: int, value: st.SearchStrategy, default: object) -> st.SearchStrategy:
    return st.tuples(rare(n), value).map(lambda pair: pair[1] if pair[0] else default)


manglings = st.builds(
    Mangling,
    endpoint=st.sampled_from(["responses", "chat"]),
    stream=st.booleans(),
    tokens=st.integers(0, 20),
    cached=st.sampled_from([0, 0, 3]),
    status=st.sampled_from([200] * 8 + [500, 502, 503, 400]),
    swap=rare(16),
    spoil=st.sampled_from(["keep"] * 4 + ["null", "missing", "past-64-bits", "huge",
                                          "negative", "string", "float"]),
    line_ends=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1, max_size=4)
    .map(tuple),
    big_event=rare(12),
    garbage=sometimes(10, st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=64)),
                      None),
    framing=st.sampled_from(["length", "chunked", "close"]),
    chunks=st.lists(st.integers(0, 10**7), max_size=12).map(tuple),
    content_type=st.sampled_from([None] * 3 + [b"text/html", b"application/json",
                                               b"text/event-stream", b""]),
    pad=st.sampled_from([0] * 6 + [100, 8000, MAX_HEAD + 1000]),
    cut=sometimes(3, st.integers(0, 10**8), None),
    hang=rare(8),
    trailing=sometimes(6, st.sampled_from([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
                                           b"\r\n", b"\x00garbage"]), b""),
    raw=sometimes(30, st.binary(min_size=1, max_size=200), b""),
    writes=st.lists(st.integers(0, 10**8), max_size=30).map(tuple),
    pace=st.booleans(),
)  # fmt: skip


def build(m: Mangling) -> Case:
    """The exchange ``m`` describes: the request, the script, and what the checks need."""
    request, body, usage = render(m.endpoint, m.stream, m.tokens, m.cached)
    sse, status = m.stream, m.status
    if status != 200:
        body, sse = orjson.dumps(error_object(status, "simulated failure", "ServerError")), False
    elif m.swap:
        body, sse = render(m.endpoint, not m.stream, m.tokens, m.cached)[1], not m.stream
    names = (
        ("input_tokens", "output_tokens", "input_tokens_details")
        if m.endpoint == "responses"
        else ("prompt_tokens", "completion_tokens", "prompt_tokens_details")
    )
    reported = (usage[names[0]], usage[names[1]], (usage.get(names[2]) or {}).get(
        "cached_tokens", 0))  # fmt: skip
    if status == 200 and m.spoil != "keep":
        assert orjson.dumps(usage) in body
        body = body.replace(orjson.dumps(usage), bogus(usage, m.spoil, m.endpoint))
    if sse:
        body = with_line_ends(body, list(m.line_ends))
        if m.big_event:
            at = next(iter(sse_events(body)), (0, 0, 0))[2]
            body = body[:at] + b"data: " + b"x" * (LIMIT + 1024) + b"\n\n" + body[at:]
    if m.garbage:
        at = m.garbage[0] % (len(body) + 1)
        body = body[:at] + m.garbage[1] + body[at:]
    framing_header, framed, pieces = frame(body, m.framing, list(m.chunks))
    right = b"text/event-stream" if sse else b"application/json"
    content_type = right if m.content_type is None else m.content_type
    head = (b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status])
            + (b"Content-Type: %s\r\n" % content_type if content_type else b"")
            + framing_header
            + (b"X-Pad: %s\r\n" % (b"p" * m.pad) if m.pad else b"")
            + b"\r\n")  # fmt: skip
    wire = head + framed
    cut = len(wire) if m.cut is None else m.cut % (len(wire) + 1)
    whole = cut == len(wire)
    hang = m.hang and (not whole or m.framing == "close")  # else it only idles: no fault
    keep_alive = whole and m.framing != "close" and not hang and not m.raw
    script = Script(
        m.raw or wire[:cut], list(m.writes), m.pace, hang, keep_alive,
        m.trailing if keep_alive else b"",
    )  # fmt: skip
    return Case(
        endpoint=m.endpoint,
        stream=m.stream,
        request=request,
        status=status,
        body=body,
        script=script,
        head_ok=not m.raw and cut >= len(head) and m.pad <= MAX_HEAD,
        delivered=received(body, pieces, cut - len(head)),
        complete=not m.raw and (not hang if m.framing == "close" else whole),
        sse=sse,
        garbage=bool(m.garbage or m.raw),
        usage=reported if status == 200 and m.spoil == "keep" else None,
    )


# ---- what the client must see ----------------------------------------------------------

_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")


def sse_events(body: bytes) -> list[tuple[int, int, int]]:
    """(start, dispatched at, end) of each event in ``body`` by the SSE spec: an event is
    complete once the first byte of the line end of its empty line is in."""
    events, start, content = [], 0, False
    for line in _LINE.finditer(body):
        if line.group(1):
            content = True
        elif content:
            events.append((start, line.start(2) + 1, line.end()))
            start, content = line.end(), False
    return events


def terminal(event: bytes, endpoint: str) -> bool:
    event = event.lstrip(b"\r\n")
    if endpoint == "responses":
        return event.startswith(b"event: response.completed")
    return event.startswith(b"data: [DONE]")


SENT: dict[str, tuple[int, tuple[int, int, int] | None]] = {}  # request id: (status, usage)


SSE_STARLETTE = Mangling(line_ends=(b"\r\n",), writes=tuple(range(600)), pace=True)


@FUZZ
@given(mangling=manglings)
@example(mangling=SSE_STARLETTE)  # "\r\n" line ends, the first 600 bytes one by one
@example(mangling=replace(SSE_STARLETTE, endpoint="chat", framing="close"))
@example(mangling=Mangling(endpoint="chat", line_ends=(b"\r",), cut=3000, framing="length"))
@example(mangling=Mangling(line_ends=(b"\n", b"\r\n", b"\r"), big_event=True))
@example(mangling=Mangling(stream=False, framing="close"))
@example(mangling=Mangling(endpoint="chat", cut=2000, hang=True))
@example(mangling=Mangling(stream=False, framing="length", trailing=b"HTTP/1.1 200 OK\r\n"))
@example(mangling=Mangling(raw=b"SSH-2.0-OpenSSH_9.2\r\n"))
@example(mangling=Mangling(pad=MAX_HEAD + 1000))
@example(mangling=Mangling(endpoint="chat", status=503))
@example(mangling=Mangling(spoil="huge", framing="close"))
def test_no_upstream_answer_hangs_the_client_breaks_a_stream_silently_or_alters_an_event(
    hostile, mangling: Mangling
):
    gw, upstream, key, _ = hostile
    case = build(mangling)
    upstream.script = case.script
    path = "/responses" if case.endpoint == "responses" else "/chat/completions"
    started = time.monotonic()
    with httpx.stream(
        "POST",
        gw.url + path,
        json=case.request,
        headers={"Authorization": f"Bearer {key}"},
        timeout=15,
    ) as resp:
        got = resp.read()
    assert time.monotonic() - started < 12, "the answer took too long"
    status, request_id = resp.status_code, resp.headers["x-request-id"]
    SENT[request_id] = (status, None)  # with the usage to check once the answer passed
    label(case, status)
    assert status in (200, 400, 502), (status, got[:300])
    if status != 200:
        code = resp.json()["error"]["code"]
        assert code == ("upstream_error" if status == 502 else "invalid_request"), got
    if case.status >= 500:
        assert status == 502
    if not case.stream:
        if case.status == 200 and not case.garbage:
            whole = case.head_ok and case.complete and case.delivered == case.body
            if whole and not case.sse:
                assert (status, got) == (200, case.body)  # byte for byte
            else:
                assert status == 502, got
        SENT[request_id] = (status, case.usage if status == 200 else None)
        return
    if case.status == 200 and case.head_ok:
        assert status == 200 and resp.headers["content-type"] == "text/event-stream"
    if status != 200:
        return
    at = got.rfind(ERROR_EVENT[case.endpoint])
    relayed, error = (got[:at], got[at:]) if at >= 0 else (got, b"")
    assert not error or (error.count(b"\n\n") == 1 and error.endswith(b"\n\n")), error
    if case.garbage:  # no terminal event came through: the stream must say it broke
        ends = (b"response.completed", b"[DONE]", b'"type":"error"', b"event: error")
        assert error or any(end in relayed for end in ends), got
        return
    required, done, too_big = 0, False, False
    events = sse_events(case.delivered)
    for first, dispatched, end in events:
        if end - first > LIMIT:
            too_big = True
            break
        required = dispatched
        done = done or terminal(case.delivered[first:end], case.endpoint)
    else:
        too_big = len(case.delivered) - (events[-1][2] if events else 0) > LIMIT
    assert case.delivered.startswith(relayed), "the client got bytes the upstream never sent"
    assert len(relayed) >= required, "an event the upstream completed did not reach the client"
    broken = too_big or not done or not case.complete
    event(f"stream {'broken' if broken else 'whole'}")
    assert bool(error) == broken, (broken, too_big, done, case.complete, got[-300:])
    SENT[request_id] = (status, case.usage if done and not too_big else None)


def label(case: Case, status: int) -> None:
    """What kind of example this was (``--hypothesis-show-statistics``)."""
    kind = "stream" if case.stream else "json"
    garbage = ", garbage" if case.garbage else ""
    event(f"{case.endpoint} {kind}: upstream {case.status}, client {status}{garbage}")
    for flag, name in [
        (case.script.hang, "silent upstream"),
        (not case.complete, "cut short"),
        (len(case.body) > LIMIT, "event too big"),
        (bool(case.script.trailing), "stray bytes after the answer"),
    ]:
        if flag:
            event(name)


def test_the_books_balance_after_the_fuzzing(hostile):
    """Checked once the fuzzing is over, so that no late group commit can hide a row."""
    gw, _, _, account = hostile
    assert SENT, "the fuzzing sent nothing"
    time.sleep(1.0)
    rows = gw.ledger(account)
    by_id = {row.request_id: row for row in rows}
    assert len(by_id) == len(rows), "a request has two rows"
    assert set(by_id) <= set(SENT), "a row for a request nobody sent"
    input_price, cached_price, output_price = (parse_usd(PRICES[k]) for k in
                                               ("input", "cached", "output"))  # fmt: skip
    for row in rows:
        price = cost_nanos(row.input_tokens, row.output_tokens, input_price, output_price,
                           row.cached_input_tokens, cached_price)  # fmt: skip
        assert row.cost == price, row
        assert 0 <= row.cached_input_tokens <= row.input_tokens and row.output_tokens >= 0, row
        assert 0 <= row.uncharged <= row.cost, row
    for request_id, (status, usage) in SENT.items():
        if status == 200:
            assert request_id in by_id, f"{request_id} was answered 200 but has no row"
        if usage is not None:
            row = by_id[request_id]
            tokens = (row.input_tokens, row.output_tokens, row.cached_input_tokens)
            assert tokens == usage and not row.estimated, (row, usage)
    balance = gw.account(account).balance
    assert balance == parse_usd(CREDIT) - sum(r.cost - r.uncharged for r in rows) >= 0
