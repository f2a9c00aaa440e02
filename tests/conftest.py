"""Real processes for the gateway tests: `bastion sim` upstreams and a `bastion serve`.

Nothing is mocked: the gateway runs as the operator would run it, from a TOML file,
on a fresh SQLite ledger, in front of simulator processes; the client is the
official `openai` SDK. Each test makes its own account and key through the store.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bastion.money import parse_usd
from bastion.store import Account, LedgerRow, Store, open_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


def start(args: list[str], health: str, **kwargs: object) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", *args],
        stdout=subprocess.DEVNULL,
        stderr=kwargs.pop("stderr", None),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        wait_http(health, proc)
    except BaseException:
        stop(proc)  # a process that never came up must not outlive the test run
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


REDIS_URL = "redis://127.0.0.1:6379/0"


def shared_store_toml(
    pg: str,
    sim: int,
    redis: str = REDIS_URL,
    *,
    max_output_tokens: int = 1000,
    top: str = "",
) -> str:
    """A gateway on PostgreSQL and Redis with one model ``m`` ($1/$2 per 1M tokens) on
    one simulator: what the scale-out and outage tests run as several replicas.
    ``top``: more top-level keys (``lease_ttl_s = 8``)."""
    return f"""
refresh_interval_s = 0.5
{top}
[database]
url = "{pg}"

[ratelimit]
url = "{redis}"
default_rpm = 100000
default_tpm = 100000000

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"

