"""The operator CLI (SPEC §4): ``bastion accounts|keys|usage|audit|serve|sim|demo``.

Each command loads the config, opens the store, does one thing and closes it; the
gateway sees the change within seconds through its snapshot refresh. Every command
takes ``--config`` and ``--json`` (also after its arguments). Refusals (unknown
account, bad amount, overdraft, bad config) print one line on stderr and exit 1.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bastion.audit import problem_count, run_audit
from bastion.config import Config, ConfigError, load_config
from bastion.money import MoneyError, format_usd, parse_usd
from bastion.store import Account, ApiKey, LedgerRow, Store, StoreError, open_store
from bastion.views import (
    account_json,
    effective_limits,
    key_json,
    ledger_json,
    new_account_json,
    new_key_json,
    parse_since,
)
from bastion.views import iso_time as _iso

T = TypeVar("T")

app = typer.Typer(
    help="Bastion: a metered, OpenAI-compatible LLM API gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
accounts_app = typer.Typer(help="Prepaid accounts and their credit.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create, list, change limits, revoke.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (default: $BASTION_CONFIG, else built-in)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
# serve/sim/demo accept both for uniformity; --json means nothing to them.
HiddenJsonOpt = Annotated[bool, typer.Option("--json", hidden=True)]
HiddenConfigOpt = Annotated[Path | None, typer.Option("--config", hidden=True)]
LimitOpt = Annotated[int | None, typer.Option(help="0 = unlimited; default: the config default.")]

out = Console()


class CliError(Exception):
    """A refusal detected by the CLI itself (bad --since, missing module)."""


# ---- shared helpers -----------------------------------------------------------------


def _with_store(config_path: Path | None, action: Callable[[Store, Config], Awaitable[T]]) -> T:
    """Load config, open and migrate the store, run ``action``, always close."""
    config = load_config(config_path)

    async def go() -> T:
        store = open_store(config.database_url)
        try:
            await store.migrate()
            return await action(store, config)
        finally:
            await store.close()

    return asyncio.run(go())


def _emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    """JSON on stdout for machines, else the human rendering."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        human()


def _table(*columns: str, caption: str | None = None) -> Table:
    """Columns fold rather than truncate, so ids survive a narrow or piped terminal."""
    table = Table(caption=caption)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _usd(nanos: int) -> str:
    return f"-${format_usd(-nanos)}" if nanos < 0 else f"${format_usd(nanos)}"


def _dollars(usd: str) -> str:
    """A decimal USD string as ``_usd`` renders nano-dollars: "-1.00" -> "-$1.00"."""
    return f"-${usd[1:]}" if usd.startswith("-") else f"${usd}"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _limit(value: int) -> str:
    return "unlimited" if value == 0 else f"{value:,}"


def _parse_since(text: str) -> int:
    """ISO 8601 with or without offset (naive = UTC) -> µs since epoch."""
    try:
        return parse_since(text)
    except ValueError as exc:
        raise CliError(f"--since: {exc}") from None


def _accounts_table(accounts: list[Account]) -> None:
    table = _table("name", "id", "balance", "reserved", "spent", "created (UTC)")
    for a in accounts:
        table.add_row(
            escape(a.name),
            a.id,
            _usd(a.balance),
            _usd(a.reserved),
            _usd(a.spent),
            _iso(a.created_at),
        )
    out.print(table)


def _keys_table(keys: list[ApiKey], config: Config) -> None:
    table = _table("id", "account", "name", "prefix", "rpm", "tpm", "state", "created (UTC)")
    for k in keys:
        rpm, tpm = effective_limits(k, config)
        table.add_row(
            k.id,
            escape(k.account_name),
            escape(k.name),
            k.prefix + "…",
            _limit(rpm) + (" (default)" if k.rpm is None else ""),
            _limit(tpm) + (" (default)" if k.tpm is None else ""),
            "[red]revoked[/red]" if k.revoked else "[green]active[/green]",
            _iso(k.created_at),
        )
    out.print(table)


# ---- accounts -----------------------------------------------------------------------


