"""Configuration: one TOML file (docs/operations.md) over embedded defaults, then env overrides.

Everything is parsed once into frozen dataclasses; prices become integer
nano-dollars per 1M tokens here so that nothing downstream sees a decimal string.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bastion.money import MoneyError, cost_nanos, parse_usd

if TYPE_CHECKING:
    from bastion.metering import Usage

ENDPOINTS = ("responses", "chat")

CACHE_ISOLATION = ("none", "account")
"""``models[].cache_isolation``: share the upstream's prefix cache, or salt it per account."""

ROUTING = ("least_outstanding", "load_aware", "prefix_affinity")
"""``models[].routing``: how a replica is picked (docs/routing.md)."""

MIN_SALT_SECRET = 32

DEFAULT_SOURCE = "built-in default"
"""``Config.database_source`` when neither a config file nor the environment set the URL."""


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 20_000_000
    workers: int = 1
    drain_timeout_s: float = 30.0  # on SIGTERM: in-flight work may finish this long
    max_json_containers: int = 20_000  # objects + arrays in one body (bastion/bodyguard.py)
    client_write_timeout_s: float = 60.0  # a client that reads nothing this long is cut off
    max_event_bytes: int = 8 * 1024 * 1024  # one upstream SSE event; past it the stream ends
    cache_salt_secret: str = field(default="", repr=False)  # HMAC key of per-account cache_salt


@dataclass(frozen=True)
class RateLimitConfig:
    url: str = "memory://"
    default_rpm: int = 600
    default_tpm: int = 2_000_000


@dataclass(frozen=True)
class MeteringConfig:
    """Allowances that make the tokenizer-free input bound a true upper bound."""

    base_tokens: int = 256
    item_tokens: int = 16
    image_tokens: int = 4096  # per media part, for models that set no ``image_tokens``


@dataclass(frozen=True)
class WebhooksConfig:
    """Where events are POSTed (bastion/webhooks/); an empty url turns delivery off."""

    url: str = ""
    secret: str = field(default="", repr=False)  # the HMAC key of the signature header
    timeout_s: float = 10.0  # one delivery attempt, connect to response
    max_age_s: float = 259_200.0  # 3 days: an event still undelivered then is given up
    poll_interval_s: float = 1.0  # how often each gateway looks for events due


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry spans over OTLP/HTTP (bastion/tracing.py); an empty endpoint: off."""

    otlp_endpoint: str = ""  # the collector's traces URL: http://127.0.0.1:4318/v1/traces
    service_name: str = "bastion"
    sample_ratio: float = 1.0  # of requests traced (a coin per request), 0 to 1
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # collector auth


@dataclass(frozen=True)
class RoutingConfig:
    """What the load_aware and prefix_affinity policies need (docs/routing.md)."""

    scrape_interval_s: float = 1.0  # each replica's /metrics, off the request path
    scrape_timeout_s: float = 0.5  # a scrape slower than this failed
    stale_after_s: float = 3.0  # older load signals are not used
    affinity_bound: float = 1.25  # a replica over this × the mean load is skipped
    affinity_prefix_chars: int = 4096  # of the prompt's leading part, hashed for affinity


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    api_key: str = ""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0
    health_path: str = "/health"  # active health check, relative to the server root
    metrics_path: str = "/metrics"  # load signals (routing), relative to the server root


@dataclass(frozen=True)
class ModelConfig:
    id: str
    upstream_model: str
    endpoints: frozenset[str]
    upstreams: tuple[str, ...]
    input_price: int  # nano-dollars per 1M tokens
    output_price: int
    max_output_tokens: int
    cached_input_price: int = -1  # -1: the input price
    image_tokens: int = 0  # input bound per image/file/audio/video part; 0: [metering]'s
    cache_isolation: str = "none"  # "account": upstream prefix cache salted per account
    routing: str = "least_outstanding"  # one of ROUTING

    @property
    def renamed(self) -> bool:
        return self.upstream_model != self.id

    def cost(self, usage: Usage) -> int:
        """The exact price of ``usage`` in nano-dollars, rounded up once."""
        return cost_nanos(
            usage.input_tokens,
            usage.output_tokens,
            self.input_price,
            self.output_price,
            usage.cached_tokens,
            self.cached_input_price,
        )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database_url: str = "sqlite:///bastion.db"
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    admin_token: str = ""
    refresh_interval_s: float = 1.0
    lease_ttl_s: float = 30.0  # a silent gateway's credit leases are reclaimed after this
    health_check_interval_s: float = 5.0
    # where database_url came from, for the CLI to say which store it opens:
    # DEFAULT_SOURCE, "config file PATH" or "BASTION_DATABASE_URL"
    database_source: str = DEFAULT_SOURCE


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Defaults ← file (``path`` or ``$BASTION_CONFIG``) ← environment overrides."""
    env = dict(os.environ if env is None else env)
    data = tomllib.loads(resources.files("bastion").joinpath("defaults.toml").read_text())
    path = path or env.get("BASTION_CONFIG")
    source = DEFAULT_SOURCE
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            user = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        data = _merge(data, user)
        if isinstance(user.get("database"), dict) and "url" in user["database"]:
            source = f"config file {path}"
    if url := env.get("BASTION_DATABASE_URL"):
        data.setdefault("database", {})["url"] = url
        source = "BASTION_DATABASE_URL"
    if url := env.get("BASTION_REDIS_URL"):
        data.setdefault("ratelimit", {})["url"] = url
    if secret := env.get("BASTION_WEBHOOKS_SECRET"):
        data.setdefault("webhooks", {})["secret"] = secret
    if otlp := env.get("BASTION_OTLP_ENDPOINT"):
        data.setdefault("tracing", {})["otlp_endpoint"] = otlp
    if token := env.get("BASTION_ADMIN_TOKEN"):
        data.setdefault("admin", {})["token"] = token
    if salt_secret := env.get("BASTION_CACHE_SALT_SECRET"):
        data.setdefault("server", {})["cache_salt_secret"] = salt_secret
    return replace(parse_config(data), database_source=source)


