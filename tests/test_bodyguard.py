"""Bodies shaped to be slow to parse are refused before the event loop parses them."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest

from bastion.bodyguard import BodyGuard, count_containers
from bastion.errors import APIError


def hostile(items: int) -> bytes:
    """Many tiny objects: cheap to send, ~1 µs each to parse."""
    return orjson.dumps({"model": "gpt-oss-120b", "input": [{"a": []}] * items})


def test_count_containers_is_exact():
    assert count_containers(b'{"a": [1, {"b": []}], "c": "{[{["}') == 4
    assert count_containers(b"not json") == -1


async def test_a_body_of_many_objects_is_refused_and_a_code_prompt_is_not():
    guard = BodyGuard(max_containers=1_000)
    with pytest.raises(APIError) as refused:
        await guard.check(hostile(2_000))
    assert refused.value.status == 400 and "4002 JSON objects and arrays" in refused.value.message
    code = orjson.dumps({"model": "m", "input": "x = {'a': [1]}\n" * 5_000})  # 10,000 brackets
    await guard.check(code)  # counted exactly off the loop: two containers, accepted
    guard.close()


def test_through_the_gateway_a_hostile_body_gets_400_while_a_stream_flows(gateway):
    key, account = gateway.new_key()
    headers = {"Authorization": f"Bearer {key}"}
    gaps: list[float] = []

    def stream() -> None:
        body = {"model": "slow-model", "input": "x", "stream": True, "sim": {"tokens": 15}}
        with httpx.stream("POST", gateway.url + "/responses", json=body, headers=headers) as r:
            last = time.monotonic()
            for _ in r.iter_raw():
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

    flowing = threading.Thread(target=stream)
    flowing.start()
    for _ in range(5):
        answer = httpx.post(gateway.url + "/responses", content=hostile(45_000), headers=headers,
                            timeout=30)  # fmt: skip
        assert answer.status_code == 400, answer.text
        assert "JSON objects and arrays" in answer.json()["error"]["message"]
    flowing.join(30)
    assert len(gaps) > 10  # the stream went on (bench/hostile_bodies.py measures its gaps)
    assert len(gateway.settled(account, 1)) == 1  # refused bodies write nothing
