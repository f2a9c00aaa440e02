"""The simulator's HTTP server: routes, per-request options, timing and fault injection."""

from __future__ import annotations

import asyncio
import time
from dataclasses import astuple, dataclass
from typing import Any

import orjson
from aiohttp import web

from bastion.sim.engine import LoadConfig, Seat
from bastion.sim.loadhttp import ENGINE_KEY, add_load_model
from bastion.sim.pacer import Pacer
from bastion.sim.reply import Reply, Usage, plan_reply, report_overrides, usage_of
from bastion.sim.wire import ChatRender, ResponsesRender, StreamPlan, error_object

FAULTS = frozenset(
    {"500", "503", "400", "401", "hang", "stall", "cut", "malformed", "slow", "error-event"}
)
SLOW_DEFAULT_MS = 2000.0
MODELS = (
    "gpt-oss-120b",
    "gpt-oss-20b",
    "Llama-3.1-8B-Instruct",
    "Meta-Llama-3_3-70B-Instruct",
    "Qwen3-32B",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "Mistral-Nemo-Instruct-2407",
    "Qwen3-Coder-30B-A3B-Instruct",
    "Qwen2.5-VL-72B-Instruct",
    "Mistral-7B-Instruct-v0.3",
)
"""Sample ids for GET /v1/models; any model name is served."""


@dataclass(frozen=True, slots=True)
class SimDefaults:
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0


@dataclass(slots=True)
class Options:
    """What one request asked of the simulator (headers > body `sim` > model suffix)."""

    tokens: int | None
    ttft_ms: float
    tokens_per_s: float
    fault: str | None
    delay_ms: float
    vllm_quirks: bool
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    usage_null: bool = False


DEFAULTS_KEY = web.AppKey("sim_defaults", SimDefaults)
PACER_KEY = web.AppKey("sim_pacer", Pacer)


class _Refusal(Exception):
    """An error answer in vLLM's envelope."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.response = web.Response(
            status=status,
            body=orjson.dumps(error_object(status, message, type_, param)),
            content_type="application/json",
        )


def _bad(message: str, param: str | None = None) -> _Refusal:
    return _Refusal(400, message, "BadRequestError", param)


def _number(raw: Any, name: str, integer: bool = False) -> float | None:
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except (TypeError, ValueError):
        raise _bad(f"{name} must be a non-negative number", name) from None
    if value < 0 or value != value:
        raise _bad(f"{name} must be a non-negative number", name)
    return value


def _options(request: web.Request, body: dict[str, Any], defaults: SimDefaults) -> Options:
    """Per-request overrides: `x-sim-*` headers, else the body's `sim` object."""
    h = request.headers
    sim = body.get("sim") if isinstance(body.get("sim"), dict) else {}

    def pick(header: str, key: str) -> Any:
        value = h.get(header)
        return value if value is not None else sim.get(key)

    fault = pick("x-sim-fault", "fault")
    if fault is None:
        _, at, suffix = body["model"].rpartition("@")
        fault = suffix if at and suffix in FAULTS else None
    elif fault not in FAULTS:
        raise _bad(f"unknown fault {fault!r}; one of {', '.join(sorted(FAULTS))}", "x-sim-fault")
    tokens = _number(pick("x-sim-tokens", "tokens"), "x-sim-tokens", integer=True)
    ttft = _number(pick("x-sim-ttft-ms", "ttft_ms"), "x-sim-ttft-ms")
    rate = _number(pick("x-sim-tokens-per-s", "tokens_per_s"), "x-sim-tokens-per-s")
    delay = _number(pick("x-sim-delay-ms", "delay_ms"), "x-sim-delay-ms")
    cached = _number(
        pick("x-sim-cached-tokens", "cached_tokens"), "x-sim-cached-tokens", integer=True
    )
    reasoning = _number(
        pick("x-sim-reasoning-tokens", "reasoning_tokens"), "x-sim-reasoning-tokens", integer=True
    )
    try:
        report_overrides(body)
    except ValueError as e:
        raise _bad(str(e), "sim.report") from None
    return Options(
        tokens=None if tokens is None else int(tokens),
        ttft_ms=defaults.ttft_ms if ttft is None else ttft,
        tokens_per_s=defaults.tokens_per_s if rate is None else rate,
        fault=fault,
        delay_ms=SLOW_DEFAULT_MS if delay is None else delay,
        vllm_quirks=str(pick("x-sim-quirks", "quirks") or "").lower() == "vllm",
        cached_tokens=None if cached is None else int(cached),
        reasoning_tokens=None if reasoning is None else int(reasoning),
        usage_null=_flag(pick("x-sim-usage-null", "usage_null_chunks"), "x-sim-usage-null"),
    )


