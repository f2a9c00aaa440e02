"""The client API (docs/api.md) through the official SDK: answers, errors, headers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import httpx
import openai
import pytest
from conftest import CACHE_SALT_SECRET
from openai import OpenAI

from bastion.sim import reply_text


def client(gateway, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)


def post(gateway, path: str, key: str | None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(gateway.url + path, headers=headers, timeout=20, **kwargs)


def assert_error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]
    assert resp.headers["x-request-id"].startswith("req_")
    return error


def test_reference_example_through_the_sdk(gateway):
    key, account = gateway.new_key()
    res = client(gateway, key).responses.create(
        model="gpt-oss-120b", input="Reply with: ok", max_output_tokens=32, store=False
    )
    assert res.output_text == "ok"
    assert res.model == "gpt-oss-120b"
    [row] = gateway.settled(account, 1)
    assert (row.input_tokens, row.output_tokens) == (
        res.usage.input_tokens,
        res.usage.output_tokens,
    )
    assert row.model == "gpt-oss-120b" and row.endpoint == "responses" and row.status == "200"
    assert not row.estimated and row.cost > 0
    assert row.request_id == res._request_id


def test_chat_completion_and_chat_only_model(gateway):
    key, account = gateway.new_key()
    messages = [{"role": "user", "content": "Reply with: fine"}]
    chat = client(gateway, key).chat.completions.create(
        model="Mistral-7B-Instruct-v0.3", messages=messages
    )
    assert chat.choices[0].message.content == "fine"
    [row] = gateway.settled(account, 1)
    assert row.endpoint == "chat" and row.output_tokens == chat.usage.completion_tokens


def test_models_lists_the_catalogue_and_needs_a_key(gateway):
    key, account = gateway.new_key()
    models = client(gateway, key).models.list()
    ids = {m.id for m in models.data}
    assert {"gpt-oss-120b", "Mistral-7B-Instruct-v0.3", "alias"} <= ids
    assert all(m.object == "model" and m.owned_by for m in models.data)
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "qbt_" + "x" * 43).models.list()
    assert gateway.account(account).spent == 0  # listing models is free


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic abc", "Bearer not-a-bastion-key", "Bearer qbt_" + "A" * 43],
)
def test_401_for_missing_malformed_unknown_keys(gateway, header):
    headers = {"Authorization": header} if header else {}
    resp = httpx.post(
        gateway.url + "/responses", headers=headers, json={"model": "gpt-oss-120b", "input": "x"}
    )
    assert_error(resp, 401, "invalid_api_key")


def test_revoked_key_is_refused_within_five_seconds(gateway):
    key, _ = gateway.new_key()
    [api_key] = [k for k in gateway.store_call("list_keys") if key.startswith(k.prefix)]
    gateway.store_call("revoke_key", api_key.id)
    assert gateway.wait_for_key(key, present=False) < 5
    resp = post(gateway, "/responses", key, json={"model": "gpt-oss-120b", "input": "x"})
    assert_error(resp, 401, "invalid_api_key")


def test_400_invalid_request_names_the_field(gateway):
    key, _ = gateway.new_key()
    assert_error(post(gateway, "/responses", key, content=b"{not json"), 400, "invalid_request")
    assert_error(post(gateway, "/responses", key, json=[1, 2]), 400, "invalid_request")
    missing = post(gateway, "/responses", key, json={"model": "gpt-oss-120b"})
    assert_error(missing, 400, "invalid_request", "input")
    bad_temp = {"model": "gpt-oss-120b", "input": "x", "temperature": 7}
    assert_error(
        post(gateway, "/responses", key, json=bad_temp), 400, "invalid_request", "temperature"
    )
    no_messages = {"model": "gpt-oss-120b", "messages": []}
    assert_error(
        post(gateway, "/chat/completions", key, json=no_messages),
        400,
        "invalid_request",
        "messages",
    )


def test_400_model_not_found_and_wrong_endpoint(gateway):
    key, _ = gateway.new_key()
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway, key).responses.create(model="no-such-model", input="x")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    resp = post(
        gateway, "/responses", key, json={"model": "Mistral-7B-Instruct-v0.3", "input": "x"}
    )
    error = assert_error(resp, 400, "model_not_found", "model")
    assert "/v1/chat/completions" in error["message"]


def test_404_unknown_path_and_stored_response_paths(gateway):
    key, _ = gateway.new_key()
    assert_error(httpx.get(gateway.root + "/v2/nothing"), 404, "not_found")
    c = client(gateway, key)
    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        c.responses.retrieve("resp_123")
    with pytest.raises(openai.NotFoundError):
        c.responses.delete("resp_123")
    with pytest.raises(openai.NotFoundError):
        c.responses.input_items.list("resp_123")


def test_413_body_over_the_limit(gateway):
    key, account = gateway.new_key()
    big = b'{"model":"gpt-oss-120b","input":"' + b"x" * 1_100_000 + b'"}'
    assert_error(post(gateway, "/responses", key, content=big), 413, "request_too_large")
    assert gateway.ledger(account) == []


def test_429_with_retry_headers_then_smooth_refill(gateway):
    key, _ = gateway.new_key(rpm=2)
    body = {"model": "gpt-oss-120b", "input": "Reply with: ok", "max_output_tokens": 16}
    first = post(gateway, "/responses", key, json=body)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-tokens" in first.headers
    assert post(gateway, "/responses", key, json=body).status_code == 200
    refused = post(gateway, "/responses", key, json=body)
    assert_error(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert 0 < int(refused.headers["retry-after-ms"]) <= 30_000
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        client(gateway, key).responses.create(model="gpt-oss-120b", input="x")


def test_429_for_tokens_per_minute(gateway):
    """Admission charges the worst case; settlement gives back what was not used."""
    key, _ = gateway.new_key(tpm=3000)
    body = {"model": "gpt-oss-120b", "input": "hello", "max_output_tokens": 2000}
    assert post(gateway, "/responses", key, json=body).status_code == 200  # used ~22
    nearly_all = {**body, "max_output_tokens": 2950}
    error = assert_error(
        post(gateway, "/responses", key, json=nearly_all), 429, "rate_limit_exceeded",
        "max_output_tokens",
    )
    assert "tokens" in error["message"]
    assert post(gateway, "/responses", key, json=body).status_code == 200
    too_big = {**body, "max_output_tokens": 4000}
    error = assert_error(
        post(gateway, "/responses", key, json=too_big), 429, "rate_limit_exceeded",
        "max_output_tokens",
    )
    assert "Request too large" in error["message"]


def test_limit_change_applies_within_five_seconds(gateway):
    key, _ = gateway.new_key(rpm=1)
    body = {"model": "gpt-oss-120b", "input": "x", "max_output_tokens": 16}
    assert post(gateway, "/responses", key, json=body).status_code == 200
    assert post(gateway, "/responses", key, json=body).status_code == 429
    [api_key] = [k for k in gateway.store_call("list_keys") if key.startswith(k.prefix)]
    gateway.store_call("update_key", api_key.id, rpm=1000)
    import time

    deadline = time.monotonic() + 5
    while post(gateway, "/responses", key, json=body).status_code == 429:
        assert time.monotonic() < deadline, "limit change not applied within 5 s"
        time.sleep(0.1)


def test_502_upstream_errors(gateway):
    key, account = gateway.new_key()
    c = client(gateway, key)
    for model in ("fault-500", "fault-503", "fault-401", "dead-model", "fault-malformed"):
        with pytest.raises(openai.InternalServerError) as err:
            c.responses.create(model=model, input="x", max_output_tokens=16)
        assert err.value.status_code == 502 and err.value.code == "upstream_error", model
    with pytest.raises(openai.InternalServerError) as err:
        c.chat.completions.create(model="fault-hang", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502 and "sent nothing for 1s" in err.value.message
    # nothing was produced, so nothing is charged; rows exist for what reached the upstream
    rows = gateway.settled(account, 5)
    assert all(r.cost == 0 and r.status == "502" for r in rows)
    assert gateway.account(account).balance == 10_000_000_000


def test_store_true_gets_502_that_says_send_store_false(gateway):
    key, _ = gateway.new_key()
    resp = post(
        gateway, "/responses", key, json={"model": "gpt-oss-120b", "input": "x", "store": True}
    )
    error = assert_error(resp, 502, "upstream_error")
    assert '"store": false' in error["message"]
    assert resp.headers["x-should-retry"] == "false"


def test_upstream_4xx_about_the_request_keeps_its_status(gateway):
    key, _ = gateway.new_key()
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway, key).responses.create(model="fault-400", input="x")
    assert err.value.status_code == 400
    assert err.value.code and err.value.message


def test_renamed_model_is_written_back(gateway):
    key, account = gateway.new_key()
    c = client(gateway, key)
    res = c.responses.create(model="alias", input="Reply with: hi")
    assert res.model == "alias" and res.output_text == "hi"
    chat = c.chat.completions.create(model="alias", messages=[{"role": "user", "content": "x"}])
    assert chat.model == "alias"
    events = list(c.responses.create(model="alias", input="x", stream=True))
    assert events[0].response.model == "alias" and events[-1].response.model == "alias"
    chunks = list(
        c.chat.completions.create(
            model="alias", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert {ch.model for ch in chunks} == {"alias"}
    assert {r.model for r in gateway.settled(account, 4)} == {"alias"}


def test_request_id_on_every_response(gateway):
    for resp in (
        httpx.get(gateway.root + "/healthz"),
        httpx.get(gateway.root + "/nope"),
        httpx.get(gateway.url + "/models"),
    ):
        assert resp.headers["x-request-id"].startswith("req_")


def test_health_readiness_and_metrics_need_no_key(gateway):
    assert httpx.get(gateway.root + "/healthz").status_code == 200
    assert httpx.get(gateway.root + "/readyz").json() == {"status": "ready"}
    metrics = httpx.get(gateway.root + "/metrics").text
    assert "bastion_requests_total" in metrics
    assert "bastion_overhead_seconds_bucket" in metrics
    assert "bastion_time_to_first_byte_seconds_bucket" in metrics
    assert "bastion_credit_lease_waits_total" in metrics
    assert "bastion_credit_lease_topups_total" in metrics


def test_default_output_cap_is_sent_upstream(gateway):
    """No cap from the client: the model's max_output_tokens goes upstream (echoed back)."""
    key, _ = gateway.new_key()
    res = client(gateway, key).responses.create(model="gpt-oss-120b", input="Reply with: ok")
    assert res.max_output_tokens == 4096
    assert reply_text({"model": "gpt-oss-120b", "input": "Reply with: ok"}) == "ok"


