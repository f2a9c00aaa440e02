"""Request bodies: parse once, check what Bastion relies on, leave everything else alone.

Only the fields that admission, metering and routing read are checked (``model``,
``input``/``messages``, ``stream``, ``store``, the output caps, ``n``,
``temperature``, ``top_p``, ``stream_options``); every other field passes through.
Each failure is a 400 whose ``param`` names the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from bastion.errors import invalid

MAX_N = 16  # choices per chat request; each multiplies the output worst case


@dataclass(slots=True)
class ClientRequest:
    raw: bytes
    body: dict
    model: str
    stream: bool
    store_true: bool
    items: int  # messages / input items, for the per-item token allowance
    cap: int | None  # the client's output cap as the upstream reads it, if it sent one
    cap_field: str  # the field that carries (or will carry) the cap upstream
    n: int
    caps: tuple[tuple[str, int], ...] = ()  # every cap field sent, each checked against the model


def parse(raw: bytes, endpoint: str) -> ClientRequest:
    if not raw:
        raise invalid("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON (or not UTF-8): {exc}") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a non-empty string.", "model")
    stream = _optional(body, "stream", bool) or False
    store = _optional(body, "store", bool)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    if endpoint == "responses":
        items = _responses_input(body)
        cap, cap_field = _cap(body, "max_output_tokens"), "max_output_tokens"
        n = 1
    else:
        items = _chat_messages(body)
        # vLLM and OpenAI read max_completion_tokens first, then max_tokens: so do we
        cap = _cap(body, "max_completion_tokens")
        cap_field = "max_completion_tokens" if cap is not None else "max_tokens"
        legacy = _cap(body, "max_tokens")
        if cap is None:
            cap = legacy
        n = _optional(body, "n", int)
        if n is None:
            n = 1
        elif not 1 <= n <= MAX_N:
            raise invalid(f"'n' must be between 1 and {MAX_N}.", "n")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise invalid("'stream_options' must be an object.", "stream_options")
    if endpoint == "responses":
        caps: tuple[tuple[str, int], ...] = () if cap is None else ((cap_field, cap),)
    else:
        caps = () if cap is None else ((cap_field, cap),)
        if legacy is not None and cap_field != "max_tokens":
            caps += (("max_tokens", legacy),)
    return ClientRequest(raw, body, model, stream, store is True, items, cap, cap_field, n, caps)


# Fields that point at state an upstream would have stored: Bastion stores none, and
# dropping them would lose the conversation's context without a word.
_STORED_CONTEXT = ("previous_response_id", "conversation")


def _responses_input(body: dict) -> int:
    for field in _STORED_CONTEXT:
        if body.get(field) is not None:
            raise invalid(
                f"'{field}' is not supported: Bastion is stateless and stores no responses"
                " or conversations. Send the whole conversation in 'input' (earlier turns"
                ' and outputs as input items), with "store": false.',
                field,
            )
    if "input" not in body:
        raise invalid("'input' is required: a string or an array of input items.", "input")
    value = body["input"]
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise invalid(f"input[{i}] must be an object (an input item).", f"input[{i}]")
        return len(value)
    raise invalid("'input' must be a string or an array of input items.", "input")


def _chat_messages(body: dict) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' is required: a non-empty array of messages.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object.", f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}].role must be a string.", f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(
                f"messages[{i}].content must be a string or an array of parts.",
                f"messages[{i}].content",
            )
    return len(messages)


def _optional(body: dict, name: str, kind: type) -> object:
    value = body.get(name)
    if value is None:
        return None
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise invalid(f"'{name}' must be a {_NAMES[kind]}.", name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number between {low} and {high}.", name)


def _cap(body: dict, name: str) -> int | None:
    value = _optional(body, name, int)
    if value is not None and value < 1:
        raise invalid(f"'{name}' must be a positive integer.", name)
    return value  # type: ignore[return-value]


_NAMES = {bool: "boolean", int: "integer", str: "string"}
