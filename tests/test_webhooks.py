"""Webhooks end to end: real `bastion serve` processes POST to a real receiver started here.

The receiver is an aiohttp app on a free port, in a thread of its own, that answers
each attempt as the test scripts it (500, a hang past the sender's timeout, a closed
connection) and otherwise 200, recording everything it was sent. Events are caused
the way production causes them: spending through the gateway with the openai SDK,
top-ups and take-backs through the admin API, and uncharged ledger rows written
through the store (a cost above the balance, with no lease to take it from).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from aiohttp import web
from conftest import Gateway, free_port, start, stop

from bastion.config import ConfigError, WebhooksConfig, load_config, parse_config
from bastion.money import format_usd, parse_usd
from bastion.store import LedgerRow, open_store
from bastion.store.sqlite import sqlite_path
from bastion.webhooks.sender import RETRY_CAP_S, WebhookSender, retry_delay
from bastion.webhooks.sign import HEADER, sign, verify

SECRET = "whsec_test_0123456789"
ADMIN = "webhook-admin-token"

TOML = """
refresh_interval_s = 0.2

[database]
url = "{db}"

[ratelimit]
default_rpm = 100000
default_tpm = 100000000

[webhooks]
url = "{hook}"
secret = "{secret}"
timeout_s = 1
poll_interval_s = 0.1

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"

[[models]]
id = "m"
upstreams = ["sim"]
input_price = "1.00"
output_price = "100.00"
max_output_tokens = 1000
"""


# ---- the receiver -----------------------------------------------------------------------


@dataclass
class Attempt:
    answer: str  # "ok", "500", "hang" (no answer within the sender's timeout), "close"
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A webhook endpoint: answers the next scripted way from ``plan`` (then 200), or 500
    to everything while ``failing``; records every attempt."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.plan: list[str] = []
        self.failing = False
        self.attempts: list[Attempt] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10), "the receiver did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = self.plan.pop(0) if self.plan else "500" if self.failing else "ok"
        self.attempts.append(Attempt(answer, dict(request.headers), body))
        if answer == "hang":
            await asyncio.sleep(3)  # the sender gave up after timeout_s = 1
        elif answer == "close":
            assert request.transport is not None
            request.transport.abort()  # the connection drops without an answer
            await asyncio.sleep(0.1)
        elif answer == "500":
            return web.Response(status=500, text="receiver down")
        return web.Response(status=204)

    def accepted(self, match: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict]:
        return [a.event for a in list(self.attempts) if a.answer == "ok" and match(a.event)]

    def wait(self, match: Callable[[dict[str, Any]], bool], count: int, timeout: float = 20):
        """The first ``count`` accepted events ``match`` allows, once they have arrived."""
        deadline = time.monotonic() + timeout
        while len(found := self.accepted(match)) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} events in {timeout}s"
            time.sleep(0.05)
        return found


def about(account: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["data"].get("account") == account


# ---- gateways ------------------------------------------------------------------------


def serve(tmp: Path, db: str, hook: str, sim: int, name: str = "gw") -> Gateway:
    """A `bastion serve` with webhooks to ``hook``, its log in ``tmp/name.log``."""
    config = tmp / f"{name}.toml"
    config.write_text(TOML.format(db=db, hook=hook, secret=SECRET, sim=sim))
    port = free_port()
    proc = start(
        ["serve", "--config", str(config), "--port", str(port)],
        f"http://127.0.0.1:{port}/healthz",
        env={**os.environ, "BASTION_ADMIN_TOKEN": ADMIN},
        stderr=open(tmp / f"{name}.log", "a"),  # the process's own, closed when it exits
    )
    root = f"http://127.0.0.1:{port}"
    return Gateway(f"{root}/v1", root, config, db, proc)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def hooked(tmp_path_factory, receiver: Receiver, sim_port: int) -> Iterator[Gateway]:
    """One gateway on SQLite sending to ``receiver``: tests tell their events apart by
    account, and leave the receiver healthy."""
    tmp = tmp_path_factory.mktemp("webhooks")
    gw = serve(tmp, f"sqlite:///{tmp / 'bastion.db'}", receiver.url, sim_port)
    yield gw
    stop(gw.proc)


def new_account(gw: Gateway, credit: int) -> tuple[str, str]:
    """A fresh account holding ``credit`` nano-dollars: (name, id)."""
    name = "wh-" + uuid.uuid4().hex[:10]
    account = gw.store_call("create_account", name, credit)
    return name, account.id


def uncharged_row(account_id: str, cost: int) -> LedgerRow:
    """A row written with no lease behind it: what the balance cannot cover is uncharged."""
    return LedgerRow(
        "req_" + uuid.uuid4().hex, account_id, "key_test", "m", "chat", 10, 20, cost, False,
        "200", time.time_ns() // 1000,
    )  # fmt: skip


def outbox(db_url: str) -> dict[str, tuple[Any, ...]]:
    """id -> (type, attempts, delivered_at, given_up_at), read behind the store's back."""
    sql = "SELECT id, type, attempts, delivered_at, given_up_at FROM webhook_outbox"
    if db_url.startswith("sqlite:"):
        conn = sqlite3.connect(sqlite_path(db_url))
        try:
            return {r[0]: tuple(r[1:]) for r in conn.execute(sql)}
        finally:
            conn.close()

    async def read() -> dict[str, tuple[Any, ...]]:
        pg = await asyncpg.connect(db_url)
        try:
            return {r[0]: tuple(r[1:]) for r in await pg.fetch(sql)}
        finally:
            await pg.close()

    return asyncio.run(read())


