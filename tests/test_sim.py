"""The upstream simulator, as the official `openai` SDK sees it (docs/simulator.md)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types import chat as chat_types
from openai.types import responses as rt
from simhelpers import SimServer

from bastion.sim import input_tokens_for, plan_reply, reply_text, reported_usage, usage_for

TOOLS_FLAT = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    }
]
TOOLS_CHAT = [
    {"type": "function", "function": {k: v for k, v in TOOLS_FLAT[0].items() if k != "type"}}
]

EVENT_CLASSES: dict[str, type] = {
    "response.created": rt.ResponseCreatedEvent,
    "response.in_progress": rt.ResponseInProgressEvent,
    "response.output_item.added": rt.ResponseOutputItemAddedEvent,
    "response.content_part.added": rt.ResponseContentPartAddedEvent,
    "response.output_text.delta": rt.ResponseTextDeltaEvent,
    "response.output_text.done": rt.ResponseTextDoneEvent,
    "response.content_part.done": rt.ResponseContentPartDoneEvent,
    "response.output_item.done": rt.ResponseOutputItemDoneEvent,
    "response.function_call_arguments.delta": rt.ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": rt.ResponseFunctionCallArgumentsDoneEvent,
    "response.completed": rt.ResponseCompletedEvent,
    "response.incomplete": rt.ResponseIncompleteEvent,
}
TEXT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_TAIL = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def client(sim: SimServer) -> Iterator[openai.OpenAI]:
    # strict validation: every body and event must validate against the SDK's own models
    with openai.OpenAI(
        base_url=sim.base_url, api_key="x", max_retries=0, _strict_response_validation=True
    ) as c:
        yield c


def _events(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    with client.responses.create(stream=True, **kwargs) as stream:
        return list(stream)


def _http(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A raw request (stdlib), to see exactly the bytes and status the simulator sends."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {})
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _check_typed(events: list[Any]) -> None:
    """Every event is the SDK class its `type` names; sequence numbers count from 0."""
    for i, ev in enumerate(events):
        assert type(ev) is EVENT_CLASSES[ev.type], (ev.type, type(ev))
        assert ev.sequence_number == i


# ---------------------------------------------------------------- /v1/responses


def test_reference_example(client: openai.OpenAI) -> None:
    body = {"model": "gpt-oss-120b", "input": "Reply with: ok", "max_output_tokens": 32}
    res = client.responses.create(**body, store=False)
    assert isinstance(res, rt.Response)
    assert res.output_text == "ok" == reply_text(body)
    assert res.status == "completed" and res.model == "gpt-oss-120b"
    assert res.id.startswith("resp_") and res.output[0].id.startswith("msg_")
    assert res.usage is not None
    assert (res.usage.input_tokens, res.usage.output_tokens) == usage_for(body, "responses")
    assert res.usage.total_tokens == res.usage.input_tokens + res.usage.output_tokens
    assert res.usage.input_tokens_details.cache_write_tokens == 0


def test_generated_text_is_deterministic(client: openai.OpenAI) -> None:
    body = {
        "model": "any/model-name",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story"}]}],
        "metadata": {"k": "v"},
    }
    a = client.responses.create(**body)
    b = client.responses.create(**body)
    assert a.output_text == b.output_text == reply_text(body) != ""
    assert len(plan_reply(body).pieces) == 16
    assert (a.usage.input_tokens, a.usage.output_tokens) == usage_for(body)  # type: ignore[union-attr]
    assert a.instructions == "Be brief." and a.metadata == {"k": "v"}
    other = {**body, "input": "Something else"}
    assert client.responses.create(**other).output_text != a.output_text


def test_stream_events_are_sdk_types(client: openai.OpenAI) -> None:
    body = {"model": "gpt-oss-120b", "input": "Write a poem", "store": False}
    events = _events(client, **body)
    _check_typed(events)
    types = [e.type for e in events]
    n = len(plan_reply(body).pieces)
    assert types == [
        *TEXT_ORDER,
        *["response.output_text.delta"] * n,
        *TEXT_TAIL,
        "response.completed",
    ]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all(d.logprobs == [] for d in deltas)
    assert "".join(d.delta for d in deltas) == reply_text(body)
    done = events[-1].response
    assert done.output_text == reply_text(body)
    assert (done.usage.input_tokens, done.usage.output_tokens) == usage_for(body)
    assert events[0].response.usage is None and events[0].response.output == []


def test_stream_helper_final_response(client: openai.OpenAI) -> None:
    body = {"model": "Qwen3-32B", "input": "Reply with: Hello there, world!"}
    with client.responses.stream(**body) as stream:
        final = stream.get_final_response()
    assert final.output_text == "Hello there, world!" == reply_text(body)
    assert final.usage is not None and final.usage.output_tokens == 3


def test_max_output_tokens_incomplete(client: openai.OpenAI) -> None:
    body = {"model": "m", "input": "long story please", "max_output_tokens": 5}
    res = client.responses.create(**body, extra_headers={"x-sim-tokens": "40"})
    assert res.status == "incomplete"
    assert res.incomplete_details is not None
    assert res.incomplete_details.reason == "max_output_tokens"
    assert res.usage is not None and res.usage.output_tokens == 5
    assert res.output_text == reply_text(body, tokens=40)
    events = _events(client, **body, extra_headers={"x-sim-tokens": "40"})
    _check_typed(events)
    assert [e.type for e in events].count("response.output_text.delta") == 5
    assert isinstance(events[-1], rt.ResponseIncompleteEvent)
    assert events[-1].response.status == "incomplete"


def test_vllm_quirks_terminal_is_completed(client: openai.OpenAI) -> None:
    body = {"model": "m", "input": "x", "max_output_tokens": 3}
    events = _events(client, **body, extra_headers={"x-sim-quirks": "vllm"})
    assert isinstance(events[-1], rt.ResponseCompletedEvent)
    assert events[-1].response.status == "incomplete"


def test_token_count_override(client: openai.OpenAI) -> None:
    events = _events(client, model="m", input="bench", extra_headers={"x-sim-tokens": "50"})
    assert [e.type for e in events].count("response.output_text.delta") == 50
    body = {"model": "m", "input": "bench", "sim": {"tokens": 7}}
    res = client.responses.create(model="m", input="bench", extra_body={"sim": {"tokens": 7}})
    assert res.usage is not None and res.usage.output_tokens == 7
    assert res.output_text == reply_text(body)


def test_input_tokens_formula_and_bound() -> None:
    body = {"model": "m", "input": "abcdefgh"}  # 8 bytes, 1 item
    assert input_tokens_for(body) == 2 + 4
    bodies = [
        body,
        {"model": "m", "input": "é" * 1001, "instructions": "x" * 13, "tools": TOOLS_FLAT},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 30},
        {
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "42"},
            ],
        },
    ]
    for b in bodies:
        text = json.dumps(b, ensure_ascii=False).encode()  # more than all the text
        items = len(b.get("messages") or b["input"]) if not isinstance(b.get("input"), str) else 1
        assert input_tokens_for(b) <= len(text) + 64 + 16 * (items + 1)


# ---------------------------------------------------------------- /v1/chat/completions


def _chat_body(**extra: Any) -> dict[str, Any]:
    base = {"model": "Mistral-7B-Instruct-v0.3", "messages": [{"role": "user", "content": "Hi"}]}
    return base | extra


def test_chat_non_stream(client: openai.OpenAI) -> None:
    body = _chat_body()
    res = client.chat.completions.create(**body)
    assert isinstance(res, chat_types.ChatCompletion)
    assert res.choices[0].message.content == reply_text(body) != ""
    assert res.choices[0].finish_reason == "stop"
    assert res.usage is not None
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == usage_for(body, "chat")
    assert res.model == body["model"]


def test_chat_and_responses_share_the_text_rule() -> None:
    chat = _chat_body(messages=[{"role": "user", "content": "same question"}])
    assert reply_text(chat, "chat") == reply_text({"model": "m", "input": "same question"})


def test_chat_stream_without_usage(client: openai.OpenAI) -> None:
    body = _chat_body()
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert all(isinstance(c, chat_types.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reply_text(body)
    assert len(chunks) == 1 + len(plan_reply(body).pieces) + 1


@pytest.mark.parametrize("stream_options", [{"include_usage": True}, {}])
def test_chat_stream_with_usage(client: openai.OpenAI, stream_options: dict[str, Any]) -> None:
    body = _chat_body(stream_options=stream_options)
    chunks = list(client.chat.completions.create(**body, stream=True))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    u = chunks[-1].usage
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == usage_for(body)


def test_chat_stream_raw_framing(sim: SimServer) -> None:
    body = _chat_body(stream=True, stream_options={"include_usage": True})
    raw = _http(sim.base_url + "/chat/completions", body)[1].decode()
    assert raw.endswith("data: [DONE]\n\n") and "event:" not in raw
    chunks = [json.loads(line[6:]) for line in raw.split("\n\n") if line[6:7] == "{"]
    assert all("usage" not in c for c in chunks[:-1])  # like vLLM: no "usage": null


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
def test_chat_finish_length(client: openai.OpenAI, cap_field: str) -> None:
    body = _chat_body(**{cap_field: 3})
    res = client.chat.completions.create(**body)
    assert res.choices[0].finish_reason == "length"
    assert res.usage is not None and res.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


# ---------------------------------------------------------------- function calls


def test_responses_function_call(client: openai.OpenAI) -> None:
    body = {"model": "gpt-oss-120b", "input": "Please call get_weather", "tools": TOOLS_FLAT}
    res = client.responses.create(**body)
    item = res.output[0]
    assert isinstance(item, rt.ResponseFunctionToolCall)
    assert item.name == "get_weather" and item.call_id.startswith("call_")
    assert item.id is not None and item.id.startswith("fc_")
    args = json.loads(item.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    assert item.arguments == plan_reply(body).arguments
    assert res.output_text == "" and res.tools[0].name == "get_weather"  # type: ignore[union-attr]
    assert (res.usage.input_tokens, res.usage.output_tokens) == usage_for(body)  # type: ignore[union-attr]


def test_responses_function_call_stream(client: openai.OpenAI) -> None:
    body = {
        "model": "m",
        "input": 'use the get_weather tool with {"city": "Paris", "unit": "celsius"}',
        "tools": TOOLS_FLAT,
    }
    events = _events(client, **body)
    _check_typed(events)
    types = [e.type for e in events]
    assert types[2] == "response.output_item.added"
    assert types[-4:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "response.content_part.added" not in types
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == '{"city":"Paris","unit":"celsius"}'
    with client.responses.stream(**body) as stream:  # strict tool: the helper parses arguments
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call"
    assert call.parsed_arguments == {"city": "Paris", "unit": "celsius"}  # type: ignore[union-attr]


def test_function_call_loop_then_text(client: openai.OpenAI) -> None:
    first = {"model": "m", "input": "call get_weather. Reply with: done", "tools": TOOLS_FLAT}
    call = client.responses.create(**first).output[0]
    assert call.type == "function_call"
    second = {
        "model": "m",
        "tools": TOOLS_FLAT,
        "input": [
            {"role": "user", "content": "call get_weather. Reply with: done"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    }
    assert client.responses.create(**second).output_text == "done"


def test_tool_choice(client: openai.OpenAI) -> None:
    required = {"model": "m", "input": "hello", "tools": TOOLS_FLAT, "tool_choice": "required"}
    assert client.responses.create(**required).output[0].type == "function_call"
    none = {"model": "m", "input": "call get_weather", "tools": TOOLS_FLAT, "tool_choice": "none"}
    assert client.responses.create(**none).output[0].type == "message"
    plain = {"model": "m", "input": "hello", "tools": TOOLS_FLAT}
    assert client.responses.create(**plain).output[0].type == "message"


def test_chat_function_call(client: openai.OpenAI) -> None:
    body = _chat_body(messages=[{"role": "user", "content": "call get_weather"}], tools=TOOLS_CHAT)
    res = client.chat.completions.create(**body)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    fn = calls[0].function  # type: ignore[union-attr]
    assert fn.name == "get_weather" and fn.arguments == plan_reply(body).arguments
    chunks = list(client.chat.completions.create(**body, stream=True))
    parts = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert parts[0].id and parts[0].id.startswith("call_") and parts[0].type == "function"
    assert parts[0].function is not None and parts[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in parts if p.function) == fn.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_chat_tool_choice_forced(client: openai.OpenAI) -> None:
    body = _chat_body(
        tools=TOOLS_CHAT, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    res = client.chat.completions.create(**body)
    assert res.choices[0].message.tool_calls is not None


# ---------------------------------------------------------------- faults and validation


@pytest.mark.parametrize("status", ["500", "503"])
def test_fault_5xx(client: openai.OpenAI, status: str) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client.responses.create(model="m", input="x", extra_headers={"x-sim-fault": status})
    assert err.value.status_code == int(status)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**_chat_body(model=f"m@{status}"))


def test_fault_400_and_401(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m@400", input="x", tools=TOOLS_FLAT)
    assert err.value.code == "invalid_function_parameters"
    assert err.value.param == "tools[0].parameters"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(**_chat_body(), extra_headers={"x-sim-fault": "401"})


def test_store_true_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client.responses.create(model="m", input="x", store=True)
    assert "store" in err.value.message
    assert client.responses.create(model="m", input="x").status == "completed"  # absent: ok


def test_fault_hang(sim: SimServer) -> None:
    c = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        c.responses.create(model="m@hang", input="x")


def test_fault_stall_stream(sim: SimServer) -> None:
    c = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=0.5)
    seen: list[str] = []
    with pytest.raises(openai.APITimeoutError):
        for ev in c.responses.create(model="m@stall", input="x", stream=True):
            seen.append(ev.type)
    assert seen[:4] == TEXT_ORDER and "response.completed" not in seen


def test_fault_cut(client: openai.OpenAI) -> None:
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for ev in client.responses.create(model="m@cut", input="x", stream=True):
            seen.append(ev.type)
    assert seen.count("response.output_text.delta") == 8
    assert "response.completed" not in seen
    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(**_chat_body(model="m@cut"), stream=True))
    with pytest.raises(openai.APIConnectionError):
        client.responses.create(model="m@cut", input="x")


def test_fault_malformed(client: openai.OpenAI) -> None:
    with pytest.raises((json.JSONDecodeError, openai.APIError)):
        client.responses.create(model="m@malformed", input="x")
    with pytest.raises(json.JSONDecodeError):
        list(client.responses.create(model="m@malformed", input="x", stream=True))
    with pytest.raises(json.JSONDecodeError):
        list(client.chat.completions.create(**_chat_body(model="m@malformed"), stream=True))


def test_fault_error_event(client: openai.OpenAI) -> None:
    seen: list[str] = []
    with pytest.raises(openai.APIError) as err:
        for ev in client.responses.create(model="m@error-event", input="x", stream=True):
            seen.append(ev.type)
    assert "simulated" in err.value.message and "response.completed" not in seen
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(**_chat_body(model="m@error-event"), stream=True))


def test_fault_slow(client: openai.OpenAI) -> None:
    t = time.monotonic()
    res = client.responses.create(
        model="m", input="x", extra_headers={"x-sim-fault": "slow", "x-sim-delay-ms": "300"}
    )
    assert time.monotonic() - t >= 0.3 and res.status == "completed"


def test_validation(sim: SimServer) -> None:
    url = sim.base_url + "/responses"
    status, raw = _http(url, b"{not json")
    assert status == 400 and json.loads(raw)["error"]["code"] == 400
    status, raw = _http(url, {"input": "x"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "model"
    assert _http(sim.base_url + "/chat/completions", {"model": "m"})[0] == 400
    assert _http(url, {"model": "m", "input": "x"}, {"x-sim-fault": "nope"})[0] == 400


def test_models_and_health(client: openai.OpenAI, sim: SimServer) -> None:
    ids = [m.id for m in client.models.list()]
    assert "gpt-oss-120b" in ids
    with urllib.request.urlopen(sim.url + "/health", timeout=5) as r:
        assert r.status == 200
    raw = client.responses.with_raw_response.create(
        model="m", input="x", extra_headers={"x-request-id": "req_abc"}
    )
    assert raw.headers["x-request-id"] == "req_abc"


# ---------------------------------------------------------------- timing


def test_stream_pacing(client: openai.OpenAI) -> None:
    headers = {"x-sim-tokens": "10", "x-sim-tokens-per-s": "50", "x-sim-ttft-ms": "100"}
    t = time.monotonic()
    first = None
    with client.responses.create(model="m", input="x", stream=True, extra_headers=headers) as s:
        for ev in s:
            if ev.type == "response.output_text.delta" and first is None:
                first = time.monotonic() - t
    total = time.monotonic() - t
    assert first is not None and 0.1 <= first < 1.0
    assert 0.1 + 0.18 <= total < 2.5


def test_non_stream_timing(client: openai.OpenAI) -> None:
    headers = {"x-sim-tokens": "10", "x-sim-tokens-per-s": "50"}
    t = time.monotonic()
    client.chat.completions.create(**_chat_body(), extra_headers=headers)
    assert 0.18 <= time.monotonic() - t < 2.5


def test_server_defaults_apply() -> None:
    with SimServer(ttft_ms=150, tokens_per_s=100) as slow:
        c = openai.OpenAI(base_url=slow.base_url, api_key="x", max_retries=0)
        t = time.monotonic()
        c.responses.create(model="m", input="x", extra_headers={"x-sim-tokens": "11"})
        assert 0.15 + 0.1 <= time.monotonic() - t < 2.5


async def test_many_concurrent_streams_keep_pace(sim: SimServer) -> None:
    """300 streams × 20 tokens at 50 tok/s end on time: the rate does not drift."""
    body = {"model": "m", "input": "x", "stream": True}
    headers = {"x-sim-tokens": "20", "x-sim-tokens-per-s": "50"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one() -> tuple[int, float]:
            t = time.monotonic()
            async with http.post(sim.base_url + "/responses", json=body, headers=headers) as r:
                data = await r.read()
            return data.count(b"event: response.output_text.delta"), time.monotonic() - t

        results = await asyncio.gather(*(one() for _ in range(300)))
    assert all(n == 20 for n, _ in results)
    assert min(d for _, d in results) >= 0.38
    assert max(d for _, d in results) < 3.0  # loose: shared CI cores


# ---------------------------------------------------------------- usage details and bogus usage


def _sdk(body: dict[str, Any]) -> dict[str, Any]:
    """SDK keyword arguments for a body: its `sim` object goes in `extra_body`."""
    rest = {k: v for k, v in body.items() if k != "sim"}
    return rest | ({"extra_body": {"sim": body["sim"]}} if "sim" in body else {})


def _raw_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a raw chat stream (not `[DONE]`), key order kept."""
    return [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line[6:7] == "{"]


