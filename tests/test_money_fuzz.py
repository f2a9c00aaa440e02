"""A randomized money test: under a random mix of traffic, the books stay exact.

Two `bastion serve` replicas share one fresh PostgreSQL database and Redis. Sixteen
client loops send random requests to either of them: both endpoints, stream or not,
every cap field, cached and reasoning tokens, bogus usage reports, OpenAI's
`usage: null` chunks, upstream faults (cut, 500, malformed, error event, hang, stall),
and clients that leave mid-stream or mid-request. Accounts have little credit (so
402s happen); meanwhile random top-ups and take-backs go through the admin API of
either replica, and keys are revoked and replaced.

What it proves, once both replicas have written everything:
- Bastion never answers 500 (or anything else unexpected: no 429, no 401 for a live
  key, no 502 or broken stream from a healthy model);
- `bastion audit` finds the books in order;
- every ledger row, estimated or not, costs exactly the price of its tokens, has no
  negative tokens, cached ≤ input, reasoning ≤ output, 0 ≤ uncharged ≤ cost, and a
  unique request id;
- every request answered 200 has a row, so there are at least as many rows as 200
  answers, and one a healthy model answered in full has status "200";
- every balance is ≥ 0 and equals the credits granted minus Σ (cost − uncharged).

BASTION_FUZZ_SEED picks the random choices (each client loop has its own generator, so
a seed replays the same choices; which key they land on and how requests interleave
still depend on timing) and BASTION_FUZZ_SECONDS how long traffic runs. `make fuzz-money`
runs it long, on a random seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port, start, stop
from openai import AsyncOpenAI

from bastion.money import cost_nanos, format_usd, parse_usd
from bastion.store import LedgerRow, open_store

SEED = int(os.environ.get("BASTION_FUZZ_SEED", "20261205"))
SECONDS = float(os.environ.get("BASTION_FUZZ_SECONDS", "20"))
CLIENTS = 16
ADMIN_TOKEN = "fuzz-admin-token"
REDIS_URL = "redis://127.0.0.1:6379/0"
RERUN = f"BASTION_FUZZ_SEED={SEED} BASTION_FUZZ_SECONDS={SECONDS:g} make fuzz-money"


# ---- the catalogue: one table gives the config and the prices the rows are checked with --


@dataclass(frozen=True)
class Model:
    upstream: str
    input_price: str
    output_price: str
    cap: int  # max_output_tokens
    cached_price: str | None = None  # None: the input price
    upstream_model: str | None = None  # "m@fault": the simulator's fault mode

    @property
    def fault(self) -> bool:
        return self.upstream_model is not None

    def prices(self) -> tuple[int, int, int]:
        """(input, cached input, output) in nano-dollars per 1M tokens."""
        cached = self.cached_price or self.input_price
        return parse_usd(self.input_price), parse_usd(cached), parse_usd(self.output_price)


MODELS = {
    "fz-cheap": Model("fast", "0.15", "0.60", 128, cached_price="0.03"),
    "fz-dear": Model("fast", "2.50", "10.00", 256),
    "fz-slow": Model("slow", "0.70", "2.80", 64, cached_price="0.35"),
    "fz-cut": Model("faulty", "1.00", "4.00", 128, "0.25", "m@cut"),
    "fz-500": Model("faulty", "1.00", "4.00", 128, None, "m@500"),
    "fz-malformed": Model("faulty", "0.50", "1.50", 96, "0.10", "m@malformed"),
    "fz-error-event": Model("faulty", "0.80", "3.20", 128, "0.20", "m@error-event"),
    "fz-hang": Model("impatient", "1.00", "4.00", 64, None, "m@hang"),
    "fz-stall": Model("impatient", "1.00", "4.00", 64, "0.50", "m@stall"),
}
HEALTHY = [name for name, m in MODELS.items() if not m.fault]
FAULTY = [name for name, m in MODELS.items() if m.fault]

TOML = """
refresh_interval_s = 0.5

[database]
url = "{pg}"

[ratelimit]
url = "{redis}"
default_rpm = 100000
default_tpm = 100000000

[[upstreams]]
name = "fast"
url = "http://127.0.0.1:{sim}/v1"

[[upstreams]]
name = "faulty"
url = "http://127.0.0.1:{sim}/v1"

