"""``bastion serve|sim|demo``: the long-running processes.

Their implementations are imported only when the command runs, so the operator
commands start quickly and need none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Annotated, Any

import typer

from bastion.cli.options import CliError, ConfigOpt, HiddenConfigOpt, HiddenJsonOpt, VerboseOpt
from bastion.cli.storeopen import load

PortOpt = Annotated[
    int | None, typer.Option(min=1, max=65535, help="Listen port (default: config).")
]


def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default: config).")] = None,
    port: PortOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Processes; >1 needs PostgreSQL and Redis (default: config)."),
    ] = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    as_json: HiddenJsonOpt = False,
) -> None:
    """Run the gateway."""
    cfg = load(config, verbose, writes=True)
    run = lazy("bastion.server", "serve")
    run(cfg, host=host, port=port, workers=cfg.server.workers if workers is None else workers)


def sim(
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port (vLLM's default).")] = 8000,
    ttft_ms: Annotated[float, typer.Option(help="Time to first token, ms.")] = 0.0,
    tokens_per_s: Annotated[float, typer.Option(help="Tokens per second; 0 = max.")] = 0.0,
    max_num_seqs: Annotated[
        int, typer.Option(min=0, help="Requests decoded at once; the rest queue. 0 = unlimited.")
    ] = 0,
    prefill_tokens_per_s: Annotated[
        float, typer.Option(min=0, help="Prefill speed for uncached prompt tokens; 0 = instant.")
    ] = 0.0,
    prefix_cache_tokens: Annotated[
        int, typer.Option(min=0, help="LRU prefix cache size, tokens (16-token blocks); 0 = none.")
    ] = 0,
    kv_cache_tokens: Annotated[
        int,
        typer.Option(min=0, help="KV capacity, tokens (default: max(prefix cache, 262144))."),
    ] = 0,
    served_model_name: Annotated[
        str, typer.Option(help="The model_name label of /metrics.")
    ] = "bastion-sim",
    config: HiddenConfigOpt = None,
    as_json: HiddenJsonOpt = False,
) -> None:
    """Run the upstream simulator (an OpenAI-compatible server, no GPU needed)."""
    run = lazy("bastion.sim", "run")
    load = lazy("bastion.sim", "LoadConfig")(
        max_num_seqs=max_num_seqs,
        prefill_tokens_per_s=prefill_tokens_per_s,
        prefix_cache_tokens=prefix_cache_tokens,
        kv_cache_tokens=kv_cache_tokens,
        served_model_name=served_model_name,
    )
    run(host=host, port=port, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, load=load)


def demo(
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Gateway port (default: config).")
    ] = None,
    sim_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Simulator port (default: config).")
    ] = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    as_json: HiddenJsonOpt = False,
) -> None:
    """Run the simulator and the gateway together; prints a key and a curl to try."""
    cfg = load(config, verbose, writes=True)
    run_demo = lazy("bastion.demo", "run")
    run_demo(cfg, port=port, sim_port=sim_port)


def lazy(module: str, name: str) -> Callable[..., Any]:
    """Import a command's implementation only when it runs."""
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise CliError(f"{module}.{name} is not available: {exc}") from None