def test_cached_tokens_responses(client: openai.OpenAI) -> None:
    body = {"model": "m", "input": "a question long enough to cache"}
    n_in = input_tokens_for(body)
    res = client.responses.create(**body, extra_body={"sim": {"cached_tokens": 3}})
    assert res.usage is not None and res.usage.input_tokens == n_in
    assert res.usage.input_tokens_details.cached_tokens == 3
    assert res.usage.input_tokens_details.cache_write_tokens == 0
    assert reported_usage({**body, "sim": {"cached_tokens": 3}}).cached_tokens == 3
    headers = {"x-sim-cached-tokens": "100000"}  # capped at the input tokens
    events = _events(client, **body, extra_headers=headers)
    _check_typed(events)
    done = events[-1].response.usage
    assert done.input_tokens_details.cached_tokens == n_in == done.input_tokens
    assert reported_usage(body, cached_tokens=100000).cached_tokens == n_in
    events = _events(client, **body, max_output_tokens=2, extra_headers=headers)
    assert isinstance(events[-1], rt.ResponseIncompleteEvent)
    assert events[-1].response.usage.input_tokens_details.cached_tokens == n_in
    plain = client.responses.create(**body)  # default: 0, details still present
    assert plain.usage is not None and plain.usage.input_tokens_details.cached_tokens == 0