[[upstreams]]
name = "slow"
url = "http://127.0.0.1:{slow}/v1"

[[upstreams]]
name = "impatient"
url = "http://127.0.0.1:{sim}/v1"
read_timeout_s = 1
"""


def model_toml(name: str, m: Model) -> str:
    lines = [
        "[[models]]",
        f'id = "{name}"',
        'endpoints = ["responses", "chat"]',
        f'upstreams = ["{m.upstream}"]',
        f'input_price = "{m.input_price}"',
        f'output_price = "{m.output_price}"',
        f"max_output_tokens = {m.cap}",
    ]
    if m.cached_price is not None:
        lines.append(f'cached_input_price = "{m.cached_price}"')
    if m.upstream_model is not None:
        lines.append(f'upstream_model = "{m.upstream_model}"')
    return "\n".join(lines) + "\n"


def config_text(pg: str, sim: int, slow: int) -> str:
    head = TOML.format(pg=pg, redis=REDIS_URL, sim=sim, slow=slow)
    return head + "\n" + "\n".join(model_toml(n, m) for n, m in MODELS.items())


# ---- the cluster -------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    root: str  # http://127.0.0.1:PORT
    log: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return self.root + "/v1"


@pytest.fixture
def cluster(tmp_path, pg_url: str, sim_port: int, slow_sim_port: int) -> Iterator[tuple]:
    config = tmp_path / "bastion.toml"
    config.write_text(config_text(pg_url, sim_port, slow_sim_port))
    replicas = []
    for name in ("a", "b"):
        port = free_port()
        log = tmp_path / f"{name}.log"
        proc = start(
            ["serve", "--config", str(config), "--port", str(port)],
            f"http://127.0.0.1:{port}/healthz",
            env={**os.environ, "BASTION_ADMIN_TOKEN": ADMIN_TOKEN},
            stderr=open(log, "w"),
        )
        replicas.append(Replica(name, f"http://127.0.0.1:{port}", log, proc))
    yield replicas, config, pg_url
    for replica in replicas:
        stop(replica.proc)


# ---- accounts and keys, made and changed through the admin API ---------------------------


@dataclass
class Key:
    id: str
    secret: str
    account: str
    revoked: bool = False  # set just before the revoke is sent


@dataclass
class Books:
    """What the test granted: the expected side of every balance."""

    credits: dict[str, int] = field(default_factory=dict)  # account name -> nano-dollars
    ids: dict[str, str] = field(default_factory=dict)  # account name -> account id
    keys: list[Key] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def live_keys(self) -> list[Key]:
        return [k for k in self.keys if not k.revoked]


async def admin(http: httpx.AsyncClient, replica: Replica, method: str, path: str, body=None):
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    url = replica.root + "/admin/v1" + path
    return await http.request(method, url, json=body, headers=headers, timeout=20)


async def wait_for_key(http: httpx.AsyncClient, replicas: list[Replica], key: Key) -> None:
    """Until every replica accepts the key (refresh_interval_s is 0.5 s)."""
    headers = {"Authorization": f"Bearer {key.secret}"}
    for replica in replicas:
        deadline = time.monotonic() + 5
        while (await http.get(replica.url + "/models", headers=headers)).status_code != 200:
            assert time.monotonic() < deadline, f"key {key.id} unknown to {replica.name} after 5s"
            await asyncio.sleep(0.05)


async def new_key(http, replicas: list[Replica], replica: Replica, books: Books, account: str):
    answer = await admin(http, replica, "POST", "/keys", {"account": account, "name": "fuzz"})
    assert answer.status_code == 201, answer.text
    made = answer.json()
    key = Key(made["id"], made["key"], account)
    await wait_for_key(http, replicas, key)
    books.keys.append(key)


async def open_accounts(http, replicas: list[Replica], books: Books, rng: random.Random) -> None:
    for i in range(5):
        name = f"fuzz-{i}"
        credit = rng.choice(["0.002", "0.005", "0.01", "0.03"])
        body = {"name": name, "credit": credit}
        answer = await admin(http, replicas[0], "POST", "/accounts", body)
        assert answer.status_code == 201, answer.text
        books.credits[name] = parse_usd(credit)
        books.ids[name] = answer.json()["id"]
        for _ in range(rng.randint(2, 3)):
            await new_key(http, replicas, rng.choice(replicas), books, name)


async def top_up(http, replica: Replica, books: Books, rng: random.Random) -> None:
    """Credit, or now and then take some back (409 when the balance is too low)."""
    name = rng.choice(sorted(books.credits))
    amount = rng.choice(["0.0002", "0.0005", "0.001", "0.003", "0.01"])
    if rng.random() < 0.1:
        amount = "-" + rng.choice(["0.0001", "0.001", "0.005"])
    answer = await admin(http, replica, "POST", f"/accounts/{name}/credit", {"amount": amount})
    if answer.status_code == 200:
        books.credits[name] += parse_usd(amount)
    elif not (answer.status_code == 409 and amount.startswith("-")):
        books.problems.append(f"credit {amount} to {name} on {replica.name}: {answer.text}")


async def replace_a_key(http, replicas: list[Replica], books: Books, rng: random.Random) -> None:
    key = rng.choice(books.live_keys())
    key.revoked = True
    replica = rng.choice(replicas)
    answer = await admin(http, replica, "POST", f"/keys/{key.id}/revoke")
    if answer.status_code != 200:
        books.problems.append(f"revoke {key.id} on {replica.name}: {answer.text}")
    await new_key(http, replicas, rng.choice(replicas), books, key.account)


async def admin_loop(replicas: list[Replica], books: Books, rng: random.Random, until: float):
    async with httpx.AsyncClient() as http:
        while time.monotonic() < until:
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            if rng.random() < 0.08:
                await replace_a_key(http, replicas, books, rng)
            else:
                await top_up(http, rng.choice(replicas), books, rng)


# ---- one random request ------------------------------------------------------------------


@dataclass
class Plan:
    replica: Replica
    key: Key
    model: str
    endpoint: str  # "responses" | "chat"
    stream: bool
    body: dict  # everything but "model" and "stream"
    raw: bool  # raw httpx instead of the openai SDK
    leave_after_events: int | None = None  # a stream the client closes after k events
    leave_after_s: float | None = None  # a JSON request the client cancels


WORDS = "the gateway meters every token exactly, café naïve 東京 🙂 nano dollars".split()


def some_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


def caps(rng: random.Random, endpoint: str, cap: int) -> dict:
    """Any mix of cap fields, each within the model's maximum (so never a 400)."""
    if endpoint == "responses":
        return {"max_output_tokens": rng.randint(1, cap)} if rng.random() < 0.6 else {}
    shape = rng.choice(["none", "max_completion_tokens", "max_tokens", "both"])
    if shape == "none":
        return {}
    if shape != "both":
        return {shape: rng.randint(1, cap)}
    first = rng.randint(1, cap)
    second = rng.choice([v for v in (rng.randint(1, cap), first - 1, first + 1) if 1 <= v <= cap]
                        or [first])  # fmt: skip
    return {"max_completion_tokens": first, "max_tokens": second}


