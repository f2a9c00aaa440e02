"""What the upstream sees on the wire, and what happens when the client or the upstream leaves.

JSON requests go upstream through pyreqwest, streams through aiohttp (docs/choices.md);
these tests hold both paths to the same contract with a recording upstream: the
client's bytes and Bastion's headers only, never the client's key; a client that
leaves cancels the upstream request; idle keep-alive connections the upstream closed
are not used again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from aiohttp import web
from conftest import Gateway, free_port, start, stop

from bastion.config import ModelConfig, UpstreamConfig
from bastion.errors import APIError
from bastion.relay import Call, Relay

RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "model": "rec",
    "output": [],
    "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
}
STREAM = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"ok","sequence_number":1}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,'
    b'"response":{"usage":{"input_tokens":7,"output_tokens":1,"total_tokens":8}}}\n\n'
)


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]  # Bastion's end of the connection
    gone_at: float = 0.0  # when the client (Bastion) closed the connection, for "hang"


@dataclass
class RecordingUpstream:
    """An upstream on its own thread that records every request; model "hang" never answers."""

    keepalive_s: float = 75.0
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        seen = Seen(dict(request.headers), await request.read(), peer)
        self.seen.append(seen)
        body = orjson.loads(seen.body)
        if body["model"] == "hang":
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110 (aiohttp has no "closed" event to await)
                await asyncio.sleep(0.02)
            seen.gone_at = time.monotonic()
            return web.Response(status=504)
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(STREAM)
            return response
        return web.json_response(RESPONSE)

    def __enter__(self) -> RecordingUpstream:
        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": []})

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        self._loop = loop

        async def serve() -> int:
            app = web.Application()
            app.router.add_post("/v1/responses", self.handle)
            app.router.add_get("/v1/models", models)
            self._runner = web.AppRunner(
                app, access_log=None, keepalive_timeout=self.keepalive_s, shutdown_timeout=0.5
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

        self.port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


TOML = """
refresh_interval_s = 0.2
health_check_interval_s = 60

[server]
port = {port}

[database]
url = "sqlite:///{db}"

[[upstreams]]
name = "rec"
url = "http://127.0.0.1:{up}/v1"
api_key = "upstream-secret"

[[models]]
id = "rec"
endpoints = ["responses"]
upstreams = ["rec"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 64

[[models]]
id = "hang"
endpoints = ["responses"]
upstreams = ["rec"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 64
"""


@pytest.fixture
def relay_gateway(tmp_path, request) -> Iterator[tuple[Gateway, RecordingUpstream]]:
    keepalive = getattr(request, "param", 75.0)
    with RecordingUpstream(keepalive_s=keepalive) as upstream:
        port = free_port()
        config = tmp_path / "b.toml"
        config.write_text(TOML.format(port=port, db=tmp_path / "b.db", up=upstream.port))
        proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz")
        gw = Gateway(
            f"http://127.0.0.1:{port}/v1",
            f"http://127.0.0.1:{port}",
            config,
            f"sqlite:///{tmp_path / 'b.db'}",
            proc,
        )
        try:
            yield gw, upstream
        finally:
            stop(proc)


def post(gw: Gateway, key: str, body: bytes, timeout: float = 10) -> httpx.Response:
    return httpx.post(
        gw.url + "/responses",
        content=body,
        timeout=timeout,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "User-Agent": "client-agent/1.0",
            "X-Client-Secret": "never-forwarded",
        },
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_gets_the_clients_bytes_and_only_bastions_headers(relay_gateway, stream):
    gw, upstream = relay_gateway
    key, account = gw.new_key()
    # odd spacing and key order: a re-serialised body would not match byte for byte
    body = b'{ "input":"x",  "model":"rec", "max_output_tokens": 16' + (
        b', "stream": true}' if stream else b"}"
    )
    resp = post(gw, key, body)
    assert resp.status_code == 200
    if stream:
        assert resp.content == STREAM
    else:
        assert orjson.loads(resp.content) == RESPONSE
    [seen] = upstream.seen
    assert seen.body == body
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["authorization"] == "Bearer upstream-secret"
    assert headers["x-request-id"] == resp.headers["x-request-id"]
    assert headers["content-type"] == "application/json"
    assert key not in str(seen.headers)
    assert "x-client-secret" not in headers and "client-agent" not in str(seen.headers)
    assert "accept-encoding" not in headers  # bodies pass through undecoded
    [row] = gw.settled(account, 1)
    assert (row.input_tokens, row.status) == (7, "200")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_that_leaves_cancels_the_upstream_request(relay_gateway, stream):
    gw, upstream = relay_gateway
    key, account = gw.new_key()
    body = b'{"model":"hang","input":"x"' + (b',"stream":true}' if stream else b"}")
    left = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(gw, key, body, timeout=0.5)
    deadline = time.monotonic() + 5
    while not (upstream.seen and upstream.seen[0].gone_at):
        assert time.monotonic() < deadline, "the upstream request was not cancelled"
        time.sleep(0.05)
    assert upstream.seen[0].gone_at - left < 3
    [row] = gw.settled(account, 1)  # it reached the upstream: one row, nothing produced
    assert (row.status, row.cost, row.output_tokens) == ("cancelled", 0, 0)
    assert gw.account(account).balance == 10_000_000_000


@pytest.mark.parametrize("relay_gateway", [0.3], indirect=True)
def test_idle_connections_the_upstream_closed_are_not_reused(relay_gateway):
    """vLLM (uvicorn) closes idle keep-alive connections after 5 s; none may cost a 502."""
    gw, upstream = relay_gateway
    key, account = gw.new_key()
    for stream in (False, True, False, True, False, False):
        body = b'{"model":"rec","input":"x"' + (b',"stream":true}' if stream else b"}")
        assert post(gw, key, body).status_code == 200
        time.sleep(0.6)  # past the upstream's keep-alive: it has closed the connection
    assert len(gw.settled(account, 6)) == 6
    assert len({seen.peer for seen in upstream.seen}) == 6  # a new connection every time


@pytest.mark.timeout(20)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_fleet_that_hangs_costs_two_read_timeouts_not_one_per_replica(stream):
    """A timeout is retried once on another replica (the client has seen nothing), no more."""
    posts: list[float] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if (await reader.readuntil(b"\r\n\r\n")).startswith(b"POST "):
                posts.append(time.monotonic())
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    ups = {n: UpstreamConfig(n, url, read_timeout_s=0.3) for n in ("a", "b", "c")}
    model = ModelConfig("m", "m", frozenset({"responses"}), tuple(ups), 1, 1, 16)
    relay = Relay(ups, health_interval_s=60)
    await relay.start()
    try:
        call = Call("req_1", "responses", model, b"{}", stream, False, False)
        started = time.monotonic()
        with pytest.raises(APIError) as raised:
            await relay.send(None, call)  # type: ignore[arg-type]  # no byte reaches a client
        elapsed = time.monotonic() - started
        assert raised.value.status == 502 and "sent nothing for 0.3s" in raised.value.message
        assert call.attempts == len(posts) == 2
        assert 0.55 < elapsed < 1.0
        tried = [r for r in relay.pool.replicas.values() if r.attempts]
        assert len(tried) == 2 and not any(r.available for r in tried)  # both ejected
    finally:
        await relay.close()
        server.close()
