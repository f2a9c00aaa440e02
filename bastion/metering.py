"""Metering: what a request may cost at worst, and what it did cost.

Admission needs an upper bound without a tokenizer: every token of a byte-level BPE
(or SentencePiece with byte fallback) covers at least one UTF-8 byte, so the bytes
of all text in the request, plus allowances for template tokens per request and per
item and a flat allowance per image/file, bound the input tokens from above.
Settlement uses the upstream's own usage report; where none came, an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.config import MeteringConfig

# content parts whose payload is not text the model reads byte for byte: each counts the
# model's media allowance, whatever the size of its URL or data (OpenAI's and vLLM's names)
_MEDIA_TYPES = frozenset(
    {
        "input_image", "image_url", "image", "image_pil", "image_embeds",
        "input_file", "file",
        "input_audio", "audio_url", "audio",
        "input_video", "video_url", "video",
    }
)  # fmt: skip

# A report above what the request could use is an upstream fault, not a bill: input up to
# this many times the bound is believed (the bound's allowances may be set too low),
# beyond it the admitted worst case is charged instead.
INPUT_SLACK = 2

NUMBER_TOKENS = 8  # a number anywhere in the body may be rendered into the prompt


def input_bound(body: dict, items: int, cfg: MeteringConfig, media_tokens: int = 0) -> int:
    """Upper bound of input tokens: text bytes + allowances (iterative: any nesting depth).

    ``media_tokens``: the model's allowance per image/file/audio/video part (0: the
    ``[metering]`` default)."""
    media = media_tokens or cfg.image_tokens
    total = cfg.base_tokens + cfg.item_tokens * items
    stack: list[object] = [v for k, v in body.items() if k != "model"]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node) if node.isascii() else len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, dict):
            if node.get("type") in _MEDIA_TYPES:
                total += media
                continue
            for key, value in node.items():
                total += len(key)
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
        elif node is not None and not isinstance(node, bool):
            total += NUMBER_TOKENS  # rendered into a template (e.g. in a tool schema)
    return total


@dataclass(slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False
    cached_tokens: int = 0  # part of input_tokens
    reasoning_tokens: int = 0  # part of output_tokens


_FIELDS = {
    "responses": ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"),
    "chat": (
        "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"
    ),
}  # fmt: skip


def usage_from(obj: object, endpoint: str) -> Usage | None:
    """The upstream's usage report inside a response body / final event, if any.

    Cached and reasoning tokens come from the details objects; absent means 0 (vLLM
    omits them unless enabled). A malformed detail is taken as absent."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    inp, out, inp_details, out_details = _FIELDS[endpoint]
    i, o = usage.get(inp), usage.get(out)
    if not (_count(i) and _count(o)):
        return None
    return Usage(
        i,  # type: ignore[arg-type]
        o,  # type: ignore[arg-type]
        cached_tokens=_detail(usage.get(inp_details), "cached_tokens"),
        reasoning_tokens=_detail(usage.get(out_details), "reasoning_tokens"),
    )


def _detail(details: object, name: str) -> int:
    if details is None or details.__class__ is not dict:
        return 0
    value = details.get(name)  # type: ignore[attr-defined]
    return value if value.__class__ is int and value > 0 else 0


def plausible(usage: Usage, input_bound: int, output_cap: int) -> bool:
    """Could the request have used this? (Output within its cap, input near its bound,
    cached within input, reasoning within output.)"""
    return (
        usage.output_tokens <= output_cap
        and usage.input_tokens <= INPUT_SLACK * input_bound
        and usage.cached_tokens <= usage.input_tokens
        and usage.reasoning_tokens <= usage.output_tokens
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The fields whose text reaches the model's prompt (the rest: options, metadata, …).
_PROMPT_FIELDS = ("input", "messages", "instructions", "tools", "functions", "prompt")
ESTIMATE_ITEM_TOKENS = 4  # a chat template's tokens per message: role markers, separators


def estimate_input(body: dict, items: int, media_tokens: int) -> int:
    """Input estimate when the upstream never reported usage (a cut stream, a client gone).

    The prompt's text at ~4 UTF-8 bytes per token (what BPE tokenizers average on
    English and code), plus a few template tokens per message, plus the model's
    allowance per media part (a picture has no text to measure). Never above the
    admission bound, which counts every byte as a token."""
    text = 0
    media = 0
    stack: list[object] = [body[k] for k in _PROMPT_FIELDS if k in body]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            text += len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, dict):
            if node.get("type") in _MEDIA_TYPES:
                media += 1
            else:
                stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return -(-text // 4) + ESTIMATE_ITEM_TOKENS * items + media * media_tokens
