"""Several replicas per model: least outstanding, ejection, retry, re-admission."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
from conftest import Gateway, free_port, start, stop
from openai import OpenAI

from bastion import upstreams
from bastion.config import UpstreamConfig
from bastion.upstreams import UpstreamPool, health_url


def pool(*names: str) -> UpstreamPool:
    return UpstreamPool({n: UpstreamConfig(n, f"http://127.0.0.1:1/{n}") for n in names})


def test_least_outstanding_then_least_recently_used():
    p = pool("a", "b")
    first = p.pick(("a", "b"), set())
    first.outstanding += 1
    second = p.pick(("a", "b"), set())
    assert second is not first
    second.outstanding += 1
    first.outstanding -= 1
    assert p.pick(("a", "b"), set()) is first
    assert p.pick(("a", "b"), {"a", "b"}) is None  # every replica tried


def test_ejection_backoff_doubles_and_success_readmits():
    p = pool("a", "b")
    a = p.replicas["a"]
    p.failed(a, "refused")
    assert not a.available
    assert p.pick(("a", "b"), set()).config.name == "b"
    first_until = a.ejected_until
    p.failed(a, "refused")
    assert a.ejected_until - time.monotonic() > first_until - time.monotonic() + 0.5
    p.succeeded(a)
    assert a.available and a.failures == 0


def test_all_ejected_still_tries_one():
    p = pool("a", "b")
    p.failed(p.replicas["a"], "x")
    p.failed(p.replicas["b"], "x")
    assert p.pick(("a", "b"), set()) is not None
    p.checked(p.replicas["a"], ok=False, why="health check unanswered")
    assert p.replicas["a"].down and not p.replicas["a"].available
    assert p.pick(("a", "b"), set()).config.name == "b"  # found down by a check: last


def test_the_health_check_is_at_the_server_root():
    for url, path, want in [
        ("http://h:8000/v1", "/health", "http://h:8000/health"),
        ("https://vllm.internal/prefix/v1", "/health", "https://vllm.internal/health"),
        ("http://[::1]:8000/v1", "/ping", "http://[::1]:8000/ping"),
    ]:
        assert health_url(UpstreamConfig("a", url, health_path=path)) == want


class Health:
    """A server whose ``GET /health`` answers 200, or (``hang``) never answers."""

    def __init__(self) -> None:
        self.hang = True
        self.checks = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.checks += 1
            if self.hang:
                await reader.read()
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def checked_pool(monkeypatch) -> AsyncIterator[tuple[UpstreamPool, Health]]:
    monkeypatch.setattr(upstreams, "CHECK_TIMEOUT_S", 0.2)
    health = Health()
    server = await asyncio.start_server(health.handle, "127.0.0.1", 0)
    health.port = server.sockets[0].getsockname()[1]
    p = UpstreamPool({"a": UpstreamConfig("a", f"http://127.0.0.1:{health.port}/v1")}, 0.3)
    async with aiohttp.ClientSession() as session:
        await p.start(session)
        yield p, health
        await p.close()
    server.close()


async def until(condition, within: float = 3.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.timeout(20)
async def test_a_hung_replica_stays_out_past_its_backoff_and_is_back_when_a_check_passes(
    checked_pool,
):
    p, health = checked_pool
    a = p.replicas["a"]
    p.failed(a, "upstream sent nothing for 3s")
    assert a.held and not a.available  # at once: a check is under way
    await until(lambda: health.checks >= 1)
    await asyncio.sleep(1.5)  # past the 1 s backoff, several failed checks later
    assert not a.available and a.held and a.ejected_until == 0.0
    health.hang = False
    back = await until(lambda: a.available)
    assert back < 0.3 + 0.2 + 0.2  # within one check interval (and a check's timeout)
    assert a.failures == 1  # only a real success resets the backoff's doubling
    p.succeeded(a)
    assert a.failures == 0


@pytest.mark.timeout(20)
async def test_a_replica_that_answers_checks_but_failed_a_request_serves_its_backoff(
    checked_pool,
):
    p, health = checked_pool
    health.hang = False
    a = p.replicas["a"]
    p.failed(a, "status 503")
    assert a.held
    await until(lambda: not a.held)  # the check passed at once…
    assert not a.available  # …but the 1 s backoff still runs
    await until(lambda: a.available, within=1.5)


TOML = """
refresh_interval_s = 0.2
health_check_interval_s = 0.3

[server]
port = {port}

[database]
url = "sqlite:///{db}"

[[upstreams]]
name = "a"
url = "http://127.0.0.1:{a}/v1"

[[upstreams]]
name = "b"
url = "http://127.0.0.1:{b}/v1"
connect_timeout_s = 1

[[models]]
id = "pair"
endpoints = ["responses", "chat"]
upstreams = ["a", "b"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 1024
"""


def upstream_metric(root: str, name: str, upstream: str) -> float:
    text = httpx.get(root + "/metrics").text
    found = re.search(rf'^{name}\{{upstream="{upstream}"\}} (\S+)$', text, re.M)
    assert found, f"{name}{{upstream={upstream}}} missing"
    return float(found.group(1))


@pytest.mark.timeout(60)
def test_a_killed_replica_is_ejected_retried_around_and_readmitted(tmp_path):
    a_port, b_port, port = free_port(), free_port(), free_port()
    sim_a = start(["sim", "--port", str(a_port)], f"http://127.0.0.1:{a_port}/health")
    sim_b = start(["sim", "--port", str(b_port)], f"http://127.0.0.1:{b_port}/health")
    config = tmp_path / "b.toml"
    config.write_text(TOML.format(port=port, db=tmp_path / "b.db", a=a_port, b=b_port))
    proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz")
    gw = Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config,
                 f"sqlite:///{tmp_path / 'b.db'}", proc)
    try:
        key, account = gw.new_key()
        client = OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=10)

        def ask(n: int) -> None:
            for i in range(n):
                res = client.responses.create(model="pair", input=f"Reply with: r{i}")
                assert res.output_text == f"r{i}"

        ask(10)
        assert upstream_metric(gw.root, "bastion_upstream_requests_total", "b") >= 3

        stop(sim_b)  # killed under load: every request still succeeds
        ask(10)
        assert upstream_metric(gw.root, "bastion_upstream_available", "b") == 0
        assert upstream_metric(gw.root, "bastion_upstream_failures_total", "b") >= 1
        served_by_b = upstream_metric(gw.root, "bastion_upstream_requests_total", "b")

        sim_b = start(["sim", "--port", str(b_port)], f"http://127.0.0.1:{b_port}/health")
        deadline = time.monotonic() + 10
        while upstream_metric(gw.root, "bastion_upstream_available", "b") == 0:
            assert time.monotonic() < deadline, "replica b not re-admitted"
            time.sleep(0.1)
        ask(6)
        assert upstream_metric(gw.root, "bastion_upstream_requests_total", "b") > served_by_b
        rows = gw.settled(account, 26)
        assert len(rows) == 26 and all(r.status == "200" for r in rows)
    finally:
        stop(proc)
        stop(sim_a)
        stop(sim_b)
