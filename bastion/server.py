"""Process management for ``bastion serve``: one worker, or N sharing the port.

With ``--workers N`` every worker is a full, stateless gateway in its own process
(spawned, so each starts clean), listening on the same port with SO_REUSEPORT so
the kernel spreads connections over them. They share nothing in memory: credit is
leased from PostgreSQL and limits live in Redis, which is why N > 1 refuses to
start on SQLite or the in-process limiter. The parent only supervises: it restarts
a worker that dies and stops them all on SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from typing import Any

from aiohttp import web

from bastion.config import Config

log = logging.getLogger("bastion")


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
    supervise(config, host, port, workers)


def run_worker(config: Config, host: str, port: int, workers: int) -> None:
    import uvloop

    from bastion.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    web.run_app(
        create_app(config, replicas=workers),
        host=host,
        port=port,
        reuse_port=workers > 1,
        backlog=4096,  # aiohttp's 128 drops SYNs when thousands of streams connect at once
        access_log=None,
        handler_cancellation=True,
        loop=uvloop.new_event_loop(),
        print=lambda msg: log.info("%s", msg),
    )


def supervise(config: Config, host: str, port: int, workers: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def spawn() -> Any:
        proc = ctx.Process(target=run_worker, args=(config, host, port, workers), daemon=True)
        proc.start()
        return proc

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = [spawn() for _ in range(workers)]
    log.info("started %d workers on http://%s:%d", workers, host, port)
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if not proc.is_alive() and not stopping:
                log.warning("worker %d exited with %s; restarting", proc.pid, proc.exitcode)
                procs[i] = spawn()
    for proc in procs:
        proc.terminate()  # SIGTERM: aiohttp shuts down gracefully, flushing the ledger
    for proc in procs:
        proc.join(15)
        if proc.is_alive():
            proc.kill()
