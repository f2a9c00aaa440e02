"""One shared clock that writes every stream's tokens on time.

A task per stream sleeping per token costs a timer, a future and a task switch per
token; at thousands of streams × 50 tokens/s that alone saturates a core. Instead each
stream is a job in one heap keyed by its next due time; a single loop callback wakes
when the earliest job is due and writes, synchronously, every token that is due for
every due stream (a stream that fell behind gets its overdue tokens in one write).
Due times are absolute (`t0 + i / rate`), so the rate never drifts under load.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math

WRITE_BUFFER_LIMIT = 256 * 1024
"""A client that lets this much pile up unread is paused (retried every 10 ms)."""


class _Job:
    __slots__ = ("done", "due", "i", "interval", "t0", "transport", "units")

    def __init__(
        self,
        transport: asyncio.Transport,
        units: list[bytes],
        t0: float,
        interval: float,
        done: asyncio.Future[bool],
    ) -> None:
        self.transport = transport
        self.units = units
        self.t0 = t0
        self.interval = interval
        self.done = done
        self.i = 0
        self.due = t0

    def step(self, now: float) -> bool:
        """Write every due unit as one HTTP chunk; True if the job has units left."""
        if self.done.done():  # the handler was cancelled
            return False
        tr = self.transport
        if tr.is_closing():
            self.done.set_result(False)
            return False
        if tr.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.due = now + 0.01
            return True
        n = len(self.units)
        if self.interval <= 0:
            j = n
        else:
            j = min(n, int((now - self.t0) / self.interval) + 1)
            while j < n and self.t0 + j * self.interval <= now:
                j += 1  # float rounding must never leave a due unit behind
        data = b"".join(self.units[self.i : j]) if j - self.i > 1 else self.units[self.i]
        try:
            tr.write(b"%x\r\n%b\r\n" % (len(data), data))
        except (ConnectionError, RuntimeError):
            self.done.set_result(False)
            return False
        self.i = j
        if j >= n:
            self.done.set_result(True)
            return False
        self.due = self.t0 + j * self.interval
        return True


class Pacer:
    """Writes pre-rendered stream units at `t0 + i * interval`, for all streams at once."""

    def __init__(self, resolution: float = 0.001) -> None:
        self._resolution = resolution
        self._heap: list[tuple[float, int, _Job]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.late_max = 0.0
        """Worst lateness seen (seconds past a unit's due time); a load gauge."""

    async def play(
        self, transport: asyncio.Transport, units: list[bytes], t0: float, tokens_per_s: float
    ) -> bool:
        """Write `units` (chunked-encoded) paced from loop time `t0`; False if the peer left."""
        if not units:
            return True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        job = _Job(transport, units, t0, 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0, done)
        heapq.heappush(self._heap, (job.due, next(self._order), job))
        self._arm(loop, job.due)
        return await done

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = loop.call_at(when, self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, job = heapq.heappop(heap)
            if now - due > self.late_max:
                self.late_max = now - due
            if job.step(now):
                heapq.heappush(heap, (job.due, next(self._order), job))
        if heap:
            self._arm(loop, max(heap[0][0], now + self._resolution))
