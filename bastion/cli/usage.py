"""``bastion usage``: the ledger, one row per request that reached an upstream.

The table shows the newest requests first, ``--limit`` of them (50 unless told),
and says what it left out: how many rows and how much money. ``--json`` keeps the
ledger's order (oldest first) and gives every matching row unless ``--limit`` is
given, in which case it gives the newest N, still oldest first (as ``tail`` does).
"""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.cli.options import CliError, ConfigOpt, JsonOpt, VerboseOpt, WideOpt, emit
from bastion.cli.render import Kind, add_row, minute, new_table, plural, show, usd
from bastion.cli.storeopen import with_store
from bastion.config import Config
from bastion.store import LedgerRow, Store
from bastion.views import iso_time, ledger_json, parse_since

TABLE_LIMIT = 50

NARROW: list[tuple[str, Kind]] = [
    ("time (UTC)", "id"), ("account", "text"), ("model", "text"), ("in", "number"),
    ("out", "number"), ("cost", "number"), ("status", "id"),
]  # fmt: skip
WIDE: list[tuple[str, Kind]] = [
    ("time (UTC)", "id"), ("request", "id"), ("account", "text"), ("key", "id"),
    ("model", "text"), ("endpoint", "id"), ("in", "number"), ("cached", "number"),
    ("out", "number"), ("reasoning", "number"), ("cost", "number"), ("uncharged", "number"),
    ("status", "id"),
]  # fmt: skip

CountOpt = Annotated[
    int | None,
    typer.Option(
        "--limit",
        "-n",
        min=0,
        help=f"Show the newest N (default: {TABLE_LIMIT} in the table, all with --json); 0 = all.",
    ),
]
SinceOpt = Annotated[
    str | None, typer.Option(help="Rows at or after this ISO 8601 time (no offset: UTC).")
]
UntilOpt = Annotated[
    str | None, typer.Option(help="Rows before this ISO 8601 time (no offset: UTC).")
]


def parse_time(option: str, text: str) -> int:
    """ISO 8601 with or without offset (naive = UTC) -> µs since epoch, or a CliError."""
    try:
        return parse_since(text)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}") from None


def usage(
    account: Annotated[str | None, typer.Option(help="Only this account's requests.")] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: CountOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """Ledger rows, one per request that reached an upstream; the table shows the newest."""
    since_us = None if since is None else parse_time("--since", since)
    until_us = None if until is None else parse_time("--until", until)

    async def read(store: Store, _: Config) -> tuple[list[LedgerRow], dict[str, str]]:
        rows = await store.usage(account, since_us)
        names = {a.id: a.name for a in await store.list_accounts()}
        return rows, names

    rows, names = with_store(read, config, verbose)
    if until_us is not None:
        rows = [r for r in rows if r.created_at < until_us]
    count = (None if as_json else TABLE_LIMIT) if limit is None else limit
    shown = rows[-count:] if count else rows  # the ledger is oldest first
    emit(
        as_json,
        [ledger_json(r, names) for r in shown],
        lambda: show_usage(shown[::-1], rows, names, wide=wide),
    )


def show_usage(
    shown: list[LedgerRow], matched: list[LedgerRow], names: dict[str, str], *, wide: bool
) -> None:
    """``shown`` newest first; the line under it compares it with everything ``matched``."""
    total = usd(sum(r.cost for r in matched))
    if len(shown) == len(matched):
        summary = f"{plural(len(matched), 'request')}, {total}"
    else:
        summary = (
            f"newest {len(shown):,} of {plural(len(matched), 'request')}:"
            f" {usd(sum(r.cost for r in shown))} of {total} (--limit 0 shows all)"
        )
    table = new_table(WIDE if wide else NARROW, wide=wide)
    for r in shown:
        cost = ("~" if r.estimated else "") + usd(r.cost)
        account = names.get(r.account_id, r.account_id)
        if wide:
            add_row(
                table, wide, iso_time(r.created_at), r.request_id, account, r.key_id, r.model,
                r.endpoint, f"{r.input_tokens:,}", f"{r.cached_input_tokens:,}",
                f"{r.output_tokens:,}", f"{r.reasoning_tokens:,}", cost, usd(r.uncharged),
                r.status,
            )  # fmt: skip
        else:
            add_row(
                table, wide, minute(r.created_at), account, r.model,
                f"{r.input_tokens:,}", f"{r.output_tokens:,}", cost, r.status,
            )  # fmt: skip
    legend = ["~ an estimated cost (the upstream reported no usage)"]
    show(table, wide, summary, *(legend if any(r.estimated for r in shown) else []))
