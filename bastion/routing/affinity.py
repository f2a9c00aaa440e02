"""The affinity key of a request, and each replica's rank for it (rendezvous hashing).

The key is what makes two requests "the same conversation" for the upstream's prefix
cache, in this order: ``prompt_cache_key`` (OpenAI's own field for it), ``user``, the
``x-session-id`` header, else a hash of the prompt's leading part (instructions or
system prompt, tools, then the first messages or input items, up to
``affinity_prefix_chars`` characters): requests that share that leading part share
cacheable blocks. It is read from the body the gateway already parsed, once per
request. A ``cache_salt`` (the client's, or the account's own under ``cache_isolation =
"account"``) is part of the key: vLLM shares cached blocks only between requests with
the same salt, so there is nothing to gain in sending other salts to the same replica.

Rendezvous (highest random weight) hashing ranks the replicas for a key: each replica
scores ``mix(key XOR seed(replica))``, and the highest comes first. Taking a replica
out moves only the keys it ranked first (to their second choice), and every gateway
process computes the same ranks: the hashes are fixed (BLAKE2b, splitmix64), never
Python's per-process ``hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import orjson

MASK = (1 << 64) - 1
KEY_FIELDS = ("prompt_cache_key", "user")
SESSION_HEADER = "x-session-id"


def hash64(text: str) -> int:
    """A fixed 64-bit hash of ``text`` (the same in every process, unlike ``hash``)."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def mix(x: int) -> int:
    """splitmix64's finalizer: spreads ``key ^ seed`` over 64 bits (rendezvous weights)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def rank(key: int, seeds: Mapping[str, int], names: Iterable[str]) -> list[str]:
    """``names`` in ``key``'s order of preference; ``seeds`` maps each to its ``hash64``."""
    return sorted(names, key=lambda name: mix(key ^ seeds[name]), reverse=True)


def affinity_key(body: dict | None, headers: Mapping[str, str] | None, prefix_chars: int) -> int:
    """The request's affinity key, as a 64-bit hash (see the module docstring)."""
    if body is None:
        body = {}
    salt = body.get("cache_salt")  # a salted cache is shared only under the same salt
    scope = f"{salt}\0" if isinstance(salt, str) and salt else ""
    for field in KEY_FIELDS:
        value = body.get(field)
        if isinstance(value, str) and value:
            return hash64(f"{scope}{field}\0{value}")
    session = headers.get(SESSION_HEADER) if headers is not None else None
    if session:
        return hash64(f"{scope}session\0{session}")
    return hash64(f"{scope}prefix\0" + prompt_prefix(body, prefix_chars))


def prompt_prefix(body: dict, limit: int) -> str:
    """The first ``limit`` characters of the prompt's text, in the order the upstream's
    template puts it: instructions, tools, then the messages (chat) or input items."""
    parts: list[str] = []
    size = 0

    def add(text: str) -> bool:  # True once enough is in
        nonlocal size
        parts.append(text)
        size += len(text)
        return size >= limit

    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions and add(instructions):
        return "".join(parts)[:limit]
    tools = body.get("tools")
    if isinstance(tools, list) and tools and add(orjson.dumps(tools).decode()):
        return "".join(parts)[:limit]
    items = body.get("messages")
    if items is None:
        items = body.get("input")
    if isinstance(items, str):
        add(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and add(_item_text(item)):
                break
    return "".join(parts)[:limit]


def _item_text(item: dict) -> str:
    """A message or input item as text: its role and the text of its content."""
    role = item.get("role")
    head = f"{role}:" if isinstance(role, str) else ""
    content = item.get("content")
    if isinstance(content, str):
        return head + content + "\n"
    if isinstance(content, list):
        texts = [
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return head + "".join(texts) + "\n"
    for field in ("output", "arguments"):  # function call items of the Responses API
        value = item.get(field)
        if isinstance(value, str):
            return head + value + "\n"
    return head + "\n"
