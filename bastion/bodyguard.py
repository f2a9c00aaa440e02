"""Bodies shaped to be slow: refused before they are parsed on the event loop.

orjson parses strings at memory speed but pays ~1 µs for every object and array it
builds, holding the GIL: a 6 MB body of 100,000 ``{"a": []}`` items blocks the loop for
over a second, freezing every stream of the process. So a body may hold at most
``max_containers`` objects and arrays (a long agent transcript needs a few thousand).

Counting ``{`` and ``[`` bytes is free (``bytes.count``) and never undercounts; only a
body whose count is over the limit — brackets inside strings, such as code, count too —
is parsed in a helper process to count exactly, so neither an attack nor a code-heavy
prompt ever costs the loop more than the limit allows.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import orjson

from bastion.errors import APIError, invalid


def count_containers(raw: bytes) -> int:
    """Exact number of JSON objects and arrays in ``raw`` (-1 if it is not JSON)."""
    try:
        stack = [orjson.loads(raw)]
    except orjson.JSONDecodeError:
        return -1
    count = 0
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            count += 1
            stack.extend(node.values())
        elif isinstance(node, list):
            count += 1
            stack.extend(node)
    return count


class BodyGuard:
    def __init__(self, max_containers: int) -> None:
        self.max_containers = max_containers
        self._pool: ProcessPoolExecutor | None = None
        self.refused = 0  # bodies refused for their shape (metric)

    async def check(self, raw: bytes) -> None:
        """Refuse (400) a body with more objects and arrays than allowed."""
        if raw.count(b"{") + raw.count(b"[") <= self.max_containers:
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        count = await loop.run_in_executor(self._pool, count_containers, raw)
        if count > self.max_containers:
            self.refused += 1
            raise too_complex(count, self.max_containers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def too_complex(count: int, limit: int) -> APIError:
    return invalid(
        f"The request body has {count} JSON objects and arrays; at most {limit} are accepted."
        " Send fewer input items or content parts."
    )