def test_refused_authenticated_posts_carry_rate_limit_headers(gateway):
    """400, 413 and model errors also tell the client where its limits stand."""
    key, _ = gateway.new_key(rpm=50, tpm=100_000)
    for path, body in (
        ("/responses", b"{bad"),
        ("/responses", b'{"model": "nope", "input": "x"}'),
        ("/chat/completions", b'{"model": "gpt-oss-120b", "messages": []}'),
    ):
        resp = post(gateway, path, key, content=body)
        assert resp.status_code == 400
        assert resp.headers["x-ratelimit-limit-requests"] == "50"
        assert resp.headers["x-ratelimit-remaining-requests"] == "50"  # nothing was charged
        assert resp.headers["x-ratelimit-limit-tokens"] == "100000"


def test_models_say_which_endpoints_serve_each_model(gateway):
    """An extra field on each model object: the SDK keeps it, a client need not learn from a 400."""
    key, _ = gateway.new_key()
    models = {m.id: m for m in client(gateway, key).models.list().data}
    assert models["gpt-oss-120b"].endpoints == ["/v1/responses", "/v1/chat/completions"]
    assert models["Mistral-7B-Instruct-v0.3"].endpoints == ["/v1/chat/completions"]


@pytest.mark.parametrize("field", ["previous_response_id", "conversation"])
def test_stored_context_is_refused_not_silently_dropped(gateway, field):
    """Bastion stores no responses: a request that points at one would lose its context."""
    key, account = gateway.new_key()
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway, key).responses.create(
            model="gpt-oss-120b", input="and then?", store=False, **{field: "resp_123"}
        )
    assert err.value.code == "invalid_request" and err.value.param == field
    assert "whole conversation" in err.value.message
    assert gateway.ledger(account) == [] and gateway.account(account).spent == 0


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/responses", {"model": "gpt-oss-120b", "input": "hello"}, "max_output_tokens"),
        (
            "/chat/completions",
            {"model": "gpt-oss-120b", "messages": [{"role": "user", "content": "hello"}]},
            "max_completion_tokens",
        ),
    ],
)
def test_no_output_cap_and_a_small_tpm_says_which_cap_to_send(gateway, path, body, field):
    """With no cap the worst case is the model's maximum; the 429 names the cap that fits."""
    key, account = gateway.new_key(tpm=3000)
    error = assert_error(post(gateway, path, key, json=body), 429, "rate_limit_exceeded", field)
    assert "no cap was sent" in error["message"]
    fits = int(re.search(rf"'{field}' of at most ([\d,]+)", error["message"])[1].replace(",", ""))
    assert 0 < fits < 3000
    assert post(gateway, path, key, json={**body, field: fits}).status_code == 200
    assert post(gateway, path, key, json={**body, field: fits + 1}).status_code == 429
    assert gateway.settled(account, 1)[0].status == "200"