def metric(gw: Gateway, type_: str, result: str) -> float:
    line = f'bastion_webhook_deliveries_total{{result="{result}",type="{type_}"}} '
    for text in httpx.get(gw.root + "/metrics").text.splitlines():
        if text.startswith(line):
            return float(text.split()[-1])
    return 0.0


# ---- the signature, the schedule, the config ----------------------------------------------


def test_a_signature_verifies_only_for_its_body_secret_and_time() -> None:
    body = b'{"id":"evt_1","type":"t","created_at":"2026-01-01T00:00:00.000000Z","data":{}}'
    header = sign(SECRET, body, timestamp=1_767_225_600)
    assert header.startswith("t=1767225600,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, body, header, now=1_767_225_600 + 299)
    assert not verify(SECRET, body, header, now=1_767_225_600 + 301)  # a replay, too late
    assert not verify("another secret", body, header, now=1_767_225_600)
    assert not verify(SECRET, body.replace(b"evt_1", b"evt_2"), header, now=1_767_225_600)
    rotated = f"{header},v1={'0' * 64}"  # several v1: any one may match (secret rotation)
    assert verify(SECRET, body, rotated, now=1_767_225_600)
    for broken in ("", "t=x,v1=ab", "v1=" + header.split("v1=")[1], "t=1767225600", "t=1,v1=é"):
        assert not verify(SECRET, body, broken, now=1_767_225_600)
    assert verify(SECRET, body, sign(SECRET, body))  # now, by default


def test_the_receiver_check_in_the_docs_accepts_bastions_signature() -> None:
    """docs/operations.md shows a receiver's check in plain Python: it must agree with ours."""
    doc = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    code = doc.split("### Verifying the signature")[1].split("```python\n")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    verified = namespace["verified"]
    body = b'{"id":"evt_1","type":"ledger.uncharged","data":{}}'
    header = sign(SECRET, body)
    assert verified(SECRET, body, header)
    assert not verified("wrong", body, header)
    assert not verified(SECRET, body + b" ", header)
    assert not verified(SECRET, body, sign(SECRET, body, int(time.time()) - 301))
    assert not verified(SECRET, body, "v1=" + header.split("v1=")[1])


def test_retries_back_off_exponentially_with_jitter_up_to_ten_minutes() -> None:
    import random

    rand = random.Random(7)
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (8, 128), (10, 512), (11, 600), (99, 600)]:
        delays = [retry_delay(attempts, rand) for _ in range(200)]
        assert ceiling / 2 <= min(delays) < max(delays) <= ceiling, attempts
    assert RETRY_CAP_S == 600


def test_webhooks_config() -> None:
    assert parse_config({}).webhooks == WebhooksConfig()  # off by default
    with pytest.raises(ConfigError, match=r"webhooks\.secret is empty"):
        parse_config({"webhooks": {"url": "https://hooks.example.com/bastion"}})
    with pytest.raises(ConfigError, match="http"):
        parse_config({"webhooks": {"url": "hooks.example.com", "secret": "s"}})
    with pytest.raises(ConfigError, match="timeout_s must be positive"):
        parse_config({"webhooks": {"url": "https://h.example", "secret": "s", "timeout_s": 0}})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config({"webhooks": {"ur1": "https://h.example"}})
    hooks = load_config(env={"BASTION_WEBHOOKS_SECRET": "from-env"}).webhooks
    assert (hooks.url, hooks.secret, hooks.timeout_s, hooks.max_age_s) == (
        "", "from-env", 10.0, 259_200.0
    )  # fmt: skip
    assert "from-env" not in repr(hooks)  # a logged config never shows the secret


# ---- delivery ---------------------------------------------------------------------------


