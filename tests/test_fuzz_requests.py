"""Property-based fuzzing of what clients send: bodies of both endpoints and headers.

Whatever a client sends, Bastion answers promptly, never with a 5xx of its own, and a
request it refuses costs nothing and writes no ledger row. Hypothesis builds bodies
near the real shape (the fields Bastion reads, with every kind of wrong value) and
headers a client controls. CI runs a fixed, derandomized set of examples;
``make fuzz`` runs many more with fresh randomness (BASTION_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import json
import os
import string

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="BASTION_FUZZ_EXAMPLES" not in os.environ,  # CI: the same examples each run
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False), st.text(max_size=20),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
models = st.sampled_from(["gpt-oss-120b", "Mistral-7B-Instruct-v0.3", "alias", "nope", ""])
caps = st.one_of(st.none(), st.integers(-5, 5000), st.just(2**63), values)
PART_TYPES = ["text", "input_text", "image_url", "input_image", "video_url", "input_audio", "x"]
content = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(PART_TYPES)},
            optional={"text": st.text(max_size=20), "image_url": values},
        ),
        max_size=3,
    ),
    values,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", 7]), "content": content}
) | values


def body(endpoint: str) -> st.SearchStrategy[dict]:
    prompt = (
        {"input": st.one_of(st.text(max_size=40), st.lists(message, max_size=4), values)}
        if endpoint == "responses"
        else {"messages": st.one_of(st.lists(message, max_size=4), values)}
    )
    optional = {
        "stream": st.one_of(st.booleans(), values),
        "temperature": st.one_of(st.floats(-1, 3), values),
        "top_p": st.one_of(st.floats(-1, 2), values),
        "n": st.one_of(st.integers(-1, 20), values),
        "stream_options": st.one_of(st.just({"include_usage": True}), values),
        "tools": values,
        "metadata": values,
        "user": values,
    }
    if endpoint == "responses":
        optional["max_output_tokens"] = caps
    else:
        optional["max_completion_tokens"] = caps
        optional["max_tokens"] = caps
    return st.fixed_dictionaries({"model": models, **prompt}, optional=optional)


header_text = st.text(
    alphabet=string.ascii_letters + string.digits + " -_/.:;=,", min_size=1, max_size=40
).map(str.strip).filter(bool)
headers = st.dictionaries(
    st.sampled_from(["Content-Type", "Accept", "X-Request-Id", "Transfer-Encoding-X",
                     "OpenAI-Beta", "x-sim-fault", "User-Agent", "Cookie", "Connection"]),
    header_text, max_size=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_key(gateway) -> tuple[str, str]:
    return gateway.new_key(credit="1000")


@pytest.mark.parametrize("endpoint", ["responses", "chat"])
@FUZZ
@given(data=st.data())
def test_no_client_body_or_header_gets_a_5xx_a_hang_or_a_charge(gateway, fuzz_key, endpoint,
                                                                  data):  # fmt: skip
    key, _ = fuzz_key
    sent = data.draw(body(endpoint))
    extra = data.draw(headers)
    extra.pop("x-sim-fault", None)  # an upstream fault is not client input
    path = "/responses" if endpoint == "responses" else "/chat/completions"
    answer = httpx.post(
        gateway.url + path,
        content=json.dumps(sent).encode(),  # not orjson: integers past 64 bits must go too
        headers={**extra, "Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code < 500 or (
        answer.status_code == 502 and sent.get("store") is True
    ), (answer.status_code, answer.text, sent)
    assert answer.headers.get("x-request-id", "").startswith("req_")
    if answer.status_code >= 400:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        if answer.status_code in (400, 402, 403, 404, 413, 429):  # refused by Bastion itself
            REFUSED.append(answer.headers["x-request-id"])


REFUSED: list[str] = []


def test_requests_refused_by_bastion_wrote_no_row_and_cost_nothing(gateway, fuzz_key):
    """Checked once the fuzzing is over, so that no late group commit can hide a row."""
    import time

    assert REFUSED, "the fuzzing refused nothing: it did not reach the checks"
    time.sleep(1.0)
    rows = gateway.ledger(fuzz_key[1])
    assert not {r.request_id for r in rows} & set(REFUSED)
    from bastion.money import parse_usd

    assert gateway.account(fuzz_key[1]).balance == parse_usd("1000") - sum(
        r.cost - r.uncharged for r in rows
    )