# ---- key expiry and model allow-lists ---------------------------------------------------


def key_of(gateway, account: str):
    [api_key] = gateway.store_call("list_keys", account)
    return api_key


def test_an_expired_key_is_refused_and_counted(gateway):
    """Expiry is a time, checked per request: no store change is needed for it to bite."""
    expires_at = time.time_ns() // 1000 + 1_500_000
    key, account = gateway.new_key(expires_at=expires_at)
    body = {"model": "gpt-oss-120b", "input": "x", "max_output_tokens": 16}
    assert post(gateway, "/responses", key, json=body).status_code == 200
    time.sleep(max(0.0, expires_at / 1e6 - time.time()) + 0.05)
    with pytest.raises(openai.AuthenticationError) as err:
        client(gateway, key).responses.create(**body)
    assert err.value.code == "invalid_api_key"
    assert err.value.body["message"] == "This API key has expired."  # nothing more
    assert httpx.get(gateway.url + "/models", headers={"Authorization": f"Bearer {key}"}).is_error
    gateway.settled(account, 1)
    assert len(gateway.ledger(account)) == 1  # only the request before the expiry
    kid = key_of(gateway, account).id
    deadline = time.monotonic() + 10
    # two refusals (the SDK's request and the models list), flushed within a second or two
    while sum(r.count for r in gateway.store_call("refusals", account) if r.status == 401) < 2:
        assert time.monotonic() < deadline, "the expired key's refusals were not counted"
        time.sleep(0.1)
    [refusal] = gateway.store_call("refusals", account)
    assert (refusal.key_id, refusal.code, refusal.count) == (kid, "invalid_api_key", 2)