def _merge(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; arrays of tables (upstreams, models) replace wholesale."""
    out = dict(base)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def parse_config(data: dict[str, Any]) -> Config:
    server = _section(data, "server", ServerConfig)
    if server.cache_salt_secret and len(server.cache_salt_secret) < MIN_SALT_SECRET:
        raise ConfigError(
            f"server.cache_salt_secret must be at least {MIN_SALT_SECRET} characters"
            " (e.g. the output of: openssl rand -base64 32)"
        )
    ratelimit = _section(data, "ratelimit", RateLimitConfig)
    metering = _section(data, "metering", MeteringConfig)
    webhooks = _webhooks(_section(data, "webhooks", WebhooksConfig))
    tracing = _tracing(_section(data, "tracing", TracingConfig))
    upstreams: dict[str, UpstreamConfig] = {}
    for i, raw in enumerate(data.get("upstreams", [])):
        up = _build(UpstreamConfig, raw, f"upstreams[{i}]")
        if not up.url.startswith(("http://", "https://")):
            raise ConfigError(f"upstreams[{i}].url must be http(s)://…, got {up.url!r}")
        upstreams[up.name] = UpstreamConfig(**{**up.__dict__, "url": up.url.rstrip("/")})
    models: dict[str, ModelConfig] = {}
    for i, raw in enumerate(data.get("models", [])):
        models_key = f"models[{i}]"
        raw = dict(raw)
        try:
            model = ModelConfig(
                id=str(raw.pop("id")),
                upstream_model=str(raw.pop("upstream_model", "") or ""),
                endpoints=frozenset(raw.pop("endpoints", ENDPOINTS)),
                upstreams=tuple(raw.pop("upstreams", ())),
                input_price=parse_usd(raw.pop("input_price")),
                output_price=parse_usd(raw.pop("output_price")),
                max_output_tokens=int(raw.pop("max_output_tokens")),
                cached_input_price=_price_or_unset(raw.pop("cached_input_price", None)),
                image_tokens=int(raw.pop("image_tokens", metering.image_tokens)),
                cache_isolation=str(raw.pop("cache_isolation", "none")),
                routing=str(raw.pop("routing", "least_outstanding")),
            )
        except KeyError as exc:
            raise ConfigError(f"{models_key}: missing {exc.args[0]}") from None
        except MoneyError as exc:
            raise ConfigError(f"{models_key}: prices are decimal strings: {exc}") from None
        if raw:
            raise ConfigError(f"{models_key}: unknown keys {sorted(raw)}")
        if not model.upstream_model:
            model = ModelConfig(**{**model.__dict__, "upstream_model": model.id})
        if model.cached_input_price == -1:
            model = ModelConfig(**{**model.__dict__, "cached_input_price": model.input_price})
        if not 0 <= model.cached_input_price <= model.input_price:
            raise ConfigError(
                f"{models_key}.cached_input_price must be between 0 and input_price"
                " (a cached token never costs more than a fresh one)"
            )
        if min(model.input_price, model.output_price) < 0:
            raise ConfigError(f"{models_key}: prices must not be negative")
        if model.image_tokens < 1:
            raise ConfigError(f"{models_key}.image_tokens must be positive")
        if bad := model.endpoints - set(ENDPOINTS):
            raise ConfigError(f"{models_key}.endpoints: unknown {sorted(bad)}")
        if not model.upstreams:
            raise ConfigError(f"{models_key}.upstreams: name at least one upstream")
        if missing := [u for u in model.upstreams if u not in upstreams]:
            raise ConfigError(f"{models_key}.upstreams: no upstream named {missing}")
        if model.max_output_tokens < 1:
            raise ConfigError(f"{models_key}.max_output_tokens must be positive")
        _cache_isolation(model, models_key, server)
        if model.routing not in ROUTING:
            raise ConfigError(
                f"{models_key}.routing must be one of {', '.join(ROUTING)}, got {model.routing!r}"
            )
        models[model.id] = model
    db = data.get("database", {})
    admin = data.get("admin", {})
    return Config(
        server=server,
        database_url=str(db.get("url", Config.database_url)),
        ratelimit=ratelimit,
        metering=metering,
        webhooks=webhooks,
        tracing=tracing,
        routing=_routing(_section(data, "routing", RoutingConfig)),
        upstreams=upstreams,
        models=models,
        admin_token=str(admin.get("token", "")),
        refresh_interval_s=float(data.get("refresh_interval_s", 1.0)),
        lease_ttl_s=_lease_ttl(data.get("lease_ttl_s", 30.0)),
        health_check_interval_s=float(data.get("health_check_interval_s", 5.0)),
    )


def _section(data: dict[str, Any], name: str, cls: type) -> Any:
    return _build(cls, data.get(name, {}), name)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    fields = cls.__dataclass_fields__
    if unknown := set(raw) - set(fields):
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        values = {k: _coerce(fields[k].type, v) for k, v in raw.items()}
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(annotation: Any, value: Any) -> Any:
    kind = {"int": int, "float": float, "str": str}.get(str(annotation))
    if kind is int and isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return kind(value) if kind else value


def _lease_ttl(value: Any) -> float:
    ttl = float(value)
    if not 2.0 <= ttl <= 3600.0:
        raise ConfigError(f"lease_ttl_s must be between 2 and 3600 seconds, got {value!r}")
    return ttl


def _webhooks(hooks: WebhooksConfig) -> WebhooksConfig:
    """A url needs a secret: an unsigned event could be forged by anyone who finds the url."""
    if not hooks.url:
        return hooks
    if not hooks.url.startswith(("http://", "https://")):
        raise ConfigError(f"webhooks.url must be http(s)://…, got {hooks.url!r}")
    if not hooks.secret:
        raise ConfigError(
            "webhooks.url is set but webhooks.secret is empty: set a secret (or"
            " BASTION_WEBHOOKS_SECRET) so receivers can verify the bastion-signature header"
        )
    for name in ("timeout_s", "max_age_s", "poll_interval_s"):
        if getattr(hooks, name) <= 0:
            raise ConfigError(f"webhooks.{name} must be positive")
    return hooks


def _tracing(tracing: TracingConfig) -> TracingConfig:
    """A collector base URL (no path) gets the OTLP traces path, as OTel's own variable does."""
    ratio = tracing.sample_ratio
    if not 0.0 <= ratio <= 1.0:  # NaN fails too
        raise ConfigError(f"tracing.sample_ratio must be between 0 and 1, got {ratio}")
    if not tracing.service_name:
        raise ConfigError("tracing.service_name must not be empty")
    headers = tracing.headers
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and "\n" not in v and "\r" not in v
        for k, v in headers.items()
    ):
        raise ConfigError('tracing.headers must be a table of strings: name = "value"')
    if not tracing.otlp_endpoint:
        return tracing
    try:
        url = urlsplit(tracing.otlp_endpoint)
        url.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        url = urlsplit("")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            "tracing.otlp_endpoint must be an http(s):// URL such as"
            f" http://127.0.0.1:4318/v1/traces, got {tracing.otlp_endpoint!r}"
        )
    if url.path in ("", "/"):
        return replace(tracing, otlp_endpoint=url._replace(path="/v1/traces").geturl())
    return tracing


