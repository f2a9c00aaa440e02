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

# content parts whose payload is not text the model reads byte for byte
_MEDIA_TYPES = frozenset(
    {"input_image", "image_url", "input_file", "file", "input_audio", "image", "audio"}
)


def input_bound(body: dict, items: int, cfg: MeteringConfig) -> int:
    """Upper bound of input tokens: text bytes + allowances (iterative: any nesting depth)."""
    total = cfg.base_tokens + cfg.item_tokens * items
    stack: list[object] = [v for k, v in body.items() if k != "model"]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node) if node.isascii() else len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, dict):
            if node.get("type") in _MEDIA_TYPES:
                total += cfg.image_tokens
                continue
            for key, value in node.items():
                total += len(key)
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
        elif node is not None and not isinstance(node, bool):
            total += 8  # a number rendered into a template (e.g. in a tool schema)
    return total


@dataclass(slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False


def usage_from(obj: object, endpoint: str) -> Usage | None:
    """The upstream's usage report inside a response body / final event, if any."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    if endpoint == "responses":
        i, o = usage.get("input_tokens"), usage.get("output_tokens")
    else:
        i, o = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (_count(i) and _count(o)):
        return None
    return Usage(i, o)  # type: ignore[arg-type]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def estimate_input(text_bytes: int) -> int:
    """Input estimate when the upstream never reported usage: ~4 bytes per token."""
    return -(-text_bytes // 4)
