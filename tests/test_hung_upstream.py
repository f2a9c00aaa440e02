"""A replica that accepts and never answers; a client that stays connected and never reads.

Real processes: `bastion serve` in front of a `bastion sim` and, as the second replica, a
TCP server of the test's own that accepts, reads each request and never answers (its
``GET /health`` included), which is how a wedged vLLM looks from outside. Its requests
are counted by request line, so the test knows exactly what reached it and when.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from conftest import Gateway, free_port, start, stop

READ_TIMEOUT_S = 3.0
CHECK_INTERVAL_S = 2.0


@dataclass
class HungServer:
    """Accepts, reads each request's head, never answers; records (when, line, stream?)."""

    port: int = 0
    seen: list[tuple[float, bytes, bool]] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    stopped: bool = False

    def posts(self, after: float = 0.0) -> list[tuple[float, bytes, bool]]:
        return [s for s in self.seen if s[1].startswith(b"POST ") and s[0] > after]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            stream = b"accept: text/event-stream" in head.lower()
            self.seen.append((time.monotonic(), head.split(b"\r\n", 1)[0], stream))
            await reader.read()  # until the gateway gives up on it
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def __enter__(self) -> HungServer:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

        async def serve() -> int:
            self._server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            await self._server.wait_closed()

        if not self.stopped:
            self.stopped = True
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric(root: str, name: str, upstream: str | None = None) -> float:
    text = httpx.get(root + "/metrics").text
    label = rf'\{{upstream="{upstream}"\}}' if upstream else ""
    found = re.search(rf"^{name}{label} (\S+)$", text, re.M)
    assert found, f"{name} {upstream or ''} missing from /metrics"
    return float(found.group(1))


def serve(tmp_path, toml: str) -> Gateway:
    port = free_port()
    config = tmp_path / "bastion.toml"
    config.write_text(toml.format(port=port, db=tmp_path / "b.db"))
    proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz")
    return Gateway(
        f"http://127.0.0.1:{port}/v1",
        f"http://127.0.0.1:{port}",
        config,
        f"sqlite:///{tmp_path / 'b.db'}",
        proc,
    )


PAIR_TOML = """
refresh_interval_s = 0.2
health_check_interval_s = {interval}

[server]
port = {{port}}

[database]
url = "sqlite:///{{db}}"

[ratelimit]
default_rpm = 100000
default_tpm = 100000000

[[upstreams]]
name = "hung"
url = "http://127.0.0.1:{hung}/v1"
connect_timeout_s = 1
read_timeout_s = {timeout}

[[upstreams]]
name = "good"
url = "http://127.0.0.1:{good}/v1"
read_timeout_s = {timeout}

[[models]]
id = "pair"
endpoints = ["responses", "chat"]
upstreams = ["hung", "good"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 1024
"""


@dataclass
class Outcome:
    status: int
    request_id: str
    usage: dict
    seconds: float


async def ask(client: httpx.AsyncClient, key: str, i: int, stream: bool, **sim) -> Outcome:
    body = {"model": "pair", "input": f"Reply with: r{i}", "stream": stream}
    if sim:
        body["sim"] = sim
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/responses", json=body, headers=headers) as resp:
        data = await resp.aread()
    usage: dict = {}
    if resp.status_code == 200 and stream:
        assert data.endswith(b"\n\n") and b"event: response.completed" in data, data[-300:]
        last = data.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].split(b"data: ", 1)[1]
        usage = orjson.loads(last)["response"]["usage"]
    elif resp.status_code == 200:
        usage = orjson.loads(data)["usage"]
    return Outcome(
        resp.status_code, resp.headers["x-request-id"], usage, time.monotonic() - started
    )


@pytest.fixture
def hung() -> Iterator[HungServer]:
    with HungServer() as server:
        yield server


