"""Streams relayed as they arrive, byte for byte, and never silently truncated."""

from __future__ import annotations

import itertools
import time

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent


def client(gateway, key: str, timeout: float = 20) -> OpenAI:
    return OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=timeout)


def raw_stream(gateway, key: str, path: str, body: dict) -> list[bytes]:
    """The SSE events exactly as the client receives them."""
    with httpx.stream(
        "POST",
        gateway.url + path,
        json=body,
        timeout=20,
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = b"".join(resp.iter_bytes())
    return [e + b"\n\n" for e in data.split(b"\n\n") if e]


def test_responses_stream_parses_into_sdk_types_and_is_metered(gateway):
    key, account = gateway.new_key()
    c = client(gateway, key)
    with c.responses.stream(model="gpt-oss-120b", input="Reply with: streamed ok") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "streamed ok"
    assert any(isinstance(e, ResponseTextDeltaEvent) for e in events)
    assert isinstance(events[-1], ResponseCompletedEvent)
    [row] = gateway.settled(account, 1)
    assert (row.input_tokens, row.output_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    assert not row.estimated and row.status == "200"


def test_chat_stream_without_include_usage_looks_untouched(gateway):
    """Bastion asks the upstream for usage; the client, who did not, never sees it."""
    key, account = gateway.new_key()
    body = {
        "model": "gpt-oss-120b",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    events = raw_stream(gateway, key, "/chat/completions", body)
    assert events[-1] == b"data: [DONE]\n\n"
    assert not any(b'"usage"' in e for e in events)
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == 16 and not row.estimated  # the sim's default length


def test_chat_stream_with_include_usage_gets_exactly_one_usage_chunk(gateway):
    key, _ = gateway.new_key()
    chunks = list(
        client(gateway, key).chat.completions.create(
            model="gpt-oss-120b",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].choices == []
    assert usage[0].usage.completion_tokens == 16


def test_events_arrive_as_the_upstream_sends_them(gateway):
    """At 5 tokens/s each delta must reach the client ~200 ms before the next one."""
    key, _ = gateway.new_key()
    arrivals = []
    stream = client(gateway, key).responses.create(
        model="slow-model", input="x", stream=True, extra_body={"sim": {"tokens": 5}}
    )
    for event in stream:
        if event.type == "response.output_text.delta":
            arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 5
    assert min(gaps) > 0.1, gaps


def test_responses_stream_cut_midway_ends_with_an_error_event(gateway):
    key, account = gateway.new_key()
    body = {"model": "fault-cut", "input": "x", "stream": True}
    events = raw_stream(gateway, key, "/responses", body)
    last = events[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = orjson.loads(last.split(b"data: ", 1)[1])
    previous = orjson.loads(events[-2].split(b"data: ", 1)[1])
    assert error["type"] == "error"
    assert error["error"]["code"] == "upstream_error" and error["error"]["param"] is None
    assert error["sequence_number"] == previous["sequence_number"] + 1
    assert not any(b"[DONE]" in e for e in events)
    # the SDK raises it as an error
    with pytest.raises(openai.APIError, match="upstream"):
        list(client(gateway, key).responses.create(**body))
    rows = gateway.settled(account, 2)
    assert all(r.estimated and r.status == "502" and r.output_tokens > 0 for r in rows)


def test_chat_stream_cut_midway_ends_with_an_error_chunk(gateway):
    key, _ = gateway.new_key()
    body = {"model": "fault-cut", "messages": [{"role": "user", "content": "x"}], "stream": True}
    events = raw_stream(gateway, key, "/chat/completions", body)
    assert events[-1].startswith(b'data: {"error":')
    assert orjson.loads(events[-1][6:])["error"]["type"] == "upstream_error"
    assert not any(b"[DONE]" in e for e in events)


def test_silent_upstream_past_read_timeout_ends_the_stream(gateway):
    key, _ = gateway.new_key()
    started = time.monotonic()
    body = {"model": "fault-stall", "input": "x", "stream": True}
    events = raw_stream(gateway, key, "/responses", body)
    assert events[-1].startswith(b"event: error")
    assert b"sent nothing" in events[-1]
    assert time.monotonic() - started < 10


def test_client_disconnect_cancels_and_charges_what_was_streamed(gateway):
    key, account = gateway.new_key()
    stream = client(gateway, key).responses.create(
        model="slow-model", input="x", stream=True, extra_body={"sim": {"tokens": 100}}
    )
    seen = 0
    for event in stream:
        if event.type == "response.output_text.delta":
            seen += 1
            if seen == 2:
                break
    stream.close()
    [row] = gateway.settled(account, 1)
    assert row.status == "cancelled" and row.estimated
    assert 1 <= row.output_tokens < 10  # nowhere near the 100 asked for


def test_a_cut_streams_input_is_estimated_from_its_text_not_the_bound(gateway):
    """A 9-token prompt is charged about 9 tokens, not the admission bound / 4 (~70)."""
    from bastion.sim import usage_for

    key, account = gateway.new_key()
    prompt = "What is the capital city of France, please?"  # 44 bytes
    body = {"model": "fault-cut", "input": prompt, "stream": True}
    raw_stream(gateway, key, "/responses", body)
    [row] = gateway.settled(account, 1)
    real = usage_for({**body, "model": "m"}, "responses")[0]  # what the upstream counts: 15
    assert row.estimated and abs(row.input_tokens - real) <= 4, (row.input_tokens, real)
