"""What the upstream sees on the wire, and what happens when the client or the upstream leaves.

JSON requests go upstream through pyreqwest, streams through aiohttp (docs/choices.md);
these tests hold both paths to the same contract with a recording upstream: the
client's bytes and Bastion's headers only, never the client's key; a client that
leaves cancels the upstream request; idle keep-alive connections the upstream closed
are not used again.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from types import SimpleNamespace

import httpx
import orjson
import pytest
from aiohttp import web
from conftest import Gateway, free_port, start, stop
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.config import ModelConfig, UpstreamConfig
from bastion.errors import APIError
from bastion.relay import Call, Relay

RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "model": "rec",
    "output": [],
    "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
}
STREAM = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"ok","sequence_number":1}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,'
    b'"response":{"usage":{"input_tokens":7,"output_tokens":1,"total_tokens":8}}}\n\n'
)

CRLF_STREAM = STREAM.replace(b"\n", b"\r\n")


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]  # Bastion's end of the connection
    gone_at: float = 0.0  # when the client (Bastion) closed the connection, for "hang"


@dataclass
class RecordingUpstream:
    """An upstream on its own thread that records every request; model "hang" never answers."""

    keepalive_s: float = 75.0
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        seen = Seen(dict(request.headers), await request.read(), peer)
        self.seen.append(seen)
        body = orjson.loads(seen.body)
        if body["model"] == "hang":
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110 (aiohttp has no "closed" event to await)
                await asyncio.sleep(0.02)
            seen.gone_at = time.monotonic()
            return web.Response(status=504)
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            if body["model"] == "crlf":  # sse-starlette: lines end "\r\n", events "\r\n\r\n"
                first, rest = CRLF_STREAM.split(b"\r\n\r\n", 1)
                await response.write(first + b"\r\n\r\n")
                await asyncio.sleep(1.0)  # the model thinks: the first event must not wait
                await response.write(rest)
                return response
            await response.write(STREAM)
            return response
        return web.json_response(RESPONSE)

    def __enter__(self) -> RecordingUpstream:
        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": []})

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        self._loop = loop

        async def serve() -> int:
            app = web.Application()
            app.router.add_post("/v1/responses", self.handle)
            app.router.add_get("/v1/models", models)
            self._runner = web.AppRunner(
                app, access_log=None, keepalive_timeout=self.keepalive_s, shutdown_timeout=0.5
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

        self.port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


TOML = """
refresh_interval_s = 0.2
health_check_interval_s = 60

[server]
port = {port}

[database]
url = "sqlite:///{db}"

[[upstreams]]
name = "rec"
url = "http://127.0.0.1:{up}/v1"
api_key = "upstream-secret"

