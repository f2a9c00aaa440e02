"""``bastion audit``: recompute every balance from the records; exit 1 if the books disagree.

A short table per account, its problems under it, then totals and ``ok`` or
``N problems`` last, so that a cron job's mail reads from the bottom up.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from bastion.audit import problem_count, run_audit
from bastion.cli.options import ConfigOpt, JsonOpt, VerboseOpt, emit
from bastion.cli.render import dollars, out, plural
from bastion.cli.storeopen import with_store

COLUMNS = ("balance", "expected", "spent", "uncharged", "rows", "leased", "dead letters")


def audit(
    account: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Recompute every balance from credits and the ledger; exit 1 if the books disagree."""
    report = with_store(lambda s, _: run_audit(s, account), config, verbose)
    emit(as_json, report, lambda: show(report))
    if not report["ok"]:
        raise typer.Exit(1)


def show(report: dict[str, Any]) -> None:
    for a in report["accounts"]:
        table = Table(title=f"{escape(a['name'])} ({a['id']})")
        for column in COLUMNS:
            table.add_column(column, overflow="fold")
        stale, estimated = a["stale_leases"], a["estimated_rows"]
        table.add_row(
            *(dollars(a[f]) for f in ("balance", "expected_balance", "spent", "uncharged")),
            f"{a['rows']:,}" + (f" ({estimated:,} est.)" if estimated else ""),
            dollars(a["leased"]) + ("" if stale == "0.00" else f" (+{dollars(stale)} stale)"),
            f"{a['dead_letters']:,}",
        )
        out.print(table)
        for problem in a["problems"]:
            out.print(f"  [red]problem:[/red] {escape(problem)}")
    for problem in report["problems"]:
        out.print(f"[red]problem:[/red] {escape(problem)}")
    out.print(
        f"{plural(len(report['accounts']), 'account')},"
        f" {dollars(report['uncharged'])} uncharged,"
        f" {plural(report['dead_letters'], 'dead letter')}"
    )
    count = problem_count(report)
    out.print("[green]ok[/green]" if count == 0 else f"[red]{plural(count, 'problem')}[/red]")
