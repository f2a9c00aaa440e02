"""The operator CLI: ``bastion accounts|keys|usage|refusals|audit|doctor|serve|sim|demo``.

Reference: docs/cli.md.

Each store command loads the config, opens the store, does one thing and closes
it; the gateway sees the change within seconds through its snapshot refresh.
Every command takes ``--config``, ``--json`` and ``--verbose`` (also after its
arguments). Refusals (unknown account, bad amount, overdraft, bad config, missing
database) print one line on stderr and exit 1.

One module per concern: accounts, keys, usage, refusals, audit, doctor (what is misconfigured),
processes (serve/sim/demo);
render (tables, money), storeopen (which store, and saying so), options (shared).
"""

from __future__ import annotations

import re
import sys

import typer

from bastion.cli import accounts, audit, doctor, keys, processes, refusals, usage
from bastion.cli.options import CliError
from bastion.config import ConfigError
from bastion.money import MoneyError
from bastion.store import StoreError

app = typer.Typer(
    help="Bastion: a metered, OpenAI-compatible LLM API gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(accounts.app, name="accounts")
app.add_typer(keys.app, name="keys")
app.command("usage")(usage.usage)
app.command("refusals")(refusals.refusals)
app.command("audit")(audit.audit)
app.command("doctor")(doctor.doctor)
app.command("serve")(processes.serve)
app.command("sim")(processes.sim)
app.command("demo")(processes.demo)


def negative_after_dashes(args: list[str]) -> list[str]:
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
        app(args=negative_after_dashes(sys.argv[1:]), prog_name="bastion")
    except (StoreError, ConfigError, MoneyError, CliError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(1) from None
