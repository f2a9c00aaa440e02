"""Structured output in the simulator: JSON that validates against the requested schema.

- The generator (`bastion/sim/structured.py`) over pydantic models and raw schemas,
  each instance checked by `jsonschema` (formats too) and, for models, by pydantic.
- End to end: the official SDK's `parse`/`stream` helpers through a real gateway in
  front of a real simulator, with usage and ledger checked against the simulator's
  token model (4 characters of JSON per token, like function arguments).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai.lib._parsing._completions import type_to_response_format_param
from openai.lib._pydantic import to_strict_json_schema
from pydantic import AnyUrl, BaseModel, Field, TypeAdapter
from simhelpers import SimServer

from bastion.sim import plan_reply, reply_text
from bastion.sim.structured import dumps, instance

MODEL = "gpt-oss-120b"


class Color(StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    city: str
    zip_code: str = Field(min_length=5, max_length=5)


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=130)
    nickname: str | None
    address: Address
    tags: list[str]
    color: Color
    role: Literal["admin", "user"]
    born: date
    seen: datetime
    id: uuid.UUID
    score: float = Field(gt=0, lt=1)


class Node(BaseModel):
    """Recursive through a list: ends with empty lists."""

    value: int
    children: list[Node]


class Chain(BaseModel):
    """Recursive through Optional: ends with null."""

    label: str
    next: Chain | None


class Tree(BaseModel):
    """Recursive with defaults (non-strict schema: fields not required)."""

    name: str = "root"
    kids: list[Tree] = []
    parent: Tree | None = None


class Circle(BaseModel):
    kind: Literal["circle"]
    radius: float = Field(gt=0)


class Square(BaseModel):
    kind: Literal["square"]
    side: int = Field(ge=1, le=10)


class Drawing(BaseModel):
    shapes: list[Annotated[Circle | Square, Field(discriminator="kind")]] = Field(min_length=2)
    main: Circle | Square
    pair: tuple[int, str]
    counts: dict[str, int]
    flags: set[Literal["a", "b", "c"]]


class Constrained(BaseModel):
    exactly_three: list[int] = Field(min_length=3, max_length=3)
    code: str = Field(pattern=r"^[a-z]+$", min_length=2, max_length=8)
    upper: str = Field(pattern=r"^[A-Z]{3}$")
    big: int = Field(gt=1000, multiple_of=7)
    negative: int = Field(lt=0)
    tiny: float = Field(gt=0.25, lt=0.5)
    step: float = Field(ge=1, le=2, multiple_of=0.25)
    long_text: str = Field(min_length=40)
    short_text: str = Field(max_length=2)
    empty_list: list[str] = Field(max_length=0)


class Kinds(BaseModel):
    at: datetime
    day: date
    clock: time
    span: timedelta
    ident: uuid.UUID
    url: AnyUrl
    v4: IPv4Address
    v6: IPv6Address
    raw: bytes
    anything: Any
    maybe: int | None
    either: int | str
    color: Color
    constant: Literal[42]
    retries: int = 3
    fallback: str | None = None


def client(gateway: Any, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)


def chat_format(model: type[BaseModel]) -> dict[str, Any]:
    """The `response_format` the SDK sends for `response_format=model` (strict schema)."""
    return dict(type_to_response_format_param(model))  # type: ignore[arg-type]


def responses_format(model: type[BaseModel]) -> dict[str, Any]:
    """The `text.format` the SDK sends for `text_format=model`."""
    inner = chat_format(model)["json_schema"]
    return {"type": "json_schema", "name": inner["name"], "schema": inner["schema"], "strict": True}


def tokens_of(text: str) -> int:
    """The simulator's token model for JSON: one token per 4 characters."""
    return math.ceil(len(text) / 4)


MODELS: list[type[BaseModel]] = [Person, Address, Node, Chain, Tree, Drawing, Constrained, Kinds]