[[models]]
id = "m"
endpoints = ["responses", "chat"]
upstreams = ["sim"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = {max_output_tokens}
"""


def start_replicas(
    config: Path, db_url: str, n: int = 2, env: dict[str, str] | None = None
) -> list[Gateway]:
    """``n`` `bastion serve` processes on one config (one shared store); ``stop`` each."""
    gateways = []
    for _ in range(n):
        port = free_port()
        proc = start(
            ["serve", "--config", str(config), "--port", str(port)],
            f"http://127.0.0.1:{port}/healthz",
            env={**os.environ, **(env or {})},
        )
        root = f"http://127.0.0.1:{port}"
        gateways.append(Gateway(root + "/v1", root, config, db_url, proc))
    return gateways


def mixed_burst(a: Gateway, b: Gateway, key: str, n: int = 200) -> list[str]:
    """``n`` concurrent requests of 1,000 output tokens with ``key``, alternating between
    the two gateways; every fourth a Responses stream, the rest chat JSON. Each outcome is
    "ok" or "<status> <code>"."""
    from openai import APIStatusError, AsyncOpenAI

    async def one(client: AsyncOpenAI, i: int) -> str:
        try:
            if i % 4 == 0:
                stream = await client.responses.create(
                    model="m", input=f"r{i}", stream=True, extra_body={"sim": {"tokens": 1000}}
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"r{i}"}],
                    extra_body={"sim": {"tokens": 1000}},
                )  # fmt: skip
            return "ok"
        except APIStatusError as exc:
            return f"{exc.status_code} {exc.code}"

    async def burst() -> list[str]:
        async with (
            AsyncOpenAI(base_url=a.url, api_key=key, max_retries=0, timeout=30) as ca,
            AsyncOpenAI(base_url=b.url, api_key=key, max_retries=0, timeout=30) as cb,
        ):
            return await asyncio.gather(*(one(ca if i % 2 else cb, i) for i in range(n)))

    return asyncio.run(burst())


def limiter_fell_back(*roots: str) -> bool:
    """Whether any gateway decided a rate limit without Redis (a round trip slower than
    its timeout, on a starved machine): those decisions may refuse with 429, by design."""
    for root in roots:
        text = httpx.get(f"{root}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("bastion_ratelimit_fallbacks_total ") and float(line.split()[1]):
                return True
    return False


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every test taking this (or ``store``) runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bastion.db'}"  # tmp_path is absolute: sqlite:////…
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated store on each backend, closed after the test."""
    s = open_store(db_url)
    await s.migrate()
    yield s
    await s.close()


@pytest.fixture(scope="session")
def sim_port() -> Iterator[int]:
    port = free_port()
    proc = start(["sim", "--port", str(port)], f"http://127.0.0.1:{port}/health")
    yield port
    stop(proc)


@pytest.fixture(scope="session")
def slow_sim_port() -> Iterator[int]:
    """A simulator emitting 5 tokens/s: deltas 200 ms apart, to watch them arrive."""
    port = free_port()
    proc = start(
        ["sim", "--port", str(port), "--tokens-per-s", "5"], f"http://127.0.0.1:{port}/health"
    )
    yield port
    stop(proc)


GATEWAY_TOML = """
refresh_interval_s = 0.2

[server]
host = "127.0.0.1"
port = {port}
max_body_bytes = 1_000_000
cache_salt_secret = "{salt_secret}"

[database]
url = "sqlite:///{db}"

[ratelimit]
url = "memory://"
default_rpm = 100000
default_tpm = 100000000

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"
api_key = "upstream-secret"

[[upstreams]]
name = "slow"
url = "http://127.0.0.1:{slow}/v1"

[[upstreams]]
name = "impatient"
url = "http://127.0.0.1:{sim}/v1"
read_timeout_s = 1

[[upstreams]]
name = "dead"
url = "http://127.0.0.1:{dead}/v1"
connect_timeout_s = 1

[[models]]
id = "gpt-oss-120b"
endpoints = ["responses", "chat"]
upstreams = ["sim"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 4096
cached_input_price = "0.025"

[[models]]
id = "Mistral-7B-Instruct-v0.3"
endpoints = ["chat"]
upstreams = ["sim"]
input_price = "0.02"
output_price = "0.04"
max_output_tokens = 4096

[[models]]
id = "alias"
upstream_model = "org/real-model"
endpoints = ["responses", "chat"]
upstreams = ["sim"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 1024

[[models]]
id = "slow-model"
endpoints = ["responses", "chat"]
upstreams = ["slow"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 1024

[[models]]
id = "dead-model"
endpoints = ["responses", "chat"]
upstreams = ["dead"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 1024

[[models]]
id = "isolated"
endpoints = ["responses", "chat"]
upstreams = ["sim"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 1024
cache_isolation = "account"
{faults}
"""

CACHE_SALT_SECRET = "test-cache-salt-secret-0123456789abcdef"

FAULT_MODEL = """
[[models]]
id = "fault-{mode}"
upstream_model = "m@{mode}"
endpoints = ["responses", "chat"]
upstreams = ["{upstream}"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 1024
"""

FAULTS = ("500", "503", "cut", "malformed", "error-event", "400", "401", "hang", "stall")


@dataclass
class Gateway:
    url: str  # base URL for the SDK: http://127.0.0.1:PORT/v1
    root: str  # http://127.0.0.1:PORT
    config_path: Path
    db_url: str
    proc: subprocess.Popen

    def run(self, coro):
        return asyncio.run(coro)

    def new_key(
        self,
        credit: str = "10.00",
        rpm: int | None = None,
        tpm: int | None = None,
        **fields: object,
    ) -> tuple[str, str]:
        """A fresh account with ``credit`` USD and a key for it, once the gateway knows it.

        ``fields``: more of ``Store.create_key``'s keyword arguments (``models=…``)."""
        name = "acct-" + uuid.uuid4().hex[:10]

        async def make() -> str:
            store = open_store(self.db_url)
            try:
                await store.migrate()
                await store.create_account(name, parse_usd(credit))
                _, key = await store.create_key(name, name="test", rpm=rpm, tpm=tpm, **fields)
                return key
            finally:
                await store.close()

        key = self.run(make())
        self.wait_for_key(key)
        return key, name

    def wait_for_key(self, key: str, present: bool = True, timeout: float = 5.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            status = httpx.get(
                f"{self.url}/models", headers={"Authorization": f"Bearer {key}"}
            ).status_code
            if (status == 200) == present:
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"key not {'accepted' if present else 'refused'} in {timeout}s")

    def store_call(self, method: str, *args: object, **kwargs: object):
        async def call():
            store = open_store(self.db_url)
            try:
                return await getattr(store, method)(*args, **kwargs)
            finally:
                await store.close()

        return self.run(call())

    def account(self, name: str) -> Account:
        return self.store_call("get_account", name)

    def ledger(self, name: str) -> list[LedgerRow]:
        return self.store_call("usage", name)

    def settled(self, name: str, rows: int, timeout: float = 5.0) -> list[LedgerRow]:
        """Wait until ``rows`` ledger rows of account ``name`` are durable, then return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.ledger(name)
            if len(found) >= rows or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, sim_port: int, slow_sim_port: int
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gateway")
    port = free_port()
    db = tmp / "bastion.db"
    faults = "".join(
        FAULT_MODEL.format(mode=m, upstream="impatient" if m in ("hang", "stall") else "sim")
        for m in FAULTS
    )
    config = tmp / "bastion.toml"
    config.write_text(
        GATEWAY_TOML.format(
            port=port,
            db=db,
            sim=sim_port,
            slow=slow_sim_port,
            dead=free_port(),
            faults=faults,
            salt_secret=CACHE_SALT_SECRET,
        )
    )
    env = {**os.environ, "BASTION_ADMIN_TOKEN": "test-admin-token"}
    proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz", env=env)
    yield Gateway(
        f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config, f"sqlite:///{db}", proc
    )
    stop(proc)


# ---- PostgreSQL: a fresh database per test (scale-out tests) ---------------------------
# Self-contained block. CI has PostgreSQL, so an unreachable server FAILS these tests
# (never skips them). BASTION_TEST_PG_URL names the server and a database to connect
# to for CREATE/DROP DATABASE (default: postgres@127.0.0.1:5432/test, trust auth).

PG_ADMIN_URL = os.environ.get("BASTION_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin(sql: str) -> None:
    """Run one statement as the admin, on a thread: no event loop of the test is touched."""
    import concurrent.futures

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a brand-new, empty PostgreSQL database, dropped after the test."""
    import urllib.parse

    name = f"bastion_t_{uuid.uuid4().hex[:16]}"
    try:
        _pg_admin(f"CREATE DATABASE {name}")
    except Exception as exc:
        pytest.fail(
            f"cannot create a test database on PostgreSQL at {PG_ADMIN_URL} "
            f"({type(exc).__name__}: {exc}); start PostgreSQL or set BASTION_TEST_PG_URL",
            pytrace=False,
        )
    yield urllib.parse.urlsplit(PG_ADMIN_URL)._replace(path=f"/{name}").geturl()
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