@pytest.mark.timeout(90)
def test_a_hung_replica_is_retried_around_held_out_and_readmitted_when_it_recovers(
    tmp_path, sim_port, hung
):
    toml = PAIR_TOML.format(
        interval=CHECK_INTERVAL_S, timeout=READ_TIMEOUT_S, hung=hung.port, good=sim_port
    )
    gw = serve(tmp_path, toml)
    sim = None
    try:
        key, account = gw.new_key()

        async def traffic() -> list[Outcome]:
            limits = httpx.Limits(max_connections=20)
            async with httpx.AsyncClient(base_url=gw.root, timeout=30, limits=limits) as c:

                async def until_hung_saw(n: int) -> None:
                    deadline = time.monotonic() + 5
                    while len(hung.posts()) < n:
                        assert time.monotonic() < deadline, "the hung replica got no request"
                        await asyncio.sleep(0.01)

                async def until_good_is_busy() -> None:
                    deadline = time.monotonic() + 5
                    busy = b'bastion_upstream_outstanding{upstream="good"} 1.0'
                    while busy not in (await c.get("/metrics")).content:
                        assert time.monotonic() < deadline, "the slow request is not on good"
                        await asyncio.sleep(0.01)

                # The first attempts are placed so both kinds meet the hung replica: a stream
                # (ties go to the first replica listed), then a slow answer that keeps "good"
                # busy, then a JSON request (least outstanding: the tie goes to "hung").
                first = [asyncio.create_task(ask(c, key, 0, True))]
                await until_hung_saw(1)
                first.append(asyncio.create_task(ask(c, key, 1, False, ttft_ms=1500)))
                await until_good_is_busy()
                first.append(asyncio.create_task(ask(c, key, 2, False)))
                await until_hung_saw(2)
                # then the rest, 10 at a time, kinds mixed: 30 now, 37 once the ejection
                # backoffs (1 s, 2 s) are long over and health checks have failed twice more
                kinds = [False] * 48 + [True] * 19
                random.Random(7).shuffle(kinds)
                gate = asyncio.Semaphore(10)

                async def one(i: int, stream: bool) -> Outcome:
                    async with gate:
                        return await ask(c, key, i, stream)

                now = [one(i + 3, s) for i, s in enumerate(kinds[:30])]
                done = [*await asyncio.gather(*first), *await asyncio.gather(*now)]
                await asyncio.sleep(2 * CHECK_INTERVAL_S + 1)
                later = [one(i + 33, s) for i, s in enumerate(kinds[30:])]
                return [*done, *await asyncio.gather(*later)]

        started = time.monotonic()
        outcomes = asyncio.run(traffic())
        elapsed = time.monotonic() - started
        assert [o.status for o in outcomes] == [200] * 70

        posts = hung.posts()
        assert [p[2] for p in posts[:2]] == [True, False]  # a stream and a JSON request hung
        first_timeout = posts[0][0] + READ_TIMEOUT_S
        after = hung.posts(after=first_timeout)
        assert len(after) <= 2, f"{len(after)} attempts reached the hung replica after it timed out"
        assert metric(gw.root, "bastion_upstream_requests_total", "hung") == len(posts)
        assert metric(gw.root, "bastion_upstream_available", "hung") == 0
        assert not [p for p in hung.seen if p[1].startswith(b"GET /v1/")]  # /health, at the root
        assert any(p[1].startswith(b"GET /health ") for p in hung.seen)
        slowest = max(o.seconds for o in outcomes)
        assert slowest < READ_TIMEOUT_S + 2  # one timeout, then the healthy replica
        print(
            f"\n70 requests in {elapsed:.1f}s (with a pause); hung replica: {len(posts)} "
            f"attempts ({len(after)} after the first timeout), "
            f"{len(hung.seen) - len(posts)} health checks; slowest answer {slowest:.2f}s"
        )

        # exactly one row per 200, each with the usage the client saw: nothing for the hangs
        rows = {r.request_id: r for r in gw.settled(account, 70)}
        assert len(rows) == 70
        for o in outcomes:
            row = rows[o.request_id]
            assert row.status == "200" and not row.estimated
            assert (row.input_tokens, row.output_tokens) == (
                o.usage["input_tokens"],
                o.usage["output_tokens"],
            )

        # it recovers: a sim takes its port, and the next health check re-admits it
        hung.stop()
        sim = start(["sim", "--port", str(hung.port)], f"http://127.0.0.1:{hung.port}/health")
        up_at = time.monotonic()
        while metric(gw.root, "bastion_upstream_available", "hung") == 0:
            assert time.monotonic() - up_at < CHECK_INTERVAL_S + 2.5, "not re-admitted"
            time.sleep(0.05)
        readmitted = time.monotonic() - up_at
        before = metric(gw.root, "bastion_upstream_requests_total", "hung")

        async def more() -> list[Outcome]:
            async with httpx.AsyncClient(base_url=gw.root, timeout=30) as c:
                return await asyncio.gather(*[ask(c, key, 100 + i, i % 2 == 0) for i in range(6)])

        assert [o.status for o in asyncio.run(more())] == [200] * 6
        assert metric(gw.root, "bastion_upstream_requests_total", "hung") > before
        print(f"re-admitted {readmitted:.2f}s after it recovered")
    finally:
        stop(gw.proc)
        if sim is not None:
            stop(sim)