def test_cached_tokens_chat(client: openai.OpenAI, sim: SimServer) -> None:
    body = _chat_body(stream_options={"include_usage": True})
    res = client.chat.completions.create(**body, extra_headers={"x-sim-cached-tokens": "4"})
    assert res.usage is not None and res.usage.prompt_tokens_details is not None
    assert res.usage.prompt_tokens_details.cached_tokens == 4
    assert res.usage.completion_tokens_details is None
    chunks = list(
        client.chat.completions.create(**_sdk(body | {"sim": {"cached_tokens": 4}}), stream=True)
    )
    u = chunks[-1].usage
    assert u is not None and u.prompt_tokens_details is not None
    assert u.prompt_tokens_details.cached_tokens == 4
    assert (u.prompt_tokens, u.completion_tokens) == usage_for(body)
    url = sim.base_url + "/chat/completions"
    for extra in ({}, {"sim": {"cached_tokens": 0}}):  # like vLLM: no details when 0
        status, raw = _http(url, body | extra)
        assert status == 200 and "prompt_tokens_details" not in json.loads(raw)["usage"]
        raw = _http(url, body | extra | {"stream": True})[1]
        assert "prompt_tokens_details" not in _raw_chunks(raw)[-1]["usage"]
    assert _http(url, body, {"x-sim-cached-tokens": "-1"})[0] == 400