def test_an_expiry_set_on_a_live_key_applies_within_five_seconds(gateway):
    key, account = gateway.new_key()
    gateway.store_call("update_key", key_of(gateway, account).id, expires_at=1_000_000)
    assert gateway.wait_for_key(key, present=False) < 5
    resp = post(gateway, "/responses", key, json={"model": "gpt-oss-120b", "input": "x"})
    assert "expired" in assert_error(resp, 401, "invalid_api_key")["message"]
    gateway.store_call("update_key", key_of(gateway, account).id, expires_at=None)
    assert gateway.wait_for_key(key) < 5  # cleared: the key works again


def test_a_model_allow_list_limits_the_key_and_its_model_list(gateway):
    key, account = gateway.new_key(models=frozenset({"gpt-oss-120b", "Mistral-7B-Instruct-v0.3"}))
    c = client(gateway, key)
    assert sorted(m.id for m in c.models.list().data) == [
        "Mistral-7B-Instruct-v0.3", "gpt-oss-120b",
    ]  # fmt: skip
    assert c.responses.create(model="gpt-oss-120b", input="x", max_output_tokens=16).output_text
    with pytest.raises(openai.PermissionDeniedError) as err:
        c.responses.create(model="alias", input="x")
    assert (err.value.status_code, err.value.code, err.value.param) == (
        403, "model_not_allowed", "model",
    )  # fmt: skip
    assert err.value.body["type"] == "invalid_request_error"
    assert "'alias'" in err.value.message
    with pytest.raises(openai.BadRequestError) as unknown:  # unknown stays unknown: 400
        c.responses.create(model="no-such-model", input="x")
    assert unknown.value.code == "model_not_found"
    assert len(gateway.settled(account, 1)) == 1  # the refused requests cost nothing
    kid = key_of(gateway, account).id
    deadline = time.monotonic() + 10
    while not any(r.status == 403 for r in gateway.store_call("refusals", account)):
        assert time.monotonic() < deadline, "the 403 was not counted"
        time.sleep(0.1)
    [refusal] = gateway.store_call("refusals", account)
    assert (refusal.key_id, refusal.code, refusal.count) == (kid, "model_not_allowed", 1)


