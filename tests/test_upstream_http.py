"""The non-stream upstream client against a scripted TCP server: framing, reuse, failures.

Each test's server answers every request on a connection with the test's ``answer``
function and records connections and requests, so a test can say how many
connections were opened and what the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
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


# ---- bodies that end at the close; connections reused only from a clean state ------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n",
    ],
    ids=["http/1.1 close", "http/1.0"],
)
async def test_a_body_delimited_by_the_close_is_a_whole_answer(head):
    """No Content-Length, not chunked: the body is what comes before the close (RFC 9112 §6.3)."""

    async def until_close(reader, writer, n) -> bool:
        writer.write(head + b'{"ok":')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"true}")
        await writer.drain()
        return False  # the close ends the body

    async with serve(until_close) as server:
        c = client(server.port)
        for _ in range(2):
            reply = await asyncio.wait_for(c.post("/responses", b"{}", {}), 3)
            assert (reply.status, reply.body) == (200, b'{"ok":true}')
        assert server.connections == 2 and not c.idle  # never reused: it is closed


async def test_a_stream_delimited_by_the_close_ends_cleanly():
    async def until_close(reader, writer, n) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close"
                     b"\r\n\r\n")  # fmt: skip
        for i in range(3):
            writer.write(b"data: %d\r\n\r\n" % i)
            await writer.drain()
            await asyncio.sleep(0.02)
        return False

    async with serve(until_close) as server:
        c = client(server.port)
        answer = await c.open("/responses", b"{}", {})
        pieces = []
        while piece := await asyncio.wait_for(answer.read(), 3):
            pieces.append(piece)
        assert b"".join(pieces) == b"data: 0\r\n\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n"
        assert not c.idle


async def test_a_close_delimited_answer_cut_by_a_reset_is_disconnected():
    """Only a clean close ends such a body; a reset may have cut it short."""

    async def reset(reader, writer, n) -> bool:
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"partial')
        await writer.drain()
        await asyncio.sleep(0.05)
        linger = struct.pack("ii", 1, 0)  # close with a reset, not a FIN
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()
        return False

    async with serve(reset) as server:
        with pytest.raises(Disconnected):
            await asyncio.wait_for(client(server.port).post("/responses", b"{}", {}), 3)


@pytest.mark.parametrize(
    "unsolicited",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"stale":',  # a part of an answer
        b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"stale"}',  # a whole one
        b"\r\n",
    ],
    ids=["partial", "whole", "crlf"],
)
async def test_bytes_on_an_idle_connection_discard_it(unsolicited):
    """Whatever an idle connection receives, nobody asked for: its next answer could
    start with it. The next request goes on a fresh connection and gets its own answer."""

    async def then_stray_bytes(reader, writer, n) -> bool:
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(unsolicited)  # after the answer, before any other request
        await writer.drain()
        return True

    async with serve(then_stray_bytes) as server:
        c = client(server.port)
        assert (await c.post("/responses", b"{}", {})).body == b'{"ok":true}'
        await asyncio.sleep(0.15)
        assert all(conn.closed for conn in c.idle)  # discarded as the bytes came
        reply = await asyncio.wait_for(c.post("/responses", b"{}", {}), 3)
        assert (reply.status, reply.body) == (200, b'{"ok":true}')
        assert server.connections == 2


async def test_bytes_after_the_answer_in_the_same_read_discard_the_connection():
    """A body longer than its Content-Length: the rest is not the next answer."""

    async def too_long(reader, writer, n) -> bool:
        writer.write(OK + b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"stale"}')
        await writer.drain()
        return True

    async with serve(too_long) as server:
        c = client(server.port)
        for _ in range(2):
            reply = await asyncio.wait_for(c.post("/responses", b"{}", {}), 3)
            assert reply.body == b'{"ok":true}'
        assert server.connections == 2


async def test_a_reused_connection_starts_clean_after_a_stream_left_unread():
    """A streamed answer that arrived whole but was not read to its end (e.g. an error
    body read only in part): none of it may reach the next answer on that connection."""

    async def two_parts(reader, writer, n) -> bool:
        if n == 1:
            writer.write(sse_head(b"Content-Length: 10\r\n") + b"first-")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"tail")
        else:
            writer.write(sse_head(b"Content-Length: 6\r\n") + b"second")
        await writer.drain()
        return True

    async with serve(two_parts) as server:
        c = client(server.port)
        first = await c.open("/responses", b"{}", {})
        assert await first.read() == b"first-"
        await asyncio.sleep(0.15)  # the tail comes: the answer is whole, but unread
        first.release()
        second = await c.open("/responses", b"{}", {})
        body = b""
        while piece := await asyncio.wait_for(second.read(), 3):
            body += piece
        assert body == b"second"


async def test_a_reused_connection_is_read_again_after_an_answer_that_paused_it(monkeypatch):
    """An answer that filled the buffer (reading paused) and was released unread must not
    leave the socket paused: the next answer on the connection would never be read."""
    monkeypatch.setattr(upstream_http, "HIGH_WATER", 16)

    async def big_then_small(reader, writer, n) -> bool:
        body = b"x" * 100 if n == 1 else b"ok"
        writer.write(sse_head(b"Content-Length: %d\r\n" % len(body)) + body)
        await writer.drain()
        return True

    async with serve(big_then_small) as server:
        c = client(server.port, read_timeout_s=0.5)
        first = await c.open("/responses", b"{}", {})
        await asyncio.sleep(0.1)  # all 100 bytes arrive in one read: paused, and whole
        first.release()
        second = await asyncio.wait_for(c.open("/responses", b"{}", {}), 3)
        assert await asyncio.wait_for(second.read(), 3) == b"ok"


@pytest.mark.parametrize("pieces", [1, 40], ids=["one read", "many reads"])
async def test_headers_over_max_head_are_refused_however_they_arrive(pieces):
    pad = b"X-Pad: " + b"p" * (upstream_http.MAX_HEAD + 1000) + b"\r\n"
    answer = b"HTTP/1.1 200 OK\r\n" + pad + b"Content-Length: 2\r\n\r\n{}"

    async def padded(reader, writer, n) -> bool:
        size = -(-len(answer) // pieces)
        for i in range(0, len(answer), size):
            writer.write(answer[i : i + size])
            await writer.drain()
            await asyncio.sleep(0.001 if pieces > 1 else 0)
        return True

    async with serve(padded) as server:
        with pytest.raises(ProtocolError, match="bytes of headers"):
            await client(server.port).post("/responses", b"{}", {})