[[models]]
id = "rec"
endpoints = ["responses"]
upstreams = ["rec"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 64

[[models]]
id = "crlf"
endpoints = ["responses"]
upstreams = ["rec"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 64

[[models]]
id = "hang"
endpoints = ["responses"]
upstreams = ["rec"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 64
"""


@pytest.fixture
def relay_gateway(tmp_path, request) -> Iterator[tuple[Gateway, RecordingUpstream]]:
    keepalive = getattr(request, "param", 75.0)
    with RecordingUpstream(keepalive_s=keepalive) as upstream:
        port = free_port()
        config = tmp_path / "b.toml"
        config.write_text(TOML.format(port=port, db=tmp_path / "b.db", up=upstream.port))
        proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz")
        gw = Gateway(
            f"http://127.0.0.1:{port}/v1",
            f"http://127.0.0.1:{port}",
            config,
            f"sqlite:///{tmp_path / 'b.db'}",
            proc,
        )
        try:
            yield gw, upstream
        finally:
            stop(proc)


def post(gw: Gateway, key: str, body: bytes, timeout: float = 10) -> httpx.Response:
    return httpx.post(
        gw.url + "/responses",
        content=body,
        timeout=timeout,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "User-Agent": "client-agent/1.0",
            "X-Client-Secret": "never-forwarded",
        },
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_gets_the_clients_bytes_and_only_bastions_headers(relay_gateway, stream):
    gw, upstream = relay_gateway
    key, account = gw.new_key()
    # odd spacing and key order: a re-serialised body would not match byte for byte
    body = b'{ "input":"x",  "model":"rec", "max_output_tokens": 16' + (
        b', "stream": true}' if stream else b"}"
    )
    resp = post(gw, key, body)
    assert resp.status_code == 200
    if stream:
        assert resp.content == STREAM
    else:
        assert orjson.loads(resp.content) == RESPONSE
    [seen] = upstream.seen
    assert seen.body == body
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["authorization"] == "Bearer upstream-secret"
    assert headers["x-request-id"] == resp.headers["x-request-id"]
    assert headers["content-type"] == "application/json"
    assert key not in str(seen.headers)
    assert "x-client-secret" not in headers and "client-agent" not in str(seen.headers)
    assert "accept-encoding" not in headers  # bodies pass through undecoded
    [row] = gw.settled(account, 1)
    assert (row.input_tokens, row.status) == (7, "200")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_that_leaves_cancels_the_upstream_request(relay_gateway, stream):
    gw, upstream = relay_gateway
    key, account = gw.new_key()
    body = b'{"model":"hang","input":"x"' + (b',"stream":true}' if stream else b"}")
    left = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(gw, key, body, timeout=0.5)
    deadline = time.monotonic() + 5
    while not (upstream.seen and upstream.seen[0].gone_at):
        assert time.monotonic() < deadline, "the upstream request was not cancelled"
        time.sleep(0.05)
    assert upstream.seen[0].gone_at - left < 3
    [row] = gw.settled(account, 1)  # it reached the upstream: one row, nothing produced
    assert (row.status, row.cost, row.output_tokens) == ("cancelled", 0, 0)
    assert gw.account(account).balance == 10_000_000_000


@pytest.mark.parametrize("relay_gateway", [0.3], indirect=True)
def test_idle_connections_the_upstream_closed_are_not_reused(relay_gateway):
    """vLLM (uvicorn) closes idle keep-alive connections after 5 s; none may cost a 502."""
    gw, upstream = relay_gateway
    key, account = gw.new_key()
    for stream in (False, True, False, True, False, False):
        body = b'{"model":"rec","input":"x"' + (b',"stream":true}' if stream else b"}")
        assert post(gw, key, body).status_code == 200
        time.sleep(0.6)  # past the upstream's keep-alive: it has closed the connection
    assert len(gw.settled(account, 6)) == 6
    assert len({seen.peer for seen in upstream.seen}) == 6  # a new connection every time


@pytest.mark.timeout(20)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_fleet_that_hangs_costs_two_read_timeouts_not_one_per_replica(stream):
    """A timeout is retried once on another replica (the client has seen nothing), no more."""
    posts: list[float] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if (await reader.readuntil(b"\r\n\r\n")).startswith(b"POST "):
                posts.append(time.monotonic())
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    ups = {n: UpstreamConfig(n, url, read_timeout_s=0.3) for n in ("a", "b", "c")}
    model = ModelConfig("m", "m", frozenset({"responses"}), tuple(ups), 1, 1, 16)
    relay = Relay(ups, health_interval_s=60)
    await relay.start()
    try:
        call = Call("req_1", "responses", model, b"{}", stream, False, False)
        started = time.monotonic()
        with pytest.raises(APIError) as raised:
            await relay.send(None, call)  # type: ignore[arg-type]  # no byte reaches a client
        elapsed = time.monotonic() - started
        assert raised.value.status == 502 and "sent nothing for 0.3s" in raised.value.message
        assert call.attempts == len(posts) == 2
        assert 0.55 < elapsed < 1.0
        tried = [r for r in relay.pool.replicas.values() if r.attempts]
        assert len(tried) == 2 and not any(r.available for r in tried)  # both ejected
    finally:
        await relay.close()
        server.close()


def test_a_crlf_stream_reaches_the_client_event_by_event_and_is_metered(relay_gateway):
    """sse-starlette separates events with "\r\n\r\n": each must go out as it completes."""
    gw, _ = relay_gateway
    key, account = gw.new_key()
    sent = time.monotonic()
    arrived: list[tuple[float, bytes]] = []
    with httpx.stream(
        "POST",
        gw.url + "/responses",
        content=b'{"model":"crlf","input":"x","stream":true}',
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=10,
    ) as resp:
        assert resp.status_code == 200
        for piece in resp.iter_raw():
            arrived.append((time.monotonic() - sent, piece))
    assert b"".join(p for _, p in arrived) == CRLF_STREAM  # byte for byte
    assert arrived[0][1] == CRLF_STREAM.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert arrived[0][0] < 0.8  # before the upstream's pause of 1 s was over
    [row] = gw.settled(account, 1)
    assert (row.input_tokens, row.output_tokens, row.status) == (7, 1, "200")
    assert row.cost == 7 * 1_000 + 1 * 2_000 and not row.estimated


# ---- SSE framing in Relay._pipe: any separator the spec allows, each event at once --------

CHAT_STREAM = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    b'{"content":"ok"}}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}\n\n'
    b"data: [DONE]\n\n"
)


class ScriptedAnswer:
    """An upstream body handed out in the given chunks; counts the reads."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.reads = 0

    async def read(self) -> bytes:
        if self.reads == len(self.chunks):
            return b""
        self.reads += 1
        return self.chunks[self.reads - 1]


class RecordingWriter:
    """What ``_pipe`` uses of aiohttp's StreamWriter; notes how many reads preceded a write."""

    def __init__(self, answer: ScriptedAnswer) -> None:
        self.answer = answer
        self.writes: list[tuple[int, bytes]] = []
        self.protocol = SimpleNamespace(writing_paused=False)

    async def write(self, data: bytes, drain: bool = True) -> None:
        self.writes.append((self.answer.reads, bytes(data)))


def pipe(
    chunks: list[bytes], endpoint: str = "responses", strip_usage: bool = False, **relay_kw: int
) -> tuple[str, RecordingWriter, Call, ScriptedAnswer]:
    """Run ``Relay._pipe`` over ``chunks``: (failure, writer, call, answer)."""
    from bastion.relay import ChatScanner, ResponsesScanner

    model = ModelConfig("m", "m", frozenset({endpoint}), ("u",), 1, 1, 64)
    relay = Relay({"u": UpstreamConfig("u", "http://127.0.0.1:9/v1")}, **relay_kw)
    call = Call("req_1", endpoint, model, b"{}", True, False, strip_usage)
    scanner = ResponsesScanner(call) if endpoint == "responses" else ChatScanner(call)
    answer = ScriptedAnswer(chunks)
    writer = RecordingWriter(answer)
    replica = relay.pool.replicas["u"]
    failure = asyncio.run(relay._pipe(answer, writer, scanner, call, replica))  # type: ignore[arg-type]
    return failure, writer, call, answer


_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")


def dispatch_points(stream: bytes) -> list[int]:
    """Where each event of ``stream`` is complete: just past the first byte of the line end
    that ends its blank line (a CR completes a line; an LF after it adds nothing)."""
    points, content = [], False
    for line in _LINE.finditer(stream):
        if line.group(1):
            content = True
        elif content:
            points.append(line.start(2) + 1)
            content = False
    return points


def with_line_ends(stream: bytes, ends: list[bytes]) -> bytes:
    """``stream`` with its i-th "\n" replaced by ``ends[i % len(ends)]`` (but never an "\n"
    right after a "\r": the two would make one line end, and an empty line would vanish)."""
    out, last = [], b""
    for i, part in enumerate(stream.split(b"\n")):
        if i:
            end = ends[(i - 1) % len(ends)]
            last = b"\r\n" if last == b"\r" and not out[-1] and end == b"\n" else end
            out.append(last)
        out.append(part)
    return b"".join(out)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a]


def assert_relayed_at_once(stream: bytes, chunks: list[bytes], writer: RecordingWriter) -> None:
    """Every event complete after the k-th read was written before the (k+1)-th read."""
    points = dispatch_points(stream)
    received = written = 0
    for k, chunk in enumerate(chunks, 1):
        received += len(chunk)
        written += sum(len(data) for reads, data in writer.writes if reads == k)
        due = max((p for p in points if p <= received), default=0)
        assert written >= due, (k, written, due)


LINE_ENDS = st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ends=LINE_ENDS, cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_responses_events_are_relayed_byte_for_byte_whatever_the_line_ends_and_chunks(ends, cuts):
    stream = with_line_ends(STREAM, ends)
    chunks = split_at(stream, cuts)
    failure, writer, call, _ = pipe(chunks)
    assert failure == ""
    assert b"".join(data for _, data in writer.writes) == stream
    assert_relayed_at_once(stream, chunks, writer)
    assert call.usage is not None and (call.usage.input_tokens, call.usage.output_tokens) == (7, 1)
    assert call.deltas == 1


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ends=LINE_ENDS, cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_chat_events_are_relayed_byte_for_byte_whatever_the_line_ends_and_chunks(ends, cuts):
    stream = with_line_ends(CHAT_STREAM, ends)
    chunks = split_at(stream, cuts)
    failure, writer, call, _ = pipe(chunks, "chat")
    assert failure == ""
    assert b"".join(data for _, data in writer.writes) == stream
    assert_relayed_at_once(stream, chunks, writer)
    assert call.usage is not None and (call.usage.input_tokens, call.usage.output_tokens) == (7, 1)
    assert call.deltas == 2


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_chat_usage_bastion_asked_for_is_dropped_whatever_the_line_ends(eol):
    stream = with_line_ends(CHAT_STREAM, [eol])
    failure, writer, call, _ = pipe([stream], "chat", strip_usage=True)
    events = stream.split(eol * 2)
    assert failure == "" and call.usage is not None and call.usage.output_tokens == 1
    assert b"".join(data for _, data in writer.writes) == eol.join(
        [events[0] + eol, events[1] + eol, events[3] + eol, b""]
    )


def test_sse_starlette_pings_and_comments_are_relayed_but_not_counted():
    """sse-starlette sends ": ping - <time>" comments; "data:" may have no space."""
    ping = b": ping - 2026-01-01 00:00:00.000000+00:00\r\n\r\n"
    stream = ping + with_line_ends(CHAT_STREAM, [b"\r\n"]).replace(b"data: [DONE]", b"data:[DONE]")
    stream = stream.replace(b"\r\n\r\ndata", b"\r\n\r\n" + ping + b"data", 1)
    failure, writer, call, _ = pipe([stream], "chat")
    assert failure == "" and b"".join(data for _, data in writer.writes) == stream
    assert call.deltas == 2  # the two content chunks: not the pings, not [DONE]
    failure, _, call, _ = pipe([ping + with_line_ends(STREAM, [b"\r\n"]) + ping])
    assert failure == "" and call.deltas == 1


def test_an_event_over_max_event_bytes_ends_the_stream_and_what_came_is_kept():
    first, rest = STREAM.split(b"\n\n", 1)
    delta = rest.split(b"\n\n", 1)[0] + b"\n\n"
    huge = b"data: " + b"x" * 5000 + b"\n\n"
    failure, writer, call, _ = pipe([first + b"\n\n", delta, huge, rest], max_event_bytes=4096)
    assert failure == "upstream sent an SSE event over 4096 bytes"
    assert b"".join(data for _, data in writer.writes) == first + b"\n\n" + delta
    assert call.deltas == 1 and call.usage is None  # settled from what was streamed


def test_an_endless_event_is_cut_off_once_it_passes_max_event_bytes():
    """An upstream that never ends an event is not buffered without end."""
    failure, writer, _, answer = pipe([b"data: " + b"x" * 1000] * 10_000, max_event_bytes=4096)
    assert failure == "upstream sent an SSE event over 4096 bytes"
    assert answer.reads <= 6 and not writer.writes


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_a_large_event_in_small_chunks_is_scanned_once(eol):
    """Framing is linear: the held part of an event is neither copied nor searched again
    on every chunk (8 MiB in 1 KiB chunks took seconds when it was)."""
    big = b"data: " + b"x" * (8 * 1024 * 1024 - 100) + eol + eol
    chunks = [big[i : i + 1024] for i in range(0, len(big), 1024)]
    started = time.perf_counter()
    failure, writer, _, _ = pipe([*chunks, b"data: [DONE]" + eol + eol], "chat")
    elapsed = time.perf_counter() - started
    assert failure == "" and writer.writes[0][1] == big
    assert elapsed < 0.5, elapsed


def test_events_completed_in_the_chunk_that_overflows_still_reach_the_client():
    first = STREAM.split(b"\n\n", 1)[0]
    huge = b"data: " + b"x" * 5000
    failure, writer, _, _ = pipe([first + b"\n\n" + huge], max_event_bytes=4096)
    assert failure == "upstream sent an SSE event over 4096 bytes"
    assert b"".join(data for _, data in writer.writes) == first + b"\n\n"