def test_a_failing_receiver_gets_the_same_signed_event_until_it_accepts(
    hooked: Gateway, receiver: Receiver
) -> None:
    """500, then no answer in time, then a dropped connection, then 2xx: four attempts of
    one event, the same id and body each time, each signed afresh, and then no more."""
    name, account_id = new_account(hooked, 1_000)
    receiver.plan = ["500", "hang", "close"]
    started = len(receiver.attempts)
    [row] = hooked.store_call("write_ledger", [uncharged_row(account_id, 5_000)])
    assert row.uncharged == 4_000
    [event] = receiver.wait(about(name), 1, timeout=30)
    assert event["type"] == "ledger.uncharged" and event["id"].startswith("evt_")
    assert event["data"] == {
        "account": name, "account_id": account_id, "request_id": row.request_id,
        "key_id": "key_test", "model": "m", "cost": "0.000005", "uncharged": "0.000004",
    }  # fmt: skip
    tries = receiver.attempts[started:]
    assert [t.answer for t in tries] == ["500", "hang", "close", "ok"]
    assert {t.body for t in tries} == {tries[0].body}  # byte for byte: one id, one body
    assert all(t.headers["Content-Type"] == "application/json" for t in tries)
    for t in tries:  # what a receiver does with the raw body and the header
        assert verify(SECRET, t.body, t.headers[HEADER], now=t.at)
        assert not verify("wrong", t.body, t.headers[HEADER], now=t.at)
    stamps = [int(t.headers[HEADER].split(",")[0][2:]) for t in tries]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 2  # re-signed per attempt
    time.sleep(1.5)
    assert len(receiver.attempts) == started + 4  # accepted: never sent again
    type_, attempts, delivered_at, given_up_at = outbox(hooked.db_url)[event["id"]]
    assert (type_, attempts, given_up_at) == ("ledger.uncharged", 4, None) and delivered_at
    assert metric(hooked, "ledger.uncharged", "failed") >= 3
    assert metric(hooked, "ledger.uncharged", "delivered") >= 1


def test_balance_low_fires_once_per_crossing(hooked: Gateway, receiver: Receiver) -> None:
    """Spend through the gateway below the alert (one event, however far below), top up
    above it, spend below again (a second event), take credit back through it (a third)."""
    admin = httpx.Client(
        base_url=hooked.root + "/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    name, _ = new_account(hooked, parse_usd("1.00"))
    shown = admin.patch(f"/accounts/{name}", json={"alert_below": "0.50"}).json()
    assert shown["alert_below"] == "0.50"
    _, key = hooked.store_call("create_key", name)
    hooked.wait_for_key(key)
    client = openai.OpenAI(base_url=hooked.url, api_key=key, max_retries=0)
    served = 0

    def spend(times: int) -> None:  # $0.10 of output each, and a little input
        nonlocal served
        for _ in range(times):
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}],
                max_completion_tokens=1000, extra_body={"sim": {"tokens": 1000}},
            )  # fmt: skip
            served += 1
            hooked.settled(name, served)

    def balance() -> int:
        return hooked.account(name).balance

    while balance() >= parse_usd("0.50"):
        spend(1)
    spend(2)  # further below: no new event
    first = receiver.wait(about(name), 1)
    assert admin.post(f"/accounts/{name}/credit", json={"amount": "1.00"}).status_code == 200
    assert balance() >= parse_usd("0.50")  # re-armed
    while balance() >= parse_usd("0.50"):
        spend(1)
    second = receiver.wait(about(name), 2)
    assert second[0] == first[0]
    assert admin.post(f"/accounts/{name}/credit", json={"amount": "0.50"}).status_code == 200
    deadline = time.monotonic() + 10
    while hooked.account(name).reserved:  # idle: the gateway gives its lease back
        assert time.monotonic() < deadline, "the lease was not given back"
        time.sleep(0.2)
    above = balance()
    assert above >= parse_usd("0.50")
    back = "-" + format_usd(above - parse_usd("0.49"))  # down to $0.49: through the alert
    taken = admin.post(f"/accounts/{name}/credit", json={"amount": back})
    assert taken.status_code == 200, taken.text
    events = receiver.wait(about(name), 3)
    time.sleep(1)  # nothing more is coming
    assert len(receiver.accepted(about(name))) == 3
    assert [e["type"] for e in events] == ["account.balance_low"] * 3
    assert [e["data"]["cause"] for e in events] == ["ledger", "ledger", "credit"]
    for e in events:
        data = e["data"]
        low, before = parse_usd(data["balance"]), parse_usd(data["previous_balance"])
        assert low < parse_usd("0.50") <= before
        assert data["alert_below"] == "0.50"
    assert events[2]["data"]["balance"] == "0.49"
    assert len({e["id"] for e in events}) == 3
    admin.close()


