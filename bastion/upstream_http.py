"""A small HTTP/1.1 client for the upstream: keep-alive POSTs, parsed by httptools.

The upstream client was most of a request's CPU: aiohttp's ClientSession spends
~80–110 µs per POST on this machine, this client ~15 µs (docs/choices.md,
``bench/candidates/clients.py``). It does only what the relay needs — POST a body,
then read the answer whole (``post``) or as it arrives (``open``), and reuse
connections. The HTTP framing (status line, headers, Content-Length, chunked,
keep-alive) is httptools' (llhttp, the parser of Node.js and uvicorn); what is left
here is the connection pool, backpressure and the timeouts.

Errors say whether the request may have reached the upstream: ``Unreachable`` (it
did not: connect refused or timed out), ``Disconnected`` (the connection broke
before the whole answer came), ``Timeout`` (silence past the read timeout),
``ProtocolError`` (not HTTP, or too large). A caller that is cancelled, or stops
reading a streamed answer, closes the connection: the upstream sees the client leave.

An answer with neither Content-Length nor chunked framing ends at the upstream's
close (RFC 9112 §6.3); llhttp would need ``llhttp_finish`` for that, which httptools
does not expose, so the EOF completes it here. A pooled connection is trusted with the
next request only while it is quiet: a byte arriving on it idle (or past the end of
its answer) discards it, and each exchange starts on a fresh parser with nothing held.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

IDLE_S = 4.0  # idle connections older than this are not reused (uvicorn, under vLLM, closes at 5)
MAX_BODY = 64 * 1024 * 1024  # a whole answer (``post``) larger than this is refused
HIGH_WATER = 256 * 1024  # a streamed answer buffered past this pauses reading the socket
MAX_HEAD = 64 * 1024  # status line and headers larger than this are refused (vLLM's: ~200 B)
_FRAMED = re.compile(rb"(?im)^(?:content-length:|transfer-encoding:[^\r\n]*chunked[ \t]*\r?$)")


class UpstreamHTTPError(Exception):
    """The upstream could not be asked or did not answer properly."""


class Unreachable(UpstreamHTTPError):
    """No connection: the request was not sent."""


class Disconnected(UpstreamHTTPError):
    """The connection broke before the whole answer arrived."""


class Timeout(UpstreamHTTPError, TimeoutError):
    """The upstream sent nothing for longer than the read timeout."""


class Aborted(UpstreamHTTPError):
    """The gateway ended the exchange itself (e.g. the lease that paid for it was given up)."""


class ProtocolError(UpstreamHTTPError):
    """The answer was not valid HTTP, or too large."""


@dataclass(slots=True)
class Reply:
    """A whole answer."""

    status: int
    body: bytes
    headers_at: float  # perf_counter when the status line and headers were in


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False  # an exchange is under way: from ``start`` until the pool takes it back
        self.streaming = False  # this exchange hands out the body as it comes
        self.waiter: asyncio.Future[Reply | int] | None = None  # whole answer, or status
        self.reader: asyncio.Future[None] | None = None  # a streamed read waiting for bytes
        self.error: UpstreamHTTPError | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.paused = False
        self.complete = False  # the current answer has fully arrived
        self.headed = False  # its status line and headers are in
        self.framed = False  # it has a Content-Length or is chunked (else the close ends it)
        self.head: list[bytes] = []  # the reads that brought the status line and headers
        self.unheaded = 0  # their size
        self.status = 0
        self.headers_at = 0.0
        self.last_read = 0.0
        self.idle_since = 0.0
        self.answered = False  # a byte of the current answer has arrived
        self.keep_alive = False  # the last answer allows another request on this connection
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None  # the read-timeout check, if armed

    def start(self, streaming: bool) -> asyncio.Future[Reply | int]:
        """A new exchange, from a clean state: a fresh parser, no flag left from the last
        answer (whose unread rest ``rest`` dropped: it must never open this one)."""
        loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.busy = True
        self.streaming = streaming
        self.waiter = loop.create_future()
        self.reader = None
        self.error = None
        self.complete = self.answered = self.keep_alive = self.headed = self.framed = False
        self.head, self.unheaded, self.status = [], 0, 0
        self.last_read = time.monotonic()
        return self.waiter

    def rest(self) -> None:
        """Between exchanges: drop what was not read of the last answer, and read the socket
        again (a paused one would hide stray bytes and the upstream's close)."""
        self.busy = False
        self.chunks, self.size = [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.complete or not self.busy:  # nobody asked for these: they would open the
            self.discard()  # next answer on this connection
            return
        self.last_read = time.monotonic()
        self.answered = True
        if not self.headed:
            self.head.append(data)
            self.unheaded += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.complete:  # bytes past the end of the answer, in the same read
                self.discard()
            else:
                ours = exc.__context__  # raised by a callback below
                why = f"upstream sent invalid HTTP: {exc}"
                self.fail(ours if isinstance(ours, ProtocolError) else ProtocolError(why))
            return
        if not self.headed and self.unheaded > MAX_HEAD:  # and it is all status and headers
            self.fail(ProtocolError(f"upstream sent over {MAX_HEAD} bytes of headers"))

    def eof_received(self) -> None:
        """The upstream closed its end: that is how an answer without framing ends."""
        if self.busy and self.headed and not self.framed and not self.complete:
            self._finish(keep_alive=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            why = f": {exc}" if exc else ""
            self.fail(Disconnected(f"upstream closed the connection{why}"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: stop llhttp (``data_received``)
            raise ProtocolError("upstream sent more than one answer")

    def on_headers_complete(self) -> None:
        # Only llhttp knows the framing, and tells only whether the connection may be kept
        # (never if the close ends the body). Not kept, or large: read the headers here
        # (an ``on_header`` callback would cost every answer a call per header).
        if self.unheaded > MAX_HEAD or not self.parser.should_keep_alive():
            head = b"".join(self.head)
            size = head.find(b"\r\n\r\n") + 4
            if size > MAX_HEAD:
                raise ProtocolError(f"upstream sent over {MAX_HEAD} bytes of headers")
            self.framed = _FRAMED.search(head, 0, size) is not None
        else:
            self.framed = True
        self.head = []
        self.headers_at = time.perf_counter()
        self.headed = True
        self.status = self.parser.get_status_code()
        if self.streaming:
            self._resolve(self.status)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        self.chunks.append(body)
        if not self.streaming:
            if self.size > MAX_BODY:
                self.fail(ProtocolError(f"upstream answer is over {MAX_BODY} bytes"))
            return
        if self.size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._finish(self.parser.should_keep_alive())  # valid only inside this callback

    # -- ours
    def _finish(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.complete = True
        if self.streaming:
            self._wake()
        else:
            body = self.take()
            self._resolve(Reply(self.status, body, self.headers_at))

    def take(self) -> bytes:
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks, self.size = [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return body

    def _resolve(self, result: Reply | int) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _wake(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None and not reader.done():
            reader.set_result(None)

    def fail(self, error: UpstreamHTTPError) -> None:
        if self.error is None:
            self.error = error
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake()  # a waiting reader finds self.error
        self.close()

    def discard(self) -> None:
        """Not to be reused; the answer already in stays good."""
        self.keep_alive = False
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()


class Answer:
    """A streamed answer: status and headers are in, the body arrives through ``read``."""

    def __init__(self, client: UpstreamClient, conn: _Connection, status: int) -> None:
        self.status = status
        self.headers_at = conn.headers_at
        self._client = client
        self._conn: _Connection | None = conn

    async def read(self) -> bytes:
        """What has arrived since the last read (waiting for it); b"" once the answer is whole."""
        conn = self._conn
        if conn is None:
            return b""
        while not conn.chunks:
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                self.release()
                return b""
            conn.reader = asyncio.get_running_loop().create_future()
            try:
                await conn.reader
            except BaseException:  # cancelled: the client left
                self._conn = None
                conn.close()
                raise
        return conn.take()

    def abort(self, why: str) -> None:
        """End the answer from our side: a waiting ``read`` raises ``Aborted(why)``."""
        if self._conn is not None:
            self._conn.fail(Aborted(why))

    def release(self) -> None:
        """Done with the answer: its connection is reused if the answer was whole, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client.done(conn)


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
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        host = host if url.port is None else f"{host}:{self.port}"
        fixed = {"Host": host, **headers}
        self.head = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fixed.items())
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle: list[_Connection] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        """POST ``body`` to prefix + ``path``; the whole answer, any status."""
        conn, reply = await self._send(path, body, headers, streaming=False)
        assert isinstance(reply, Reply)
        self.done(conn)
        return reply

    async def open(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        """POST, and return as soon as the status line and headers are in.

        The caller reads the body with ``Answer.read`` and must ``release`` it (reading
        to the end releases it too)."""
        conn, status = await self._send(path, body, headers, streaming=True)
        assert isinstance(status, int)
        return Answer(self, conn, status)

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def done(self, conn: _Connection) -> None:
        """Back to the pool if the answer is whole and the upstream keeps the connection."""
        if conn.complete and conn.keep_alive and not conn.closed:
            conn.rest()
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.close()

    async def _send(
        self, path: str, body: bytes, headers: dict[str, str], streaming: bool
    ) -> tuple[_Connection, Reply | int]:
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
                return conn, await self._exchange(conn, request, body, streaming)
            except Disconnected:
                if conn.answered:
                    raise
                # the upstream closed this idle connection as we sent: nothing was
                # answered, so ask once more on a fresh one
        conn = await self._connect()
        return conn, await self._exchange(conn, request, body, streaming)

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

    async def _exchange(
        self, conn: _Connection, request: bytes, body: bytes, streaming: bool
    ) -> Reply | int:
        waiter = conn.start(streaming)
        assert conn.transport is not None
        conn.transport.writelines((request, body))
        if conn.timer is None:  # else the pending check re-arms itself from last_read
            loop = asyncio.get_running_loop()
            conn.timer = loop.call_later(self.read_timeout_s, self._check_silence, conn)
        try:
            return await waiter
        except BaseException:  # cancelled, timed out, broken: this connection is done
            conn.close()
            raise

    def _check_silence(self, conn: _Connection) -> None:
        """Fires read_timeout after the last byte came: fail, or look again later.

        At most one timer per connection, re-armed lazily; time spent paused (the client reads
        slower than the upstream writes) is not the upstream's silence."""
        conn.timer = None
        if conn.complete or conn.closed:
            return
        silent = 0.0 if conn.paused else time.monotonic() - conn.last_read
        if silent >= self.read_timeout_s:
            conn.fail(Timeout(f"upstream sent nothing for {self.read_timeout_s:g}s"))
        else:
            loop = asyncio.get_running_loop()
            conn.timer = loop.call_later(self.read_timeout_s - silent, self._check_silence, conn)
