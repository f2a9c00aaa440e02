"""Each upstream as the gateway will meet it: TCP, its model list, its health check.

Every upstream is checked at once, each step bounded by the upstream's own timeouts
(connect: ``connect_timeout_s``; an answer: at most ``read_timeout_s``, capped at
``MAX_READ_S``), so ten dead upstreams cost one connect timeout, not ten. The model
list is fetched with the upstream's ``api_key``, as requests are; the health check
without it, as the gateway sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bastion.config import Config, ModelConfig, UpstreamConfig
from bastion.doctor.findings import Finding, error, listed, ok, warning
from bastion.upstreams import CHECK_TIMEOUT_S, health_url

MAX_READ_S = 10.0  # a slow-but-alive model list is not worth waiting read_timeout_s (300 s)


async def check_upstreams(config: Config) -> list[Finding]:
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(
                check_upstream(up, served_on(config, up.name), session)
                for up in config.upstreams.values()
            )
        )
    return [finding for found in results for finding in found]


def served_on(config: Config, upstream: str) -> list[ModelConfig]:
    return [m for m in config.models.values() if upstream in m.upstreams]


async def check_upstream(
    up: UpstreamConfig, models: list[ModelConfig], session: aiohttp.ClientSession
) -> list[Finding]:
    check = f"upstream {up.name}"
    if problem := await _tcp(up, check):
        return [problem]
    listing, health = await asyncio.gather(
        _models(up, models, session, check), _health(up, session, check)
    )
    return [*listing, health]


def _address(up: UpstreamConfig) -> tuple[str, int]:
    url = urlsplit(up.url)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


async def _tcp(up: UpstreamConfig, check: str) -> Finding | None:
    host, port = _address(up)
    where = f"upstream {up.name!r}"
    try:
        async with asyncio.timeout(up.connect_timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return error(
            check,
            "unreachable",
            f"{host}:{port} accepted no connection within connect_timeout_s ="
            f" {up.connect_timeout_s:g} s",
            f"check the host and port in the url of {where}, that the server is up, and that"
            " no firewall drops the connection",
        )
    except socket.gaierror as exc:
        return error(
            check,
            "unknown host",
            f"cannot resolve {host}: {exc.strerror or exc}",
            f"correct the host in the url of {where}, or add it to DNS (or /etc/hosts)",
        )
    except OSError as exc:
        return error(
            check,
            "unreachable",
            f"cannot connect to {host}:{port}: {_reason(exc)}",
            f"start the inference server there (vLLM: vllm serve MODEL --port {port}), or"
            f" correct the url of {where}",
        )
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(up.connect_timeout_s):
            await writer.wait_closed()
    return None


def _reason(exc: OSError) -> str:
    """The system's words (Connection refused), not asyncio's (Connect call failed …)."""
    return os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)


def _timeout(up: UpstreamConfig, read_s: float) -> aiohttp.ClientTimeout:
    read_s = min(up.read_timeout_s, read_s)
    return aiohttp.ClientTimeout(
        total=up.connect_timeout_s + read_s, sock_connect=up.connect_timeout_s, sock_read=read_s
    )


async def _get(
    session: aiohttp.ClientSession, url: str, bounds: aiohttp.ClientTimeout, key: str = ""
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(url, timeout=bounds, headers=headers, allow_redirects=False) as resp:
        return resp.status, await resp.read()


async def _models(
    up: UpstreamConfig, models: list[ModelConfig], session: aiohttp.ClientSession, check: str
) -> list[Finding]:
    url = f"{up.url}/models"
    timeout = _timeout(up, MAX_READ_S)
    try:
        status, body = await _get(session, url, timeout, up.api_key)
    except TimeoutError:
        return [_silent(up, check, f"GET {url}", timeout.sock_read or 0)]
    except aiohttp.ClientError as exc:
        return [_failed(up, check, f"GET {url}", exc)]
    if status in (401, 403):
        return [_refused(up, check, url, status)]
    listing = _listing(body) if status == 200 else None
    if listing is None:
        what = f"answered {status}" if status != 200 else "answered no OpenAI model list"
        return [
            error(
                check,
                "no model list",
                f"GET {url} {what}",
                f"the url of upstream {up.name!r} must be the server's OpenAI-compatible base"
                " URL, ending in /v1 (vLLM: http://HOST:8000/v1)",
            )
        ]
    return model_findings(up, models, listing, check)


def _listing(body: bytes) -> dict[str, dict[str, Any]] | None:
    """``{"data": [{"id": …}, …]}`` → id → entry; None when the body is not that."""
    try:
        data = json.loads(body)["data"]
        return {str(entry["id"]): entry for entry in data if isinstance(entry, dict)}
    except (ValueError, KeyError, TypeError):
        return None


def model_findings(
    up: UpstreamConfig, models: list[ModelConfig], listing: dict[str, dict[str, Any]], check: str
) -> list[Finding]:
    """Every model configured on ``up`` must be listed; its cap must fit the context."""
    if not models:
        return [
            warning(
                check,
                "no model uses it",
                f"no [[models]] entry names upstream {up.name!r}: it is health-checked but"
                " never sent a request",
                "add it to a model's upstreams list, or remove it",
            )
        ]
    found: list[Finding] = []
    served = sorted(listing)
    for model in models:
        entry = listing.get(model.upstream_model)
        if entry is None:
            found.append(_not_served(up, model, served, check))
            continue
        context = entry.get("max_model_len")
        if isinstance(context, int) and model.max_output_tokens > context:
            found.append(
                warning(
                    check,
                    f"model {model.id}: cap above context",
                    f"max_output_tokens = {model.max_output_tokens:,} but the upstream's"
                    f" max_model_len is {context:,}: requests asking for more than fits are"
                    " admitted (and credit reserved for them) only to fail upstream",
                    f'set max_output_tokens of model "{model.id}" to at most {context:,}',
                )
            )
    if not found:
        names = listed([m.upstream_model for m in models])
        what = "the model" if len(models) == 1 else f"all {len(models)} models"
        found.append(ok(check, "models served", f"lists {what} configured on it: {names}"))
    return found


def _not_served(up: UpstreamConfig, model: ModelConfig, served: list[str], check: str) -> Finding:
    """Names what the upstream does list, the likeliest intended name first."""
    close = difflib.get_close_matches(model.upstream_model, served, n=1, cutoff=0.6)
    served = close + [name for name in served if name not in close]
    name = repr(close[0]) if close else "the name the upstream lists"
    return error(
        check,
        f"model {model.id} not served",
        f"upstream {up.name!r} does not list {model.upstream_model!r}"
        f" (it lists: {listed(served) or 'nothing'})",
        f'set upstream_model of model "{model.id}" to {name}, or serve it there'
        f" (vLLM: --served-model-name {model.upstream_model})",
    )


async def _health(up: UpstreamConfig, session: aiohttp.ClientSession, check: str) -> Finding:
    """The gateway counts 5xx or no answer as down; anything else passes its check."""
    url = health_url(up)
    timeout = _timeout(up, CHECK_TIMEOUT_S)
    try:
        status, _ = await _get(session, url, timeout)
    except TimeoutError:
        return _silent(up, check, f"health check GET {url}", timeout.sock_read or 0)
    except aiohttp.ClientError as exc:
        return _failed(up, check, f"health check GET {url}", exc)
    if 200 <= status < 300:
        return ok(check, "healthy", f"GET {url} answered {status}")
    if status >= 500:
        return error(
            check,
            "unhealthy",
            f"GET {url} answered {status}: the gateway keeps it out of rotation until its"
            " health check passes",
            "look at the inference server's log: it is up but not ready (still loading?)",
        )
    return warning(
        check,
        "health path answers no 2xx",
        f"GET {url} answered {status}; the gateway counts only 5xx or no answer as down, so"
        " its health check tells it little",
        f"set health_path of upstream {up.name!r} to the server's health endpoint (vLLM: /health,"
        " at the server root, not under /v1)",
    )


def _refused(up: UpstreamConfig, check: str, url: str, status: int) -> Finding:
    if up.api_key:
        fix = (
            f"check api_key of upstream {up.name!r}: it must be the server's key (vLLM: --api-key)"
        )
    else:
        fix = f"the server wants a key: set api_key of upstream {up.name!r} (vLLM: --api-key)"
    return error(check, "api key refused", f"GET {url} answered {status}", fix)


def _silent(up: UpstreamConfig, check: str, what: str, waited: float) -> Finding:
    return error(
        check,
        "no answer",
        f"{what}: connected, but no answer within {waited:g} s",
        "the server accepts connections but does not answer: look at its log (stuck or"
        " overloaded?); a proxy in between may be holding the request",
    )


def _failed(up: UpstreamConfig, check: str, what: str, exc: Exception) -> Finding:
    return error(
        check,
        "request failed",
        f"{what}: {exc}",
        f"check that the url of upstream {up.name!r} points at an HTTP(S) inference server",
    )
