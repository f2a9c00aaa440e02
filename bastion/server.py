"""Process management for ``bastion serve``: one worker, or N sharing the port.

With ``--workers N`` every worker is a full, stateless gateway in its own process
(spawned, so each starts clean), listening on the same port with SO_REUSEPORT so
the kernel spreads connections over them. They share nothing in memory: credit is
leased from PostgreSQL and limits live in Redis, which is why N > 1 refuses to
start on SQLite or the in-process limiter. The parent only supervises: it restarts
a worker that dies and stops them all on SIGINT/SIGTERM.

Shutdown (SIGTERM or SIGINT) drains: every worker closes its listener at once, lets
requests in flight finish for ``drain_timeout_s``, ends the streams still running
with the stream error event, writes every ledger row and exits 0. With N workers the
parent forwards the signal to all of them at once and waits for them against one
shared deadline (the drain plus time to settle and write), killing only a worker
still alive after it.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from typing import Any

from aiohttp import web

from bastion.config import Config

log = logging.getLogger("bastion")

SETTLE_S = 15.0  # after the drain deadline: ended streams settle, rows are written

def serve(
    config: Config, host: str | None = None, port: int | None = None, workers: int | None = None
) -> None:
    """Run the gateway until interrupted."""
    workers = workers or config.server.workers
    host = host or config.server.host
    port = port or config.server.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if workers <= 1:
        run_worker(config, host, port, workers=1)
        return
    problems = []
    if config.database_url.startswith("sqlite:"):
        problems.append("database.url is SQLite (set a postgresql:// URL)")
    if config.ratelimit.url.startswith("memory:"):
        problems.append("ratelimit.url is memory:// (set a redis:// URL)")
    if problems:
        raise SystemExit(
            f"error: --workers {workers} needs PostgreSQL and Redis shared by every worker: "
            + "; ".join(problems)
            + "."
        )
    if config.tracing.otlp_endpoint:
        from bastion.app import tracing_class

        tracing_class()  # refused here, once, rather than in every worker
    supervise(config, host, port, workers)


def run_worker(config: Config, host: str, port: int, workers: int, slot: int = 0) -> None:
    """One gateway process. Its seat (host:port/slot) is taken over by its replacement,
    which reclaims at once what this one held should it die."""
    import uvloop

    from bastion import logsafe
    from bastion.app import DRAIN_GRACE_S, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logsafe.install()
    web.run_app(
        create_app(config, replicas=workers, seat=f"{socket.gethostname()}:{port}/{slot}"),
        host=host,
        port=port,
        reuse_port=workers > 1,
        backlog=4096,  # aiohttp's 128 drops SYNs when thousands of streams connect at once
        access_log=None,
        handler_cancellation=True,
        # Gateway.drain waits for in-flight work itself (drain_timeout_s); what aiohttp
        # cancels after this is only what did not finish even then
        shutdown_timeout=DRAIN_GRACE_S + 1.0,
        loop=uvloop.new_event_loop(),
        print=lambda msg: log.info("%s", msg),
    )


def supervise(config: Config, host: str, port: int, workers: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def spawn(slot: int) -> Any:
        proc = ctx.Process(
            target=run_worker, args=(config, host, port, workers, slot), daemon=True
        )
        proc.start()
        return proc

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = [spawn(slot) for slot in range(workers)]
    log.info("started %d workers on http://%s:%d", workers, host, port)
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if not proc.is_alive() and not stopping:
                log.warning("worker %d exited with %s; restarting", proc.pid, proc.exitcode)
                procs[i] = spawn(i)
    for proc in procs:
        proc.terminate()  # SIGTERM to every worker at once: each drains (Gateway.drain)
    deadline = time.monotonic() + config.server.drain_timeout_s + SETTLE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))  # one deadline shared by all
    for proc in procs:
        if proc.is_alive():
            log.error("worker %d still running after the drain deadline: killed", proc.pid)
            proc.kill()