BOGUS_REPORTS = [
    {"output_tokens": 10**19},
    {"input_tokens": 10**12},
    {"output_tokens": 10**6},
    {"input_tokens": 300},  # over the bound of a short prompt, within the 2x slack: uncharged
    {"input_tokens": 900, "output_tokens": 3},
    {"cached_tokens": 10**6},
    {"reasoning_tokens": 10**6},
    {"cached_tokens": -1},
    {"output_tokens": -5},
    {"input_tokens": 0, "output_tokens": 0},
]


def sim_options(rng: random.Random, model: str) -> dict:
    sim: dict = {"tokens": rng.randint(1, 30 if model == "fz-slow" else 300)}
    if rng.random() < 0.3:
        sim["cached_tokens"] = rng.randint(0, 200)
    if rng.random() < 0.3:
        sim["reasoning_tokens"] = rng.randint(0, 300)
    if rng.random() < 0.06:
        sim["report"] = rng.choice(BOGUS_REPORTS)
    return sim


def plan(rng: random.Random, replicas: list[Replica], books: Books) -> Plan:
    keys = books.live_keys()
    if rng.random() < 0.05:  # now and then a key that is (being) revoked
        keys = [k for k in books.keys if k.revoked] or keys
    model = rng.choice(FAULTY) if rng.random() < 0.12 else rng.choice(HEALTHY)
    endpoint = rng.choice(["responses", "chat"])
    stream = rng.random() < 0.5
    body: dict = caps(rng, endpoint, MODELS[model].cap)
    body["sim"] = sim_options(rng, model)
    if endpoint == "responses":
        body["input"] = some_text(rng)
    else:
        body["messages"] = [
            {"role": rng.choice(["system", "user"]), "content": some_text(rng)}
            for _ in range(rng.randint(1, 3))
        ]
        if stream and rng.random() < 0.4:
            body["stream_options"] = {"include_usage": True}
            body["sim"]["usage_null_chunks"] = rng.random() < 0.7
    leaves = rng.random() < (0.5 if model == "fz-slow" else 0.2)
    return Plan(
        replica=rng.choice(replicas),
        key=rng.choice(keys),
        model=model,
        endpoint=endpoint,
        stream=stream,
        body=body,
        raw=rng.random() < 0.25,
        leave_after_events=rng.randint(0, 15) if leaves and stream else None,
        leave_after_s=rng.uniform(0.005, 0.6) if leaves and not stream else None,
    )