def _routing(routing: RoutingConfig) -> RoutingConfig:
    """Signals must be able to arrive before they go stale, and a scrape end before the next."""
    r = routing
    if not r.scrape_interval_s > 0 or not 0 < r.scrape_timeout_s <= r.scrape_interval_s:
        raise ConfigError(
            "routing.scrape_interval_s must be positive and routing.scrape_timeout_s between 0"
            " and it"
        )
    if not r.stale_after_s > r.scrape_interval_s:
        raise ConfigError("routing.stale_after_s must be longer than routing.scrape_interval_s")
    if not r.affinity_bound >= 1.0:  # NaN fails too
        raise ConfigError(f"routing.affinity_bound must be at least 1, got {r.affinity_bound}")
    if r.affinity_prefix_chars < 1:
        raise ConfigError("routing.affinity_prefix_chars must be positive")
    return r


def _cache_isolation(model: ModelConfig, where: str, server: ServerConfig) -> None:
    """Refused rather than derived: a salt secret made up here would differ between
    replicas (one tenant, several caches) or be guessable (no isolation at all)."""
    if model.cache_isolation not in CACHE_ISOLATION:
        raise ConfigError(
            f"{where}.cache_isolation must be 'none' or 'account', got {model.cache_isolation!r}"
        )
    if model.cache_isolation == "account" and not server.cache_salt_secret:
        raise ConfigError(
            f"{where}.cache_isolation is 'account' but server.cache_salt_secret is not set:"
            " set it (or BASTION_CACHE_SALT_SECRET) to the same random value on every replica,"
            " e.g. the output of: openssl rand -base64 32"
        )


def _price_or_unset(value: Any) -> int:
    return -1 if value is None else parse_usd(value)
