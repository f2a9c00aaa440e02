"""What the simulator answers, as pure functions of the request body.

Everything here is deterministic so tests (and the gateway's own tests) can compute
the exact text, function call and usage the simulator will produce. The rules are
documented in docs/simulator.md; keep the two in step.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from bastion.sim import structured

DEFAULT_TOKENS = 16
"""Length of a generated (not "Reply with:") answer when nothing overrides it."""

ARG_PIECE_CHARS = 4
"""JSON (a call's arguments, structured output) streams in pieces of this many characters,
one token each."""

PER_ITEM_TOKENS = 4
"""Input tokens charged per message / input item (and for `instructions`)."""

_VOCAB = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
    "zulu amber basil cedar dune ember fern grove harbor iris jade kelp lotus maple "
    "nectar onyx pearl quartz river sage tide umber vale willow yarrow zephyr the a of "
    "and to in is on with for at by from"
).split()
assert len(_VOCAB) == 64

_REPLY_WITH = re.compile(r"reply with:\s*(.*)", re.IGNORECASE | re.DOTALL)
_WORD = re.compile(r"\s*\S+")
_CALL = re.compile(
    r"\b(?:call|use)\s+(?:the\s+)?([A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*)", re.IGNORECASE
)
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Reply:
    """The planned answer: either text or one function call, already capped."""

    pieces: list[str]
    """What each streamed delta carries (text words, or argument pieces); one token each."""
    truncated: bool
    """True when the output cap cut the answer (finish_reason "length" / incomplete)."""
    input_tokens: int
    call_name: str | None = None
    """Set when the answer is a function call."""
    call_arguments: str = ""
    """The full (uncut) arguments JSON; the emitted arguments are "".join(pieces)."""

    @property
    def text(self) -> str:
        """The emitted text (empty for a function call)."""
        return "" if self.call_name else "".join(self.pieces)

    @property
    def arguments(self) -> str:
        """The emitted arguments string (what the client receives)."""
        return "".join(self.pieces) if self.call_name else ""

    @property
    def output_tokens(self) -> int:
        return len(self.pieces)


def endpoint_of(body: dict[str, Any]) -> str:
    """`chat` when the body has `messages`, else `responses`."""
    return "chat" if "messages" in body else "responses"


# ---------------------------------------------------------------- input text


def _part_texts(content: Any) -> list[str]:
    """Text of a message `content`: a string, or the text/refusal of each part."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                for key in ("text", "refusal"):
                    value = part.get(key)
                    if isinstance(value, str):
                        out.append(value)
            elif isinstance(part, str):
                out.append(part)
    return out


def _item_texts(item: Any) -> list[str]:
    """Every text an input item / chat message carries (images and files carry none)."""
    if isinstance(item, str):
        return [item]
    if not isinstance(item, dict):
        return []
    out = _part_texts(item.get("content"))
    for key in ("name", "arguments"):  # responses function_call items
        if item.get("type") == "function_call" and isinstance(item.get(key), str):
            out.append(item[key])
    if item.get("type") == "function_call_output":
        out += _part_texts(item.get("output"))
    if item.get("type") == "reasoning":
        out += _part_texts(item.get("summary")) + _part_texts(item.get("content"))
    for call in item.get("tool_calls") or ():  # chat assistant messages
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out += [v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str)]
    return out


def _items(body: dict[str, Any], endpoint: str) -> list[Any]:
    """The conversation: chat `messages`, or responses `input` (a string is one item)."""
    if endpoint == "chat":
        messages = body.get("messages")
        return messages if isinstance(messages, list) else []
    inp = body.get("input")
    if isinstance(inp, str):
        return [inp]
    return inp if isinstance(inp, list) else []


def _is_user(item: Any) -> bool:
    return isinstance(item, str) or (
        isinstance(item, dict)
        and item.get("role") == "user"
        and item.get("type", "message") == "message"
    )


def last_user_text(body: dict[str, Any], endpoint: str | None = None) -> str:
    """Text of the last user message anywhere in the conversation ("" if none)."""
    for item in reversed(_items(body, endpoint or endpoint_of(body))):
        if _is_user(item):
            return "".join(_item_texts(item))
    return ""


