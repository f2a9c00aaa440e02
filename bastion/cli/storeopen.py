"""Opening the store: which one, saying so, and never creating one just to read it.

The built-in default, ``sqlite:///bastion.db``, is relative to the working
directory, so the same command run from another directory would otherwise open
(or create) another, empty database. Hence: commands that only read refuse a
SQLite file that is not there, every command can name its store (``--verbose``),
and using the built-in default is always noted on stderr (never on stdout, which
``--json`` keeps pure).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bastion.cli.options import CliError
from bastion.config import DEFAULT_SOURCE, Config, load_config
from bastion.store import Store, open_store
from bastion.store.sqlite import sqlite_path

T = TypeVar("T")

OTHER_STORE = "--config or BASTION_DATABASE_URL chooses another"


def sqlite_file(url: str) -> Path | None:
    """The absolute path of an on-disk SQLite database; None for PostgreSQL or in-memory."""
    if not url.startswith("sqlite:"):
        return None
    path = sqlite_path(url)
    return None if path == ":memory:" else Path.cwd() / path


def masked(url: str) -> str:
    """The URL with any password (in the user part or a ``password=`` query) as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if "password=" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def describe(config: Config) -> str:
    """``sqlite:////abs/x.db (config file b.toml)``: the store, absolute, and its source."""
    file = sqlite_file(config.database_url)
    url = masked(config.database_url) if file is None else f"sqlite:///{file}"
    source = config.database_source
    if source == DEFAULT_SOURCE:
        source = f"the built-in default, relative to this directory; {OTHER_STORE}"
    return f"{url} ({source})"


def load(config_path: Path | None, verbose: bool, *, writes: bool) -> Config:
    """The config, after refusing a read of a missing SQLite file and saying which store.

    Writers may create the file (``accounts create`` starts a new database).
    """
    config = load_config(config_path)
    file = sqlite_file(config.database_url)
    creating = False
    if file is not None and not file.exists():
        if not writes:
            raise CliError(_missing(config, file))
        creating = True
    announce(config, verbose, creating=creating)
    return config


def announce(config: Config, verbose: bool, *, creating: bool = False) -> None:
    """``--verbose``: the store line; otherwise a note only for the built-in default."""
    if verbose:
        sys.stderr.write(f"store: {describe(config)}\n")
    elif config.database_source == DEFAULT_SOURCE and (file := sqlite_file(config.database_url)):
        where = f"./{file.name} in {file.parent}" if file.parent == Path.cwd() else str(file)
        sys.stderr.write(
            f"note: {'creating' if creating else 'using'} {where}"
            f" (the built-in default; {OTHER_STORE})\n"
        )


def with_store(
    action: Callable[[Store, Config], Awaitable[T]],
    config_path: Path | None,
    verbose: bool,
    *,
    writes: bool = False,
) -> T:
    """Load the config, open and migrate the store, run ``action``, always close."""
    config = load(config_path, verbose, writes=writes)

    async def go() -> T:
        store = open_store(config.database_url, config.lease_ttl_s)
        try:
            await store.migrate()
            return await action(store, config)
        finally:
            await store.close()

    return asyncio.run(go())


def _missing(config: Config, file: Path) -> str:
    url, source = config.database_url, config.database_source
    relative = not sqlite_path(url).startswith("/")
    if source == DEFAULT_SOURCE:
        return (
            f"no database at {file} (the default {url}, relative to this directory);"
            " pass --config or set BASTION_DATABASE_URL"
        )
    where = f"{url} from {source}" + (", relative to this directory" if relative else "")
    return f"no database at {file} ({where}); check the URL: only commands that write create one"
