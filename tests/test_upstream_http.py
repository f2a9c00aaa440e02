"""The non-stream upstream client against a scripted TCP server: framing, reuse, failures.

Each test's server answers every request on a connection with the test's ``answer``
function and records connections and requests, so a test can say how many
connections were opened and what the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from bastion import upstream_http
from bastion.upstream_http import (
    Disconnected,
    ProtocolError,
    Timeout,
    Unreachable,
    UpstreamClient,
)

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


@dataclass
class Server:
    """Counts connections; ``answer`` returns False to stop serving that connection."""

    answer: Answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                if not await self.answer(reader, writer, len(self.requests)):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()  # the client closed its end
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serve(answer: Answer) -> AsyncIterator[Server]:
    server = Server(answer)
    tcp = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = tcp.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        tcp.close()


def client(port: int, read_timeout_s: float = 5.0) -> UpstreamClient:
    return UpstreamClient(
        f"http://127.0.0.1:{port}/v1", {"Authorization": "Bearer up"}, 1.0, read_timeout_s
    )


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    writer.write(OK)
    await writer.drain()
    return True


async def test_post_sends_the_body_and_headers_and_reuses_the_connection():
    async with serve(ok) as server:
        c = client(server.port)
        for _ in range(3):
            reply = await c.post("/responses", b'{"a":1}', {"X-Request-Id": "req_1"})
            assert (reply.status, reply.body) == (200, b'{"ok":true}')
        assert server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/responses HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:%d" % server.port in head
        assert b"\r\nAuthorization: Bearer up" in head and b"\r\nX-Request-Id: req_1" in head
        assert body == b'{"a":1}'
        await c.close()


async def test_chunked_answers_and_error_statuses_come_back_whole():
    async def chunked(reader, writer, n) -> bool:
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"a":\r\n3\r\n42}\r\n0\r\n\r\n'
        )
        return True

    async with serve(chunked) as server:
        reply = await client(server.port).post("/chat/completions", b"{}", {})
        assert (reply.status, reply.body) == (503, b'{"a":42}')


async def test_connection_close_answers_are_not_reused():
    async def close(reader, writer, n) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        return False

    async with serve(close) as server:
        c = client(server.port)
        for _ in range(2):
            assert (await c.post("/responses", b"{}", {})).body == b"{}"
        assert server.connections == 2 and not c.idle


async def test_an_idle_connection_the_upstream_dropped_is_retried_on_a_fresh_one():
    async def answer_then_hang_up(reader, writer, n) -> bool:
        writer.write(OK)  # keep-alive by HTTP/1.1 default, but the server closes anyway
        await writer.drain()
        return False

    async with serve(answer_then_hang_up) as server:
        c = client(server.port)
        await c.post("/responses", b"{}", {})
        await asyncio.sleep(0.05)
        assert (await c.post("/responses", b"{}", {})).status == 200
        assert server.connections == 2


async def test_a_reused_connection_closed_without_an_answer_is_asked_once_more():
    """The race the check above cannot see: the upstream closes as the request goes out."""

    async def close_on_the_second(reader, writer, n) -> bool:
        if n == 2:
            return False  # read the request, close without a byte of answer
        writer.write(OK)
        await writer.drain()
        return True

    async with serve(close_on_the_second) as server:
        c = client(server.port)
        await c.post("/responses", b"{}", {})
        assert (await c.post("/responses", b"{}", {})).status == 200
        assert (server.connections, len(server.requests)) == (2, 3)


async def test_connections_idle_too_long_are_not_reused(monkeypatch):
    monkeypatch.setattr(upstream_http, "IDLE_S", 0.05)
    async with serve(ok) as server:
        c = client(server.port)
        await c.post("/responses", b"{}", {})
        await asyncio.sleep(0.1)
        await c.post("/responses", b"{}", {})
        assert server.connections == 2


async def test_a_break_mid_answer_is_disconnected_and_not_retried():
    async def half(reader, writer, n) -> bool:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial')
        await writer.drain()
        return False

    async with serve(half) as server:
        with pytest.raises(Disconnected):
            await client(server.port).post("/responses", b"{}", {})
        assert len(server.requests) == 1


async def test_silence_past_the_read_timeout():
    async def never(reader, writer, n) -> bool:
        await asyncio.sleep(10)
        return False

    async with serve(never) as server:
        started = time.monotonic()
        with pytest.raises(Timeout):
            await client(server.port, read_timeout_s=0.3).post("/responses", b"{}", {})
        assert 0.25 < time.monotonic() - started < 2


async def test_a_slow_but_steady_answer_is_not_a_timeout():
    async def trickle(reader, writer, n) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        for byte in b"{ }\n":
            await asyncio.sleep(0.15)  # each byte within the timeout, the whole answer not
            writer.write(bytes([byte]))
        return True

    async with serve(trickle) as server:
        reply = await client(server.port, read_timeout_s=0.3).post("/responses", b"{}", {})
        assert reply.body == b"{ }\n"


async def test_nothing_listening_is_unreachable():
    async with serve(ok) as server:
        port = server.port
    with pytest.raises(Unreachable):
        await client(port).post("/responses", b"{}", {})


async def test_not_http_is_a_protocol_error():
    async def garbage(reader, writer, n) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        return True

    async with serve(garbage) as server:
        with pytest.raises(ProtocolError):
            await client(server.port).post("/responses", b"{}", {})


async def test_cancelling_the_caller_closes_the_connection():
    """A client that leaves Bastion must leave the upstream too (it stops generating)."""

    async def never(reader, writer, n) -> bool:
        await reader.read()  # until the client closes
        raise ConnectionError

    async with serve(never) as server:
        c = client(server.port)
        task = asyncio.create_task(c.post("/responses", b"{}", {}))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 2)
        assert not c.idle


def test_only_http_urls_and_a_host_header_for_each_form():
    with pytest.raises(ValueError):
        UpstreamClient("ftp://example/v1", {}, 1, 1)
    for url, host in [
        ("http://vllm.internal/v1", b"Host: vllm.internal\r\n"),
        ("https://vllm.internal:8443/v1", b"Host: vllm.internal:8443\r\n"),
        ("http://[::1]:8000/v1", b"Host: [::1]:8000\r\n"),
    ]:
        c = UpstreamClient(url, {}, 1, 1)
        assert c.head == host and c.prefix == b"/v1"


# ---- streamed answers (``open``) ---------------------------------------------------------


def sse_head(extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + extra + b"\r\n"


async def test_a_streamed_answer_arrives_piece_by_piece_and_then_reuses_the_connection():
    async def events(reader, writer, n) -> bool:
        writer.write(sse_head(b"Transfer-Encoding: chunked\r\n"))
        for i in range(3):
            await asyncio.sleep(0.05)
            data = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    async with serve(events) as server:
        c = client(server.port)
        answer = await c.open("/responses", b"{}", {"Accept": "text/event-stream"})
        assert answer.status == 200
        pieces = []
        while piece := await answer.read():
            pieces.append((time.monotonic(), piece))
        assert b"".join(p for _, p in pieces) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert len(pieces) == 3 and pieces[-1][0] - pieces[0][0] > 0.08  # as they came
        assert len(c.idle) == 1  # read to the end: back in the pool
        second = await c.open("/responses", b"{}", {})
        while await second.read():
            pass
        assert server.connections == 1


async def test_a_stream_left_unfinished_closes_its_connection():
    async def endless(reader, writer, n) -> bool:
        writer.write(sse_head(b"Transfer-Encoding: chunked\r\n"))
        while True:
            writer.write(b"8\r\ndata: x\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with serve(endless) as server:
        c = client(server.port)
        answer = await c.open("/responses", b"{}", {})
        assert await answer.read()
        answer.release()
        await asyncio.wait_for(server.closed.wait(), 2)
        assert not c.idle


async def test_cancelling_a_streamed_read_closes_the_connection():
    async def one_then_silence(reader, writer, n) -> bool:
        writer.write(sse_head(b"Transfer-Encoding: chunked\r\n") + b"8\r\ndata: x\n\r\n")
        await reader.read()
        raise ConnectionError

    async with serve(one_then_silence) as server:
        answer = await client(server.port).open("/responses", b"{}", {})
        assert await answer.read() == b"data: x\n"
        task = asyncio.create_task(answer.read())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 2)


async def test_a_stream_cut_mid_way_raises_after_what_came():
    async def cut(reader, writer, n) -> bool:
        writer.write(sse_head(b"Transfer-Encoding: chunked\r\n") + b"8\r\ndata: x\n\r\n")
        await writer.drain()
        return False  # closes without the last chunk

    async with serve(cut) as server:
        answer = await client(server.port).open("/responses", b"{}", {})
        assert await answer.read() == b"data: x\n"
        with pytest.raises(Disconnected):
            await answer.read()


async def test_a_stream_silent_past_the_read_timeout_between_events():
    async def stall(reader, writer, n) -> bool:
        writer.write(sse_head(b"Transfer-Encoding: chunked\r\n") + b"8\r\ndata: x\n\r\n")
        await asyncio.sleep(10)
        return False

    async with serve(stall) as server:
        answer = await client(server.port, read_timeout_s=0.3).open("/responses", b"{}", {})
        assert await answer.read() == b"data: x\n"
        started = time.monotonic()
        with pytest.raises(Timeout):
            await answer.read()
        assert time.monotonic() - started < 2


async def test_a_slow_reader_pauses_the_upstream_without_timing_it_out(monkeypatch):
    """Backpressure: past HIGH_WATER unread bytes the socket is not read; that is no silence."""
    monkeypatch.setattr(upstream_http, "HIGH_WATER", 1024)
    size = 4_000_000

    async def flood(reader, writer, n) -> bool:
        writer.write(sse_head(b"Content-Length: %d\r\n" % size) + b"x" * size)
        await writer.drain()
        return True

    async with serve(flood) as server:
        answer = await client(server.port, read_timeout_s=0.3).open("/responses", b"{}", {})
        first = await answer.read()
        await asyncio.sleep(0.6)  # a slow client: twice the read timeout without reading
        assert answer._conn is not None and answer._conn.size < size // 4  # the socket waits
        rest = b""
        while piece := await answer.read():
            rest += piece
        assert len(first) + len(rest) == size
