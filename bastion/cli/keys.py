"""``bastion keys create|list|update|revoke``: API keys and their limits.

``update`` and ``revoke`` take a key's id or a unique prefix of it, so the short
ids ``keys list`` shows can be pasted back.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from bastion.cli.options import CliError, ConfigOpt, JsonOpt, LimitOpt, VerboseOpt, WideOpt, emit
from bastion.cli.render import limit_text, out, show_keys
from bastion.cli.storeopen import with_store
from bastion.config import Config
from bastion.store import ApiKey, NotFound, Store
from bastion.views import effective_limits, key_json, new_key_json

app = typer.Typer(help="API keys: create, list, change limits, revoke.", no_args_is_help=True)

IdArg = Annotated[
    str, typer.Argument(metavar="ID", help="The key's id, or a unique prefix of it (8+ chars).")
]

MIN_PREFIX = len("key_") + 4
"""A prefix this short or shorter could name any key: refused (revoking cannot be undone)."""


async def resolve(store: Store, given: str) -> str:
    """The full id of the one key whose id is ``given`` or starts with it."""
    ids = [k.id for k in await store.list_keys()]
    if given in ids:
        return given
    matches = [i for i in ids if i.startswith(given)]
    if not matches:
        raise NotFound(f"no key with id {given!r}")
    if len(matches) > 1:
        shown = ", ".join(matches[:4]) + (", …" if len(matches) > 4 else "")
        raise CliError(f"key id {given!r} is ambiguous: {len(matches)} keys start so ({shown})")
    if len(given) < MIN_PREFIX:
        raise CliError(f"key id {given!r} is too short: give at least {MIN_PREFIX} characters")
    return matches[0]


@app.command("create")
def create(
    account: Annotated[str, typer.Option(help="Account name the key charges.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    rpm: LimitOpt = None,
    tpm: LimitOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Create a key; the key itself is shown only this once."""

    async def make(store: Store, cfg: Config) -> tuple[ApiKey, str, Config]:
        key, plaintext = await store.create_key(account, name, rpm, tpm)
        return key, plaintext, cfg

    key, plaintext, cfg = with_store(make, config, verbose, writes=True)
    eff_rpm, eff_tpm = effective_limits(key, cfg)

    def human() -> None:
        out.print(f"Created key {key.id} for account [bold]{escape(key.account_name)}[/bold]")
        out.print(f"rpm {limit_text(eff_rpm)}, tpm {limit_text(eff_tpm)}")
        out.print("Key (shown only now; store it safely):")
        out.print(plaintext, soft_wrap=True, highlight=False)

    emit(as_json, new_key_json(key, plaintext, cfg), human)


@app.command("list")
def list_(
    account: Annotated[str | None, typer.Option(help="Only this account's keys.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """List keys, oldest first (never the key itself; --wide shows its prefix)."""

    async def read(store: Store, cfg: Config) -> tuple[list[ApiKey], Config]:
        return await store.list_keys(account), cfg

    keys, cfg = with_store(read, config, verbose)
    emit(
        as_json,
        [key_json(k, cfg) for k in keys],
        lambda: show_keys(keys, cfg, wide=wide),
    )


@app.command("update")
def update(
    key_id: IdArg,
    rpm: LimitOpt = None,
    tpm: LimitOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """Change a key's limits; only the limits given change (0 = unlimited)."""
    if rpm is None and tpm is None:
        raise CliError("nothing to change: give --rpm and/or --tpm")

    async def change(store: Store, cfg: Config) -> tuple[ApiKey, Config]:
        return await store.update_key(await resolve(store, key_id), rpm=rpm, tpm=tpm), cfg

    key, cfg = with_store(change, config, verbose, writes=True)
    emit(as_json, key_json(key, cfg), lambda: show_keys([key], cfg, wide=wide))


@app.command("revoke")
def revoke(
    key_id: IdArg,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Revoke a key: gateways refuse it within seconds. Cannot be undone."""

    async def drop(store: Store, cfg: Config) -> tuple[ApiKey, Config]:
        return await store.revoke_key(await resolve(store, key_id)), cfg

    key, cfg = with_store(drop, config, verbose, writes=True)
    emit(as_json, key_json(key, cfg), lambda: out.print(f"Revoked key {key.id}"))
