"""The simulator's wire format: Responses and Chat Completions bodies and SSE streams.

Shapes follow the OpenAI API and vLLM's server: what vLLM and OpenAI send and what the
`openai` SDK's types and stream accumulator accept. Streams are rendered up front into
bytes (one unit per token) so the hot loop only writes precomputed bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson

from bastion.sim.reply import Reply, Usage


@dataclass(slots=True)
class StreamPlan:
    """A rendered stream: `head` is sent at once, then one unit per token (paced).

    The last unit carries the ending (terminal event, usage chunk, `[DONE]`), so the
    stream finishes together with its last token.
    """

    head: bytes
    units: list[bytes]


def new_id(prefix: str) -> str:
    """A random id in OpenAI's style (`resp_…`, `msg_…`, `fc_…`, `call_…`, `chatcmpl-…`)."""
    return prefix + os.urandom(16).hex()


def error_object(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error envelope: like OpenAI's, but `code` is the HTTP status as an int."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _sse(event_type: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# ---------------------------------------------------------------- /v1/responses


class ResponsesRender:
    """Renders one Responses answer, JSON or stream, with stable ids and timestamps."""

    def __init__(
        self,
        body: dict[str, Any],
        reply: Reply,
        created_at: int,
        done_at: int,
        usage: Usage | None = None,
    ) -> None:
        self.body = body
        self.reply = reply
        self.reported = usage or Usage(reply.input_tokens, reply.output_tokens)
        self.created_at = created_at
        self.done_at = done_at
        self.rid = new_id("resp_")
        self.item_id = new_id("fc_" if reply.call_name else "msg_")
        self.call_id = new_id("call_")
        self.status = "incomplete" if reply.truncated else "completed"

    def response(self, final: bool) -> dict[str, Any]:
        """The Response object: `final` is the completed one, else the in-progress snapshot."""
        b = self.body
        temperature = b.get("temperature")
        top_p = b.get("top_p")
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status if final else "in_progress",
            "completed_at": self.done_at if final and not self.reply.truncated else None,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if final and self.reply.truncated else None
            ),
            "instructions": b.get("instructions"),
            "max_output_tokens": b.get("max_output_tokens"),
            "model": b["model"],
            "output": [self.item(final)] if final else [],
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "previous_response_id": b.get("previous_response_id"),
            "reasoning": b.get("reasoning") or {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if temperature is None else temperature,
            "text": b.get("text") or {"format": {"type": "text"}},
            "tool_choice": b.get("tool_choice") or "auto",
            "tools": b.get("tools") or [],
            "top_p": 1.0 if top_p is None else top_p,
            "truncation": b.get("truncation") or "disabled",
            "usage": self.usage() if final else None,
            "user": b.get("user"),
            "metadata": b.get("metadata") or {},
        }

    def usage(self) -> dict[str, Any]:
        u = self.reported
        return {
            "input_tokens": u.input_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.output_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens,
        }

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, final: bool) -> dict[str, Any]:
        """The output item, as first added (`final` False) or finished."""
        status = self.status if final else "in_progress"
        if self.reply.call_name:
            return {
                "type": "function_call",
                "id": self.item_id,
                "call_id": self.call_id,
                "name": self.reply.call_name,
                "arguments": self.reply.arguments if final else "",
                "status": status,
            }
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [self._part(self.reply.text)] if final else [],
        }

    def json_body(self) -> bytes:
        return orjson.dumps(self.response(final=True))

    def stream(self, fault: str | None = None, vllm_quirks: bool = False) -> StreamPlan:
        """The §3 event sequence; `fault` is None, "cut", "error-event" or "malformed"."""
        seq = 0
        head: list[bytes] = []

        def event(obj: dict[str, Any]) -> bytes:
            nonlocal seq
            seq += 1
            return _sse(obj["type"], {"type": obj["type"], "sequence_number": seq - 1, **obj})

        call = self.reply.call_name is not None
        head.append(event({"type": "response.created", "response": self.response(False)}))
        head.append(event({"type": "response.in_progress", "response": self.response(False)}))
        head.append(
            event(
                {"type": "response.output_item.added", "output_index": 0, "item": self.item(False)}
            )
        )
        ids = {"item_id": self.item_id, "output_index": 0}
        if not call:
            head.append(
                event(
                    {
                        "type": "response.content_part.added",
                        **ids,
                        "content_index": 0,
                        "part": self._part(""),
                    }
                )
            )
            kind = b"response.output_text.delta"
            mid = b',"item_id":"' + self.item_id.encode() + b'","output_index":0,"content_index":0,'
            suffix = b',"logprobs":[]}\n\n'
        else:
            kind = b"response.function_call_arguments.delta"
            mid = b',"item_id":"' + self.item_id.encode() + b'","output_index":0,'
            suffix = b"}\n\n"
        prefix = b"event: " + kind + b'\ndata: {"type":"' + kind + b'","sequence_number":'
        pieces = self.reply.pieces
        cut = len(pieces) // 2 if fault in ("cut", "error-event") else len(pieces)
        units = []
        for piece in pieces[:cut]:
            units.append(
                prefix + str(seq).encode() + mid + b'"delta":' + orjson.dumps(piece) + suffix
            )
            seq += 1
        if fault == "cut":
            return StreamPlan(b"".join(head), units)
        if fault == "error-event":
            err = error_object(500, "simulated generation failure", "InternalServerError")
            units.append(event({"type": "error", **err}))
            return StreamPlan(b"".join(head), units)
        tail = self._tail(event, ids, call, vllm_quirks)
        if units:
            units[-1] += tail
        else:
            units.append(tail)
        if fault == "malformed":
            bad = b"event: " + kind + b"\ndata: " + prefix.split(b"data: ")[1] + b"\n\n"
            units[len(units) // 2] = bad + units[len(units) // 2]
        return StreamPlan(b"".join(head), units)

    def _tail(self, event: Any, ids: dict[str, Any], call: bool, vllm_quirks: bool) -> bytes:
        """Done events and the terminal event, with the full output and usage."""
        out: list[bytes] = []
        if call:
            out.append(
                event(
                    {
                        "type": "response.function_call_arguments.done",
                        **ids,
                        "name": self.reply.call_name,
                        "arguments": self.reply.arguments,
                    }
                )
            )
        else:
            text = self.reply.text
            out.append(
                event(
                    {
                        "type": "response.output_text.done",
                        **ids,
                        "content_index": 0,
                        "text": text,
                        "logprobs": [],
                    }
                )
            )
            out.append(
                event(
                    {
                        "type": "response.content_part.done",
                        **ids,
                        "content_index": 0,
                        "part": self._part(text),
                    }
                )
            )
        out.append(
            event({"type": "response.output_item.done", "output_index": 0, "item": self.item(True)})
        )
        terminal = "response.incomplete" if self.reply.truncated else "response.completed"
        if vllm_quirks:
            terminal = "response.completed"  # vLLM never sends response.incomplete
        out.append(event({"type": terminal, "response": self.response(True)}))
        return b"".join(out)


# ---------------------------------------------------------------- /v1/chat/completions


class ChatRender:
    """Renders one Chat Completions answer, JSON or stream."""

    def __init__(
        self,
        body: dict[str, Any],
        reply: Reply,
        created: int,
        usage: Usage | None = None,
        usage_null: bool = False,
    ) -> None:
        self.body = body
        self.reply = reply
        self.created = created
        self.reported = usage or Usage(reply.input_tokens, reply.output_tokens)
        # OpenAI's stream: with usage on, every other chunk carries "usage": null
        self.usage_null = usage_null and self.include_usage()
        self.cid = new_id("chatcmpl-")
        self.call_id = new_id("call_")
        if reply.truncated:
            self.finish = "length"
        else:
            self.finish = "tool_calls" if reply.call_name else "stop"

    def usage(self) -> dict[str, Any]:
        """vLLM's shape: the details objects only when non-zero."""
        u = self.reported
        out: dict[str, Any] = {
            "prompt_tokens": u.input_tokens,
            "completion_tokens": u.output_tokens,
            "total_tokens": u.total_tokens,
        }
        if u.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
        if u.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": u.reasoning_tokens}
        return out

    def json_body(self) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if self.reply.call_name:
            message["tool_calls"] = [
                {
                    "id": self.call_id,
                    "type": "function",
                    "function": {"name": self.reply.call_name, "arguments": self.reply.arguments},
                }
            ]
        else:
            message["content"] = self.reply.text
        return orjson.dumps(
            {
                "id": self.cid,
                "object": "chat.completion",
                "created": self.created,
                "model": self.body["model"],
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
                ],
                "usage": self.usage(),
            }
        )

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.body["model"],
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.usage_null:
            chunk["usage"] = None
        return _data(chunk)

    def include_usage(self) -> bool:
        """vLLM: a present `stream_options` defaults `include_usage` to true."""
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage", True) is not False

    def stream(self, fault: str | None = None) -> StreamPlan:
        """Role chunk + first token, one chunk per token, finish chunk, usage, `[DONE]`."""
        call = self.reply.call_name
        first = self._chunk({"role": "assistant", "content": ""})
        if call:
            first += self._chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": self.call_id,
                            "type": "function",
                            "function": {"name": call, "arguments": ""},
                        }
                    ]
                }
            )
        template = self._chunk(
            {"content": "\x00"}
            if not call
            else {"tool_calls": [{"index": 0, "function": {"arguments": "\x00"}}]}
        )
        before, after = template.split(b'"\\u0000"')
        pieces = self.reply.pieces
        cut = len(pieces) // 2 if fault in ("cut", "error-event") else len(pieces)
        units = [before + orjson.dumps(p) + after for p in pieces[:cut]]
        if units:
            units[0] = first + units[0]
        if fault == "cut":
            return StreamPlan(b"", units)
        if fault == "error-event":
            err = _data(error_object(500, "simulated generation failure", "InternalServerError"))
            units.append(err + b"data: [DONE]\n\n")
            if len(units) == 1:
                units[0] = first + units[0]
            return StreamPlan(b"", units)
        tail = self._chunk({}, self.finish)
        if self.include_usage():
            tail += _data(
                {
                    "id": self.cid,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.body["model"],
                    "choices": [],
                    "usage": self.usage(),
                }
            )
        tail += b"data: [DONE]\n\n"
        if units:
            units[-1] += tail
        else:
            units.append(first + tail)
        if fault == "malformed":
            bad = before.rstrip(b"{") + b"{\n\n"
            units[len(units) // 2] = bad + units[len(units) // 2]
        return StreamPlan(b"", units)
