"""The simulator's prefix cache: vLLM's automatic prefix caching, by blocks of 16 tokens.

vLLM hashes a prompt's KV blocks as a chain (each block's key covers every token up to
its end), so a hit is always a leading prefix, and keeps freed blocks in an LRU queue,
tail blocks first, so a prompt's shared beginning outlives its end. The simulator has
no tokenizer; its tokens follow its usage formula (`bastion.sim.reply`): one token per
4 bytes of the prompt's text in template order, plus 4 tokens per message or item. The
token sequence therefore has exactly `input_tokens` tokens, and the cached share the
answer reports is a part of the input tokens it reports.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from typing import Any

from bastion.sim.reply import PER_ITEM_TOKENS, prompt_segments

BLOCK_TOKENS = 16
"""vLLM's default `--block-size`."""

_TEXT_BYTES = 4
"""Bytes of prompt text per token (the usage formula's ceil(B / 4))."""
_RECORD = 1 + _TEXT_BYTES
"""Each token is one fixed-size record, so a block is a plain byte slice of the sequence."""


def _text_records(data: bytes) -> bytes:
    """Whole 4-byte tokens as records: a length byte, then the 4 bytes."""
    return b"".join(b"\x04" + data[i : i + _TEXT_BYTES] for i in range(0, len(data), _TEXT_BYTES))


@functools.lru_cache(maxsize=256)
def _item_records(label: str) -> bytes:
    """The 4 tokens a message or item adds (its role or type, as a chat template would)."""
    tag = hashlib.blake2b(label.encode(), digest_size=_TEXT_BYTES).digest()
    return b"".join(bytes([0xF0 + i]) + tag for i in range(PER_ITEM_TOKENS))


def token_records(body: dict[str, Any], endpoint: str | None = None) -> bytes:
    """The prompt's tokens, one 5-byte record each, in template order.

    Text runs on across segment boundaries (the 4-byte chunks count the bytes of the
    whole prompt, as the usage formula does); each message's 4 tokens come where it starts.
    """
    out: list[bytes] = []
    carry = b""
    for label, text in prompt_segments(body, endpoint):
        if label:
            out.append(_item_records(label))
        data = carry + text
        whole = len(data) - len(data) % _TEXT_BYTES
        out.append(_text_records(data[:whole]))
        carry = data[whole:]
    if carry:
        out.append(bytes([len(carry)]) + carry.ljust(_TEXT_BYTES, b"\x00"))
    return b"".join(out)


def token_count(records: bytes) -> int:
    return len(records) // _RECORD


def block_hashes(records: bytes) -> list[bytes]:
    """The chained key of every full block: hash(previous key + the block's tokens)."""
    size = BLOCK_TOKENS * _RECORD
    keys: list[bytes] = []
    prev = b""
    for start in range(0, len(records) - size + 1, size):
        prev = hashlib.blake2b(prev + records[start : start + size], digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixCache:
    """Cached block keys in LRU order (least recent first), at most `capacity_tokens`."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = max(capacity_tokens, 0) // BLOCK_TOKENS
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    @property
    def tokens(self) -> int:
        """Tokens held now (whole blocks)."""
        return len(self._blocks) * BLOCK_TOKENS

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def lookup(self, keys: list[bytes], prompt_tokens: int) -> int:
        """Cached tokens for a prompt: its longest leading run of cached blocks.

        At most `prompt_tokens - 1`, rounded down to a block: like vLLM, the last prompt
        token is always computed (it yields the first output token). Hits are refreshed.
        """
        limit = min(len(keys), max(prompt_tokens - 1, 0) // BLOCK_TOKENS)
        n = 0
        while n < limit and keys[n] in self._blocks:
            n += 1
        for key in reversed(keys[:n]):
            self._blocks.move_to_end(key)
        return n * BLOCK_TOKENS

    def insert(self, keys: list[bytes]) -> None:
        """Add or refresh a prompt's blocks, then evict least recent blocks over capacity.

        Inserted last block first, so the prompt's first blocks are the most recent and
        the tail goes first (vLLM frees a request's blocks in reverse order).
        """
        blocks = self._blocks
        for key in reversed(keys):
            if key in blocks:
                blocks.move_to_end(key)
            else:
                blocks[key] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