def test_reasoning_tokens(client: openai.OpenAI, sim: SimServer) -> None:
    body = {"model": "m", "input": "think hard", "sim": {"tokens": 10, "reasoning_tokens": 6}}
    res = client.responses.create(**_sdk(body))
    assert res.usage is not None and res.usage.output_tokens == 10  # part of the output
    assert res.usage.output_tokens_details.reasoning_tokens == 6
    assert res.output_text == reply_text(body)
    events = _events(client, model="m", input="x", extra_headers={"x-sim-reasoning-tokens": "99"})
    done = events[-1].response.usage
    assert done.output_tokens_details.reasoning_tokens == done.output_tokens == 16
    chat = _chat_body(stream_options={})
    res_c = client.chat.completions.create(**chat, extra_body={"sim": {"reasoning_tokens": 5}})
    assert res_c.usage is not None and res_c.usage.completion_tokens == 16
    assert res_c.usage.completion_tokens_details is not None
    assert res_c.usage.completion_tokens_details.reasoning_tokens == 5
    assert res_c.usage.prompt_tokens_details is None
    headers = {"x-sim-reasoning-tokens": "5", "x-sim-cached-tokens": "2"}
    chunks = list(client.chat.completions.create(**chat, stream=True, extra_headers=headers))
    u = chunks[-1].usage
    assert u is not None and u.completion_tokens_details is not None
    assert u.completion_tokens_details.reasoning_tokens == 5
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 2
    raw = _http(sim.base_url + "/chat/completions", chat)[1]  # 0: omitted
    assert "completion_tokens_details" not in json.loads(raw)["usage"]