def test_an_event_survives_a_restart(tmp_path: Path, sim_port: int) -> None:
    """Stopped while the receiver fails, started again: the event still arrives, same id.
    One made while no gateway runs at all arrives too."""
    with Receiver() as receiver:
        receiver.failing = True
        db = f"sqlite:///{tmp_path / 'bastion.db'}"
        gw = serve(tmp_path, db, receiver.url, sim_port)
        name, account_id = new_account(gw, 100)
        gw.store_call("write_ledger", [uncharged_row(account_id, 300)])
        deadline = time.monotonic() + 10
        while len(receiver.attempts) < 2:
            assert time.monotonic() < deadline, "no attempts"
            time.sleep(0.05)
        stop(gw.proc)
        [failed_id] = {a.event["id"] for a in receiver.attempts}
        gw.store_call("write_ledger", [uncharged_row(account_id, 50)])  # no gateway running
        receiver.failing = False
        gw = serve(tmp_path, db, receiver.url, sim_port)
        try:
            events = receiver.wait(about(name), 2)
        finally:
            stop(gw.proc)
        # the retried one may come second: the new one was due at once, it was backing off
        by_id = {e["id"]: e["data"]["uncharged"] for e in events}
        assert by_id[failed_id] == "0.0000002"
        assert sorted(by_id.values()) == ["0.00000005", "0.0000002"]
        assert all(delivered for _, _, delivered, _ in outbox(db).values())


def test_an_event_too_old_is_given_up(tmp_path: Path) -> None:
    """The sender run in-process against a receiver that never accepts: past max_age_s
    the event is given up (logged, counted), and nothing more is sent."""

    async def scenario(receiver: Receiver) -> tuple[int, WebhookSender]:
        store = open_store(f"sqlite:///{tmp_path / 'b.db'}")
        config = WebhooksConfig(receiver.url, SECRET, timeout_s=1, max_age_s=2.5,
                                poll_interval_s=0.05)  # fmt: skip
        sender = WebhookSender(store, config)
        await store.add_event("evt_old", "key.limit_reached", {"key_id": "key_1"})
        sender.start()
        await asyncio.sleep(5)
        await sender.close()
        sent = len(receiver.attempts)
        await store.close()
        return sent, sender

    with Receiver() as receiver:
        receiver.failing = True
        sent, sender = asyncio.run(scenario(receiver))
    assert 2 <= sent <= 4  # 0 s, then 0.5-1 s, then 1-2 s later (the next would be too late)
    assert sender.deliveries["key.limit_reached", "given_up"] == 1
    assert sender.deliveries["key.limit_reached", "failed"] == sent - 1
    [(_, attempts, delivered_at, given_up_at)] = outbox(f"sqlite:///{tmp_path / 'b.db'}").values()
    assert (attempts, delivered_at) == (sent, None) and given_up_at


def test_two_replicas_send_each_event_once(tmp_path: Path, pg_url: str, sim_port: int) -> None:
    """Two gateways on one PostgreSQL, a healthy receiver: every event arrives exactly once,
    and add_event's repeats of an id are the same event."""
    with Receiver() as receiver:
        a = serve(tmp_path, pg_url, receiver.url, sim_port, "a")
        b = serve(tmp_path, pg_url, receiver.url, sim_port, "b")
        try:
            name, account_id = new_account(a, 1_000)
            made = 0
            for burst in range(3):
                rows = [uncharged_row(account_id, 2_000) for _ in range(12)]
                a.store_call("write_ledger", rows)  # one transaction, 12 events
                for i in range(4):
                    data = {  # as the gateway records it when it refuses a key over its limit
                        "key_id": f"key_{i}", "account": name, "account_id": account_id,
                        "limit": "5.00", "limit_reset": "monthly",
                        "period_start": "2026-01-01T00:00:00.000000Z",
                        "resets_at": "2026-02-01T00:00:00.000000Z",
                    }  # fmt: skip
                    b.store_call("add_event", f"evt_limit_{burst}_{i}", "key.limit_reached", data)
                    b.store_call("add_event", f"evt_limit_{burst}_{i}", "key.limit_reached", data)
                made += 16
                time.sleep(0.2)
            events = receiver.wait(about(name), made)
            time.sleep(2)  # time for any duplicate to show
            ids = [e["id"] for e in receiver.accepted(about(name))]
            assert len(ids) == len(set(ids)) == made == 48
            assert len(receiver.attempts) == made  # no failed attempt either
            by_type = {t: sum(e["type"] == t for e in events) for t in {e["type"] for e in events}}
            assert by_type == {"ledger.uncharged": 36, "key.limit_reached": 12}
            sent = [metric(gw, t, "delivered") for gw in (a, b) for t in by_type]
            assert sum(sent) == 48  # each by one replica
            assert all(row[2] for row in outbox(pg_url).values())
        finally:
            stop(a.proc)
            stop(b.proc)
