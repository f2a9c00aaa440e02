"""Checks that need only the config: does it load, which file and store, and do its
values look like mistakes (prices, caps, limits, tokens, webhooks).

``load_config`` already refuses what the gateway cannot run with (a webhook url
without a secret, cache isolation without a salt secret, a model naming an unknown
upstream, a cached price above the input price, a non-positive cap); here such a
refusal becomes one error finding with a fix, and the rest are warnings about
values the gateway accepts but that are probably not what the operator meant.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from bastion.cli.storeopen import describe, masked
from bastion.config import Config, ConfigError, load_config
from bastion.doctor.findings import Finding, error, listed, ok, warning
from bastion.money import cost_nanos, format_usd, parse_usd
from bastion.store import StoreError

ENV_OVERRIDES = (
    "BASTION_DATABASE_URL",
    "BASTION_REDIS_URL",
    "BASTION_ADMIN_TOKEN",
    "BASTION_WEBHOOKS_SECRET",
    "BASTION_CACHE_SALT_SECRET",
    "BASTION_OTLP_ENDPOINT",
)
MAX_PRICE = parse_usd("1000")  # per 1M tokens: above it, most likely USD per 1K or per token
HUGE_OUTPUT_TOKENS = 1_000_000  # no model writes this much in one answer
MIN_ADMIN_TOKEN = 24
SECRET_HINT = "e.g. the output of: openssl rand -base64 32"

# A refusal's message names the key; these add the action where it is not obvious.
_FIXES = (
    (
        "webhooks.secret is empty",
        "set webhooks.secret (or BASTION_WEBHOOKS_SECRET) to a random"
        f" value, {SECRET_HINT}, and give the same value to the receiver",
    ),
    (
        "server.cache_salt_secret is not set",
        "set server.cache_salt_secret (or"
        f" BASTION_CACHE_SALT_SECRET) to the same random value on every replica, {SECRET_HINT};"
        ' or set that model\'s cache_isolation = "none"',
    ),
    (
        "cache_salt_secret must be at least",
        f"use a longer server.cache_salt_secret (or BASTION_CACHE_SALT_SECRET), {SECRET_HINT}",
    ),
    (
        "no upstream named",
        "add an [[upstreams]] entry with that name, or correct the model's upstreams list",
    ),
    (
        "cached_input_price must be between",
        "lower the model's cached_input_price to at most its"
        " input_price (or remove it: it then defaults to input_price)",
    ),
)


def config_source(path: Path | None) -> str:
    """Which config file is read, and why: the flag, the environment, or none at all."""
    if path is not None:
        return f"{path} (--config)"
    if env := os.environ.get("BASTION_CONFIG"):
        return f"{env} (BASTION_CONFIG)"
    return "none: the built-in defaults (pass --config or set BASTION_CONFIG to use a file)"


def load(path: Path | None) -> tuple[Config | None, list[Finding]]:
    """The config and the findings about where it came from; None if it cannot be used."""
    source = config_source(path)
    try:
        config = load_config(path)
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return None, [refused(exc, path or os.environ.get("BASTION_CONFIG"))]
    try:
        store = describe(config)
    except StoreError:
        store = masked(config.database_url)
    findings = [ok("config", "config file", source), ok("config", "store", store)]
    if overrides := [name for name in ENV_OVERRIDES if os.environ.get(name)]:
        findings.append(ok("config", "environment overrides", ", ".join(overrides)))
    return config, findings


def refused(exc: Exception, path: Path | str | None) -> Finding:
    """A config the gateway would not start with: what is wrong and what to change."""
    message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
    if message.startswith("cannot read config"):
        return error(
            "config",
            "config file unreadable",
            message,
            "check the path given to --config (or BASTION_CONFIG) and its permissions",
        )
    if isinstance(exc.__context__, tomllib.TOMLDecodeError):
        return error(
            "config",
            "config file is not valid TOML",
            message,
            "correct the TOML syntax at the line and column named",
        )
    where = f"in {path}" if path else "in the environment variable that sets it (no config file)"
    if not isinstance(exc, ConfigError):  # a value of the wrong type, met by the loader
        fix = (
            f"find the value of the wrong type {where}: sections are [tables], upstreams and"
            " models are [[arrays of tables]], numbers are unquoted, prices are quoted"
            " (docs/operations.md, Configuration reference)"
        )
    else:
        fix = next((fix for needle, fix in _FIXES if needle in message), "")
        fix = fix or f"correct the key the message names, {where}"
    return error("config", "config refused", message, fix)


def setting_findings(config: Config) -> list[Finding]:
    """Values the gateway accepts that are probably mistakes; one ok finding per clean group."""
    return [*model_findings(config), *admin_findings(config), *webhook_findings(config)]


def model_findings(config: Config) -> list[Finding]:
    found: list[Finding] = []
    for model in config.models.values():
        found += _model_findings(model.id, model.input_price, model.output_price)
        if model.max_output_tokens > HUGE_OUTPUT_TOKENS:
            reserve = cost_nanos(0, model.max_output_tokens, 0, model.output_price)
            found.append(
                warning(
                    "models",
                    f"{model.id}: huge max_output_tokens",
                    f"max_output_tokens = {model.max_output_tokens:,}: a request that sets no"
                    f" cap of its own reserves credit for that many output tokens"
                    f" (${format_usd(reserve)}), so accounts with less are refused",
                    f'set max_output_tokens of model "{model.id}" to what the model can'
                    " really write (its context length at most)",
                )
            )
    if not found:
        names = listed(sorted(config.models))
        found.append(ok("models", "prices and caps", f"{len(config.models)} models: {names}"))
    return found


def _model_findings(model_id: str, input_price: int, output_price: int) -> list[Finding]:
    found: list[Finding] = []
    for name, price in (("input_price", input_price), ("output_price", output_price)):
        if price == 0:
            found.append(
                warning(
                    "models",
                    f"{model_id}: free {name.split('_')[0]}",
                    f"{name} is 0: these tokens cost the accounts nothing",
                    f'if that is not intended, set {name} of model "{model_id}"'
                    " (USD per 1M tokens, a decimal string)",
                )
            )
        elif price > MAX_PRICE:
            found.append(
                warning(
                    "models",
                    f"{model_id}: {name} looks too high",
                    f"{name} is {format_usd(price)} USD per 1M tokens (above"
                    f" {format_usd(MAX_PRICE)}): most likely a price per 1K tokens or per token",
                    f"prices are USD per 1M tokens: multiply a per-token price by 1,000,000"
                    f' (per 1K: by 1,000) and set {name} of model "{model_id}"',
                )
            )
    return found


def admin_findings(config: Config) -> list[Finding]:
    token = config.admin_token
    if not token:
        return [ok("admin", "admin API off", "no admin token: /admin/v1 is not served")]
    if len(token) < MIN_ADMIN_TOKEN:
        return [
            warning(
                "admin",
                "admin token is short",
                f"the admin token has {len(token)} characters (fewer than {MIN_ADMIN_TOKEN}):"
                " it guards every account's money",
                f"set [admin] token (or BASTION_ADMIN_TOKEN) to a long random value, {SECRET_HINT}",
            )
        ]
    return [ok("admin", "admin API on", f"token of {len(token)} characters")]


def webhook_findings(config: Config) -> list[Finding]:
    url = config.webhooks.url
    if not url:
        return [ok("webhooks", "webhooks off", "no webhooks.url: no events are sent")]
    parts = urlsplit(url)
    if parts.scheme == "http" and not is_local(parts.hostname or ""):
        return [
            warning(
                "webhooks",
                "events sent unencrypted",
                f"webhooks.url {masked(url)} is http:// to another machine: account names and"
                " balances cross the network in the clear (the signature stops forgery, not"
                " reading)",
                "use an https:// url for webhooks.url",
            )
        ]
    return [ok("webhooks", "webhooks on", f"events to {masked(url)}, signed")]


def is_local(host: str) -> bool:
    """Loopback only: a private network is still a network."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
