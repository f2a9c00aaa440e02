"""``bastion keys create|list|update|revoke``: API keys and their limits.

``update`` and ``revoke`` take a key's id or a unique prefix of it, so the short
ids ``keys list`` shows can be pasted back. Besides rate limits a key may carry a
spend limit per period, an expiry time and a model allow-list; model names are
checked against the loaded config's catalogue (the gateway's, given the same
``--config``), so a typo is refused now rather than found by a customer later.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape

from bastion.cli.options import CliError, ConfigOpt, JsonOpt, LimitOpt, VerboseOpt, WideOpt, emit
from bastion.cli.render import limit_text, out, show_keys, spend_limit_text
from bastion.cli.storeopen import with_store
from bastion.config import Config
from bastion.money import parse_usd
from bastion.store import UNCHANGED, ApiKey, NotFound, Store, Unchanged
from bastion.views import (
    check_models,
    effective_limits,
    iso_time,
    key_json,
    new_key_json,
    parse_expiry,
)

app = typer.Typer(help="API keys: create, list, change limits, revoke.", no_args_is_help=True)

IdArg = Annotated[
    str, typer.Argument(metavar="ID", help="The key's id, or a unique prefix of it (8+ chars).")
]

MIN_PREFIX = len("key_") + 4
"""A prefix this short or shorter could name any key: refused (revoking cannot be undone)."""

SpendOpt = Annotated[
    str | None,
    typer.Option(
        "--limit", metavar="USD", help="Spend limit in USD per --limit-reset period; 'none'."
    ),
]
ResetOpt = Annotated[
    str | None,
    typer.Option(
        "--limit-reset",
        metavar="never|daily|weekly|monthly",
        help="When the spend limit starts over (00:00 UTC; weeks on Monday). Default: never.",
    ),
]
ExpiresOpt = Annotated[
    str | None,
    typer.Option(
        "--expires", metavar="ISO-TIME", help="Refuse the key from then on (naive = UTC); 'none'."
    ),
]
ModelsOpt = Annotated[
    str | None,
    typer.Option(
        "--models", metavar="A,B", help="Only these models (comma-separated); 'all': every model."
    ),
]


def spend_arg(text: str) -> int | None:
    """``--limit``: USD as a decimal string, or 'none'."""
    return None if text.strip().lower() == "none" else parse_usd(text)


def expires_arg(text: str) -> int | None:
    """``--expires``: an ISO 8601 time, or 'none'."""
    if text.strip().lower() == "none":
        return None
    try:
        return parse_expiry(text)
    except ValueError as exc:
        raise CliError(f"--expires: {exc}") from None


def models_arg(text: str, config: Config) -> frozenset[str] | None:
    """``--models``: names from the config's catalogue, comma-separated, or 'all'."""
    if text.strip().lower() == "all":
        return None
    try:
        return check_models(text.split(","), config)
    except ValueError as exc:
        raise CliError(f"--models: {exc}") from None


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
    limit: SpendOpt = None,
    limit_reset: ResetOpt = None,
    expires: ExpiresOpt = None,
    models: ModelsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Create a key; the key itself is shown only this once."""
    spend_limit = None if limit is None else spend_arg(limit)
    expires_at = None if expires is None else expires_arg(expires)
    if expires_at is not None and expires_at <= time.time_ns() // 1000:
        raise CliError(f"--expires {expires} is in the past: the key could never be used")

    async def make(store: Store, cfg: Config) -> tuple[ApiKey, str, Config]:
        key, plaintext = await store.create_key(
            account,
            name,
            rpm,
            tpm,
            spend_limit=spend_limit,
            limit_reset=limit_reset or "never",
            expires_at=expires_at,
            models=None if models is None else models_arg(models, cfg),
        )
        return key, plaintext, cfg

    key, plaintext, cfg = with_store(make, config, verbose, writes=True)
    eff_rpm, eff_tpm = effective_limits(key, cfg)

    def human() -> None:
        out.print(f"Created key {key.id} for account [bold]{escape(key.account_name)}[/bold]")
        out.print(f"rpm {limit_text(eff_rpm)}, tpm {limit_text(eff_tpm)}")
        for line in controls_lines(key):
            out.print(line, highlight=False, markup=False)
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
    limit: SpendOpt = None,
    limit_reset: ResetOpt = None,
    expires: ExpiresOpt = None,
    models: ModelsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    wide: WideOpt = False,
) -> None:
    """Change a key; only what is given changes (0 = unlimited; 'none'/'all' clear).

    Gateways apply the change within seconds; an expiry in the past ends the key now."""
    if all(v is None for v in (rpm, tpm, limit, limit_reset, expires, models)):
        raise CliError(
            "nothing to change: give --rpm, --tpm, --limit, --limit-reset, --expires or --models"
        )
    spend_limit: int | Unchanged | None = UNCHANGED if limit is None else spend_arg(limit)
    expires_at: int | Unchanged | None = UNCHANGED if expires is None else expires_arg(expires)

    async def change(store: Store, cfg: Config) -> tuple[ApiKey, Config]:
        allowed = UNCHANGED if models is None else models_arg(models, cfg)
        key = await store.update_key(
            await resolve(store, key_id),
            rpm=rpm,
            tpm=tpm,
            spend_limit=spend_limit,
            limit_reset=limit_reset,
            expires_at=expires_at,
            models=allowed,
        )
        return key, cfg

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


def controls_lines(key: ApiKey) -> list[str]:
    """The spend limit, expiry and model list a new key was given, one line each."""
    lines = []
    if key.spend_limit is not None:
        lines.append(f"spend limit {spend_limit_text(key, wide=True)}")
    if key.expires_at is not None:
        lines.append(f"expires {iso_time(key.expires_at)}")
    if key.models is not None:
        lines.append(f"models {', '.join(sorted(key.models))}")
    return lines
