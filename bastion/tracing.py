"""OpenTelemetry tracing: a span per API request, a child span per upstream attempt.

The gateway imports this module only when ``[tracing] otlp_endpoint`` is set
(``app.open_tracing``): with tracing off no OpenTelemetry module is loaded and the hot
path pays a ``None`` check. Every OpenTelemetry import of Bastion is here.

Spans follow the GenAI semantic conventions (docs/tracing.md lists what is recorded).
Ending a span only appends it to the BatchSpanProcessor's queue; the SDK's own thread
encodes the batches (protobuf) and POSTs them to the collector (OTLP/HTTP). A slow or
dead collector therefore holds up that thread only: once its queue is full, new spans
are dropped, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import sys
import threading
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from bastion import __version__
from bastion.config import TracingConfig, UpstreamConfig
from bastion.errors import APIError
from bastion.money import format_usd

if TYPE_CHECKING:
    from bastion.relay import Call
    from bastion.store import ApiKey, LedgerRow
    from bastion.validation import ClientRequest

T = TypeVar("T")
Attributes = dict[str, str | bool | int]

SHUTDOWN_S = 5.0  # cleanup waits this long for the last spans to go out, not longer
TEXT_LIMIT = 256  # client- or upstream-chosen text (a model name, a message) is cut here
_API_TYPE = {"responses": "responses", "chat": "chat_completions"}  # openai.api.type
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


class Tracing:
    """The tracer provider of one gateway process, and its exporter."""

    def __init__(self, config: TracingConfig, models: Iterable[str]) -> None:
        resource = Resource.create(
            {"service.name": config.service_name, "service.version": __version__}
        )
        self.provider = TracerProvider(
            resource=resource,
            sampler=ALWAYS_ON,  # ``request`` samples: before the SDK is called at all
            shutdown_on_exit=False,  # ``close`` flushes, with a bound; never at exit, unbounded
        )
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, headers=config.headers or None)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("bastion", __version__)
        self.ratio = config.sample_ratio
        self.models = frozenset(models)  # named in span names; a client's typo is not
        self._upstreams: dict[str, Attributes] = {}

    def request(self, endpoint: str, request_id: str) -> RequestTrace | None:
        """Open the span of an API request, named for its model once the body is read;
        None for a request not sampled.

        Sampling is decided here, not by the SDK's sampler: even a span it drops costs a
        third of a recorded one, so a request left out costs one ``random()`` instead.
        (Every trace starts here, so a coin per request samples as a trace id would.)

        Each attribute costs the SDK a check when set and an encoding when exported (most
        of tracing's cost): what another attribute or the attempt spans already say (the
        route, POST, the upstream) is left out."""
        if self.ratio < 1.0 and random.random() >= self.ratio:
            return None
        attributes: Attributes = {
            "gen_ai.operation.name": "chat",  # both APIs: semconv has no other name for them
            "gen_ai.provider.name": "openai",  # the API spoken (its attribute flavour)
            "openai.api.type": _API_TYPE[endpoint],
            "bastion.request_id": request_id,
        }
        span = self.tracer.start_span("chat", kind=SpanKind.SERVER, attributes=attributes)
        return RequestTrace(self, span)

    def upstream(self, upstream: UpstreamConfig) -> Attributes:
        """An upstream's fixed attributes, worked out once."""
        found = self._upstreams.get(upstream.name)
        if found is None:
            url = urlsplit(upstream.url)
            port = 443 if url.scheme == "https" else 80
            with contextlib.suppress(ValueError):  # not a number: the client reports that
                port = url.port or port
            found = {
                "bastion.upstream": upstream.name,
                "server.address": url.hostname or "",
                "server.port": port,
            }
            self._upstreams[upstream.name] = found
        return found

    async def close(self) -> None:
        """Send what is queued (drain, cleanup), waiting at most SHUTDOWN_S: a dead
        collector must not hold up the exit. The SDK's shutdown blocks, so it runs on a
        daemon thread the exit does not wait for."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def shutdown() -> None:
            self.provider.shutdown()
            with contextlib.suppress(RuntimeError):  # the loop closed first: nobody waits
                loop.call_soon_threadsafe(done.set)

        threading.Thread(target=shutdown, name="bastion-tracing-close", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), SHUTDOWN_S)


class RequestTrace:
    """One API request's span; the relay runs each upstream attempt under it."""

    __slots__ = ("context", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self.context = trace.set_span_in_context(span)

    async def attempt(self, work: Awaitable[T], call: Call) -> T:
        """Await one upstream attempt (``work``) inside its own CLIENT span.

        The span's context goes upstream as ``traceparent``, so an upstream that traces
        (vLLM with ``--otlp-traces-endpoint``) adds its spans under it."""
        assert call.upstream is not None
        attributes = {**self.tracing.upstream(call.upstream), "bastion.attempt": call.attempts}
        if call.attempts > 1:
            attributes["http.request.resend_count"] = call.attempts - 1
        span = self.tracing.tracer.start_span(
            f"upstream {call.upstream.name}", self.context, SpanKind.CLIENT, attributes
        )
        ids = span.get_span_context()
        call.traceparent = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"
        call.upstream_status = 0
        try:
            result = await work
        except BaseException as exc:
            if span.is_recording():
                _attempt_failed(span, call, exc)
            raise
        else:
            if span.is_recording():
                _attempt_answered(span, call)
            return result
        finally:
            span.end()

    def end(
        self,
        key: ApiKey | None,
        req: ClientRequest | None,
        call: Call | None,
        row: LedgerRow | None,
        failure: APIError | None,
    ) -> None:
        """Close the span when the answer (or the stream) has ended, or the client left.

        ``row``: the request's ledger row, if it reached an upstream; ``failure``: the
        error the client was answered, if any."""
        span = self.span
        if span.is_recording():
            attributes = _request_attributes(key, req, call, row, self.tracing.models, span)
            status, error, bad = _outcome(call, failure)
            if status is not None:
                attributes["http.response.status_code"] = status
            if error is not None:
                attributes["error.type"] = error
            if failure is None and call is not None and call.reached and status == 200:
                attributes["gen_ai.response.model"] = call.model.id  # what the client read
            span.set_attributes(attributes)
            if bad:
                message = failure.message if failure is not None else call.aborted if call else ""
                span.set_status(Status(StatusCode.ERROR, (message or error or "")[:TEXT_LIMIT]))
        span.end()


def _request_attributes(
    key: ApiKey | None,
    req: ClientRequest | None,
    call: Call | None,
    row: LedgerRow | None,
    models: frozenset[str],
    span: Span,
) -> Attributes:
    attributes: Attributes = {}
    if key is not None:  # who: never the key itself
        attributes["bastion.account"] = key.account_name
        attributes["bastion.key_id"] = key.id
    if req is not None:
        model = req.model[:TEXT_LIMIT]
        attributes["gen_ai.request.model"] = model
        if req.stream:  # semconv: set if and only if streaming
            attributes["gen_ai.request.stream"] = True
        if req.n != 1:
            attributes["gen_ai.request.choice.count"] = req.n
        if req.cap is not None:
            attributes["gen_ai.request.max_tokens"] = req.cap
        if model in models:
            span.update_name(f"chat {model}")
    if call is not None:
        attributes["gen_ai.request.max_tokens"] = call.output_cap // (req.n if req else 1)
    if row is not None:
        attributes["gen_ai.usage.input_tokens"] = row.input_tokens
        attributes["gen_ai.usage.output_tokens"] = row.output_tokens
        if row.cached_input_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = row.cached_input_tokens
        if row.reasoning_tokens:
            attributes["gen_ai.usage.reasoning.output_tokens"] = row.reasoning_tokens
        attributes["bastion.cost_usd"] = format_usd(row.cost)
        if row.estimated:  # no usage report: charged by the gateway's estimate
            attributes["bastion.usage.estimated"] = True
    return attributes


def _outcome(call: Call | None, failure: APIError | None) -> tuple[int | None, str | None, bool]:
    """(HTTP status, error.type, span status ERROR?) of a request.

    As for any HTTP server span, a 4xx is the client's error, not the server's: it gets
    ``error.type`` but no ERROR status; a 5xx, a stream ended by an error event, or an
    exception does. A client that left is ``cancelled``, not an error."""
    if failure is not None:
        return failure.status, failure.code[:TEXT_LIMIT], failure.status >= 500
    if call is not None and call.status == "200":
        return 200, None, False
    exc = sys.exc_info()[1]  # called from a ``finally``: what is propagating, if anything
    if isinstance(exc, asyncio.CancelledError) or (call is not None and call.status == "cancelled"):
        return None, "cancelled", False
    if exc is None and call is not None:  # a stream whose 200 was sent, ended by an error event
        return 200, "stream_error", True
    return 500, type(exc).__qualname__ if exc is not None else "_OTHER", True


def _attempt_answered(span: Span, call: Call) -> None:
    span.set_attribute("http.response.status_code", call.upstream_status)
    if call.stream and call.status != "200":  # the relay settled how the stream ended
        error = "cancelled" if call.status == "cancelled" else "stream_error"
        span.set_attribute("error.type", error)
        if error == "stream_error":
            span.set_status(Status(StatusCode.ERROR, call.aborted[:TEXT_LIMIT] or None))


def _attempt_failed(span: Span, call: Call, exc: BaseException) -> None:
    """``error.type``: ``cancelled`` (the client left), the upstream's HTTP status, or the
    upstream client's failure: unreachable, timeout, disconnected, protocol_error."""
    if isinstance(exc, asyncio.CancelledError):
        span.set_attribute("error.type", "cancelled")
        return
    status = call.upstream_status
    if status:
        span.set_attribute("http.response.status_code", status)
        error = str(status) if status >= 400 else getattr(exc, "code", type(exc).__name__)
    else:  # the relay wraps what the upstream client raised: that is the kind
        cause = exc.__cause__ or exc.__context__ or exc
        error = _CAMEL.sub("_", type(cause).__name__).lower()
    span.set_attribute("error.type", error[:TEXT_LIMIT])
    span.set_status(Status(StatusCode.ERROR, str(exc)[:TEXT_LIMIT]))
