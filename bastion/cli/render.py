"""Tables and money for people; ``--json`` (bastion.views) is for machines.

Two looks. The default fits an 80-column terminal with one line per row: no box,
the columns that matter, ids cut to 12 characters (longer where needed to stay
unique, as git does), columns one space apart when two would not fit, and names
cut with "…" only if the terminal is narrower still. ``--wide`` is the full boxed
table: every column, full ids, exact times, cells that fold rather than lose a
character. Totals and legends go on plain lines under the table.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Literal

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from bastion.config import Config
from bastion.money import format_usd
from bastion.store import Account, ApiKey
from bastion.views import effective_limits, iso_time

Kind = Literal["id", "text", "number"]
"""``text`` columns (names, models) give way first when a row is too wide; ``number``
columns are right-aligned; ``id`` columns (ids, times, states) keep their width."""

SHORT_ID = 12

out = Console()


def usd(nanos: int) -> str:
    """Nano-dollars, exact: 1_500_000_000 -> "$1.50", -1 -> "-$0.000000001"."""
    return f"-${format_usd(-nanos)}" if nanos < 0 else f"${format_usd(nanos)}"


def dollars(text: str) -> str:
    """A decimal USD string as ``usd`` renders nano-dollars: "-1.00" -> "-$1.00"."""
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def limit_text(value: int) -> str:
    return "unlimited" if value == 0 else f"{value:,}"


def minute(us: int) -> str:
    """µs since epoch -> "2025-01-31 12:00" (UTC): enough to read a table by."""
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M")


def short_ids(ids: Iterable[str], length: int = SHORT_ID) -> dict[str, str]:
    """id -> its first ``length`` characters, or more where that would not be unique."""
    ordered = sorted(set(ids))
    short: dict[str, str] = {}
    for i, full in enumerate(ordered):
        need = length
        for other in ordered[max(i - 1, 0) : i] + ordered[i + 1 : i + 2]:
            need = max(need, _common(full, other) + 1)
        short[full] = full[:need]
    return short


def _common(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def new_table(columns: Sequence[tuple[str, Kind]], *, wide: bool) -> Table:
    """An empty table in the chosen look; fill it with ``add_row``, print it with ``show``."""
    table = Table() if wide else Table(box=None, pad_edge=False)
    for header, kind in columns:
        justify: Literal["left", "right"] = "right" if kind == "number" else "left"
        if wide:
            table.add_column(header, justify=justify, overflow="fold")
        else:
            table.add_column(header, justify=justify, no_wrap=kind != "text", overflow="ellipsis")
    return table


def add_row(table: Table, wide: bool, *cells: str | Text) -> None:
    """Cells are plain text (never markup); in the narrow look each stays on one line."""
    row = [cell if isinstance(cell, Text) else Text(cell) for cell in cells]
    if not wide:
        for cell in row:
            cell.no_wrap, cell.overflow = True, "ellipsis"
    table.add_row(*row)


def show(table: Table, wide: bool, *notes: str) -> None:
    """Print the table, then each note on a line of its own."""
    if not wide and _natural_width(table) > out.width:
        table.padding = (0, 1, 0, 0)  # one space between columns instead of two
    out.print(table)
    for note in notes:
        out.print(note, highlight=False, markup=False)


def _natural_width(table: Table) -> int:
    return Measurement.get(out, out.options.update_width(10_000), table).maximum


def show_accounts(accounts: list[Account], *, wide: bool) -> None:
    columns: list[tuple[str, Kind]] = [
        ("name", "text"), ("id", "id"), ("balance", "number"), ("reserved", "number"),
        ("spent", "number"), ("uncharged", "number"),
    ]  # fmt: skip
    if wide:
        columns += [("alert below", "number"), ("created (UTC)", "id")]
    table = new_table(columns, wide=wide)
    ids = short_ids(a.id for a in accounts)
    for a in accounts:
        money = (usd(a.balance), usd(a.reserved), usd(a.spent), usd(a.uncharged))
        alert = "off" if a.alert_below is None else usd(a.alert_below)
        created = (alert, iso_time(a.created_at)) if wide else ()
        add_row(table, wide, a.name, a.id if wide else ids[a.id], *money, *created)
    show(table, wide)


def show_keys(keys: list[ApiKey], config: Config, *, wide: bool) -> None:
    """A limit that follows the config default is marked: ``*`` (narrow), ``(default)`` (wide).

    The spend limit is compact ("$5.00/day"); expiry and model lists only in ``--wide``,
    though an expired key's state says so in both."""
    columns: list[tuple[str, Kind]] = [("id", "id"), ("account", "text"), ("name", "text")]
    if wide:
        columns.append(("prefix", "id"))
    columns += [("rpm", "number"), ("tpm", "number"), ("limit", "number"), ("state", "id")]
    if wide:
        columns += [("expires (UTC)", "id"), ("models", "text"), ("created (UTC)", "id")]
    table = new_table(columns, wide=wide)
    ids = short_ids(k.id for k in keys)
    mark = " (default)" if wide else "*"
    now = time.time_ns() // 1000
    for k in keys:
        rpm, tpm = effective_limits(k, config)
        if k.revoked:
            state = Text("revoked", style="red")
        elif k.expires_at is not None and k.expires_at <= now:
            state = Text("expired", style="red")
        else:
            state = Text("active", style="green")
        cells: list[str | Text] = [k.id if wide else ids[k.id], k.account_name, k.name]
        if wide:
            cells.append(k.prefix + "…")
        cells += [
            limit_text(rpm) + (mark if k.rpm is None else ""),
            limit_text(tpm) + (mark if k.tpm is None else ""),
            spend_limit_text(k, wide=wide),
            state,
        ]
        if wide:
            cells += [
                "-" if k.expires_at is None else iso_time(k.expires_at),
                "all" if k.models is None else ", ".join(sorted(k.models)),
                iso_time(k.created_at),
            ]
        add_row(table, wide, *cells)
    defaults = not wide and any(k.rpm is None or k.tpm is None for k in keys)
    show(table, wide, *(["* the config default (ratelimit.default_rpm / default_tpm)"] * defaults))


_PER = {"daily": ("/day", " per day"), "weekly": ("/wk", " per week"),
        "monthly": ("/mo", " per month"), "never": ("", " in total")}  # fmt: skip


def spend_limit_text(key: ApiKey, *, wide: bool) -> str:
    """A spend limit and its period: ``$5.00/day`` narrow, ``$5.00 per day`` wide; ``-``: none."""
    if key.spend_limit is None:
        return "-"
    return usd(key.spend_limit) + _PER[key.limit_reset][wide]
