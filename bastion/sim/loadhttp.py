"""The load model's HTTP side: `GET /metrics` and the ORCA `endpoint-load-metrics` header."""

from __future__ import annotations

import orjson
from aiohttp import web

from bastion.sim.engine import Engine, LoadConfig
from bastion.sim.loadmetrics import CONTENT_TYPE, ORCA_REQUEST_HEADER, ORCA_RESPONSE_HEADER
from bastion.sim.wire import error_object

ENGINE_KEY = web.AppKey("sim_engine", Engine)
"""Set only when a load option is given; absent, requests skip the model entirely."""


def add_load_model(app: web.Application, load: LoadConfig | None) -> None:
    """Routes `/metrics` always; the engine and the ORCA header only with the model on."""
    if load is not None and load.active:
        app[ENGINE_KEY] = Engine(load)
        app.on_response_prepare.append(_orca_report)
    app.router.add_get("/metrics", _metrics)


async def _metrics(request: web.Request) -> web.Response:
    """vLLM's Prometheus metrics; a 404 when no load option is set (nothing is tracked)."""
    engine = request.app.get(ENGINE_KEY)
    if engine is None:
        message = (
            "metrics are off: start the simulator with a load option (--max-num-seqs, "
            "--prefill-tokens-per-s, --prefix-cache-tokens or --kv-cache-tokens)"
        )
        return web.Response(
            status=404,
            body=orjson.dumps(error_object(404, message, "NotFoundError")),
            content_type="application/json",
        )
    return web.Response(body=engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _orca_report(request: web.Request, response: web.StreamResponse) -> None:
    """vLLM's ORCA load report, on a 200 answer whose request asked for one."""
    fmt = request.headers.get(ORCA_REQUEST_HEADER)
    if fmt and response.status == 200 and request.method == "POST":
        value = request.app[ENGINE_KEY].metrics.orca_header(fmt)
        if value is not None:
            response.headers[ORCA_RESPONSE_HEADER] = value
