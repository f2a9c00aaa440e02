"""`bastion demo` (the README's run command): simulator + gateway on embedded defaults.

Starts both in one process, makes a "demo" account with credit and a fresh key,
and prints the key and a curl to paste. Ctrl-C stops both.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from urllib.parse import urlsplit

from aiohttp import web

from bastion.app import create_app
from bastion.config import Config
from bastion.money import format_usd, parse_usd
from bastion.store import StoreError, open_store

DEMO_ACCOUNT = "demo"
DEMO_CREDIT = "10.00"


async def provision(config: Config) -> tuple[str, int]:
    """The demo account (created with credit once) and a new key for it."""
    store = open_store(config.database_url)
    try:
        await store.migrate()
        try:
            account = await store.get_account(DEMO_ACCOUNT)
        except StoreError:
            account = await store.create_account(DEMO_ACCOUNT, parse_usd(DEMO_CREDIT))
        _, key = await store.create_key(DEMO_ACCOUNT, name="demo")
        return key, account.balance
    finally:
        await store.close()


def curl_example(base_url: str, key: str) -> str:
    body = (
        '{"model": "gpt-oss-120b", "input": "Reply with: ok", '
        '"max_output_tokens": 32, "store": false}'
    )
    return (
        f"curl {base_url}/v1/responses \\\n"
        f'  -H "Authorization: Bearer {key}" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d {shlex.quote(body)}"
    )


async def main(config: Config) -> None:
    from bastion.sim import create_app as create_sim

    runners: list[web.AppRunner] = []
    sims = {(u.hostname, u.port) for u in (urlsplit(x.url) for x in config.upstreams.values())}
    for host, port in sorted(sims, key=str):
        if host in ("127.0.0.1", "localhost"):
            runners.append(await _start(create_sim(), host or "127.0.0.1", port or 80))
    key, balance = await provision(config)
    host, port = config.server.host, config.server.port
    runners.append(await _start(create_app(config), host, port, handler_cancellation=True))
    base = f"http://{host}:{port}"
    print(
        f"\nBastion is running at {base}/v1 (simulated upstream; ledger in "
        f"{config.database_url}).\nAccount '{DEMO_ACCOUNT}' has ${format_usd(balance)} of credit.\n"
        f"\nYour API key (shown once):\n\n  {key}\n\nTry it:\n\n{curl_example(base, key)}\n"
        f"\nOr with the OpenAI SDK: OpenAI(base_url='{base}/v1', api_key='{key}')\n"
        "Press Ctrl-C to stop.\n",
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _start(app: web.Application, host: str, port: int, **kwargs: object) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, **kwargs)  # type: ignore[arg-type]
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return runner


def run(config: Config) -> None:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main(config))
