"""Upstream relay: send the request to an upstream, pass the answer back unchanged.

JSON answers are read whole (usage is in them). Streams are cut at SSE event
boundaries (``EventFramer``: any line end the SSE spec allows) and each event goes to
the client as soon as it is complete, byte for byte; a scanner beside the pipe notes
usage, counts deltas for estimates, and rewrites only what docs/api.md allows (the model
name, the usage chunk Bastion asked for on the client's behalf). An upstream that
breaks off, or sends an event over ``max_event_bytes``, ends the client's stream with
a well-formed error event, never a silent truncation.

A replica that fails before the client got a byte (refused, broken, 5xx, silent past
its read timeout, not HTTP) is ejected and the request tried on another; a timeout is
retried once only, so a fleet that hangs costs two read timeouts, not one per replica.
A client that reads nothing for ``client_write_timeout_s`` is cut off like one that
left: its upstream is cancelled and the slot freed. Waiting for the client costs a
timer only while its transport is actually over the high-water mark.

Requests go upstream through ``upstream_http`` (keep-alive connections, httptools
framing); aiohttp's client serves only the health checks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http import StreamWriter

from bastion.config import ModelConfig, RoutingConfig, ServerConfig, UpstreamConfig
from bastion.errors import APIError
from bastion.metering import Usage, usage_from
from bastion.routing import Router
from bastion.upstream_http import (
    Aborted,
    Answer,
    Disconnected,
    ProtocolError,
    Reply,
    Timeout,
    Unreachable,
    UpstreamClient,
    UpstreamHTTPError,
)
from bastion.upstreams import Replica, UpstreamPool

if TYPE_CHECKING:
    from bastion.tracing import RequestTrace

log = logging.getLogger("bastion.relay")

_TYPE = re.compile(rb'"type"\s*:\s*"([^"]+)"')
_DATA = re.compile(rb"(?:\A|[\r\n])data: ?")  # where the first data line's value starts
_EMPTY_LINE = re.compile(rb"\n[\r\n]")  # (+ "\r\r"): sre finds it faster than bytes.find
_OVERFLOW = "upstream sent an SSE event over %d bytes"
_SEQ = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")
_USAGE_NULL = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')
STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(slots=True, eq=False)
class Call:
    """One request on its way through the relay, and what became of it."""

    request_id: str
    endpoint: str  # "responses" | "chat"
    model: ModelConfig
    payload: bytes
    stream: bool
    store_true: bool
    strip_usage: bool  # chat: Bastion asked for the usage chunk; the client did not
    headers: dict[str, str] = field(default_factory=dict)  # for the client
    upstream: UpstreamConfig | None = None  # the replica that answered (or failed last)
    attempts: int = 0
    # outcome
    reached: bool = False  # the upstream received the request (a ledger row is due)
    status: str = "502"
    usage: Usage | None = None
    deltas: int = 0  # streamed content events, for estimates
    body_bytes: int = 0
    input_bound: int = 0
    output_cap: int = 0  # the output tokens admitted (cap × n)
    epoch: int = 0  # the credit lease generation that admitted it
    first_byte_at: float = 0.0  # perf_counter when the upstream's headers came
    upstream_s: float = 0.0  # time spent waiting on the upstream
    answer: Answer | None = None  # a stream being relayed, so it can be ended
    input_estimate: int = -1  # the input estimate, once made (metering.estimate_input)
    aborted: str = ""  # why the gateway ended it, if it did
    # tracing on (bastion/tracing.py): the request's span, the context sent upstream, and
    # the HTTP status of the current attempt's answer (0: none yet)
    trace: RequestTrace | None = None
    traceparent: str = ""
    upstream_status: int = 0

    def abort(self, why: str) -> None:
        """End the stream with an error event (the upstream is cancelled)."""
        self.aborted = why
        if self.answer is not None:
            self.answer.abort(why)


class Relay:
    def __init__(
        self,
        upstreams: dict[str, UpstreamConfig],
        health_interval_s: float = 5.0,
        client_write_timeout_s: float = 60.0,
        max_event_bytes: int = ServerConfig.max_event_bytes,
        models: Mapping[str, ModelConfig] | None = None,
        routing: RoutingConfig | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.client_write_timeout_s = client_write_timeout_s
        self.max_event_bytes = max_event_bytes
        self.pool = UpstreamPool(upstreams, health_interval_s)
        self.router = Router(self.pool, models or {}, routing or RoutingConfig())  # per model
        self.session: aiohttp.ClientSession | None = None  # health checks and /readyz probes
        self.clients: dict[str, UpstreamClient] = {}  # requests, one keep-alive pool each

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            skip_auto_headers=("User-Agent",),
        )
        await self.pool.start(self.session)
        self.router.start(self.session)  # load signals, if a model's policy reads them
        self.clients = {
            name: UpstreamClient(
                u.url,
                {"Content-Type": "application/json"}
                | ({"Authorization": f"Bearer {u.api_key}"} if u.api_key else {}),
                u.connect_timeout_s,
                u.read_timeout_s,
            )
            for name, u in self.upstreams.items()
        }

    async def close(self) -> None:
        await self.pool.close()
        await self.router.close()
        for client in self.clients.values():
            await client.close()
        if self.session:
            await self.session.close()

    async def send(
        self, request: web.Request, call: Call, body: dict | None = None
    ) -> web.StreamResponse:
        """Try the model's replicas until one answers; retry only before the client got a byte.

        After a second timeout no other replica is tried: each costs a whole read timeout.
        The model's routing policy picks each replica; an affinity key (from ``body``, the
        parsed request, and the headers) is computed once, for every attempt."""
        assert self.clients, "Relay.start() first"
        path = "/responses" if call.endpoint == "responses" else "/chat/completions"
        tried: set[str] = set()
        sent = time.perf_counter()
        error: APIError | None = None
        timed_out = False
        policy = self.router.policy(call.model)
        key = 0
        if policy.keyed:
            key = policy.key(body, request.headers if request is not None else None)
        while (replica := policy.pick(call.model.upstreams, tried, key)) is not None:
            tried.add(replica.config.name)
            call.upstream = replica.config
            call.attempts += 1
            replica.outstanding += 1
            try:
                work = self._attempt(request, call, replica, path, sent)
                return await (work if call.trace is None else call.trace.attempt(work, call))
            except _Retry as retry:
                error = retry.error
                if retry.timed_out:
                    if timed_out:
                        break
                    timed_out = True
            except asyncio.CancelledError:  # the client left; the upstream may have begun
                call.reached = True  # so the ledger records the cancellation (cost 0 if no output)
                raise
            finally:
                replica.outstanding -= 1
        assert error is not None
        raise error

    async def _attempt(
        self, request: web.Request, call: Call, replica: Replica, path: str, sent: float
    ) -> web.StreamResponse:
        """One replica: send, then relay its answer (whole JSON, or a stream as it comes)."""
        assert call.upstream is not None
        client = self.clients[call.upstream.name]
        headers = {"X-Request-Id": call.request_id}
        if call.traceparent:
            headers["traceparent"] = call.traceparent
        answer: Reply | Answer
        try:
            if call.stream:
                headers["Accept"] = "text/event-stream"
                answer = await client.open(path, call.payload, headers)
                call.answer = answer
                if call.aborted:
                    answer.abort(call.aborted)
            else:
                answer = await client.post(path, call.payload, headers)
        except Unreachable as exc:
            self.pool.failed(replica, str(exc))
            raise _Retry(APIError(502, "upstream_error", public(exc))) from None
        except (Disconnected, Timeout, ProtocolError) as exc:  # the client has seen nothing yet
            call.reached = True
            self.pool.failed(replica, str(exc))
            error = APIError(502, "upstream_error", public(exc))
            raise _Retry(error, timed_out=isinstance(exc, Timeout)) from None
        finally:
            call.upstream_s = time.perf_counter() - sent
        call.reached = True
        call.first_byte_at = answer.headers_at
        call.upstream_status = answer.status
        try:
            if answer.status >= 400:
                body = answer.body if isinstance(answer, Reply) else await _read_some(answer)
                error = upstream_error(answer.status, body[:65536], call)
                if answer.status >= 500 and not call.store_true:
                    self.pool.failed(replica, f"status {answer.status}")
                    raise _Retry(error)
                raise error
            self.pool.succeeded(replica)
            if isinstance(answer, Reply):
                return self._json(answer.body, call)
            response = await self._stream(request, answer, call, replica)
            call.upstream_s = time.perf_counter() - sent
            return response
        finally:
            if isinstance(answer, Answer):
                answer.release()  # reused if the stream was read to its end, else closed

    @staticmethod
    def _json(data: bytes, call: Call) -> web.Response:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise APIError(502, "upstream_error", "upstream sent a malformed JSON body") from None
        call.usage = usage_from(obj, call.endpoint)
        call.body_bytes = len(data)
        if call.model.renamed:
            data = rename(data, call.model)
        call.status = "200"
        call.headers["Content-Type"] = "application/json"
        return web.Response(body=data, status=200, headers=call.headers)

    async def _stream(
        self, request: web.Request, upstream: Answer, call: Call, replica: Replica
    ) -> web.StreamResponse:
        scanner = ResponsesScanner(call) if call.endpoint == "responses" else ChatScanner(call)
        response = web.StreamResponse(status=200, headers={**STREAM_HEADERS, **call.headers})
        call.status = "cancelled"  # until the stream is known to have ended well
        try:
            writer = await response.prepare(request)
            assert isinstance(writer, StreamWriter)
            failure = await self._pipe(upstream, writer, scanner, call, replica)
            if failure:
                await self._write(writer, scanner.error_event(failure), call)
            call.status = "502" if failure or scanner.errored else "200"
            transport = writer.transport
            if transport is not None and transport.get_write_buffer_size():  # client behind
                await self._guard(response.write_eof(), transport, call)
            else:
                await response.write_eof()
        except ConnectionError:  # the client left (or was cut off); aiohttp ignores it from here
            call.status = "cancelled"
        return response

    async def _pipe(
        self,
        upstream: Answer,
        writer: StreamWriter,
        scanner: ResponsesScanner | ChatScanner,
        call: Call,
        replica: Replica,
    ) -> str:
        """Relay whole SSE events as they come; returns why the upstream failed, or ''.

        Writes never wait inside aiohttp (``drain=False``): only when the client's
        transport is over its high-water mark is the drain awaited, under the write timeout."""
        protocol = writer.protocol
        framer = EventFramer(self.max_event_bytes)
        try:
            while chunk := await upstream.read():
                out = []
                for event in framer.feed(chunk):
                    if sent := scanner.feed(event):
                        out.append(sent)
                if out:
                    await writer.write(out[0] if len(out) == 1 else b"".join(out), drain=False)
                    if protocol.writing_paused:
                        await self._drain(writer, call)
                if framer.overflow:  # that answer's fault, not a sign of the replica's health
                    return framer.overflow
        except Aborted as exc:  # by the gateway: the replica is not at fault
            return str(exc)
        except Disconnected as exc:
            self.pool.failed(replica, str(exc))
            return "upstream broke off the stream"
        except UpstreamHTTPError as exc:  # silent past the read timeout, or not HTTP
            self.pool.failed(replica, str(exc))
            return public(exc)
        rest = framer.rest()
        if rest and not rest.strip(b"\r\n"):  # the LF of a CR LF that ended the last event
            await self._write(writer, rest, call)
        return "" if scanner.finished else "upstream closed the stream before it finished"

    async def _write(self, writer: StreamWriter, data: bytes, call: Call) -> None:
        await writer.write(data, drain=False)
        if writer.protocol.writing_paused:
            await self._drain(writer, call)

    async def _drain(self, writer: StreamWriter, call: Call) -> None:
        """The client is behind: wait for it to read, but cut it off if it reads nothing."""
        transport = writer.transport
        if transport is not None:
            await self._guard(writer.drain(), transport, call)

    async def _guard(self, wait: Awaitable[None], transport: asyncio.Transport, call: Call) -> None:
        """``wait`` for the client; past the write timeout, drop its connection.

        Dropping it ends the request as a disconnect does (aiohttp cancels the handler,
        or the next write fails): the upstream is closed, the delivered part settled."""
        after = self.client_write_timeout_s
        timer = asyncio.get_running_loop().call_later(after, _cut_off, transport, call, after)
        try:
            await wait
        finally:
            timer.cancel()


def _cut_off(transport: asyncio.Transport, call: Call, after: float) -> None:
    log.warning("request %s: the client read nothing for %gs; cut off", call.request_id, after)
    transport.abort()


class EventFramer:
    """Cuts an SSE byte stream into events, each exactly as it was sent.

    The SSE spec ends lines with "\n", "\r\n" or "\r", and an event at an empty line:
    a line end right after another, i.e. "\n\n", "\n\r" or "\r\r" ("\r\n" is one line
    end). An event ends after its empty line's line end; if that is a "\r" whose "\n"
    has not come yet, the "\n" opens the next event's bytes (a leading empty line, which
    SSE parsers and the scanners skip), so no event waits for a byte it does not need.

    Each byte is searched once: the part of an event held across chunks is kept as a
    list (joined once, when the event completes) and only its last byte is looked at
    again, for an empty line split between two chunks. "\r\r" (rare) is searched for
    once per chunk, not once per event.

    An event over ``limit`` bytes (complete or not) ends the stream: ``overflow`` says
    so, and the events completed before it are still handed out."""

    __slots__ = ("held", "limit", "overflow", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: list[bytes] = []  # the start of an event that is not complete yet
        self.size = 0  # bytes held
        self.overflow = ""  # why the stream must end here, once an event is too large

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completes (up to one over the limit: see ``overflow``)."""
        if self.held or 13 in chunk:
            return self._split(chunk, 0)
        found = _EMPTY_LINE.search(chunk)  # without "\r": the first "\n\n"
        if found and found.end() == len(chunk) <= self.limit:
            return [chunk]  # vLLM's case: one whole event per chunk
        return self._split(chunk, found.start() if found else len(chunk))

    def _split(self, chunk: bytes, searched: int) -> list[bytes]:
        """``feed``, any case; ``chunk[:searched]`` holds no empty line (it was searched)."""
        events: list[bytes] = []
        start = self._straddle(chunk) if self.held else 0
        if start:
            events.append(b"".join([*self.held, chunk[:start]]))
            self.held, self.size = [], 0
            if len(events[0]) > self.limit:
                self.overflow = _OVERFLOW % self.limit
                return []
        searched = max(start, searched)
        if 13 in chunk:
            ends = self._ends(chunk, searched)
        else:  # only "\n\n" can end an event: let sre walk them
            ends = [found.end() for found in _EMPTY_LINE.finditer(chunk, searched)]
        for end in ends:
            event = chunk[start:end]
            if self.held:
                event = b"".join([*self.held, event])
                self.held, self.size = [], 0
            if len(event) > self.limit:
                self.overflow = _OVERFLOW % self.limit
                return events
            events.append(event)
            start = end
        if start < len(chunk):
            self.held.append(chunk[start:] if start else chunk)
            self.size += len(chunk) - start
            if self.size > self.limit:
                self.overflow = _OVERFLOW % self.limit
        return events

    @staticmethod
    def _ends(chunk: bytes, start: int) -> list[int]:
        """Where each event ending in ``chunk[start:]`` ends, any line ends ("\r\r", rare,
        is searched for once per chunk, not once per event)."""
        ends = []
        rr = chunk.find(b"\r\r", start)
        while True:
            found = _EMPTY_LINE.search(chunk, start)
            at = found.start() if found else -1
            if 0 <= rr < start:
                rr = chunk.find(b"\r\r", start)
            if 0 <= rr < at or at < 0:
                at = rr
            if at < 0:
                return ends
            start = at + 3 if chunk[at + 1] == 13 and chunk[at + 2 : at + 3] == b"\n" else at + 2
            ends.append(start)

    def rest(self) -> bytes:
        """What is held: the start of an event the stream never finished."""
        return b"".join(self.held)

    def _straddle(self, chunk: bytes) -> int:
        """An empty line split between the held bytes and ``chunk``: where it ends, or 0."""
        last, first = self.held[-1][-1], chunk[0]
        if (last == 10 and first in (10, 13)) or (last == first == 13):
            return 2 if first == 13 and chunk[1:2] == b"\n" else 1
        return 0


