"""SIGKILL: the streams a dead worker was serving are still charged, and the process that
takes its place says what the dead one held (log and metric).

Real processes: `bastion serve` on PostgreSQL + Redis, one worker restarted by hand on
the same port (as systemd would), and two workers restarted by their supervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Gateway, free_port, start, stop
from openai import AsyncOpenAI

from bastion.money import cost_nanos, parse_usd

TOML = """
refresh_interval_s = 0.5

[database]
url = "{pg}"

[ratelimit]
url = "redis://127.0.0.1:6379/0"

[[upstreams]]
name = "slow"
url = "http://127.0.0.1:{slow}/v1"

[[models]]
id = "m"
upstreams = ["slow"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 200
"""


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def cut_stream(c: AsyncOpenAI) -> int:
    """A 20 s stream; returns how many deltas arrived before the connection broke."""
    deltas = 0
    try:
        stream = await c.responses.create(
            model="m", input="a long answer", stream=True, extra_body={"sim": {"tokens": 100}}
        )
        async for event in stream:
            deltas += event.type == "response.output_text.delta"
    except (openai.APIError, httpx.HTTPError):
        pass
    return deltas


def serve(config: Path, port: int, workers: int, log: Path):
    with open(log, "a") as err:
        return start(
            ["serve", "--config", str(config), "--port", str(port), "--workers", str(workers)],
            f"http://127.0.0.1:{port}/healthz",
            env={**os.environ},
            stderr=err,
        )


@pytest.mark.parametrize("workers", [1, 2], ids=["restarted-by-hand", "restarted-by-supervisor"])
@pytest.mark.timeout(90)
def test_streams_of_a_killed_worker_are_charged_and_the_next_start_reports_it(
    tmp_path, pg_url: str, slow_sim_port: int, workers: int
):
    config = tmp_path / "bastion.toml"
    config.write_text(TOML.format(pg=pg_url, slow=slow_sim_port))
    port, log = free_port(), tmp_path / "gateway.log"
    proc = serve(config, port, workers, log)
    gw = Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config, pg_url, proc)
    try:
        key, account = gw.new_key(credit="1.00")
        time.sleep(1.0)  # every worker knows the key

        async def scenario() -> list[int]:
            async with AsyncOpenAI(base_url=gw.url, api_key=key, max_retries=0) as c:
                streams = [asyncio.create_task(cut_stream(c)) for _ in range(4)]
                await asyncio.sleep(3.0)  # ~15 deltas each, checkpointed every 0.5 s
                for pid in children(proc.pid) if workers > 1 else [proc.pid]:
                    os.kill(pid, signal.SIGKILL)
                return await asyncio.gather(*streams)

        seen = asyncio.run(scenario())
        assert all(5 <= n < 100 for n in seen), seen  # cut mid-way, never finished
        if workers == 1:  # the operator's service manager starts it again
            proc.wait(5)
            gw.proc = proc = serve(config, port, 1, log)
        deadline = time.monotonic() + 15
        while len(rows := gw.ledger(account)) < 4:
            assert time.monotonic() < deadline, (rows, log.read_text()[-2000:])
            time.sleep(0.5)
        assert len(rows) == 4 == len({r.request_id for r in rows})
        for row, delivered in zip(sorted(rows, key=lambda r: r.output_tokens),
                                  sorted(seen), strict=True):  # fmt: skip
            assert row.status == "cancelled" and row.estimated
            assert delivered - 5 <= row.output_tokens <= delivered  # ≤ one checkpoint behind
            assert row.cost == cost_nanos(
                row.input_tokens, row.output_tokens, parse_usd("1.00"), parse_usd("2.00")
            )
        acct = gw.account(account)
        assert acct.balance == parse_usd("1.00") - sum(r.cost - r.uncharged for r in rows) >= 0
        text = log.read_text()
        assert "stopped without a clean shutdown" in text and "credit leases" in text
        assert "charged 4 streams" in text or text.count("charged ") >= 1
        if workers > 1:
            assert "exited with -9; restarting" in text
        metrics = "".join(httpx.get(gw.root + "/metrics").text for _ in range(6))
        assert "bastion_reclaimed_gateways_total 1.0" in metrics
    finally:
        stop(proc)
