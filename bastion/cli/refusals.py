"""``bastion refusals``: requests Bastion refused for the customer's own reasons.

A 401 (revoked or unknown key), 402 (no credit), 403 or 429 (rate limit) writes no
ledger row, so ``usage`` cannot show a customer being refused; this does. One line
per account and key, a column per status, the most recently refused first. Counts
are kept per UTC hour, so ``--since``/``--until`` round outwards to whole hours.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated

import typer

from bastion.cli.options import ConfigOpt, JsonOpt, VerboseOpt, WideOpt, emit
from bastion.cli.render import Kind, add_row, minute, new_table, plural, short_ids, show
from bastion.cli.storeopen import with_store
from bastion.cli.usage import SinceOpt, UntilOpt, parse_time
from bastion.config import Config
from bastion.store import Refusal, Store
from bastion.views import iso_time, refusal_json

STATUSES = (401, 402, 403, 429)
UNKNOWN = "(unknown key)"


def refusals(
    account: Annotated[str | None, typer.Option(help="Only this account's keys.")] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """Refused requests (401, 402, 403, 429) per account and key; they have no ledger row."""
    since_us = None if since is None else parse_time("--since", since)
    until_us = None if until is None else parse_time("--until", until)

    async def read(store: Store, _: Config) -> tuple[list[Refusal], dict[str, str]]:
        rows = await store.refusals(account, since_us, until_us)
        return rows, {a.id: a.name for a in await store.list_accounts()}

    rows, names = with_store(read, config, verbose)
    emit(as_json, [refusal_json(r, names) for r in rows], lambda: show_refusals(rows, names, wide))


def show_refusals(rows: list[Refusal], names: dict[str, str], wide: bool) -> None:
    """One line per (account, key): a count per status; the store gives them newest first."""
    per_key: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: dict.fromkeys(STATUSES, 0))
    last: dict[tuple[str, str], int] = {}
    for r in rows:
        who = (r.account_id, r.key_id)
        per_key[who][r.status] = per_key[who].get(r.status, 0) + r.count
        last[who] = max(last.get(who, 0), r.last_at)
    short = short_ids(key_id for _, key_id in per_key if key_id)
    columns: list[tuple[str, Kind]] = [("account", "text"), ("key", "id")]
    columns += [(str(s), "number") for s in STATUSES] + [("last (UTC)", "id")]
    table = new_table(columns, wide=wide)
    for (account_id, key_id), counts in per_key.items():
        add_row(
            table, wide,
            names.get(account_id, account_id) if account_id else UNKNOWN,
            (key_id if wide else short[key_id]) if key_id else "-",
            *(f"{counts[s]:,}" if counts[s] else "-" for s in STATUSES),
            iso_time(last[account_id, key_id]) if wide else minute(last[account_id, key_id]),
        )  # fmt: skip
    total = sum(r.count for r in rows)
    keys = sum(1 for _, key_id in per_key if key_id)
    unknown = " and keys Bastion does not know" if ("", "") in per_key else ""
    show(table, wide, f"{plural(total, 'refused request')}, {plural(keys, 'key')}{unknown}")
