"""Several replicas per model: least outstanding, ejection, retry, re-admission."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from conftest import Gateway, free_port, start, stop
from openai import OpenAI

from bastion.config import UpstreamConfig
from bastion.upstreams import UpstreamPool


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