def validate(schema: dict[str, Any], value: Any) -> None:
    """Schema-valid (formats checked where jsonschema can) and valid JSON text."""
    cls = jsonschema.validators.validator_for(schema)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(value)
    assert orjson.loads(orjson.dumps(value)) == value


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("strict", [False, True], ids=["pydantic", "sdk-strict"])
def test_models_give_valid_instances(model: type[BaseModel], strict: bool) -> None:
    """pydantic's schema and the SDK's strict conversion of it, over many seeds."""
    schema = to_strict_json_schema(model) if strict else model.model_json_schema()
    for i in range(25):
        value = instance(schema, i.to_bytes(4, "big"))
        validate(schema, value)
        model.model_validate(value)
        assert instance(schema, i.to_bytes(4, "big")) == value  # deterministic
        assert dumps(schema, i.to_bytes(4, "big")) == orjson.dumps(value).decode()


def test_seed_varies_the_values() -> None:
    schema = Person.model_json_schema()
    assert len({dumps(schema, bytes([i])) for i in range(10)}) == 10


def test_recursion_terminates() -> None:
    value = instance(to_strict_json_schema(Node), b"x")
    depth = 0
    while value["children"]:
        value, depth = value["children"][0], depth + 1
    assert 0 < depth < 8
    chain = instance(to_strict_json_schema(Chain), b"x")
    links = 0
    while chain["next"] is not None:
        chain, links = chain["next"], links + 1
    assert 0 < links < 8


RAW_SCHEMAS: list[dict[str, Any]] = [
    {"type": "string", "format": f}
    for f in ("date-time", "date", "time", "email", "uuid", "uri", "ipv4", "ipv6", "hostname")
] + [
    {"type": ["string", "null"]},
    {"type": ["null", "integer"], "minimum": 5},
    {"const": {"a": [1, None]}},
    {"enum": [None, 3, "x"]},
    {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 12},
    {"type": "number", "minimum": -1.5, "maximum": -1.5},
    {"type": "integer", "maximum": 0},
    {"type": "number", "exclusiveMaximum": -100},
    {"type": "integer", "multipleOf": 5, "minimum": 11, "maximum": 19},
    {"oneOf": [{"type": "string", "maxLength": 0}, {"type": "integer"}]},
    {
        "allOf": [{"$ref": "#/definitions/A"}, {"required": ["b"], "properties": {"b": {}}}],
        "definitions": {
            "A": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
        },
    },
    {"type": "object", "minProperties": 3, "additionalProperties": {"type": "integer"}},
    {"type": "object", "required": ["x"], "additionalProperties": {"type": "string"}},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 3, "uniqueItems": True},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    {"type": "array", "minItems": 2},
    {"properties": {"self": {"$ref": "#"}}, "required": []},
    {
        "$defs": {
            "L": {
                "type": "array",
                "items": {"anyOf": [{"$ref": "#/$defs/L"}, {"type": "null"}]},
                "minItems": 1,
                "maxItems": 1,
            }
        },
        "$ref": "#/$defs/L",
    },
    {"type": "string", "default": "given", "minLength": 1},
    {"type": "integer", "default": None},  # a default of the wrong type is not used
    {},
    {"title": "no type", "description": "anything"},
]


@pytest.mark.parametrize("schema", RAW_SCHEMAS, ids=lambda s: orjson.dumps(s).decode()[:60])
def test_raw_schemas(schema: dict[str, Any]) -> None:
    for i in range(10):
        validate(schema, instance(schema, bytes([i])))


def test_formats_are_real_values() -> None:
    def fmt(name: str) -> str:
        return instance({"type": "string", "format": name}, b"s")

    datetime.fromisoformat(fmt("date-time"))
    date.fromisoformat(fmt("date"))
    assert uuid.UUID(fmt("uuid")).version == 4
    assert fmt("uri").startswith("https://") and "@" in fmt("email")
    assert TypeAdapter(timedelta).validate_python(fmt("duration"))


