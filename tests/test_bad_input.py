"""Bad input: a clear 4xx, never a 5xx, never a changed balance or a ledger row."""

from __future__ import annotations

import httpx
import pytest

from bastion.money import parse_usd

GOOD = {"model": "gpt-oss-120b", "input": "x"}
CHAT = {"model": "gpt-oss-120b", "messages": [{"role": "user", "content": "x"}]}


def nested(depth: int) -> bytes:
    return b'{"model":"gpt-oss-120b","input":' + b"[" * depth + b"]" * depth + b"}"


RAW_CASES = {
    "not json": b"model=gpt",
    "empty": b"",
    "invalid utf-8": b'{"model":"gpt-oss-120b","input":"\xff\xfe"}',
    "lone surrogate": b'{"model":"gpt-oss-120b","input":"\\ud800"}',
    "1000-deep nesting": nested(1000),
    "100000-deep nesting": nested(100_000),
    "huge integer": b'{"model":"gpt-oss-120b","input":"x","max_output_tokens":1' + b"0" * 40 + b"}",
    "NaN": b'{"model":"gpt-oss-120b","input":"x","temperature":NaN}',
    "trailing garbage": b'{"model":"gpt-oss-120b","input":"x"} {}',
}

JSON_CASES = {
    "model not a string": {**GOOD, "model": 42},
    "input a number": {**GOOD, "input": 7},
    "input items not objects": {**GOOD, "input": ["a", "b"]},
    "stream a string": {**GOOD, "stream": "yes"},
    "store a number": {**GOOD, "store": 1},
    "temperature too hot": {**GOOD, "temperature": 1e308},
    "top_p negative": {**GOOD, "top_p": -0.1},
    "cap absurd": {**GOOD, "max_output_tokens": 10**18},
    "cap negative": {**GOOD, "max_output_tokens": -5},
    "cap a float": {**GOOD, "max_output_tokens": 16.5},
    "cap a bool": {**GOOD, "max_output_tokens": True},
}

CHAT_CASES = {
    "messages an object": {**CHAT, "messages": {"role": "user"}},
    "message without role": {**CHAT, "messages": [{"content": "x"}]},
    "content a number": {**CHAT, "messages": [{"role": "user", "content": 3}]},
    "n too many": {**CHAT, "n": 1000},
    "n zero": {**CHAT, "n": 0},
    "max_tokens absurd": {**CHAT, "max_tokens": 2**62},
    "stream_options a list": {**CHAT, "stream": True, "stream_options": [1]},
}


@pytest.fixture(scope="module")
def victim(gateway):
    key, account = gateway.new_key(credit="1.00")
    return key, account


def check(gateway, victim, resp: httpx.Response) -> None:
    _, account = victim
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["code"] in ("invalid_request", "request_too_large")
    acct = gateway.account(account)
    assert acct.balance == parse_usd("1.00") and acct.spent == 0
    assert gateway.ledger(account) == []


@pytest.mark.parametrize("name", RAW_CASES)
def test_raw_bodies(gateway, victim, name):
    resp = httpx.post(
        gateway.url + "/responses",
        content=RAW_CASES[name],
        headers={"Authorization": f"Bearer {victim[0]}"},
    )
    check(gateway, victim, resp)


@pytest.mark.parametrize("name", JSON_CASES)
def test_wrong_types_and_absurd_numbers(gateway, victim, name):
    resp = httpx.post(
        gateway.url + "/responses",
        json=JSON_CASES[name],
        headers={"Authorization": f"Bearer {victim[0]}"},
    )
    check(gateway, victim, resp)
    if name not in ("input items not objects",):
        assert resp.json()["error"]["param"] is not None


@pytest.mark.parametrize("name", CHAT_CASES)
def test_chat_bodies(gateway, victim, name):
    resp = httpx.post(
        gateway.url + "/chat/completions",
        json=CHAT_CASES[name],
        headers={"Authorization": f"Bearer {victim[0]}"},
    )
    check(gateway, victim, resp)
    assert resp.json()["error"]["param"]


def test_oversize_chunked_body(gateway, victim):
    def chunks():
        yield b'{"model":"gpt-oss-120b","input":"'
        for _ in range(200):
            yield b"x" * 10_000
        yield b'"}'

    resp = httpx.post(
        gateway.url + "/responses",
        content=chunks(),
        headers={"Authorization": f"Bearer {victim[0]}"},
    )
    assert resp.status_code == 413
    check(gateway, victim, resp)


def raw_request(gateway, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Bytes no HTTP client library would send: the status line and the whole answer."""
    import socket

    host, port = gateway.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + b"\r\nConnection: close\r\n\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff\xfe\xfd", b"Bearer qbt_\xc3\x28abc", b"\xff", b"Bearer \x7fqbt_x"],
    ids=["latin-1 bytes", "broken utf-8", "no scheme", "control byte"],
)
def test_a_malformed_authorization_header_is_a_401_not_a_500(gateway, value):
    body = b'{"model":"gpt-oss-120b","input":"x"}'
    head = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nAuthorization: " + value
    )
    status, answer = raw_request(gateway, head, body)
    assert status in (400, 401), answer  # 400: bytes HTTP forbids, refused by the HTTP parser
    if status == 401:
        assert b"x-request-id" in answer.lower() and b'"invalid_api_key"' in answer
    for path in (b"/v1/models", b"/v1/key", b"/admin/v1/accounts"):
        status, answer = raw_request(gateway, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: " + value)  # fmt: skip
        assert status in (400, 401, 404), answer


def test_metrics_answers_carry_a_request_id(gateway):
    assert httpx.get(gateway.root + "/metrics").headers.get("x-request-id", "").startswith("req_")
