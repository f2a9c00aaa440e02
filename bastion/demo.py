"""`bastion demo` (the README's run command): simulator + gateway on embedded defaults.

Starts both in one process, makes a "demo" account with credit and a key, and prints
the key, a curl to paste and the CLI command that reads the demo's ledger from any
directory. The store keeps only a key's hash, so the demo keeps the plaintext in a
file of its own (mode 0600, next to the SQLite ledger) and a second run prints the
same key instead of minting another. SIGINT and SIGTERM are handled on the event loop,
so Ctrl-C stops it even when the shell that started it ignores SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from aiohttp import web

from bastion.app import create_app
from bastion.auth import hash_key, well_formed
from bastion.config import Config, UpstreamConfig
from bastion.money import format_usd, parse_usd
from bastion.store import StoreError, open_store
from bastion.store.sqlite import sqlite_path

DEMO_ACCOUNT = "demo"
DEMO_CREDIT = "10.00"
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # upstreams the demo serves itself with `bastion sim`
KEY_SUFFIX = ".demo-key"
KeyOrigin = Literal["reused", "saved", "unsaved"]  # the demo key: from the file, or new


def demo_config(config: Config, port: int | None = None, sim_port: int | None = None) -> Config:
    """The config the demo runs: ports moved as asked, a SQLite ledger at an absolute path.

    ``sim_port`` moves every local upstream (the simulators the demo starts), so the
    gateway follows them. The ledger path is made absolute once, here, so the gateway
    and the CLI command the demo prints name the same file whatever the directory.
    """
    server = config.server if port is None else replace(config.server, port=port)
    upstreams = config.upstreams
    if sim_port is not None:
        upstreams = {name: _moved(up, sim_port) for name, up in upstreams.items()}
    database_url = absolute_sqlite_url(config.database_url)
    return replace(config, server=server, upstreams=upstreams, database_url=database_url)


def _moved(upstream: UpstreamConfig, port: int) -> UpstreamConfig:
    parts = urlsplit(upstream.url)
    if parts.hostname not in LOCAL_HOSTS:
        return upstream
    return replace(upstream, url=parts._replace(netloc=f"{parts.hostname}:{port}").geturl())


def absolute_sqlite_url(url: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////cwd/rel.db``; any other URL unchanged."""
    if not url.startswith("sqlite:"):
        return url
    path = sqlite_path(url)
    if path == ":memory:":
        raise StoreError("the demo needs a ledger that outlives one connection, not sqlite://")
    _, sep, query = url.partition("?")
    return f"sqlite:///{os.path.abspath(path)}{sep}{query}"


def key_file(database_url: str) -> Path:
    """Where the demo keeps its key's plaintext: next to a SQLite ledger (``bastion.db.demo-key``).

    Another store has no file to sit next to, so the key goes to the user's state
    directory under a hash of the database URL (the URL may hold a password).
    """
    if database_url.startswith("sqlite:"):
        return Path(sqlite_path(database_url) + KEY_SUFFIX)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return Path(state) / "bastion" / f"demo-key-{digest}"


def _read_key(path: Path) -> str | None:
    try:
        key = path.read_text().strip()
    except OSError:
        return None
    return key if well_formed(key) else None


