"""PostgreSQL refused for 20 s, or black-holed for 40 s, under steady traffic: prompt 503s
rather than hangs, a quiet log (a line per state change, no tracebacks), nothing served is
lost, and service resumes by itself. A TCP proxy of our own stands between Bastion and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse

import httpx
import pytest
from conftest import Gateway, free_port, shared_store_toml, start, stop
from faultproxy import FaultProxy

from bastion.money import parse_usd


@pytest.mark.parametrize("mode,outage_s", [("refuse", 20), ("blackhole", 40)])
@pytest.mark.timeout(120)
def test_postgres_outage_503s_promptly_logs_quietly_loses_nothing(
    tmp_path, pg_url: str, sim_port: int, mode: str, outage_s: int
):
    parts = urllib.parse.urlsplit(pg_url)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    config = tmp_path / "bastion.toml"
    config.write_text(
        shared_store_toml(
            proxy.url_for(pg_url), sim_port, max_output_tokens=50, top="lease_ttl_s = 8\n"
        )
    )
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with open(log_path, "w") as log_file:
        proc = start(
            ["serve", "--config", str(config), "--port", str(port)],
            f"http://127.0.0.1:{port}/healthz",
            env={**os.environ},
            stderr=log_file,
        )
    gw = Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config, pg_url, proc)
    try:
        key, account = gw.new_key(credit="5.00")
        outcomes: list[tuple[float, int, float]] = []  # (when, status, seconds)

        async def traffic(until: float) -> None:
            headers = {"Authorization": f"Bearer {key}"}
            body = {"model": "m", "input": "x", "max_output_tokens": 10}
            async with httpx.AsyncClient(timeout=30) as c:
                while time.monotonic() < until:
                    sent = time.monotonic()
                    answer = await c.post(gw.url + "/responses", json=body, headers=headers)
                    outcomes.append((sent, answer.status_code, time.monotonic() - sent))
                    await asyncio.sleep(0.02)

        async def scenario() -> dict[str, float]:
            marks = {"out": time.monotonic() + 2}
            marks["back"] = marks["out"] + outage_s
            task = asyncio.create_task(traffic(marks["back"] + 10))
            await asyncio.sleep(marks["out"] - time.monotonic())
            getattr(proxy, mode)()
            await asyncio.sleep(marks["back"] - time.monotonic())
            proxy.passing()
            await task
            return marks

        marks = asyncio.run(scenario())
        statuses = {s for _, s, _ in outcomes}
        assert statuses <= {200, 503}, statuses
        slowest = max(seconds for _, _, seconds in outcomes)
        assert slowest < 12, slowest  # a black hole costs at most the store timeouts, never a hang
        assert any(s == 503 for w, s, _ in outcomes if w < marks["back"])
        recovered = [w for w, s, _ in outcomes if w > marks["back"] and s == 200]
        assert recovered and recovered[0] - marks["back"] < 8  # by itself, within seconds
        log = log_path.read_text()
        assert "Traceback" not in log, log[-3000:]
        assert len(log.splitlines()) < 40, log  # state changes, not a line per request
        metrics = httpx.get(gw.root + "/metrics").text
        refusals = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("bastion_credit_unavailable_total ")
        )
        assert refusals == sum(1 for _, s, _ in outcomes if s == 503)  # counted, not logged
        time.sleep(2)
        rows = gw.ledger(account)
        assert len(rows) >= sum(1 for _, s, _ in outcomes if s == 200)
        assert len(rows) == len({r.request_id for r in rows})
        acct = gw.account(account)
        assert acct.balance == parse_usd("5.00") - sum(r.cost - r.uncharged for r in rows) >= 0
    finally:
        stop(proc)
        proxy.stop()