class _Retry(Exception):
    """This replica failed before the client saw anything: another may be tried."""

    def __init__(self, error: APIError, timed_out: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.timed_out = timed_out


class ResponsesScanner:
    """Responses SSE: usage from the terminal event; sequence numbers for our error event."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.finished = False
        self.errored = False
        self.last = b""
        self.old_model = _model_field(call.model.upstream_model) if call.model.renamed else b""

    def feed(self, event: bytes) -> bytes:
        kind = _event_type(event)
        if kind.endswith(b".delta"):
            self.call.deltas += 1
        elif kind in _TERMINAL:
            self.finished = True
            self.call.usage = usage_from(_data(event).get("response"), "responses")
        elif kind == b"error":
            self.finished = self.errored = True
        if kind:  # not a comment or an empty line: the sequence to continue is in it
            self.last = event
        if self.old_model and self.old_model in event:
            event = event.replace(self.old_model, _model_field(self.call.model.id))
        return event

    def error_event(self, message: str) -> bytes:
        seen = _SEQ.search(self.last)
        seq = int(seen.group(1)) + 1 if seen else 0
        data = {"type": "error", "error": _error_object(message), "sequence_number": seq}
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


class ChatScanner:
    """Chat SSE: usage from the usage chunk (dropped again if only Bastion asked for it)."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.finished = False
        self.errored = False
        self.old_model = _model_field(call.model.upstream_model) if call.model.renamed else b""

    def feed(self, event: bytes) -> bytes | None:
        if event.startswith(b"data: {"):  # the common case: a chunk
            at = 6
        else:  # [DONE]; or "data:" without its space, after other lines, or none at all
            at = _data_at(event)
            if at < 0:  # a comment (sse-starlette's pings), an empty line: nothing produced
                return event
            if event.startswith(b"[DONE]", at):
                self.finished = True
                return event
        if b'"usage"' in event:  # a usage report, or OpenAI's "usage": null in every chunk
            obj = _data(event)
            usage = usage_from(obj, "chat")
            if usage is not None:
                self.call.usage = usage
                if self.call.strip_usage and not obj.get("choices"):
                    return None
            if obj.get("choices"):
                self.call.deltas += 1
            if self.call.strip_usage:
                for null in _USAGE_NULL:
                    event = event.replace(null, b"")
        elif event.startswith(b'{"error"', at):
            self.errored = True
        else:
            self.call.deltas += 1
        if self.old_model and self.old_model in event:
            event = event.replace(self.old_model, _model_field(self.call.model.id))
        return event

    def error_event(self, message: str) -> bytes:
        return b"data: " + orjson.dumps({"error": _error_object(message)}) + b"\n\n"


def public(exc: UpstreamHTTPError) -> str:
    """What a client may read about an upstream failure: its kind, never the operator's
    hosts and ports (those go to the log, through ``UpstreamPool.failed``)."""
    if isinstance(exc, Unreachable):
        return "upstream unreachable"
    if isinstance(exc, Disconnected):
        return "upstream closed the connection before answering"
    if isinstance(exc, Timeout):
        return str(exc)  # "upstream sent nothing for Ns": no address in it
    if isinstance(exc, Aborted):
        return str(exc)
    return "upstream sent an answer that is not valid HTTP"


def upstream_error(status: int, body: bytes, call: Call) -> APIError:
    """Map an upstream error answer to what the client gets (docs/api.md, Errors)."""
    detail = _error_detail(body)
    message = detail.get("message") if isinstance(detail.get("message"), str) else ""
    if status >= 500:
        if call.store_true:
            return APIError(
                502,
                "upstream_error",
                f"The upstream refused the request ({status}): it does not keep state. "
                'Send "store": false.',
                headers={"x-should-retry": "false"},
            )
        text = f"upstream returned {status}" + (f": {message}" if message else "")
        return APIError(502, "upstream_error", text)
    if status in (401, 403, 404):
        return APIError(
            502,
            "upstream_error",
            f"upstream refused Bastion's request ({status}); the gateway is misconfigured",
        )
    code = detail.get("code")
    param = detail.get("param")
    return APIError(
        status,
        code if isinstance(code, str) and code else "invalid_request",
        message or f"upstream rejected the request ({status})",
        param if isinstance(param, str) else None,
    )


def rename(data: bytes, model: ModelConfig) -> bytes:
    return data.replace(_model_field(model.upstream_model), _model_field(model.id))


def _model_field(name: str) -> bytes:
    return b'"model":' + orjson.dumps(name)


def _event_type(event: bytes) -> bytes:
    """The SSE `event:` name, else the data's leading "type" (vLLM and OpenAI put it first);
    b"" for an event without data (a comment, an empty line)."""
    if event.startswith(b"event:"):
        name = event[6 : event.find(b"\n")]  # to the "\n" of "\n" or "\r\n", or past "\r"
        if 13 in name:
            name = name[: name.find(b"\r")]
        return name.strip()
    at = _data_at(event)
    found = _TYPE.search(event, at, at + 160) if at >= 0 else None
    return found.group(1) if found else b""


def _data_at(event: bytes) -> int:
    """Where the value of the event's first `data:` line starts; -1 if it has none."""
    found = _DATA.search(event)
    return found.end() if found else -1


def _data(event: bytes) -> dict:
    """The JSON of an SSE event's data line(s); {} if there is none or it is not JSON.
    (``bytes.splitlines`` splits at "\r\n", "\r" and "\n": the SSE line ends exactly.)"""
    lines = [ln[5:].lstrip(b" ") for ln in event.splitlines() if ln.startswith(b"data:")]
    try:
        obj = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _error_detail(body: bytes) -> dict:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if isinstance(obj, dict):
        inner = obj.get("error", obj)
        return inner if isinstance(inner, dict) else {"message": str(inner)}
    return {}


def _error_object(message: str) -> dict[str, object]:
    return {"type": "upstream_error", "code": "upstream_error", "message": message, "param": None}


async def _read_some(answer: Answer, limit: int = 65536) -> bytes:
    """The start of an error answer's body (what a message can be made of)."""
    body = b""
    try:
        while len(body) < limit and (chunk := await answer.read()):
            body += chunk
    except UpstreamHTTPError:
        pass
    return body