def _write_key(path: Path, key: str) -> bool:
    """Replace the file atomically, readable by its owner only; False if it cannot be written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an old file
            f.write(key + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        print(f"warning: cannot save the demo key in {path}: {exc.strerror}", file=sys.stderr)
        return False
    return True


async def provision(config: Config) -> tuple[str, KeyOrigin, int]:
    """The demo account (created with credit once) and its key: (key, origin, balance).

    The saved key is reused while the store still knows it as an active key of the
    demo account; otherwise (first run, revoked, another database) a new one is made.
    """
    saved = key_file(config.database_url)
    store = open_store(config.database_url, config.lease_ttl_s)
    try:
        await store.migrate()
        try:
            account = await store.get_account(DEMO_ACCOUNT)
        except StoreError:
            account = await store.create_account(DEMO_ACCOUNT, parse_usd(DEMO_CREDIT))
        key = _read_key(saved)
        if key is not None:
            digest = hash_key(key)
            for known in await store.list_keys(DEMO_ACCOUNT):
                if known.key_hash == digest and not known.revoked:
                    return key, "reused", account.balance
        _, key = await store.create_key(DEMO_ACCOUNT, name="demo")
        return key, "saved" if _write_key(saved, key) else "unsaved", account.balance
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


def bastion_command() -> str:
    """This installation's `bastion`, absolute: the venv's script, else ``python -m bastion``."""
    python = os.path.abspath(sys.executable)  # not resolved: a venv's python is a symlink
    script = os.path.join(os.path.dirname(python), "bastion")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return shlex.quote(script)
    return f"{shlex.quote(python)} -m bastion"


def cli_command(database_url: str) -> str:
    """A command that shows the demo account from any directory.

    ``BASTION_DATABASE_URL`` overrides the database of whatever config the CLI loads,
    and the CLI needs nothing else from the demo's config to read the store.
    """
    url = shlex.quote(database_url)
    return f"BASTION_DATABASE_URL={url} {bastion_command()} accounts show {DEMO_ACCOUNT}"


def banner(config: Config, key: str, origin: KeyOrigin, balance: int) -> str:
    """What the demo prints; "Press Ctrl-C to stop." is the last line (tests read up to it)."""
    host, port = config.server.host, config.server.port
    base = f"http://{host}:{port}"
    ledger = _ledger_name(config.database_url)
    saved = key_file(config.database_url)
    how = {
        "reused": f"reused from {saved}",
        "saved": f"new; saved in {saved} for the next run",
        "unsaved": "new; not saved, so the next run makes another",
    }[origin]
    return (
        f"\nBastion is running at {base}/v1 (simulated upstream; ledger in {ledger}).\n"
        f"Account '{DEMO_ACCOUNT}' has ${format_usd(balance)} of credit.\n"
        f"\nYour API key ({how}):\n\n  {key}\n"
        f"\nTry it:\n\n{curl_example(base, key)}\n"
        f"\nOr with the OpenAI SDK: OpenAI(base_url='{base}/v1', api_key='{key}')\n"
        f"\nThe clients in examples/ read:\n\n"
        f"  export OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={key}\n"
        f"\nRead the demo's ledger from any directory:\n\n"
        f"  {cli_command(config.database_url)}\n"
        "\nPress Ctrl-C to stop.\n"
    )


def _ledger_name(url: str) -> str:
    """The SQLite file, or the URL without its password (the CLI command has it in full)."""
    if url.startswith("sqlite:"):
        return sqlite_path(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}").geturl()


async def main(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then stop both servers cleanly."""
    from bastion.sim import create_app as create_sim

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Replaces whatever disposition the process inherited, SIG_IGN included.
        loop.add_signal_handler(sig, _on_signal, stop)
    runners: list[web.AppRunner] = []
    try:
        sims = {(u.hostname, u.port) for u in (urlsplit(x.url) for x in config.upstreams.values())}
        for host, port in sorted(sims, key=str):
            if host in LOCAL_HOSTS:
                runners.append(await _start(create_sim(), host or "127.0.0.1", port or 80))
        key, origin, balance = await provision(config)
        host, port = config.server.host, config.server.port
        runners.append(await _start(create_app(config), host, port, handler_cancellation=True))
        print(banner(config, key, origin, balance), end="", flush=True)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _on_signal(stop: asyncio.Event) -> None:
    """The first signal stops cleanly; a second one, while that runs, ends at once."""
    if stop.is_set():
        print("stopped before the clean shutdown finished", file=sys.stderr, flush=True)
        os._exit(1)
    stop.set()


async def _start(app: web.Application, host: str, port: int, **kwargs: object) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, **kwargs)  # type: ignore[arg-type]
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return runner


def run(config: Config, port: int | None = None, sim_port: int | None = None) -> None:
    """`bastion demo [--port P] [--sim-port Q]`: blocks until SIGINT or SIGTERM, exits 0."""
    import uvloop

    config = demo_config(config, port, sim_port)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the loop's handlers are in
        uvloop.run(main(config))
