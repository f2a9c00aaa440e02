"""What every command module shares: the option types and the CLI's own refusal.

Kept apart from ``__init__`` (which imports every command module) so that the
command modules can import it without an import cycle.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (default: $BASTION_CONFIG, else built-in)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Say on stderr which store is used and why."),
]
WideOpt = Annotated[bool, typer.Option("--wide", help="Every column and full ids.")]
# serve/sim/demo accept both for uniformity; --json means nothing to them.
HiddenJsonOpt = Annotated[bool, typer.Option("--json", hidden=True)]
HiddenConfigOpt = Annotated[Path | None, typer.Option("--config", hidden=True)]
LimitOpt = Annotated[int | None, typer.Option(help="0 = unlimited; default: the config default.")]


class CliError(Exception):
    """A refusal detected by the CLI itself (bad --since, missing database, ambiguous id)."""


def emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    """JSON on stdout for machines, else the human rendering."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        human()