def _reported(reply: Reply, body: dict[str, Any], opts: Options) -> Usage:
    """The usage to write; a `sim.report` number orjson cannot encode (64 bits) is a 400."""
    usage = usage_of(reply, body, opts.cached_tokens, opts.reasoning_tokens)
    try:
        orjson.dumps([*astuple(usage), usage.total_tokens])
    except orjson.JSONEncodeError:
        raise _bad("sim.report: usage numbers must fit in 64 bits", "sim.report") from None
    return usage


def _flag(raw: Any, name: str) -> bool:
    """A boolean option: JSON true/false, or a header `1`/`0`/`true`/`false`."""
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    value = str(raw).strip().lower()
    if value not in ("1", "0", "true", "false"):
        raise _bad(f"{name} must be a boolean (1/0/true/false)", name)
    return value in ("1", "true")


async def _until_gone(request: web.Request) -> None:
    """Wait until the client goes away (`hang`/`stall` faults): polls, no per-request timer."""
    while True:
        tr = request.transport
        if tr is None or tr.is_closing():
            return
        await asyncio.sleep(0.2)


def _load(raw: bytes, endpoint: str) -> dict[str, Any]:
    """Parse and lightly validate the body, as vLLM would refuse it."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad("field required: model", "model")
    if endpoint == "responses":
        if not isinstance(body.get("input"), str | list):
            raise _bad("field required: input (a string or a list of items)", "input")
    elif not isinstance(body.get("messages"), list) or not body["messages"]:
        raise _bad("field required: messages (a non-empty list)", "messages")
    return body


async def _handle(request: web.Request, endpoint: str) -> web.StreamResponse:
    try:
        body = _load(await request.read(), endpoint)
        opts = _options(request, body, request.app[DEFAULTS_KEY])
        fault = opts.fault
        if fault == "slow":
            await asyncio.sleep(opts.delay_ms / 1000)
        if fault in ("500", "503", "400", "401"):
            return _fault_response(fault)
        stream = body.get("stream") is True
        if fault == "hang" or (fault == "stall" and not stream):
            await _until_gone(request)
            return web.Response(status=504)
        if body.get("store") is True:
            raise _Refusal(
                500,
                "stateful mode is not supported by this server (store=true): "
                "send store=false, this server keeps no responses",
                "InternalServerError",
                "store",
            )
        reply = plan_reply(body, endpoint, opts.tokens)
        usage = _reported(reply, body, opts)
    except _Refusal as refusal:
        return refusal.response
    engine = request.app.get(ENGINE_KEY)  # None unless a load option is set: no cost then
    seat = None
    if engine is not None:
        seat = engine.seat(body, endpoint, reply, opts.ttft_ms, opts.tokens_per_s)
    try:
        if stream:
            return await _stream(request, endpoint, body, reply, usage, opts, seat)
        return await _json(request, endpoint, body, reply, usage, opts, seat)
    except ConnectionError:  # the client went away mid-answer: nothing left to do
        return web.Response(status=499)
    finally:
        if engine is not None and seat is not None:
            engine.leave(seat)  # also when the client left (cancelled) while queued


async def _seated(
    request: web.Request, seat: Seat, reply: Reply, body: dict[str, Any], opts: Options
) -> Usage:
    """Wait for a place in the batch; the usage then reports what the prefix cache held.

    A cached count the request sets itself (header, or the body's `sim`) still wins.
    """
    await request.app[ENGINE_KEY].admit(seat)
    cached = opts.cached_tokens
    sim = body.get("sim")
    if cached is None and not (isinstance(sim, dict) and "cached_tokens" in sim):
        cached = seat.cached_tokens
    return usage_of(reply, body, cached, opts.reasoning_tokens)


def _duration(reply: Reply, opts: Options) -> float:
    """Seconds until the last token: ttft, then one token per 1/rate after the first."""
    per = 1.0 / opts.tokens_per_s if opts.tokens_per_s > 0 else 0.0
    return opts.ttft_ms / 1000 + max(reply.output_tokens - 1, 0) * per


async def _json(
    request: web.Request,
    endpoint: str,
    body: dict[str, Any],
    reply: Reply,
    usage: Usage,
    opts: Options,
    seat: Seat | None = None,
) -> web.StreamResponse:
    duration = _duration(reply, opts)
    if seat is not None:  # queue, then prefill: the answer is due at the seat's last token
        usage = await _seated(request, seat, reply, body, opts)
        duration = seat.end_at - asyncio.get_running_loop().time()
    now = time.time()
    if endpoint == "responses":
        data = ResponsesRender(body, reply, int(now), int(now + duration), usage).json_body()
    else:
        data = ChatRender(body, reply, int(now), usage).json_body()
    if duration > 0:
        await asyncio.sleep(duration)
    if opts.fault == "malformed":
        data = data[: len(data) // 2]
    elif opts.fault == "error-event":
        return _fault_response("500")
    elif opts.fault == "cut":
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        if request.transport is not None:
            request.transport.close()
        return resp
    if seat is not None:
        seat.finished = True
    return web.Response(body=data, content_type="application/json")


async def _stream(
    request: web.Request,
    endpoint: str,
    body: dict[str, Any],
    reply: Reply,
    usage: Usage,
    opts: Options,
    seat: Seat | None = None,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    first = loop.time() + opts.ttft_ms / 1000
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)  # sends the headers at once, as vLLM does
    if seat is not None:  # then waits for a place in the batch, and its prefill
        usage = await _seated(request, seat, reply, body, opts)
        first = seat.first_token_at
    plan: StreamPlan
    wire_fault = opts.fault if opts.fault in ("cut", "error-event", "malformed") else None
    if endpoint == "responses":
        now = time.time()
        render = ResponsesRender(body, reply, int(now), int(now + _duration(reply, opts)), usage)
        plan = render.stream(wire_fault, opts.vllm_quirks)
    else:
        chat = ChatRender(body, reply, int(time.time()), usage, opts.usage_null)
        plan = chat.stream(wire_fault)
    if plan.head:
        await resp.write(plan.head)
    transport = request.transport
    if transport is None:
        return resp
    units = plan.units[:1] if opts.fault == "stall" else plan.units
    pacer = request.app[PACER_KEY]
    finished = await pacer.play(transport, units, first, opts.tokens_per_s)
    if not finished:
        return resp
    if opts.fault == "stall":
        await _until_gone(request)
        return resp
    if opts.fault == "cut":
        transport.close()  # no terminal event, no final chunk: the peer sees a broken body
        return resp
    await resp.write_eof()
    if seat is not None:
        seat.finished = True
    return resp


def _fault_response(fault: str) -> web.Response:
    if fault == "400":
        err = {
            "error": {
                "message": "Invalid schema for function 'simulated': "
                "'object' is not valid under any of the given schemas.",
                "type": "invalid_request_error",
                "param": "tools[0].parameters",
                "code": "invalid_function_parameters",
            }
        }
        return web.Response(status=400, body=orjson.dumps(err), content_type="application/json")
    if fault == "401":  # what vLLM's --api-key middleware answers
        return web.Response(
            status=401, body=b'{"error":"Unauthorized"}', content_type="application/json"
        )
    status = int(fault)
    kind = "InternalServerError" if status == 500 else "ServiceUnavailableError"
    message = f"simulated upstream failure ({status})"
    return web.Response(
        status=status,
        body=orjson.dumps(error_object(status, message, kind)),
        content_type="application/json",
    )


async def _responses(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "responses")


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "chat")


async def _models(request: web.Request) -> web.Response:
    created = int(time.time())
    data = [
        {
            "id": m,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": m,
            "parent": None,
            "max_model_len": 131072,
        }
        for m in MODELS
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response()


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Echo `x-request-id` (vLLM's --enable-request-id-headers), so callers can check it."""
    rid = request.headers.get("x-request-id")
    if rid is not None:
        response.headers["x-request-id"] = rid


def create_app(
    ttft_ms: float = 0, tokens_per_s: float = 0, load: LoadConfig | None = None
) -> web.Application:
    """The simulator as an aiohttp application (server-wide timing defaults, load model)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[DEFAULTS_KEY] = SimDefaults(float(ttft_ms), float(tokens_per_s))
    app[PACER_KEY] = Pacer()
    app.on_response_prepare.append(_echo_request_id)
    add_load_model(app, load)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    return app


def run(
    host: str = "127.0.0.1",
    port: int = 8000,
    ttft_ms: float = 0,
    tokens_per_s: float = 0,
    load: LoadConfig | None = None,
) -> None:
    """Serve the simulator until SIGINT/SIGTERM (blocking, on uvloop)."""
    import gc

    import uvloop

    loop = uvloop.new_event_loop()
    app = create_app(ttft_ms, tokens_per_s, load)
    gc.freeze()  # startup objects never die: keep full collections (pauses) short under load
    rate = f"{tokens_per_s:g} tokens/s" if tokens_per_s > 0 else "max speed"
    if load is not None and load.active:
        rate += f"; {load.describe()}"
    print(f"bastion sim on http://{host}:{port}/v1 (ttft {ttft_ms:g} ms, {rate})", flush=True)
    web.run_app(
        app,
        host=host,
        port=port,
        print=None,
        access_log=None,
        backlog=4096,
        handler_cancellation=True,
        shutdown_timeout=1.0,
        loop=loop,
    )