def input_tokens_for(body: dict[str, Any], endpoint: str | None = None) -> int:
    """ceil(text bytes / 4) + 4 per item; text = items' text, instructions, tools JSON.

    Never above (UTF-8 bytes of that text) + 1 + 4 per item, which keeps it inside the
    gateway's tokenizer-free worst-case bound (bytes + 64 + 16 per item).
    """
    endpoint = endpoint or endpoint_of(body)
    items = _items(body, endpoint)
    nbytes = sum(len(t.encode()) for item in items for t in _item_texts(item))
    count = len(items)
    instructions = body.get("instructions")
    if endpoint == "responses" and isinstance(instructions, str) and instructions:
        nbytes += len(instructions.encode())
        count += 1
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        nbytes += len(orjson.dumps(tools))
    return math.ceil(nbytes / 4) + PER_ITEM_TOKENS * count


def prompt_segments(body: dict[str, Any], endpoint: str | None = None) -> list[tuple[str, bytes]]:
    """The prompt in template order, as `input_tokens_for` counts it: (label, UTF-8 text).

    `instructions` (responses), then the tools' JSON (label "" : bytes but no per-item
    tokens), then each message / item labelled by its role or type. So the bytes add up
    to B and the labelled parts to M of the usage formula, and the prefix cache's token
    sequence has exactly `input_tokens_for` tokens (usage and cache stay consistent).
    """
    endpoint = endpoint or endpoint_of(body)
    out: list[tuple[str, bytes]] = []
    instructions = body.get("instructions")
    if endpoint == "responses" and isinstance(instructions, str) and instructions:
        out.append(("instructions", instructions.encode()))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out.append(("", orjson.dumps(tools)))
    for item in _items(body, endpoint):
        label = "user" if isinstance(item, str) else None
        if isinstance(item, dict):
            label = item.get("role") or item.get("type")
        out.append((str(label or "item"), "".join(_item_texts(item)).encode()))
    return out


# ---------------------------------------------------------------- text answer


def _seed(body: dict[str, Any], endpoint: str) -> bytes:
    """Seed of the generated words: the conversation's texts (same for both endpoints)."""
    texts = [t for item in _items(body, endpoint) for t in _item_texts(item)]
    return hashlib.blake2b("\x00".join(texts).encode(), digest_size=16).digest()


def generated_words(seed: bytes, n: int) -> list[str]:
    """n pseudo-random words from the fixed vocabulary, as delta pieces."""
    words: list[str] = []
    block = 0
    while len(words) < n:
        digest = hashlib.blake2b(seed + block.to_bytes(4, "big"), digest_size=64).digest()
        words += [_VOCAB[b & 63] for b in digest[: n - len(words)]]
        block += 1
    if not words:
        return []
    words[0] = words[0].capitalize()
    words[-1] += "."
    return [words[0]] + [" " + w for w in words[1:]]


def _requested_tokens(body: dict[str, Any], tokens: int | None) -> int:
    if tokens is not None:
        return tokens
    sim = body.get("sim")
    if isinstance(sim, dict) and isinstance(sim.get("tokens"), int) and sim["tokens"] >= 0:
        return int(sim["tokens"])
    return DEFAULT_TOKENS


def _text_pieces(body: dict[str, Any], endpoint: str, tokens: int | None) -> list[str]:
    match = _REPLY_WITH.search(last_user_text(body, endpoint))
    if match:
        return _WORD.findall(match.group(1).strip())
    return generated_words(_seed(body, endpoint), _requested_tokens(body, tokens))


# ---------------------------------------------------------------- structured output


def output_format(body: dict[str, Any], endpoint: str) -> dict[str, Any] | None:
    """The JSON format asked for: chat `response_format`, responses `text.format`.

    None for `{"type": "text"}`, an absent format, or anything else (words, as before).
    """
    if endpoint == "chat":
        fmt = body.get("response_format")
    else:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    ok = isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object")
    return fmt if ok else None