def test_the_model_check_comes_after_the_body_and_before_the_rate_limit(gateway):
    key, _ = gateway.new_key(rpm=1, models=frozenset({"gpt-oss-120b"}))
    bad_body = {"model": "alias", "input": "x", "temperature": 7}
    assert_error(
        post(gateway, "/responses", key, json=bad_body), 400, "invalid_request", "temperature"
    )
    allowed = {"model": "gpt-oss-120b", "input": "x", "max_output_tokens": 16}
    assert post(gateway, "/responses", key, json=allowed).status_code == 200  # the one rpm
    refused = {"model": "alias", "input": "x"}
    assert_error(post(gateway, "/responses", key, json=refused), 403, "model_not_allowed", "model")
    assert post(gateway, "/responses", key, json=allowed).status_code == 429


def test_a_model_not_allowed_is_403_whichever_endpoint_it_is_sent_to(gateway):
    """A key learns nothing about a model it may not use, not even its endpoints."""
    key, _ = gateway.new_key(models=frozenset({"gpt-oss-120b"}))
    chat_only = {"model": "Mistral-7B-Instruct-v0.3", "input": "x"}
    resp = post(gateway, "/responses", key, json=chat_only)
    error = assert_error(resp, 403, "model_not_allowed", "model")
    assert "chat/completions" not in error["message"]


# ---- prefix-cache isolation (models[].cache_isolation = "account") ---------------------


def salt_sent(gateway, key: str, model: str = "isolated", stream: bool = False, **body) -> object:
    """The ``cache_salt`` the simulator received for one request (its ``sim.echo`` answers
    with the JSON of a field of the upstream body), over chat, or responses if streamed."""
    sim = {"sim": {"echo": "cache_salt"}}
    c = client(gateway, key)
    if stream:
        with c.responses.stream(model=model, input="x", extra_body=body | sim) as events:
            return json.loads(events.get_final_response().output_text)
    chat = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], extra_body=body | sim
    )
    return json.loads(chat.choices[0].message.content or "")


def test_an_isolated_model_gets_one_secret_salt_per_account(gateway):
    key_a, account_a = gateway.new_key()
    key_a2 = gateway.store_call("create_key", account_a)[1]  # a second key, same account
    key_b, account_b = gateway.new_key()
    gateway.wait_for_key(key_a2)
    salt_a = salt_sent(gateway, key_a)
    assert salt_a == salt_sent(gateway, key_a2) == salt_sent(gateway, key_a, stream=True)
    salt_b = salt_sent(gateway, key_b)
    assert salt_b != salt_a
    for salt, account in ((salt_a, account_a), (salt_b, account_b)):  # HMAC of the account id
        account_id = gateway.account(account).id.encode()
        mac = hmac.new(CACHE_SALT_SECRET.encode(), account_id, hashlib.sha256).digest()
        assert salt == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        assert len(salt) == 43  # 256 bits, as vLLM recommends


def test_a_client_cannot_choose_the_salt_of_an_isolated_model(gateway):
    key_a, _ = gateway.new_key()
    key_b, _ = gateway.new_key()
    salt_b = salt_sent(gateway, key_b)
    assert salt_sent(gateway, key_a, cache_salt=salt_b) == salt_sent(gateway, key_a) != salt_b
    assert salt_sent(gateway, key_a, stream=True, cache_salt="mine") != "mine"


def test_a_model_without_isolation_sends_what_the_client_sent(gateway):
    key, _ = gateway.new_key()
    assert salt_sent(gateway, key, model="gpt-oss-120b") is None  # nothing added
    assert salt_sent(gateway, key, model="gpt-oss-120b", cache_salt="team-7") == "team-7"
