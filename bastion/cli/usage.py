"""``bastion usage``: the ledger, one row per request that reached an upstream.

The table shows the newest requests first, ``--limit`` of them (50 unless told),
and says what it left out: how many rows and how much money. ``--json`` keeps the
ledger's order (oldest first) and gives every matching row unless ``--limit`` is
given, in which case it gives the newest N, still oldest first (as ``tail`` does).
``--csv`` is ``--json`` as CSV. ``--group-by`` gives totals per group instead of
rows. The store does the filtering and the grouping (bastion/store/usage.py).
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from bastion.cli.keys import resolve
from bastion.cli.options import CliError, ConfigOpt, JsonOpt, VerboseOpt, WideOpt, emit
from bastion.cli.render import (
    Kind,
    add_row,
    dollars,
    minute,
    new_table,
    plural,
    short_ids,
    show,
    usd,
)
from bastion.cli.storeopen import with_store
from bastion.config import Config
from bastion.money import parse_usd
from bastion.store import LedgerRow, Store
from bastion.views import (
    USAGE_GROUPS,
    USAGE_TOTALS,
    csv_text,
    iso_time,
    ledger_fields,
    ledger_json,
    parse_group_by,
    parse_since,
    usage_totals_json,
)

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


KeyOpt = Annotated[
    str | None,
    typer.Option("--key", metavar="ID", help="Only this key's requests (its id or a prefix)."),
]
GroupOpt = Annotated[
    str | None,
    typer.Option(
        "--group-by",
        metavar="day,model,key,account",
        help="Totals per group (any of them, comma-separated) instead of rows.",
    ),
]
CsvOpt = Annotated[bool, typer.Option("--csv", help="The --json fields as CSV, with a header.")]


def usage(
    account: Annotated[str | None, typer.Option(help="Only this account's requests.")] = None,
    key: KeyOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    group_by: GroupOpt = None,
    limit: CountOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    as_csv: CsvOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """Ledger rows, one per request that reached an upstream (the table shows the newest),
    or with --group-by their totals per day, model, key and/or account."""
    since_us = None if since is None else parse_time("--since", since)
    until_us = None if until is None else parse_time("--until", until)
    if as_csv and as_json:
        raise CliError("--csv or --json, not both")
    groups: list[str] = []
    if group_by is not None:
        try:
            groups = parse_group_by(group_by)
        except ValueError as exc:
            raise CliError(f"--group-by: {exc}") from None
        if limit is not None:
            raise CliError("--limit counts ledger rows: --group-by shows every group's total")

    async def read(store: Store, _: Config) -> tuple[list[Any], dict[str, str]]:
        key_id = None if key is None else await resolve(store, key)
        if groups:
            found: list[Any] = await store.usage_totals(groups, account, key_id, since_us, until_us)
        else:
            found = await store.usage(account, since_us, until_us, key_id)
        return found, {a.id: a.name for a in await store.list_accounts()}

    found, names = with_store(read, config, verbose)
    if groups:
        totals = usage_totals_json(found, groups, names)
        fields = [USAGE_GROUPS[g] for g in groups] + list(USAGE_TOTALS)
        if as_csv:
            sys.stdout.write(csv_text(totals, fields))
        else:
            emit(as_json, totals, lambda: show_totals(totals, groups, wide=wide))
        return
    rows: list[LedgerRow] = found
    count = (None if as_json or as_csv else TABLE_LIMIT) if limit is None else limit
    shown = rows[-count:] if count else rows  # the ledger is oldest first
    if as_csv:
        sys.stdout.write(csv_text([ledger_json(r, names) for r in shown], ledger_fields()))
        return
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


GROUP_COLUMNS: dict[str, tuple[str, Kind]] = {
    "day": ("day (UTC)", "id"), "model": ("model", "text"), "key": ("key", "id"),
    "account": ("account", "text"),
}  # fmt: skip


def show_totals(totals: list[dict[str, Any]], groups: list[str], *, wide: bool) -> None:
    """One line per group (``usage_totals_json`` items); cached and uncharged in --wide."""
    columns = [GROUP_COLUMNS[g] for g in groups] + [("requests", "number"), ("in", "number")]
    columns += [("cached", "number")] if wide else []
    columns += [("out", "number"), ("cost", "number")]
    columns += [("uncharged", "number")] if wide else []
    table = new_table(columns, wide=wide)
    short = short_ids(t["key_id"] for t in totals if "key_id" in t)
    for t in totals:
        cells = [str(t[USAGE_GROUPS[g]]) for g in groups]
        if "key" in groups and not wide:
            cells[groups.index("key")] = short[t["key_id"]]
        cells += [f"{t['requests']:,}", f"{t['input_tokens']:,}"]
        cells += [f"{t['cached_input_tokens']:,}"] if wide else []
        cells += [f"{t['output_tokens']:,}", dollars(t["cost"])]
        cells += [dollars(t["uncharged"])] if wide else []
        add_row(table, wide, *cells)
    requests = sum(t["requests"] for t in totals)
    cost = sum(parse_usd(t["cost"]) for t in totals)
    uncharged = sum(parse_usd(t["uncharged"]) for t in totals)
    summary = f"{plural(len(totals), 'group')}: {plural(requests, 'request')}, {usd(cost)}"
    show(table, wide, summary + (f", {usd(uncharged)} uncharged" if uncharged else ""))