def test_report_overrides_usage(client: openai.OpenAI, sim: SimServer) -> None:
    report = {"input_tokens": 10**19, "output_tokens": -7, "cached_tokens": 2**64 - 1}
    body = {"model": "m", "input": "Reply with: same text", "sim": {"report": report}}
    res = client.responses.create(**_sdk(body))
    assert res.output_text == "same text"  # generation unchanged
    u = res.usage
    assert u is not None and (u.input_tokens, u.output_tokens) == (10**19, -7)
    assert u.total_tokens == 10**19 - 7 and u.input_tokens_details.cached_tokens == 2**64 - 1
    assert u.output_tokens_details.reasoning_tokens == 0
    assert usage_for(body) == (10**19, -7)
    assert reported_usage(body).total_tokens == 10**19 - 7
    events = _events(client, **_sdk(body))
    _check_typed(events)
    assert events[-1].response.usage.input_tokens == 10**19
    assert [e.type for e in events].count("response.output_text.delta") == 2

    chat_report = {"output_tokens": 10**19, "reasoning_tokens": -1}
    chat = _chat_body(stream_options={"include_usage": True}, sim={"report": chat_report})
    res_c = client.chat.completions.create(**_sdk(chat))
    uc = res_c.usage
    assert uc is not None and uc.completion_tokens == 10**19
    assert uc.prompt_tokens == input_tokens_for(chat)
    assert uc.total_tokens == 10**19 + input_tokens_for(chat)
    assert uc.completion_tokens_details is not None
    assert uc.completion_tokens_details.reasoning_tokens == -1
    assert res_c.choices[0].message.content == reply_text(chat)
    chunks = list(client.chat.completions.create(**_sdk(chat), stream=True))
    us = chunks[-1].usage
    assert us is not None and (us.prompt_tokens, us.completion_tokens) == usage_for(chat)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_text(chat)


