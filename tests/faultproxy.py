"""A TCP proxy faking outages between a process under test and PostgreSQL or Redis, which
are shared by the whole suite and must never be stopped. It runs its own event loop on its
own thread, so sync tests and async tests on any loop drive it alike, and a test blocking
its own loop never stalls the forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

Mode = Literal["passing", "refuse", "blackhole"]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: the peer fails at once instead of at some later read."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream (none if it was accepted while black-holed)."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tainted: bool = False  # lived through a black hole: bytes were lost, never trust it again

    def abort(self) -> None:
        for writer in self.writers:
            _reset(writer)


class FaultProxy:
    """Forward 127.0.0.1:`port` to a target, or fake it refusing or partitioned."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.connections = 0  # client connections accepted so far, in every mode
        self._mode: Mode = "passing"
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    def start(self) -> FaultProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"faultproxy-{self.target_port}", daemon=True
        )
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    __enter__ = start

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url_for(self, url: str) -> str:
        """`url` (postgresql://…, redis://…) with its host:port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        at = f"{userinfo}@" if userinfo else ""
        return parts._replace(netloc=f"{at}127.0.0.1:{self.port}").geturl()

    def passing(self) -> None:
        """Forward normally. Black-holed connections are reset so that clients reconnect."""
        self._set("passing")

    def refuse(self) -> None:
        """Reset every connection, and reset new ones as soon as they are accepted."""
        self._set("refuse")

    def blackhole(self) -> None:
        """Keep (and accept) connections but drop every byte both ways: a partition."""
        self._set("blackhole")

    def _set(self, mode: Mode) -> None:
        async def apply() -> None:
            self._mode = mode
            for link in list(self._links):
                if mode == "refuse" or (mode == "passing" and link.tainted):
                    link.abort()
                elif mode == "blackhole":
                    link.tainted = True

        if self._loop is None:
            self._mode = mode
        else:  # applied on the proxy's loop, and done by the time this returns
            self._call(apply())

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._mode == "refuse":
            _reset(writer)
            return
        link = _Link([writer], tainted=self._mode == "blackhole")
        self._links.add(link)
        try:
            if link.tainted:  # nothing would ever be forwarded: no upstream at all
                await self._pump(reader, None, link)
                return
            try:
                up = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                link.abort()  # the target itself is down: the client sees a reset
                return
            link.writers.append(up[1])
            await asyncio.gather(self._pump(reader, up[1], link), self._pump(up[0], writer, link))
        except asyncio.CancelledError:  # stop(): 3.11 logs a cancelled handler as an error
            link.abort()
        finally:
            self._links.discard(link)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None, link: _Link
    ) -> None:
        """Copy src to dst while passing, drop while black-holed; on EOF close both sides."""
        try:
            while data := await src.read(65536):
                if dst is not None and self._mode == "passing" and not link.tainted:
                    dst.write(data)
                    await dst.drain()
        except OSError:
            pass
        finally:
            for w in link.writers:
                w.close()