def structured_text(body: dict[str, Any], endpoint: str, fmt: dict[str, Any]) -> str:
    """The JSON answer: an instance of the schema, or for `json_object` an object.

    `json_schema` reads chat's `{"json_schema": {"schema"}}` or responses' flat
    `{"schema"}`. `json_object` (or a schema that is missing) answers the `Reply with:`
    text when it is a JSON object, else `{}`.
    """
    nested = fmt.get("json_schema")
    schema = nested.get("schema") if isinstance(nested, dict) else fmt.get("schema")
    if fmt.get("type") == "json_schema" and isinstance(schema, dict):
        return structured.dumps(schema, _seed(body, endpoint))
    match = _REPLY_WITH.search(last_user_text(body, endpoint))
    try:
        value = orjson.loads(match.group(1).strip()) if match else None
    except orjson.JSONDecodeError:
        value = None
    return orjson.dumps(value).decode() if isinstance(value, dict) else "{}"


# ---------------------------------------------------------------- function calls


def _function_tools(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> JSON schema of every function tool, flat (responses) or nested (chat) form."""
    out: dict[str, dict[str, Any]] = {}
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = fn.get("name")
        if isinstance(name, str):
            params = fn.get("parameters")
            out[name] = params if isinstance(params, dict) else {}
    return out


def _forced_name(choice: Any, tools: dict[str, dict[str, Any]]) -> str | None:
    """The tool a `tool_choice` object names (either wire form), if any."""
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
    name = fn.get("name")
    return name if isinstance(name, str) and name in tools else None


def _triggered_call(body: dict[str, Any], endpoint: str) -> tuple[str, str] | None:
    """(name, text after the trigger) when the request asks for a function call."""
    tools = _function_tools(body)
    if not tools:
        return None
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    items = _items(body, endpoint)
    text = last_user_text(body, endpoint)
    asked = None
    if items and _is_user(items[-1]):  # never call again right after a tool result
        lower = {name.lower(): name for name in tools}
        for match in _CALL.finditer(text):
            if match.group(1).lower() in lower:
                asked = (lower[match.group(1).lower()], text[match.end() :])
                break
    forced = _forced_name(choice, tools)
    if forced:
        return forced, asked[1] if asked and asked[0] == forced else ""
    required = choice == "required" or (
        isinstance(choice, dict) and choice.get("mode") == "required"
    )
    if asked:
        return asked
    if required:
        return next(iter(tools)), ""
    return None


def _h(seed: bytes, label: str) -> int:
    return int.from_bytes(hashlib.blake2b(seed + label.encode(), digest_size=8).digest(), "big")


def _value_for(schema: Any, seed: bytes, label: str) -> Any:
    """A deterministic value that fits a (simple) JSON schema."""
    if not isinstance(schema, dict):
        return None
    h = _h(seed, label)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][h % len(schema["enum"])]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return _VOCAB[h % 26]
    if kind == "integer":
        return h % 100
    if kind == "number":
        return (h % 1000) / 10
    if kind == "boolean":
        return bool(h & 1)
    if kind == "array":
        return []
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {k: _value_for(v, seed, f"{label}.{k}") for k, v in props.items()}
    return None


def call_arguments(body: dict[str, Any], name: str, after: str, endpoint: str) -> str:
    """The arguments JSON: a `{...}` object written after the trigger, else schema-derived."""
    match = _JSON_OBJECT.search(after)
    if match:
        try:
            value = orjson.loads(match.group(0))
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return orjson.dumps(value).decode()
    schema = _function_tools(body).get(name, {})
    value = _value_for({"type": "object", **schema}, _seed(body, endpoint), name)
    return orjson.dumps(value if isinstance(value, dict) else {}).decode()


# ---------------------------------------------------------------- the plan


def _json_pieces(text: str) -> list[str]:
    """JSON (arguments or structured output) as deltas of 4 characters, one token each."""
    return [text[i : i + ARG_PIECE_CHARS] for i in range(0, len(text), ARG_PIECE_CHARS)]


def output_cap(body: dict[str, Any], endpoint: str) -> int | None:
    """`max_output_tokens` (responses) or `max_completion_tokens`/`max_tokens` (chat)."""
    keys = (
        ("max_output_tokens",)
        if endpoint == "responses"
        else (
            "max_completion_tokens",
            "max_tokens",
        )
    )
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def plan_reply(
    body: dict[str, Any], endpoint: str | None = None, tokens: int | None = None
) -> Reply:
    """The whole answer for a request; `tokens` is the `x-sim-tokens` header, if sent."""
    endpoint = endpoint or endpoint_of(body)
    call = _triggered_call(body, endpoint)
    name = None
    arguments = ""
    echo = _sim(body).get("echo")
    if isinstance(echo, str):  # for tests of a gateway: what its upstream body held
        pieces = _json_pieces(orjson.dumps(body.get(echo)).decode())
    elif call:
        name = call[0]
        arguments = call_arguments(body, name, call[1], endpoint)
        pieces = _json_pieces(arguments)
    elif fmt := output_format(body, endpoint):
        pieces = _json_pieces(structured_text(body, endpoint, fmt))
    else:
        pieces = _text_pieces(body, endpoint, tokens)
    cap = output_cap(body, endpoint)
    truncated = cap is not None and len(pieces) > cap
    if truncated:
        pieces = pieces[: max(cap or 0, 0)]
    return Reply(pieces, truncated, input_tokens_for(body, endpoint), name, arguments)


def reply_text(body: dict[str, Any], endpoint: str | None = None, tokens: int | None = None) -> str:
    """The exact text the simulator answers (after the output cap; "" for a function call)."""
    return plan_reply(body, endpoint, tokens).text


# ---------------------------------------------------------------- reported usage

REPORT_KEYS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
"""What `sim.report` may override (bogus usage, to test how the gateway copes)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """The numbers written in `usage`: the real ones, unless `sim.report` overrides them."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _sim(body: dict[str, Any]) -> dict[str, Any]:
    sim = body.get("sim")
    return sim if isinstance(sim, dict) else {}


def _count(value: Any) -> int | None:
    """A non-negative int option (bools excluded), else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return int(value) if ok else None


def report_overrides(body: dict[str, Any]) -> dict[str, int]:
    """The body's `sim.report` ({} if absent); ValueError names what is wrong with it."""
    report = _sim(body).get("report")
    if report is None:
        return {}
    if not isinstance(report, dict):
        raise ValueError("sim.report must be an object")
    for key, value in report.items():
        if key not in REPORT_KEYS:
            raise ValueError(f"sim.report: unknown key {key!r}; one of {', '.join(REPORT_KEYS)}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"sim.report.{key} must be an integer")
    return {k: int(v) for k, v in report.items()}


def usage_of(
    reply: Reply,
    body: dict[str, Any],
    cached_tokens: int | None = None,
    reasoning_tokens: int | None = None,
) -> Usage:
    """What the answer reports: cached ≤ input and reasoning ≤ output, then `sim.report`.

    `cached_tokens`/`reasoning_tokens` are the header values, when sent; else the body's
    `sim.cached_tokens`/`sim.reasoning_tokens` count.
    """
    sim = _sim(body)
    if cached_tokens is None:
        cached_tokens = _count(sim.get("cached_tokens"))
    if reasoning_tokens is None:
        reasoning_tokens = _count(sim.get("reasoning_tokens"))
    real = {
        "input_tokens": reply.input_tokens,
        "output_tokens": reply.output_tokens,
        "cached_tokens": min(cached_tokens or 0, reply.input_tokens),
        "reasoning_tokens": min(reasoning_tokens or 0, reply.output_tokens),
    }
    return Usage(**(real | report_overrides(body)))


def reported_usage(
    body: dict[str, Any],
    endpoint: str | None = None,
    tokens: int | None = None,
    cached_tokens: int | None = None,
    reasoning_tokens: int | None = None,
) -> Usage:
    """The full `Usage` the simulator reports (the extra arguments are header values)."""
    return usage_of(plan_reply(body, endpoint, tokens), body, cached_tokens, reasoning_tokens)


def usage_for(
    body: dict[str, Any], endpoint: str | None = None, tokens: int | None = None
) -> tuple[int, int]:
    """(input_tokens, output_tokens) the simulator reports (`sim.report` applied)."""
    usage = reported_usage(body, endpoint, tokens)
    return usage.input_tokens, usage.output_tokens
