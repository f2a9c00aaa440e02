"""OpenTelemetry tracing, end to end: a real gateway process exports to a real OTLP/HTTP
receiver (this file's ``Collector``: aiohttp, protobuf bodies decoded with
opentelemetry-proto), clients are the official ``openai`` SDK, upstreams ``bastion sim``.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import Gateway, free_port, start, stop
from openai import OpenAI

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    from bastion.tracing import Tracing
except ImportError as exc:  # CI installs it: a missing package fails, never skips
    pytest.fail(f"{exc}: install the test tools with pip install -e '.[test]'", pytrace=False)

from bastion.config import TracingConfig
from bastion.money import format_usd

SERVER, CLIENT = Span.SpanKind.SPAN_KIND_SERVER, Span.SpanKind.SPAN_KIND_CLIENT
ERROR, UNSET = Status.StatusCode.STATUS_CODE_ERROR, Status.StatusCode.STATUS_CODE_UNSET
WAIT_S = 10.0  # how long to wait for an export before failing (a bound, not a measurement)

TOML = """
health_check_interval_s = 60  # the dead replica stays in rotation until a request fails on it

[server]
port = {port}

[database]
url = "sqlite:///{db}"

[tracing]
otlp_endpoint = "{otlp}"
service_name = "bastion-test"

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"

[[upstreams]]
name = "dead"
url = "http://127.0.0.1:{dead}/v1"
connect_timeout_s = 1