UNSATISFIABLE: list[Any] = [
    False,
    True,
    None,
    "not a schema",
    {"$ref": "#/$defs/missing"},
    {"$ref": "https://example.com/remote.json"},
    {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"},
    {"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}]}}, "$ref": "#/$defs/A"},
    {"$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}]}}, "$ref": "#/$defs/A"},
    {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 10**9},
    {
        "$defs": {"L": {"type": "array", "items": {"$ref": "#/$defs/L"}, "minItems": 1}},
        "$ref": "#/$defs/L",
    },
    {"type": "string", "minLength": 10**12, "maxLength": 3},
    {"type": "integer", "minimum": 10**30},
    {"type": "number", "minimum": -1.7e308, "maximum": 1.7e308},
    {"type": "number", "minimum": 1e308, "multipleOf": 1e-308},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "string", "pattern": "(unclosed"},
    {"type": "string", "pattern": "^[0-9]{10}$"},
    {"type": "array", "items": {"const": 1}, "minItems": 2, "uniqueItems": True},
    {"type": "object", "required": ["a"], "additionalProperties": False},
    {"type": ["widget"], "enum": []},
    {"anyOf": []},
    {"allOf": "nope", "properties": 5, "required": [1, None], "items": 3, "prefixItems": {}},
]


@pytest.mark.parametrize("schema", UNSATISFIABLE, ids=lambda s: repr(s)[:50])
def test_best_effort_never_raises(schema: Any) -> None:
    """Unsatisfiable or broken schemas still give JSON text, quickly and bounded."""
    text = dumps(schema, b"seed")
    json.loads(text)
    assert len(text) < 2_000_000


_KEYWORDS = [
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum",
    "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "minItems", "maxItems", "minLength",
    "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "format", "default", "pattern", "uniqueItems", "minProperties",
]  # fmt: skip
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["object", "array", "string", "integer", "number", "null", "date-time"]),
    st.sampled_from(["#", "#/$defs/a", "#/properties/x", "#/nowhere", "^[a-z]{2,}$", "("]),
    st.text(max_size=8),
)
_SCHEMAS = st.recursive(
    _JUNK,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from([*_KEYWORDS, "x", "a"]), inner, max_size=6),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_SCHEMAS, seed=st.binary(max_size=4))
def test_fuzzed_schemas_never_raise(schema: Any, seed: bytes) -> None:
    """Any JSON at all as a schema: JSON text comes back, never an exception."""
    json.loads(dumps(schema, seed))


def test_plan_splits_json_like_arguments() -> None:
    body = {"input": "x", "text": {"format": responses_format(Person)}}
    reply = plan_reply(body, "responses")
    assert all(len(p) == 4 for p in reply.pieces[:-1]) and 1 <= len(reply.pieces[-1]) <= 4
    assert reply.text == "".join(reply.pieces) and Person.model_validate_json(reply.text)
    assert reply.output_tokens == tokens_of(reply.text) and not reply.truncated
    capped = plan_reply({**body, "max_output_tokens": 2}, "responses")
    assert capped.truncated and capped.text == reply.text[:8] and capped.output_tokens == 2
    assert plan_reply(body, "responses", tokens=3).text == reply.text  # x-sim-tokens: no effect