WRITE_TOML = """
refresh_interval_s = 0.2

[server]
port = {{port}}
client_write_timeout_s = 2

[database]
url = "sqlite:///{{db}}"

[ratelimit]
default_rpm = 100000
default_tpm = 100000000

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"

[[models]]
id = "long"
endpoints = ["responses", "chat"]
upstreams = ["sim"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 1000000
"""


def raw_request(port: int, key: str, body: dict) -> bytes:
    data = orjson.dumps(body)
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (port, key.encode(), len(data), data)
    )


@pytest.mark.timeout(60)
def test_a_client_that_never_reads_is_cut_off_and_its_upstream_freed(tmp_path, sim_port):
    gw = serve(tmp_path, WRITE_TOML.format(sim=sim_port))
    try:
        key, account = gw.new_key()
        port = int(gw.root.rsplit(":", 1)[1])
        body = {
            "model": "long",
            "messages": [{"role": "user", "content": "go on"}],
            "stream": True,
            "max_tokens": 200_000,
            "sim": {"tokens": 200_000, "tokens_per_s": 0},
        }
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        sock.connect(("127.0.0.1", port))
        sock.sendall(raw_request(port, key, body))
        sent = time.monotonic()
        deadline = sent + 20
        while metric(gw.root, "bastion_upstream_outstanding", "sim") == 0:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.02)
        # the client reads nothing from here on; the gateway must let go of the upstream
        while metric(gw.root, "bastion_upstream_outstanding", "sim") or metric(
            gw.root, "bastion_in_flight"
        ):
            assert time.monotonic() < deadline, "the upstream slot is still held"
            time.sleep(0.05)
        freed = time.monotonic() - sent
        [row] = gw.settled(account, 1)
        assert row.status == "cancelled" and row.estimated
        assert 0 < row.output_tokens < 200_000 and row.cost > 0
        assert freed >= 2  # not before the write timeout
        sock.close()
        print(f"\nslot freed {freed:.2f}s after the request; charged {row.output_tokens} tokens")

        # a client that is only slow (stops reading for 1 s, under the timeout) is served whole
        body["max_tokens"] = body["sim"]["tokens"] = 20_000
        with httpx.stream(
            "POST",
            gw.url + "/chat/completions",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            time.sleep(1.0)
            data = b"".join(resp.iter_bytes())
        assert resp.status_code == 200 and data.endswith(b"data: [DONE]\n\n")
        rows = gw.settled(account, 2)
        assert sorted(r.status for r in rows) == ["200", "cancelled"]
    finally:
        stop(gw.proc)
