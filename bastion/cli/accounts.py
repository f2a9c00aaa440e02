"""``bastion accounts create|credit|update|show|list``: prepaid accounts and their credit."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from bastion.cli.options import CliError, ConfigOpt, JsonOpt, VerboseOpt, WideOpt, emit
from bastion.cli.render import out, show_accounts, usd
from bastion.cli.storeopen import with_store
from bastion.money import parse_usd
from bastion.views import account_json, new_account_json

app = typer.Typer(help="Prepaid accounts and their credit.", no_args_is_help=True)


@app.command("create")
def create(
    name: str,
    credit: Annotated[str, typer.Option(help="Initial credit in USD, e.g. 10 or 0.50.")] = "0",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Create an account, optionally with initial credit."""
    amount = parse_usd(credit)
    account = with_store(lambda s, _: s.create_account(name, amount), config, verbose, writes=True)
    emit(
        as_json,
        new_account_json(account),
        lambda: out.print(
            f"Created account [bold]{escape(account.name)}[/bold] ({account.id}),"
            f" balance {usd(account.balance)}"
        ),
    )


@app.command("credit", context_settings={"ignore_unknown_options": True})
def credit(
    name: str,
    amount_usd: Annotated[
        str, typer.Argument(metavar="USD", help="USD to add; negative (-0.50) takes credit back.")
    ],
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            metavar="K", help="Apply this top-up once: a repeat with K prints the first answer."
        ),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Add credit to an account (negative to take back; never below zero)."""
    amount = parse_usd(amount_usd)
    account = with_store(
        lambda s, _: s.credit_account(name, amount, idempotency_key), config, verbose, writes=True
    )
    if account.replayed:  # stdout stays the first answer's, for scripts that retry
        sys.stderr.write(
            f"note: idempotency key {idempotency_key!r} was used before for this same top-up:"
            " nothing was added; this is its first answer\n"
        )
    emit(
        as_json,
        account_json(account),
        lambda: out.print(
            f"{'Added' if amount > 0 else 'Took back'} {usd(abs(amount))}:"
            f" [bold]{escape(account.name)}[/bold] balance is now {usd(account.balance)}"
        ),
    )


@app.command("update")
def update(
    name: str,
    alert_below: Annotated[
        str | None,
        typer.Option(
            metavar="USD",
            help="Webhook account.balance_low when the balance falls below this; none: off.",
        ),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Change an account's settings: its balance alert."""
    if alert_below is None:
        raise CliError("nothing to change: give --alert-below USD (or none)")
    alert = None if alert_below.strip().lower() == "none" else parse_usd(alert_below)
    account = with_store(
        lambda s, _: s.update_account(name, alert_below=alert), config, verbose, writes=True
    )

    def human() -> None:
        said = "off" if account.alert_below is None else f"below {usd(account.alert_below)}"
        out.print(
            f"[bold]{escape(account.name)}[/bold]: balance alert {said}"
            f" (balance {usd(account.balance)})"
        )

    emit(as_json, account_json(account), human)


@app.command("show")
def show(
    name: str,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """Show one account: balance, credit held for requests in flight, total spent."""
    account = with_store(lambda s, _: s.get_account(name), config, verbose)
    emit(as_json, account_json(account), lambda: show_accounts([account], wide=wide))


@app.command("list")
def list_(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """List all accounts, by name."""
    accounts = with_store(lambda s, _: s.list_accounts(), config, verbose)
    emit(
        as_json,
        [account_json(a) for a in accounts],
        lambda: show_accounts(accounts, wide=wide),
    )
