"""Run `bastion sim` in-process on a free port, for any test that needs an upstream.

    with SimServer(tokens_per_s=0) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)

The server runs on its own thread and event loop, so both sync and async tests
(on any loop) can use it.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from bastion.sim import LoadConfig, create_app


class SimServer:
    """The simulator on 127.0.0.1:<free port>, on a background thread."""

    def __init__(
        self, ttft_ms: float = 0, tokens_per_s: float = 0, load: LoadConfig | None = None
    ) -> None:
        self._app = create_app(ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, load=load)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT (no /v1)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base_url."""
        return self.url + "/v1"

    async def _start(self) -> int:
        self._runner = web.AppRunner(
            self._app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    def start(self) -> SimServer:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            runner = self._runner
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