@dataclass
class Outcome:
    status: str  # the HTTP status the client got, or "left" / "conn-error" / "bad-body"
    request_id: str | None = None
    broke: str = ""  # how a 200 answer ended early: "left", "stream-error", "conn-error", …
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{self.status}/{self.broke}" if self.broke else self.status


def broken(exc: Exception) -> str:
    """How a stream that had begun with 200 broke, by what the client raised."""
    if isinstance(exc, ValueError):  # an event that is not JSON
        return "bad-body"
    if isinstance(exc, httpx.TransportError | openai.APIConnectionError):
        return "conn-error"
    return "stream-error"


STREAM_FAILURES = (openai.APIError, httpx.TransportError, ValueError)


async def via_sdk(client: AsyncOpenAI, p: Plan) -> Outcome:
    body = {k: v for k, v in p.body.items() if k != "sim"}
    extra = {"extra_body": {"sim": p.body["sim"]}}
    if p.endpoint == "responses":
        create = client.responses.create
    else:
        create = client.chat.completions.create
    if not p.stream:
        answer = await create(model=p.model, **body, **extra)
        return Outcome("200", answer._request_id)
    stream = await create(model=p.model, stream=True, **body, **extra)
    outcome = Outcome("200", stream.response.headers.get("x-request-id"))
    events = 0
    try:
        async for _ in stream:
            if events == p.leave_after_events:
                await stream.close()
                outcome.broke = "left"
                return outcome
            events += 1
    except STREAM_FAILURES as exc:
        outcome.broke, outcome.detail = broken(exc), f"{type(exc).__name__}: {exc}"
    return outcome


async def via_httpx(http: httpx.AsyncClient, p: Plan) -> Outcome:
    path = "/responses" if p.endpoint == "responses" else "/chat/completions"
    body = {"model": p.model, **p.body, **({"stream": True} if p.stream else {})}
    headers = {"Authorization": f"Bearer {p.key.secret}"}
    async with http.stream("POST", p.replica.url + path, json=body, headers=headers) as answer:
        outcome = Outcome(str(answer.status_code), answer.headers.get("x-request-id"))
        if answer.status_code != 200 or not p.stream:
            text = await answer.aread()
            try:
                json.loads(text)
            except ValueError:
                outcome.broke, outcome.detail = "bad-body", repr(text[:200])
            return outcome
        events = 0
        try:
            async for line in answer.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if events == p.leave_after_events:
                    outcome.broke = "left"
                    return outcome
                events += 1
                if is_error_event(line[5:].strip()):
                    outcome.broke, outcome.detail = "stream-error", line[:200]
                    return outcome
        except STREAM_FAILURES as exc:
            outcome.broke, outcome.detail = broken(exc), f"{type(exc).__name__}: {exc}"
        return outcome


def is_error_event(data: str) -> bool:
    """A stream's error event: responses' {"type": "error"}, chat's {"error": …}."""
    if data == "[DONE]":
        return False
    event = json.loads(data)
    return "error" in event or event.get("type") == "error"