def test_chat_shapes_and_tool_calls_win() -> None:
    fmt = chat_format(Address)
    chat = {"messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    Address.model_validate_json(reply_text(chat))
    flat = {
        **chat,
        "response_format": {"type": "json_schema", "schema": fmt["json_schema"]["schema"]},
    }
    assert reply_text(flat) == reply_text(chat)  # the flat (responses) shape is read too
    assert reply_text({**chat, "response_format": {"type": "json_object"}}) == "{}"
    text = {**chat, "response_format": {"type": "text"}}
    assert reply_text(text) == reply_text({"messages": chat["messages"]})
    for broken in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": "x"}):
        assert reply_text({**chat, "response_format": broken}) == "{}"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    called = plan_reply({**chat, "tools": tools, "tool_choice": "required"})
    assert called.call_name == "f" and called.text == ""


ODD_FORMATS: list[Any] = [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": False}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
    {"type": "json_schema", "schema": {"type": "integer", "minimum": 10**30}},
    {"type": "json_schema", "json_schema": None},
    {"type": "json_object", "schema": 5},
    {"type": "grammar", "grammar": "root ::= x"},
    "json_object",
    None,
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.mark.parametrize("fmt", ODD_FORMATS, ids=lambda f: repr(f)[:50])
@pytest.mark.parametrize("stream", [False, True])
def test_odd_formats_never_500(sim: SimServer, fmt: Any, stream: bool) -> None:
    """Whatever the format says, the simulator answers 200 (JSON, or words if not JSON)."""
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    for path, extra in (
        ("/chat/completions", {"response_format": fmt}),
        ("/responses", {"input": "x", "text": {"format": fmt}}),
    ):
        r = httpx.post(sim.base_url + path, json={**body, **extra}, timeout=10)
        assert r.status_code == 200, r.text


def test_sdk_strict_validation_direct(sim: SimServer) -> None:
    """Every body and event validates against the SDK's own types (strict), as in test_sim."""
    with OpenAI(
        base_url=sim.base_url, api_key="x", max_retries=0, _strict_response_validation=True
    ) as c:
        messages = [{"role": "user", "content": "x"}]
        chat = c.chat.completions.parse(model=MODEL, messages=messages, response_format=Drawing)
        assert isinstance(chat.choices[0].message.parsed, Drawing)
        resp = c.responses.parse(model=MODEL, input="x", text_format=Drawing, store=False)
        assert resp.output_parsed == chat.choices[0].message.parsed
        assert resp.text.format is not None and resp.text.format.type == "json_schema"
        with c.responses.stream(model=MODEL, input="x", text_format=Drawing) as stream:
            assert stream.get_final_response().output_parsed == resp.output_parsed
        with c.chat.completions.stream(
            model=MODEL, messages=messages, response_format=Drawing
        ) as chat_stream:
            assert (
                chat_stream.get_final_completion().choices[0].message.parsed == resp.output_parsed
            )


# ---------------------------------------------------------------- end to end


def test_chat_parse_through_gateway(gateway: Any) -> None:
    key, account = gateway.new_key()
    messages = [{"role": "user", "content": "Describe a person."}]
    res = client(gateway, key).chat.completions.parse(
        model=MODEL, messages=messages, response_format=Person
    )
    msg = res.choices[0].message
    assert isinstance(msg.parsed, Person)
    assert res.choices[0].finish_reason == "stop"
    body = {"messages": messages, "response_format": chat_format(Person)}
    assert msg.content == reply_text(body, "chat")
    assert res.usage is not None
    assert res.usage.completion_tokens == tokens_of(msg.content) == plan_reply(body).output_tokens
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == res.usage.completion_tokens and not row.estimated


def test_responses_parse_through_gateway(gateway: Any) -> None:
    key, account = gateway.new_key()
    res = client(gateway, key).responses.parse(
        model=MODEL, input="Describe a person.", text_format=Person, store=False
    )
    assert isinstance(res.output_parsed, Person)
    assert res.status == "completed"
    body = {"input": "Describe a person.", "text": {"format": responses_format(Person)}}
    assert res.output_text == reply_text(body, "responses")
    assert res.usage is not None
    assert res.usage.output_tokens == tokens_of(res.output_text)
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == res.usage.output_tokens and not row.estimated


def test_same_json_on_both_endpoints(gateway: Any) -> None:
    """Same conversation and schema: same JSON, whichever endpoint asks."""
    key, _ = gateway.new_key()
    c = client(gateway, key)
    chat = c.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], response_format=Address
    )
    resp = c.responses.parse(model=MODEL, input="hello", text_format=Address, store=False)
    assert chat.choices[0].message.content == resp.output_text
    assert chat.choices[0].message.parsed == resp.output_parsed


