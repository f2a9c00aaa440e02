"""A small HTTP/1.1 client for upstream JSON calls: keep-alive POSTs, parsed by httptools.

Non-stream requests are the gateway's costliest path, and most of their CPU was the
upstream client: aiohttp's ClientSession spends ~80–110 µs per POST on this machine,
this client ~15 µs (docs/choices.md, ``bench/candidates/clients.py``). It does only
what the relay needs: POST a body, read the whole answer, reuse connections. The HTTP
framing (status line, headers, Content-Length, chunked, keep-alive) is httptools'
(llhttp, the parser of Node.js and uvicorn); what is left here is the connection pool
and the timeouts. Streams keep using aiohttp, which is the better streaming client.

Errors say whether the request may have reached the upstream: ``Unreachable`` (it
did not: connect refused or timed out), ``Disconnected`` (the connection broke
before the whole answer came), ``Timeout`` (silence past the read timeout),
``ProtocolError`` (not HTTP, or too large). A request whose task is cancelled closes
its connection, so the upstream sees the client leave.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

IDLE_S = 4.0  # idle connections older than this are not reused (uvicorn, under vLLM, closes at 5)
MAX_BODY = 64 * 1024 * 1024


class UpstreamHTTPError(Exception):
    """The upstream could not be asked or did not answer properly."""


class Unreachable(UpstreamHTTPError):
    """No connection: the request was not sent."""


class Disconnected(UpstreamHTTPError):
    """The connection broke before the whole answer arrived."""


class Timeout(UpstreamHTTPError, TimeoutError):
    """The upstream sent nothing for longer than the read timeout."""


class ProtocolError(UpstreamHTTPError):
    """The answer was not valid HTTP, or too large."""


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers_at: float  # perf_counter when the status line and headers were in


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.headers_at = 0.0
        self.last_read = 0.0
        self.idle_since = 0.0
        self.answered = False  # a byte of the current answer has arrived
        self.keep_alive = False  # the last answer allows another request on this connection
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"upstream sent invalid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = f": {exc}" if exc else ""
        self._fail(Disconnected(f"upstream closed the connection{why}"))

    # -- httptools callbacks
    def on_headers_complete(self) -> None:
        self.headers_at = time.perf_counter()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_BODY:
            self._fail(ProtocolError(f"upstream answer is over {MAX_BODY} bytes"))
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # valid only inside this callback
        waiter, self.waiter = self.waiter, None
        status = self.parser.get_status_code()
        body = b"".join(self.chunks)
        self.chunks, self.size = [], 0
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(status, body, self.headers_at))

    # -- ours
    def _fail(self, error: UpstreamHTTPError) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return not self.closed and self.keep_alive


class UpstreamClient:
    """Keep-alive POSTs to one upstream base URL (``http[s]://host:port/prefix``)."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream url must be http(s)://host[:port]/…, not {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/").encode()
        host = self.host if url.port is None else f"{self.host}:{self.port}"
        fixed = {"Host": host, **headers}
        self.head = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fixed.items())
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle: list[_Connection] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        """POST ``body`` to prefix + ``path``; the whole answer, any status."""
        extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
        request = b"POST %s%s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n" % (
            self.prefix,
            path.encode(),
            self.head,
            extra,
            len(body),
        )
        conn = self._checkout()
        if conn is not None:
            try:
                return await self._exchange(conn, request, body)
            except Disconnected:
                if conn.answered:
                    raise
                # the upstream closed this idle connection as we sent: nothing was
                # answered, so ask once more on a fresh one
        return await self._exchange(await self._connect(), request, body)

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def _checkout(self) -> _Connection | None:
        cutoff = time.monotonic() - IDLE_S
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.idle_since > cutoff:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            raise Unreachable(
                f"cannot connect to {self.host}:{self.port}: "
                f"no answer in {self.connect_timeout_s:g}s"
            ) from None
        except OSError as exc:
            raise Unreachable(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    async def _exchange(self, conn: _Connection, request: bytes, body: bytes) -> Reply:
        loop = asyncio.get_running_loop()
        conn.waiter = waiter = loop.create_future()
        conn.answered = False
        conn.last_read = time.monotonic()
        assert conn.transport is not None
        conn.transport.writelines((request, body))
        timer = loop.call_later(self.read_timeout_s, self._check_silence, conn, waiter)
        try:
            reply = await waiter
        except BaseException:  # cancelled, timed out, broken: this connection is done
            conn.close()
            raise
        finally:
            timer.cancel()
        if conn.reusable():
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.close()
        return reply

    def _check_silence(self, conn: _Connection, waiter: asyncio.Future[Reply]) -> None:
        """Fires read_timeout after the last byte came: fail, or look again later."""
        if waiter.done():
            return
        silent = time.monotonic() - conn.last_read
        if silent >= self.read_timeout_s:
            conn._fail(Timeout(f"upstream sent nothing for {self.read_timeout_s:g}s"))
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(self.read_timeout_s - silent, self._check_silence, conn, waiter)