async def send(p: Plan, sdk: AsyncOpenAI, http: httpx.AsyncClient) -> Outcome:
    """Send one planned request; every way it can end becomes an Outcome."""
    go = via_httpx(http, p) if p.raw else via_sdk(sdk, p)
    try:
        if p.leave_after_s is not None:
            return await asyncio.wait_for(go, p.leave_after_s)
        return await go
    except TimeoutError:
        return Outcome("left")
    except openai.APIStatusError as exc:
        return Outcome(str(exc.status_code), exc.request_id, detail=exc.message[:200])
    except (openai.APIConnectionError, httpx.TransportError) as exc:
        return Outcome("conn-error", detail=f"{type(exc).__name__}: {exc}")
    except (openai.APIError, ValueError) as exc:
        return Outcome("bad-body", detail=f"{type(exc).__name__}: {exc}")


def expected_labels(p: Plan) -> set[str]:
    """Every healthy way a request can end; 502 and broken streams only from a fault."""
    expected = {"200", "402", "left", "200/left"}
    if p.key.revoked:
        expected.add("401")
    if MODELS[p.model].fault:
        expected |= {"502", "200/stream-error"}
    if p.model == "fz-malformed" and p.stream:
        expected.add("200/bad-body")  # the upstream's invalid event is relayed as it came
    return expected


def judge(p: Plan, o: Outcome) -> str | None:
    """What is wrong with this outcome, if anything."""
    if o.label in expected_labels(p):
        return None
    what = "Bastion answered 500" if o.status == "500" else f"unexpected {o.label}"
    sent = {"model": p.model, "stream": p.stream, **p.body}
    return (
        f"{what} ({'httpx' if p.raw else 'sdk'} → {p.replica.name}/{p.endpoint}, key {p.key.id}"
        f", request {o.request_id}): {o.detail} — sent {json.dumps(sent)[:400]}"
    )


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    served: set[str] = field(default_factory=set)  # request ids answered 200
    complete: set[str] = field(default_factory=set)  # ... by a healthy model, read to the end
    problems: list[str] = field(default_factory=list)

    @property
    def answered_200(self) -> int:
        return sum(n for label, n in self.counts.items() if label.split("/")[0] == "200")

    def record(self, p: Plan, o: Outcome) -> None:
        self.counts[o.label] += 1
        if problem := judge(p, o):
            self.problems.append(problem)
        if o.status == "200":
            if o.request_id is None:
                self.problems.append(f"a 200 without x-request-id ({p.model}, {p.endpoint})")
                return
            self.served.add(o.request_id)
            # a faulty upstream may hold a stream open after its last event ("m@stall" with
            # one token): the client has it all, the row says "cancelled"; so healthy only
            if not o.broke and not MODELS[p.model].fault:
                self.complete.add(o.request_id)


async def client_loop(i: int, replicas, books: Books, tally: Tally, until: float) -> None:
    rng = random.Random(f"{SEED}/client/{i}")
    async with httpx.AsyncClient(timeout=20) as http:
        sdks: dict[tuple[str, str], AsyncOpenAI] = {}
        while time.monotonic() < until:
            p = plan(rng, replicas, books)
            sdk = sdks.get((p.replica.name, p.key.id))
            if sdk is None:
                sdk = AsyncOpenAI(base_url=p.replica.url, api_key=p.key.secret,
                                  max_retries=0, timeout=20)  # fmt: skip
                sdks[p.replica.name, p.key.id] = sdk
            tally.record(p, await send(p, sdk, http))
        for sdk in sdks.values():
            await sdk.close()


# ---- after the traffic: wait for the ledger, then read the books -------------------------


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


QUIET_S = 60


async def quiesce(replicas: list[Replica]) -> None:
    """Until no replica has a request in flight or a row waiting to be written."""
    deadline = time.monotonic() + QUIET_S
    async with httpx.AsyncClient() as http:
        for replica in replicas:
            while True:
                text = (await http.get(replica.root + "/metrics")).text
                if metric(text, "bastion_ledger_queue") == 0 == metric(text, "bastion_in_flight"):
                    break
                assert time.monotonic() < deadline, f"{replica.name} still busy after {QUIET_S}s"
                await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)