def test_chat_stream_helper(gateway: Any) -> None:
    key, account = gateway.new_key()
    messages = [{"role": "user", "content": "Stream a person."}]
    with client(gateway, key).chat.completions.stream(
        model=MODEL, messages=messages, response_format=Person
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta" and e.delta]
        final = stream.get_final_completion()
    msg = final.choices[0].message
    assert isinstance(msg.parsed, Person)
    assert "".join(deltas) == msg.content
    assert all(len(d) <= 4 for d in deltas)
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == len(deltas) == tokens_of(msg.content or "")


def test_responses_stream_helper(gateway: Any) -> None:
    key, account = gateway.new_key()
    with client(gateway, key).responses.stream(
        model=MODEL, input="Stream a person.", text_format=Person, store=False
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Person)
    assert "".join(deltas) == final.output_text
    assert final.usage is not None and final.usage.output_tokens == len(deltas)
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == len(deltas) == tokens_of(final.output_text)


def test_json_object_both_endpoints(gateway: Any) -> None:
    key, _ = gateway.new_key()
    c = client(gateway, key)
    chat = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "any JSON please"}],
        response_format={"type": "json_object"},
    )
    content = chat.choices[0].message.content or ""
    assert isinstance(json.loads(content), dict)
    assert chat.usage is not None and chat.usage.completion_tokens == tokens_of(content)
    resp = c.responses.create(
        model=MODEL, input="any JSON please", text={"format": {"type": "json_object"}}, store=False
    )
    assert isinstance(json.loads(resp.output_text), dict)
    scripted = c.responses.create(
        model=MODEL,
        input='Reply with: {"a": [1, 2], "b": "x"}',
        text={"format": {"type": "json_object"}},
        store=False,
    )
    assert scripted.output_text == '{"a":[1,2],"b":"x"}'


def test_text_format_is_unchanged(gateway: Any) -> None:
    key, _ = gateway.new_key()
    c = client(gateway, key)
    plain = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    text = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format={"type": "text"}
    )
    assert plain.choices[0].message.content == text.choices[0].message.content
    resp = c.responses.create(
        model=MODEL, input="hi", text={"format": {"type": "text"}}, store=False
    )
    assert resp.output_text == plain.choices[0].message.content


def test_cap_truncates_chat(gateway: Any) -> None:
    key, account = gateway.new_key()
    c = client(gateway, key)
    messages = [{"role": "user", "content": "Describe a person."}]
    full = reply_text({"messages": messages, "response_format": chat_format(Person)}, "chat")
    res = c.chat.completions.create(
        model=MODEL,
        messages=messages,
        response_format=chat_format(Person),  # type: ignore[arg-type]
        max_completion_tokens=3,
    )
    assert res.choices[0].finish_reason == "length"
    assert res.choices[0].message.content == full[:12]
    assert res.usage is not None and res.usage.completion_tokens == 3
    with pytest.raises(openai.LengthFinishReasonError):
        c.chat.completions.parse(
            model=MODEL, messages=messages, response_format=Person, max_completion_tokens=3
        )
    rows = gateway.settled(account, 2)
    assert [r.output_tokens for r in rows] == [3, 3]


def test_cap_truncates_responses(gateway: Any) -> None:
    key, account = gateway.new_key()
    fmt = responses_format(Person)
    full = reply_text({"input": "Describe a person.", "text": {"format": fmt}}, "responses")
    res = client(gateway, key).responses.create(
        model=MODEL,
        input="Describe a person.",
        text={"format": fmt},  # type: ignore[typeddict-item]
        max_output_tokens=5,
        store=False,
    )
    assert res.status == "incomplete"
    assert res.incomplete_details is not None
    assert res.incomplete_details.reason == "max_output_tokens"
    assert res.output_text == full[:20]
    assert res.usage is not None and res.usage.output_tokens == 5
    [row] = gateway.settled(account, 1)
    assert row.output_tokens == 5