[[upstreams]]
name = "recorder"
url = "http://127.0.0.1:{recorder}/v1"
"""


MODEL = """
[[models]]
id = "{id}"
upstreams = {upstreams}
input_price = "{price}"
output_price = "{price}"
max_output_tokens = 1024
{extra}"""
MODELS = "".join(
    MODEL.format(id=name, upstreams=upstreams, price=price, extra=extra)
    for name, upstreams, price, extra in [
        ("gpt-oss-120b", '["sim"]', "0.50", 'cached_input_price = "0.125"\n'),
        ("pair", '["dead", "sim"]', "1.00", ""),  # the dead replica is tried first
        ("dead-model", '["dead"]', "1.00", ""),
        ("recorded", '["recorder"]', "1.00", 'endpoints = ["chat"]\n'),  # the Collector
    ]
)


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "recorded",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
}


class Collector:
    """An OTLP/HTTP traces receiver on its own thread and loop. ``hold()`` makes it keep
    the next export unanswered until ``release()``: a collector that hangs.

    It is an upstream too (``/v1/chat/completions``, ``/health``), which notes the
    ``traceparent`` header of each request it answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.content_types: set[str] = set()
        self.traceparents: list[str] = []
        self.changed = threading.Condition()
        self.holding = threading.Event()  # an export is being held unanswered
        self._hold = False
        self._release: asyncio.Event | None = None
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Collector:
        self.thread.start()
        assert self._ready.wait(WAIT_S), "the collector did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/chat/completions", self._upstream)
        app.router.add_get("/health", self._upstream)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    async def _traces(self, request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest.FromString(await request.read())
        if self._hold:
            self._hold = False
            self._release = asyncio.Event()
            self.holding.set()
            await self._release.wait()
        with self.changed:
            self.content_types.add(request.content_type)
            for resource_spans in body.resource_spans:
                self.resources.append(attributes(resource_spans.resource))
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
            self.changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def _upstream(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self.traceparents.append(request.headers.get("traceparent", ""))
        return web.json_response(COMPLETION)

    def hold(self) -> None:
        self._hold = True

    @property
    def held(self) -> bool:
        """An export is being held and has not been released."""
        return self._release is not None and not self._release.is_set()

    def release(self) -> None:
        if self._release is not None:
            self.loop.call_soon_threadsafe(self._release.set)

    def wait(self, found: Callable[[list[Span]], list[Span] | None]) -> list[Span]:
        """Wait until ``found`` picks spans from what arrived, and return them."""
        with self.changed:
            result = None
            ok = self.changed.wait_for(lambda: (result := found(self.spans)), WAIT_S)
            assert ok, f"spans not exported within {WAIT_S}s; got {[s.name for s in self.spans]}"
            result = found(self.spans)
            assert result is not None
            return result

    def request(self, request_id: str, attempts: int = 1) -> tuple[Span, list[Span]]:
        """The SERVER span of ``request_id`` and its ``attempts`` CLIENT children, in order."""

        def found(spans: list[Span]) -> list[Span] | None:
            mine = [s for s in spans if attributes(s).get("bastion.request_id") == request_id]
            if not mine:
                return None
            children = [s for s in spans if s.parent_span_id == mine[0].span_id]
            return [mine[0], *children] if len(children) >= attempts else None

        parent, *children = self.wait(found)
        children.sort(key=lambda s: attributes(s)["bastion.attempt"])
        return parent, children


def attributes(item: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in item.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


def start_gateway(
    tmp: Path, otlp: str, sim: int, env: dict[str, str], recorder: int = 0
) -> Gateway:
    port = free_port()
    db = tmp / "bastion.db"
    config = tmp / "bastion.toml"
    text = (
        TOML.format(
            port=port, db=db, otlp=otlp, sim=sim, dead=free_port(), recorder=recorder or free_port()
        )
        + MODELS
    )
    config.write_text(text)
    stderr = open(tmp / "gateway.err", "w")  # the process keeps it open
    proc = start(
        ["serve", "--config", str(config)],
        f"http://127.0.0.1:{port}/healthz",
        env={**os.environ, **env},
        stderr=stderr,
    )
    root = f"http://127.0.0.1:{port}"
    return Gateway(f"{root}/v1", root, config, f"sqlite:///{db}", proc)


QUICK_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms between batches (default 5 s)
PATIENT = {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "60"}  # s: a held export is waited for


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory, sim_port: int
) -> Iterator[tuple[Gateway, Collector]]:
    with Collector() as collector:
        tmp = tmp_path_factory.mktemp("traced")
        env = {**QUICK_EXPORT, **PATIENT}
        gw = start_gateway(tmp, collector.url, sim_port, env, recorder=collector.port)
        try:
            yield gw, collector
        finally:
            stop(gw.proc)


def new_client(gw: Gateway, credit: str = "10.00") -> tuple[OpenAI, str]:
    """A fresh account's key as an SDK client (no retries: one request, one span)."""
    key, account = gw.new_key(credit=credit)
    return OpenAI(base_url=gw.url, api_key=key, max_retries=0), account


def row_of(gw: Gateway, account: str, request_id: str) -> Any:
    rows = {r.request_id: r for r in gw.settled(account, 1)}
    return rows[request_id]


def check_request_span(span: Span, model: str, request_id: str, account: str) -> dict[str, Any]:
    got = attributes(span)
    assert span.kind == SERVER
    assert span.name == f"chat {model}"
    assert got["gen_ai.operation.name"] == "chat"
    assert got["gen_ai.provider.name"] == "openai"
    assert got["gen_ai.request.model"] == model
    assert got["bastion.request_id"] == request_id
    assert got["bastion.account"] == account
    assert got["bastion.key_id"].startswith("key_")
    assert not any(str(v).startswith("qbt_") for v in got.values())  # never the key itself
    return got


def test_json_requests_on_both_endpoints(traced: tuple[Gateway, Collector], sim_port: int) -> None:
    gw, collector = traced
    client, account = new_client(gw)
    sim = {"sim": {"cached_tokens": 3, "reasoning_tokens": 2}}

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-oss-120b",
        messages=[{"role": "user", "content": "Reply with: hello"}],
        max_tokens=50,
        extra_body=sim,
    )
    chat_id, chat = raw.headers["x-request-id"], raw.parse()
    raw = client.responses.with_raw_response.create(
        model="gpt-oss-120b", input="Reply with: hi", extra_body=sim
    )
    responses_id, answer = raw.headers["x-request-id"], raw.parse()

    span, (attempt,) = collector.request(chat_id)
    got = check_request_span(span, "gpt-oss-120b", chat_id, account)
    assert got["openai.api.type"] == "chat_completions"
    assert "gen_ai.request.stream" not in got  # set only for streams
    assert got["gen_ai.request.max_tokens"] == 50
    assert got["gen_ai.response.model"] == "gpt-oss-120b"
    usage = chat.usage
    assert usage and usage.prompt_tokens_details and usage.completion_tokens_details
    assert got["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert got["gen_ai.usage.output_tokens"] == usage.completion_tokens
    cached = usage.prompt_tokens_details.cached_tokens
    assert got["gen_ai.usage.cache_read.input_tokens"] == cached == 3
    thought = usage.completion_tokens_details.reasoning_tokens
    assert got["gen_ai.usage.reasoning.output_tokens"] == thought and thought > 0
    assert got["http.response.status_code"] == 200
    assert got["bastion.cost_usd"] == format_usd(row_of(gw, account, chat_id).cost)
    assert "error.type" not in got and span.status.code == UNSET

    assert attempt.kind == CLIENT and attempt.name == "upstream sim"
    assert attempt.trace_id == span.trace_id
    assert attempt.start_time_unix_nano >= span.start_time_unix_nano
    assert attempt.end_time_unix_nano <= span.end_time_unix_nano
    step = attributes(attempt)
    assert step["bastion.upstream"] == "sim" and step["bastion.attempt"] == 1
    assert step["server.address"] == "127.0.0.1" and step["server.port"] == sim_port
    assert step["http.response.status_code"] == 200
    assert "http.request.resend_count" not in step

    span, _ = collector.request(responses_id)
    got = check_request_span(span, "gpt-oss-120b", responses_id, account)
    assert got["openai.api.type"] == "responses"
    assert answer.usage is not None
    assert got["gen_ai.usage.input_tokens"] == answer.usage.input_tokens
    assert got["gen_ai.usage.output_tokens"] == answer.usage.output_tokens
    assert got["gen_ai.request.max_tokens"] == 1024  # none sent: the model's maximum
    assert got["bastion.cost_usd"] == format_usd(row_of(gw, account, responses_id).cost)
    assert collector.content_types == {"application/x-protobuf"}
    assert {"service.name": "bastion-test"}.items() <= collector.resources[0].items()


def test_streams_end_their_span_when_the_stream_ends(traced: tuple[Gateway, Collector]) -> None:
    gw, collector = traced
    client, account = new_client(gw)

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-oss-120b",
        messages=[{"role": "user", "content": "Reply with: one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chat_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    usage = chunks[-1].usage
    raw = client.responses.with_raw_response.create(
        model="gpt-oss-120b", input="Reply with: four five", stream=True
    )
    responses_id = raw.headers["x-request-id"]
    events = list(raw.parse())
    completed = events[-1]
    assert completed.type == "response.completed"

    span, (attempt,) = collector.request(chat_id)
    got = check_request_span(span, "gpt-oss-120b", chat_id, account)
    assert got["gen_ai.request.stream"] is True
    assert usage is not None
    assert got["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert got["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert got["bastion.cost_usd"] == format_usd(row_of(gw, account, chat_id).cost)
    assert attempt.end_time_unix_nano <= span.end_time_unix_nano  # the stream was inside

    span, _ = collector.request(responses_id)
    got = check_request_span(span, "gpt-oss-120b", responses_id, account)
    assert got["gen_ai.request.stream"] is True
    assert got["gen_ai.usage.output_tokens"] == completed.response.usage.output_tokens
    assert got["bastion.cost_usd"] == format_usd(row_of(gw, account, responses_id).cost)


def test_a_retry_onto_the_second_replica_is_two_attempts(
    traced: tuple[Gateway, Collector],
) -> None:
    gw, collector = traced
    client, account = new_client(gw)
    raw = client.responses.with_raw_response.create(model="pair", input="Reply with: ok")
    request_id = raw.headers["x-request-id"]
    assert raw.parse().output_text == "ok"

    span, (first, second) = collector.request(request_id, attempts=2)
    got = check_request_span(span, "pair", request_id, account)
    assert span.status.code == UNSET and got["http.response.status_code"] == 200
    failed, ok = attributes(first), attributes(second)
    assert failed["bastion.upstream"] == "dead" and failed["error.type"] == "unreachable"
    assert first.status.code == ERROR and "http.response.status_code" not in failed
    assert ok["bastion.upstream"] == "sim" and ok["bastion.attempt"] == 2
    assert ok["http.request.resend_count"] == 1 and ok["http.response.status_code"] == 200
    assert second.status.code == UNSET
    assert first.end_time_unix_nano <= second.start_time_unix_nano


def test_the_attempt_span_is_the_upstream_requests_parent(
    traced: tuple[Gateway, Collector],
) -> None:
    """``traceparent`` goes upstream: a vLLM that traces puts its spans under the attempt."""
    gw, collector = traced
    client, _ = new_client(gw)
    raw = client.chat.completions.with_raw_response.create(
        model="recorded", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == "ok"
    span, (attempt,) = collector.request(raw.headers["x-request-id"])
    assert attributes(span)["gen_ai.usage.input_tokens"] == 7
    trace_id, span_id = attempt.trace_id.hex(), attempt.span_id.hex()
    version, trace, parent, flags = collector.traceparents[-1].split("-")
    assert (version, trace, parent) == ("00", trace_id, span_id)
    assert int(flags, 16) & 1  # sampled: the upstream records its part too


def test_failures_and_refusals(traced: tuple[Gateway, Collector]) -> None:
    gw, collector = traced
    client, account = new_client(gw)

    raw = client.responses.with_raw_response  # 502: its only replica is dead
    with pytest.raises(Exception) as caught:
        raw.create(model="dead-model", input="x")
    dead_id = caught.value.response.headers["x-request-id"]  # type: ignore[attr-defined]
    span, (attempt,) = collector.request(dead_id)
    got = check_request_span(span, "dead-model", dead_id, account)
    assert got["http.response.status_code"] == 502 and got["error.type"] == "upstream_error"
    assert span.status.code == ERROR and span.status.message == "upstream unreachable"
    assert attributes(attempt)["error.type"] == "unreachable" and attempt.status.code == ERROR

    poor, poor_account = new_client(gw, credit="0.00")
    with pytest.raises(Exception) as caught:
        poor.responses.create(model="gpt-oss-120b", input="x")
    refused_id = caught.value.response.headers["x-request-id"]  # type: ignore[attr-defined]
    span, attempts = collector.request(refused_id, attempts=0)
    got = check_request_span(span, "gpt-oss-120b", refused_id, poor_account)
    assert got["http.response.status_code"] == 402
    assert got["error.type"] == "insufficient_funds"
    assert span.status.code == UNSET  # a 4xx is the client's error, as HTTP semconv says
    assert attempts == [] and "bastion.cost_usd" not in got  # no upstream, no ledger row

    with pytest.raises(Exception) as caught:
        OpenAI(base_url=gw.url, api_key="qbt_" + "x" * 40, max_retries=0).responses.create(
            model="gpt-oss-120b", input="x"
        )
    unknown_id = caught.value.response.headers["x-request-id"]  # type: ignore[attr-defined]
    span, _ = collector.request(unknown_id, attempts=0)
    got = attributes(span)
    assert span.name == "chat"  # the body was never read: no model to name
    assert got["http.response.status_code"] == 401 and got["error.type"] == "invalid_api_key"
    assert "bastion.account" not in got


def test_a_hung_collector_holds_up_no_request(traced: tuple[Gateway, Collector]) -> None:
    """While the collector sits on an export (the SDK's thread waits on it, up to the
    exporter's 60 s timeout), requests are answered, streams included; their spans follow
    once the collector answers again."""
    gw, collector = traced
    client, _ = new_client(gw)
    collector.hold()
    client.responses.create(model="gpt-oss-120b", input="Reply with: first")
    assert collector.holding.wait(WAIT_S), "no export reached the collector"
    ids = []
    for _ in range(3):
        raw = client.responses.with_raw_response.create(model="gpt-oss-120b", input="Reply: ok")
        assert raw.parse().output_text
        ids.append(raw.headers["x-request-id"])
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-oss-120b", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert any(c.choices and c.choices[0].delta.content for c in list(raw.parse()))
    ids.append(raw.headers["x-request-id"])
    assert collector.held  # the export is still unanswered, and no later one was sent:
    exported = {attributes(s).get("bastion.request_id") for s in collector.spans}
    assert not exported & set(ids)
    collector.release()
    for request_id in ids:
        collector.request(request_id)


def test_an_unreachable_collector_fails_no_request_and_the_drain_flushes(
    tmp_path: Path, sim_port: int
) -> None:
    """Exports go out every 4 spans (2 requests) or at the exit: the first two requests'
    export fails (nothing listens yet); the third's spans wait in the queue until SIGTERM,
    when the drain sends them to the collector, which is up by then."""
    collector = Collector()  # its port, not yet listened on
    env = {
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1",  # a refused export is given up at once
    }
    gw = start_gateway(tmp_path, collector.url, sim_port, env)
    log = tmp_path / "gateway.err"
    try:
        client, account = new_client(gw)
        for i in range(2):
            assert client.responses.create(model="gpt-oss-120b", input=f"Reply with: r{i}")
        assert len(gw.settled(account, 2)) == 2
        deadline = time.monotonic() + WAIT_S
        while "spans batch" not in log.read_text():  # the exporter's failure, logged
            assert time.monotonic() < deadline, "no failed export was logged"
            time.sleep(0.05)
        with collector:
            raw = client.responses.with_raw_response.create(model="gpt-oss-120b", input="hi")
            request_id = raw.headers["x-request-id"]
            assert not collector.spans
            stop(gw.proc)
            assert gw.proc.returncode == 0
            exported = {attributes(s).get("bastion.request_id") for s in collector.spans}
            assert request_id in exported  # sent by the drain, before the exit
    finally:
        stop(gw.proc)


def test_sample_ratio_is_decided_before_any_span() -> None:
    """A request left out of the sample gets no span at all (None): it costs nothing more."""

    async def sampled(ratio: float) -> int:
        config = TracingConfig(otlp_endpoint="http://127.0.0.1:1/v1/traces", sample_ratio=ratio)
        tracing = Tracing(config, ["m"])
        try:
            traces = [tracing.request("chat", f"req_{i}") for i in range(400)]
            return sum(t is not None and t.span.is_recording() for t in traces)
        finally:
            await tracing.close()  # nothing was ended: nothing to send

    random.seed(13)
    assert asyncio.run(sampled(1.0)) == 400
    assert asyncio.run(sampled(0.0)) == 0
    assert 60 <= asyncio.run(sampled(0.25)) <= 140


OFF_THEN_MISSING = """
import sys
from bastion.app import create_app
from bastion.cli import main
from bastion.config import load_config
import bastion.server
create_app(load_config(env={"BASTION_DATABASE_URL": sys.argv[1]}))  # tracing off
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"), flush=True)
sys.modules["opentelemetry"] = None  # as if bastion[tracing] were not installed
sys.argv = ["bastion", "serve", "--config", sys.argv[2]]  # a config that turns it on
main()
"""


def test_off_imports_no_opentelemetry_and_on_serve_needs_it(tmp_path: Path) -> None:
    """In a fresh interpreter: a gateway with tracing off loads no OpenTelemetry module;
    then, with the package made unimportable, ``bastion serve`` with tracing on refuses."""
    db = f"sqlite:///{tmp_path / 'b.db'}"
    config = tmp_path / "b.toml"
    config.write_text(
        f'[server]\nport = {free_port()}\n[database]\nurl = "{db}"\n'
        '[tracing]\notlp_endpoint = "http://127.0.0.1:4318"\n'
    )
    code = [sys.executable, "-c", OFF_THEN_MISSING, db, str(config)]
    result = subprocess.run(code, capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["[]"], result.stderr
    assert result.returncode == 1
    assert "otlp_endpoint is set" in result.stderr
    assert "pip install 'bastion[tracing]'" in result.stderr


def test_workers_are_not_started_when_tracing_cannot_be_imported(tmp_path: Path) -> None:
    """``--workers 2``: the supervisor refuses once, instead of restarting workers that
    each die for want of the package."""
    config = tmp_path / "b.toml"
    config.write_text(
        f'[server]\nport = {free_port()}\n[database]\nurl = "postgresql://127.0.0.1:1/none"\n'
        '[ratelimit]\nurl = "redis://127.0.0.1:1/0"\n'
        '[tracing]\notlp_endpoint = "http://127.0.0.1:4318"\n'
    )
    script = (
        "import sys\n"
        "from bastion.cli import main\n"
        "sys.modules['opentelemetry'] = None  # as if bastion[tracing] were not installed\n"
        "sys.argv = ['bastion', 'serve', '--workers', '2', '--config', sys.argv[1]]\n"
        "main()\n"
    )
    code = [sys.executable, "-c", script, str(config)]
    result = subprocess.run(code, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "pip install 'bastion[tracing]'" in result.stderr
    assert "worker" not in result.stderr.lower(), result.stderr
