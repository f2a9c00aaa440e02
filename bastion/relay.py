"""Upstream relay: send the request to an upstream, pass the answer back unchanged.

JSON answers are read whole (usage is in them). Streams are cut at SSE event
boundaries and each event goes to the client as soon as it is complete, byte for
byte; a scanner beside the pipe notes usage, counts deltas for estimates, and
rewrites only what SPEC §1 allows (the model name, the usage chunk Bastion asked
for on the client's behalf). An upstream that breaks off ends the client's stream
with a well-formed error event, never a silent truncation.

Requests go upstream through ``upstream_http`` (keep-alive connections, httptools
framing); aiohttp's client serves only the health checks.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from bastion.config import ModelConfig, UpstreamConfig
from bastion.errors import APIError
from bastion.metering import Usage, usage_from
from bastion.upstream_http import (
    Answer,
    Disconnected,
    Reply,
    Unreachable,
    UpstreamClient,
    UpstreamHTTPError,
)
from bastion.upstreams import Replica, UpstreamPool

_TYPE = re.compile(rb'"type"\s*:\s*"([^"]+)"')
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

    def abort(self, why: str) -> None:
        """End the stream with an error event (the upstream is cancelled)."""
        self.aborted = why
        if self.answer is not None:
            self.answer.abort(why)


class Relay:
    def __init__(
        self, upstreams: dict[str, UpstreamConfig], health_interval_s: float = 5.0
    ) -> None:
        self.upstreams = upstreams
        self.pool = UpstreamPool(upstreams, health_interval_s)
        self.session: aiohttp.ClientSession | None = None  # health checks and /readyz probes
        self.clients: dict[str, UpstreamClient] = {}  # requests, one keep-alive pool each

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            skip_auto_headers=("User-Agent",),
        )
        await self.pool.start(self.session)
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
        for client in self.clients.values():
            await client.close()
        if self.session:
            await self.session.close()

    async def send(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Try the model's replicas until one answers; retry only before the client got a byte."""
        assert self.clients, "Relay.start() first"
        path = "/responses" if call.endpoint == "responses" else "/chat/completions"
        tried: set[str] = set()
        sent = time.perf_counter()
        error: APIError | None = None
        while (replica := self.pool.pick(call.model.upstreams, tried)) is not None:
            tried.add(replica.config.name)
            call.upstream = replica.config
            call.attempts += 1
            replica.outstanding += 1
            try:
                return await self._attempt(request, call, replica, path, sent)
            except _Retry as retry:
                error = retry.error
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
            raise _Retry(APIError(502, "upstream_error", f"upstream unreachable: {exc}")) from None
        except Disconnected as exc:
            call.reached = True
            self.pool.failed(replica, str(exc))
            raise _Retry(APIError(502, "upstream_error", str(exc))) from None
        except UpstreamHTTPError as exc:  # timed out, or not HTTP
            call.reached = True
            raise APIError(502, "upstream_error", str(exc)) from None
        finally:
            call.upstream_s = time.perf_counter() - sent
        call.reached = True
        call.first_byte_at = answer.headers_at
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
            response = await self._stream(request, answer, call)
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
        self, request: web.Request, upstream: Answer, call: Call
    ) -> web.StreamResponse:
        scanner = ResponsesScanner(call) if call.endpoint == "responses" else ChatScanner(call)
        response = web.StreamResponse(status=200, headers={**STREAM_HEADERS, **call.headers})
        call.status = "cancelled"  # until the stream is known to have ended well
        try:
            await _send(response.prepare(request))
            failure = await self._pipe(upstream, response, scanner, call)
            if failure:
                await _send(response.write(scanner.error_event(failure)))
            call.status = "502" if failure or scanner.errored else "200"
            await _send(response.write_eof())
        except _ClientGone:
            call.status = "cancelled"  # aiohttp ignores the closed connection from here
        return response

    @staticmethod
    async def _pipe(
        upstream: Answer,
        response: web.StreamResponse,
        scanner: ResponsesScanner | ChatScanner,
        call: Call,
    ) -> str:
        """Relay whole SSE events as they come; returns why the upstream failed, or ''."""
        buffer = b""
        try:
            while chunk := await upstream.read():
                buffer += chunk
                out = []
                start = 0
                while (end := buffer.find(b"\n\n", start)) >= 0:
                    event = scanner.feed(buffer[start : end + 2])
                    start = end + 2
                    if event:
                        out.append(event)
                buffer = buffer[start:]
                if out:
                    await _send(response.write(out[0] if len(out) == 1 else b"".join(out)))
        except Disconnected as exc:
            return f"upstream broke off the stream: {exc}"
        except UpstreamHTTPError as exc:  # silent past the read timeout, or not HTTP
            return str(exc)
        return "" if scanner.finished else "upstream closed the stream before it finished"


class _ClientGone(Exception):
    """Writing to the client failed: it disconnected (not an upstream error)."""


async def _send(write: Awaitable[object]) -> None:
    try:
        await write
    except ConnectionResetError:
        raise _ClientGone from None


class _Retry(Exception):
    """This replica failed before the client saw anything: another may be tried."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


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
        if event.startswith(b"data: [DONE]"):
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
        elif event.startswith(b'data: {"error"'):
            self.errored = True
        else:
            self.call.deltas += 1
        if self.old_model and self.old_model in event:
            event = event.replace(self.old_model, _model_field(self.call.model.id))
        return event

    def error_event(self, message: str) -> bytes:
        return b"data: " + orjson.dumps({"error": _error_object(message)}) + b"\n\n"


def upstream_error(status: int, body: bytes, call: Call) -> APIError:
    """Map an upstream error answer to what the client gets (SPEC §1, Errors)."""
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
    """The SSE `event:` name, else the data's leading "type" (vLLM and OpenAI put it first)."""
    if event.startswith(b"event:"):
        return event[6 : event.find(b"\n")].strip()
    found = _TYPE.search(event, 0, 160)
    return found.group(1) if found else b""


def _data(event: bytes) -> dict:
    """The JSON of an SSE event's data line(s); {} if there is none or it is not JSON."""
    lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
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