def run_audit(config: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "audit", "--json", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        ok = json.loads(result.stdout)["ok"] is True
    except (ValueError, KeyError):
        ok = False
    if result.returncode == 0 and ok:
        return []
    return [f"audit exit {result.returncode}:\n{result.stdout}\n{result.stderr}"]


def row_problems(row: LedgerRow) -> list[str]:
    tokens = (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens)
    i_price, c_price, o_price = MODELS[row.model].prices()
    exact = cost_nanos(
        row.input_tokens, row.output_tokens, i_price, o_price, row.cached_input_tokens, c_price
    )
    checks = {
        "a negative token count": min(tokens) >= 0,
        "cached > input": row.cached_input_tokens <= row.input_tokens,
        "reasoning > output": row.reasoning_tokens <= row.output_tokens,
        f"cost is not the exact price {exact}": row.cost == exact,
        "uncharged outside [0, cost]": 0 <= row.uncharged <= row.cost,
        "an unknown status": row.status in ("200", "502", "cancelled"),
    }
    return [f"row {row} has {what}" for what, ok in checks.items() if not ok]


def ledger_summary(rows: list[LedgerRow]) -> str:
    statuses = Counter(r.status for r in rows)
    return (
        f"ledger: {len(rows)} rows {dict(statuses)}, {sum(r.estimated for r in rows)} estimated,"
        f" {sum(r.cached_input_tokens > 0 for r in rows)} with cached input,"
        f" {sum(r.reasoning_tokens > 0 for r in rows)} with reasoning,"
        f" {sum(r.uncharged > 0 for r in rows)} partly uncharged"
        f" ({format_usd(sum(r.uncharged for r in rows))} USD)"
    )


async def book_problems(pg: str, books: Books, tally: Tally) -> list[str]:
    store = open_store(pg)
    try:
        rows = await store.usage()
        accounts = {name: await store.get_account(name) for name in books.credits}
    finally:
        await store.close()
    print(ledger_summary(rows))
    problems = [p for row in rows for p in row_problems(row)]
    by_id = {row.request_id: row for row in rows}
    if len(by_id) != len(rows):
        problems.append(f"{len(rows) - len(by_id)} duplicate request ids in the ledger")
    if missing := tally.served - by_id.keys():
        problems.append(f"{len(missing)} requests answered 200 have no row: {sorted(missing)[:5]}")
    for rid in tally.complete & by_id.keys():
        if by_id[rid].status != "200":
            problems.append(f"request {rid} was answered 200 in full but its row says {by_id[rid]}")
    if len(rows) < tally.answered_200:
        problems.append(f"{len(rows)} rows for {tally.answered_200} answers of 200")
    for name, account in accounts.items():
        mine = [r for r in rows if r.account_id == books.ids[name]]
        expected = books.credits[name] - sum(r.cost - r.uncharged for r in mine)
        if account.balance < 0 or account.balance != expected:
            problems.append(
                f"account {name}: balance {format_usd(account.balance)}, expected"
                f" {format_usd(expected)} (credits {format_usd(books.credits[name])},"
                f" {len(mine)} rows)"
            )
    return problems


def report(problems: list[str], tally: Tally, replicas: list[Replica]) -> str:
    lines = [
        f"money fuzz failed (seed {SEED}); rerun with: {RERUN}",
        f"outcomes: {dict(sorted(tally.counts.items()))}",
        f"{len(problems)} problems:",
        *problems[:30],
    ]
    for replica in replicas:
        tail = replica.log.read_text(errors="replace").splitlines()[-40:]
        lines += [f"---- replica {replica.name} log tail ({replica.log}):", *tail]
    return "\n".join(lines)


# ---- the test ----------------------------------------------------------------------------


@pytest.mark.timeout(int(SECONDS) + 120)
def test_random_traffic_keeps_the_books_exact(cluster):
    replicas, config, pg = cluster
    books, tally = Books(), Tally()

    async def scenario() -> list[str]:
        rng = random.Random(f"{SEED}/admin")
        async with httpx.AsyncClient() as http:
            await open_accounts(http, replicas, books, rng)
        until = time.monotonic() + SECONDS
        await asyncio.gather(
            admin_loop(replicas, books, rng, until),
            *(client_loop(i, replicas, books, tally, until) for i in range(CLIENTS)),
        )
        await quiesce(replicas)
        return await book_problems(pg, books, tally)

    try:
        problems = asyncio.run(scenario())
    except Exception as exc:  # a helper's own assertion: still say how to rerun
        problems = [f"{type(exc).__name__}: {exc}"]
    problems = tally.problems + books.problems + problems + run_audit(config)
    print(f"money fuzz, seed {SEED}, {SECONDS:g} s: {dict(sorted(tally.counts.items()))}")
    assert not problems, report(problems, tally, replicas)