@accounts_app.command("create")
def accounts_create(
    name: str,
    credit: Annotated[str, typer.Option(help="Initial credit in USD, e.g. 10 or 0.50.")] = "0",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an account, optionally with initial credit."""
    amount = parse_usd(credit)
    account = _with_store(config, lambda s, _: s.create_account(name, amount))
    _emit(
        as_json,
        new_account_json(account),
        lambda: out.print(
            f"Created account [bold]{escape(account.name)}[/bold] ({account.id}),"
            f" balance {_usd(account.balance)}"
        ),
    )


@accounts_app.command("credit", context_settings={"ignore_unknown_options": True})
def accounts_credit(
    name: str,
    usd: Annotated[str, typer.Argument(help="USD to add; negative (-0.50) takes credit back.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add credit to an account (negative to take back; never below zero)."""
    amount = parse_usd(usd)
    account = _with_store(config, lambda s, _: s.credit_account(name, amount))
    _emit(
        as_json,
        account_json(account),
        lambda: out.print(
            f"{'Added' if amount > 0 else 'Took back'} {_usd(abs(amount))}:"
            f" [bold]{escape(account.name)}[/bold] balance is now {_usd(account.balance)}"
        ),
    )


@accounts_app.command("show")
def accounts_show(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show one account: balance, credit held for requests in flight, total spent."""
    account = _with_store(config, lambda s, _: s.get_account(name))
    _emit(as_json, account_json(account), lambda: _accounts_table([account]))


@accounts_app.command("list")
def accounts_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List all accounts."""
    accounts = _with_store(config, lambda s, _: s.list_accounts())
    _emit(as_json, [account_json(a) for a in accounts], lambda: _accounts_table(accounts))


# ---- keys ---------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    account: Annotated[str, typer.Option(help="Account name the key charges.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    rpm: LimitOpt = None,
    tpm: LimitOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key; the key itself is shown only this once."""

    async def create(store: Store, cfg: Config) -> tuple[ApiKey, str, Config]:
        key, plaintext = await store.create_key(account, name, rpm, tpm)
        return key, plaintext, cfg

    key, plaintext, cfg = _with_store(config, create)
    data = new_key_json(key, plaintext, cfg)
    eff_rpm, eff_tpm = effective_limits(key, cfg)

    def human() -> None:
        out.print(f"Created key {key.id} for account [bold]{escape(key.account_name)}[/bold]")
        out.print(f"rpm {_limit(eff_rpm)}, tpm {_limit(eff_tpm)}")
        out.print("Key (shown only now; store it safely):")
        out.print(plaintext, soft_wrap=True, highlight=False)

    _emit(as_json, data, human)


@keys_app.command("list")
def keys_list(
    account: Annotated[str | None, typer.Option(help="Only this account's keys.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List keys (never the key itself, only its prefix)."""

    async def list_keys(store: Store, cfg: Config) -> tuple[list[ApiKey], Config]:
        return await store.list_keys(account), cfg

    keys, cfg = _with_store(config, list_keys)
    _emit(as_json, [key_json(k, cfg) for k in keys], lambda: _keys_table(keys, cfg))


@keys_app.command("update")
def keys_update(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    rpm: LimitOpt = None,
    tpm: LimitOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a key's limits; only the limits given change (0 = unlimited)."""
    if rpm is None and tpm is None:
        raise CliError("nothing to change: give --rpm and/or --tpm")

    async def update(store: Store, cfg: Config) -> tuple[ApiKey, Config]:
        return await store.update_key(key_id, rpm=rpm, tpm=tpm), cfg

    key, cfg = _with_store(config, update)
    _emit(as_json, key_json(key, cfg), lambda: _keys_table([key], cfg))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key: gateways refuse it within seconds. Cannot be undone."""

    async def revoke(store: Store, cfg: Config) -> tuple[ApiKey, Config]:
        return await store.revoke_key(key_id), cfg

    key, cfg = _with_store(config, revoke)
    _emit(as_json, key_json(key, cfg), lambda: out.print(f"Revoked key {key.id}"))


# ---- usage --------------------------------------------------------------------------


@app.command("usage")
def usage(
    account: Annotated[str | None, typer.Option(help="Only this account's requests.")] = None,
    since: Annotated[
        str | None, typer.Option(help="ISO 8601 time; without an offset it is UTC.")
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ledger rows (one per request that reached an upstream), oldest first."""
    since_us = None if since is None else _parse_since(since)

    async def read(store: Store, _: Config) -> tuple[list[LedgerRow], dict[str, str]]:
        rows = await store.usage(account, since_us)
        names = {a.id: a.name for a in await store.list_accounts()}
        return rows, names

    rows, names = _with_store(config, read)

    def human() -> None:
        table = _table(
            "time (UTC)", "request", "account", "key", "model", "endpoint",
            "in", "out", "cost", "status",
            caption=f"{len(rows)} requests, {_usd(sum(r.cost for r in rows))}",
        )  # fmt: skip
        for r in rows:
            table.add_row(
                _iso(r.created_at),
                escape(r.request_id),
                escape(names.get(r.account_id, r.account_id)),
                r.key_id,
                escape(r.model),
                r.endpoint,
                f"{r.input_tokens:,}",
                f"{r.output_tokens:,}",
                _usd(r.cost) + (" (est.)" if r.estimated else ""),
                r.status,
            )
        out.print(table)

    _emit(as_json, [ledger_json(r, names) for r in rows], human)


# ---- audit --------------------------------------------------------------------------


@app.command("audit")
def audit(
    account: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute every balance from credits and the ledger; exit 1 if the books disagree."""
    report = _with_store(config, lambda s, _: run_audit(s, account))

    def human() -> None:
        for a in report["accounts"]:
            table = _table(
                "balance", "expected", "spent", "uncharged", "rows", "leased", "dead letters"
            )
            table.title = f"{escape(a['name'])} ({a['id']})"
            stale, estimated = a["stale_leases"], a["estimated_rows"]
            table.add_row(
                *(_dollars(a[f]) for f in ("balance", "expected_balance", "spent", "uncharged")),
                f"{a['rows']:,}" + (f" ({estimated:,} est.)" if estimated else ""),
                _dollars(a["leased"]) + ("" if stale == "0.00" else f" (+{_dollars(stale)} stale)"),
                f"{a['dead_letters']:,}",
            )
            out.print(table)
            for problem in a["problems"]:
                out.print(f"  [red]problem:[/red] {escape(problem)}")
        for problem in report["problems"]:
            out.print(f"[red]problem:[/red] {escape(problem)}")
        out.print(
            f"{_plural(len(report['accounts']), 'account')},"
            f" {_dollars(report['uncharged'])} uncharged,"
            f" {_plural(report['dead_letters'], 'dead letter')}"
        )
        count = problem_count(report)
        out.print("[green]ok[/green]" if count == 0 else f"[red]{_plural(count, 'problem')}[/red]")

    _emit(as_json, report, human)
    if not report["ok"]:
        raise typer.Exit(1)


# ---- processes (implemented elsewhere; imported lazily) ------------------------------


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default: config).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: config).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Processes; >1 needs PostgreSQL and Redis (default: config)."),
    ] = None,
    config: ConfigOpt = None,
    as_json: HiddenJsonOpt = False,
) -> None:
    """Run the gateway."""
    cfg = load_config(config)
    run = _lazy("bastion.server", "serve")
    run(cfg, host=host, port=port, workers=cfg.server.workers if workers is None else workers)


@app.command("sim")
def sim(
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port (vLLM's default).")] = 8000,
    ttft_ms: Annotated[float, typer.Option(help="Time to first token, ms.")] = 0.0,
    tokens_per_s: Annotated[float, typer.Option(help="Tokens per second; 0 = max.")] = 0.0,
    config: HiddenConfigOpt = None,
    as_json: HiddenJsonOpt = False,
) -> None:
    """Run the upstream simulator (an OpenAI-compatible server, no GPU needed)."""
    run = _lazy("bastion.sim", "run")
    run(host=host, port=port, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s)


@app.command("demo")
def demo(config: ConfigOpt = None, as_json: HiddenJsonOpt = False) -> None:
    """Run the simulator and the gateway together; prints a key and a curl to try."""
    cfg = load_config(config)
    run_demo = _lazy("bastion.demo", "run")
    run_demo(cfg)


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """Import a command's implementation only when it runs, so the CLI needs none of them."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise CliError(f"{module}.{name} is not available: {exc}") from None


def _negative_after_dashes(args: list[str]) -> list[str]:
    """``accounts credit acme -- -0.50 --json``: drop the ``--`` so later options still count.

    The amount is accepted as ``-0.50`` anyway (the command ignores unknown options),
    so the ``--`` is only a habit to honour, not a reason to swallow ``--json``.
    """
    if args[:2] == ["accounts", "credit"] and "--" in args:
        i = args.index("--")
        if i + 1 < len(args) and re.fullmatch(r"-\.?\d[\d.]*", args[i + 1]):
            return args[:i] + args[i + 1 :]
    return args


def main() -> None:
    """Console entry point: refusals become one line on stderr and exit code 1."""
    try:
        app(args=_negative_after_dashes(sys.argv[1:]), prog_name="bastion")
    except (StoreError, ConfigError, MoneyError, CliError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(1) from None