@pytest.mark.parametrize(
    "report",
    [
        {"input_tokens": 2**64},  # orjson stops at 2**64 - 1
        {"input_tokens": 10**19, "output_tokens": 10**19},  # the total overflows
        {"cached_tokens": -(2**63) - 1},
        {"input": 1},
        {"output_tokens": "12"},
        {"output_tokens": True},
        [1, 2],
    ],
)
def test_report_refused(sim: SimServer, report: Any) -> None:
    for endpoint, body in (
        ("/responses", {"model": "m", "input": "x"}),
        ("/chat/completions", _chat_body(stream=True)),
    ):
        status, raw = _http(sim.base_url + endpoint, body | {"sim": {"report": report}})
        assert status == 400 and json.loads(raw)["error"]["param"] == "sim.report"


def test_chat_usage_null_chunks(client: openai.OpenAI, sim: SimServer) -> None:
    url = sim.base_url + "/chat/completions"
    body = _chat_body(stream=True, stream_options={"include_usage": True})
    for extra, headers in (
        ({"sim": {"usage_null_chunks": True}}, {}),
        ({}, {"x-sim-usage-null": "1"}),
    ):
        raw = _http(url, body | extra, headers)[1]
        chunks = _raw_chunks(raw)
        assert raw.endswith(b"data: [DONE]\n\n")
        assert len(chunks) == 1 + len(plan_reply(body).pieces) + 1 + 1
        for c in chunks[:-1]:  # OpenAI's format: "usage": null last, then the usage chunk
            assert list(c)[-1] == "usage" and c["usage"] is None and c["choices"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    no_usage = body | {"stream_options": {"include_usage": False}}
    off = _raw_chunks(_http(url, no_usage, {"x-sim-usage-null": "1"})[1])
    assert all("usage" not in c for c in off)  # only with usage on
    assert _http(url, body, {"x-sim-usage-null": "maybe"})[0] == 400

    sdk_body = _chat_body(stream_options={"include_usage": True}, sim={"usage_null_chunks": True})
    chunks_sdk = list(client.chat.completions.create(**_sdk(sdk_body), stream=True))
    assert all(c.usage is None and c.choices for c in chunks_sdk[:-1])
    u = chunks_sdk[-1].usage
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == usage_for(sdk_body)
    with client.chat.completions.stream(
        model=sdk_body["model"],
        messages=sdk_body["messages"],
        stream_options={"include_usage": True},
        extra_body={"sim": {"usage_null_chunks": True, "cached_tokens": 1}},
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == reply_text(sdk_body)
    assert final.usage is not None and final.usage.prompt_tokens_details is not None
    assert final.usage.prompt_tokens_details.cached_tokens == 1
    tools = _chat_body(
        messages=[{"role": "user", "content": "call get_weather"}],
        tools=TOOLS_CHAT,
        stream_options={"include_usage": True},
    )
    headers = {"x-sim-usage-null": "true"}
    calls = list(client.chat.completions.create(**tools, stream=True, extra_headers=headers))
    assert calls[-2].choices[0].finish_reason == "tool_calls" and calls[-1].usage is not None


def test_echo_answers_a_field_of_the_body_as_received() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache_salt": "s-1"}
    assert reply_text({**body, "sim": {"echo": "cache_salt"}}) == '"s-1"'
    assert reply_text({**body, "sim": {"echo": "nothing"}}) == "null"
    assert reply_text({**body, "sim": {"echo": "messages"}}, "chat") == json.dumps(
        body["messages"], separators=(",", ":")
    )
