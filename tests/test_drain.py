"""SIGTERM drains: in-flight work finishes or ends cleanly, every row is written, exit 0.

Real processes, one worker on SQLite and two workers on PostgreSQL + Redis, with
``drain_timeout_s = 3``: streams shorter than the drain finish normally, longer ones
end at the deadline with the stream error event, and every one has its ledger row.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import Gateway, free_port, start
from openai import AsyncOpenAI

TOML = """
refresh_interval_s = 0.2

[server]
drain_timeout_s = 3

[database]
url = "{db}"

[ratelimit]
url = "{limiter}"

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


@pytest.fixture(params=[1, 2], ids=["1-worker-sqlite", "2-workers-postgres"])
def gateway(request, tmp_path, slow_sim_port: int) -> Iterator[Gateway]:
    workers = request.param
    if workers == 1:
        db, limiter = f"sqlite:///{tmp_path / 'bastion.db'}", "memory://"
    else:
        db, limiter = request.getfixturevalue("pg_url"), "redis://127.0.0.1:6379/0"
    config = tmp_path / "bastion.toml"
    config.write_text(TOML.format(db=db, limiter=limiter, slow=slow_sim_port))
    port = free_port()
    proc = start(
        ["serve", "--config", str(config), "--port", str(port), "--workers", str(workers)],
        f"http://127.0.0.1:{port}/healthz",
        env={**os.environ},
    )
    gw = Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config, db, proc)
    yield gw
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def stream(c: AsyncOpenAI, endpoint: str, tokens: int) -> str:
    """How the stream ended: the last event type, or the error the SDK raised."""
    last = "nothing"
    try:
        if endpoint == "responses":
            s = await c.responses.create(
                model="m", input="x", stream=True, extra_body={"sim": {"tokens": tokens}}
            )
            async for event in s:
                last = event.type
        else:
            s = await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True,
                extra_body={"sim": {"tokens": tokens}},
            )  # fmt: skip
            async for chunk in s:
                last = chunk.choices[0].finish_reason or "delta" if chunk.choices else "usage"
    except openai.APIError as exc:
        return f"error: {exc.message}"
    return last


@pytest.mark.timeout(90)
def test_sigterm_lets_short_streams_finish_ends_long_ones_cleanly_and_writes_every_row(gateway):
    key, account = gateway.new_key()
    if gateway.proc.args[-1] == "2":
        time.sleep(0.5)  # both workers know the key

    async def scenario() -> tuple[list[str], float, bool]:
        async with AsyncOpenAI(base_url=gateway.url, api_key=key, max_retries=0) as c:
            short = [stream(c, e, 10) for e in ("responses", "chat") * 2]  # 2 s at 5 tok/s
            long = [stream(c, e, 100) for e in ("responses", "chat") * 3]  # 20 s
            tasks = [asyncio.create_task(t) for t in short + long]
            await asyncio.sleep(1.0)
            gateway.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.5)
            try:  # the listener is closed: a new connection is refused
                await asyncio.to_thread(httpx.get, gateway.root + "/healthz", timeout=1)
                refused = False
            except httpx.ConnectError:
                refused = True
            ends = await asyncio.gather(*tasks)
            return ends, time.monotonic() - signalled, refused

    ends, took, refused = asyncio.run(scenario())
    assert refused
    assert ends[:4] == ["response.completed", "stop"] * 2, ends  # finished within the drain
    for end in ends[4:]:  # ended at the deadline with the stream error event
        assert end.startswith("error:") and "shutting down" in end, end
    assert took < 3 + 3, took  # the deadline, plus the time to end them
    assert gateway.proc.wait(20) == 0
    rows = gateway.ledger(account)
    assert len(rows) == 10 == len({r.request_id for r in rows})
    assert sorted(r.status for r in rows) == ["200"] * 4 + ["502"] * 6
    for row in rows:
        if row.status == "502":
            assert row.estimated and 5 <= row.output_tokens < 100 and row.cost > 0
    acct = gateway.account(account)
    assert acct.balance == 10_000_000_000 - sum(r.cost - r.uncharged for r in rows)
