"""``bastion doctor`` against real things: the simulator, SQLite files, PostgreSQL,
Redis, a tiny aiohttp upstream that refuses keys, and a socket that never answers.

The command runs in-process through typer's CliRunner (its checks call asyncio.run
themselves, so these tests are plain functions), and once in a subprocess
(``python -m bastion doctor``), as an operator runs it. The silent upstreams have
short read timeouts, so they cost well under a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import free_port
from typer.testing import CliRunner

from bastion.cli import app
from bastion.doctor.config_checks import ENV_OVERRIDES
from bastion.store.migrate import load_migrations, migrate_sqlite
from bastion.store.postgres import PostgresStore

REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FIELDS = {"check", "level", "title", "detail", "fix"}
# the environment must not choose another config or store for these tests
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(("BASTION_CONFIG", *ENV_OVERRIDES))
NO_UPSTREAMS = "upstreams = []\nmodels = []\n"
ADMIN = '[admin]\ntoken = "a-long-enough-admin-token-0123456789"\n'


def model(name: str, upstream: str, served_as: str = "", **fields: Any) -> str:
    """One [[models]] entry; ``fields`` override the defaults (values as TOML literals)."""
    values: dict[str, Any] = {
        "input_price": '"0.10"',
        "output_price": '"0.50"',
        "max_output_tokens": 4096,
        **fields,
    }
    lines = [f'id = "{name}"', f'upstreams = ["{upstream}"]']
    lines += [f'upstream_model = "{served_as}"'] if served_as else []
    lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n[[models]]\n" + "\n".join(lines) + "\n"


def upstream(name: str, port: int, **fields: Any) -> str:
    values = {"connect_timeout_s": 2, "read_timeout_s": 5, **fields}  # a live one answers at once
    lines = [f'name = "{name}"', f'url = "http://127.0.0.1:{port}/v1"']
    lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n[[upstreams]]\n" + "\n".join(lines) + "\n"


def sqlite_db(tmp: Path, upto: int | None = None) -> str:
    """A migrated SQLite database (only up to ``upto``, like an older release's)."""
    db = tmp / "ledger.db"
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        migrate_sqlite(conn, upto)
    return f"sqlite:///{db}"


def write_config(
    tmp: Path, body: str = "", *, top: str = "", db_url: str = "", ratelimit: str = ""
) -> Path:
    """``top``: top-level keys (before any table); ``body``: tables and arrays of tables."""
    path = tmp / "bastion.toml"
    ratelimit = ratelimit or 'url = "memory://"'
    database = f'[database]\nurl = "{db_url or sqlite_db(tmp)}"\n'
    path.write_text(f"{top}\n{database}\n[ratelimit]\n{ratelimit}\n{body}")
    return path


def doctor(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """Run ``bastion doctor --json``: (exit code, the parsed report, stderr)."""
    result = CliRunner().invoke(
        app, ["doctor", "--config", str(config), "--json", *args], env={**CLEAN_ENV, **(env or {})}
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    report = json.loads(result.stdout)
    assert set(report) == {"ok", "findings"}
    for finding in report["findings"]:
        assert set(finding) == FIELDS, finding
        assert finding["level"] in ("ok", "warning", "error")
        assert bool(finding["fix"]) == (finding["level"] != "ok"), finding
    assert report["ok"] == all(f["level"] != "error" for f in report["findings"])
    assert result.exit_code == (0 if report["ok"] else 1)
    return result.exit_code, report, result.stderr


def find(report: Any, check: str, level: str | None = None) -> list[dict[str, str]]:
    return [
        f
        for f in report["findings"]
        if f["check"] == check and (level is None or f["level"] == level)
    ]


def only(report: Any, check: str, level: str, title: str) -> dict[str, str]:
    """The one finding of ``check`` at ``level`` whose title contains ``title``."""
    hits = [f for f in find(report, check, level) if title in f["title"]]
    assert len(hits) == 1, (check, level, title, report["findings"])
    return hits[0]


@contextmanager
def serving(app_: web.Application) -> Iterator[int]:
    """A real aiohttp server on its own thread and loop, for as long as the block runs."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app_)
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


# ---- a healthy setup ------------------------------------------------------------------


def test_healthy_setup_exits_0_with_every_check_ok(tmp_path: Path, sim_port: int) -> None:
    body = ADMIN + upstream("sim", sim_port) + model("gpt-oss-120b", "sim")
    body += model("renamed", "sim", served_as="Qwen3-32B", max_output_tokens=131072)
    config = write_config(tmp_path, body)
    code, report, stderr = doctor(config, "--verbose")
    assert code == 0 and report["ok"], report
    assert [f for f in report["findings"] if f["level"] != "ok"] == []
    checks = {f["check"] for f in report["findings"]}
    assert checks == {"config", "store", "ratelimit", "upstream sim", "models", "admin", "webhooks"}
    assert f"{config} (--config)" in only(report, "config", "ok", "config file")["detail"]
    assert "ledger.db (config file" in only(report, "config", "ok", "store")["detail"]
    assert (
        "all 2 models configured" in only(report, "upstream sim", "ok", "models served")["detail"]
    )
    assert "/health answered 200" in only(report, "upstream sim", "ok", "healthy")["detail"]
    assert only(report, "store", "ok", "schema current")
    assert stderr.startswith("store: sqlite:///") and "ledger.db" in stderr  # --verbose


def test_the_console_script_prints_a_grouped_list_that_fits_80_columns(
    tmp_path: Path, sim_port: int
) -> None:
    body = upstream("sim", sim_port) + model("gpt-oss-20b", "sim", input_price='"0"')
    config = write_config(tmp_path, body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bastion", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a warning alone: still 0
    lines = proc.stdout.splitlines()
    # only a word longer than a line (here the temp path) may stick out
    assert all(len(line) <= 80 or len(line.split()) == 1 for line in lines), proc.stdout
    assert lines[0] == "config" and "upstream sim" in lines and "models" in lines
    assert any(line.startswith("  ✓ config file:") for line in lines)
    assert any(line.startswith("  ! gpt-oss-20b: free input: ") for line in lines)
    assert any(
        line.startswith("    fix: if that is not intended, set input_price") for line in lines
    )
    assert lines[-1] == "! 1 warning, no errors"


# ---- upstreams --------------------------------------------------------------------------


def test_a_dead_upstream_is_an_error_with_a_fix(tmp_path: Path, sim_port: int) -> None:
    dead = free_port()
    body = upstream("sim", sim_port) + upstream("dead", dead)
    body += model("gpt-oss-120b", "sim") + model("gpt-oss-20b", "dead")
    code, report, _ = doctor(write_config(tmp_path, body))
    assert code == 1 and not report["ok"]
    finding = only(report, "upstream dead", "error", "unreachable")
    assert f"127.0.0.1:{dead}" in finding["detail"] and "refused" in finding["detail"]
    assert "url of upstream 'dead'" in finding["fix"]
    assert find(report, "upstream dead") == [finding]  # nothing more to learn from it
    assert find(report, "upstream sim", "error") == []  # the healthy one is unaffected


def test_a_model_the_upstream_does_not_serve_is_named(tmp_path: Path, sim_port: int) -> None:
    body = upstream("sim", sim_port) + model("gpt-oss-120b", "sim")
    body += model("mine", "sim", served_as="org/not-served")
    body += model("llama", "sim", served_as="meta-llama/Llama-3.1-8B-Instruct")
    code, report, _ = doctor(write_config(tmp_path, body))
    assert code == 1
    finding = only(report, "upstream sim", "error", "model mine not served")
    assert "upstream 'sim' does not list 'org/not-served'" in finding["detail"]
    assert "(it lists: Llama-3.1-8B-Instruct, " in finding["detail"]  # what it does serve
    assert finding["detail"].endswith(" and 5 more)")
    assert "--served-model-name org/not-served" in finding["fix"]
    assert 'upstream_model of model "mine" to the name the upstream lists' in finding["fix"]
    # a near miss: the likeliest name is offered first
    finding = only(report, "upstream sim", "error", "model llama not served")
    assert "(it lists: Llama-3.1-8B-Instruct, " in finding["detail"]
    assert "model \"llama\" to 'Llama-3.1-8B-Instruct'" in finding["fix"]
    assert find(report, "upstream sim", "error") == [
        f for f in report["findings"] if "not served" in f["title"]
    ]  # gpt-oss-120b is served


def test_an_upstream_refusing_the_key_and_failing_health(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"error": {"message": "bad key"}}, status=401)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=503)

    upstream_app = web.Application()
    upstream_app.router.add_get("/v1/models", models)
    upstream_app.router.add_get("/health", health)
    with serving(upstream_app) as port:
        body = upstream("locked", port, api_key='"wrong-key"') + model("m", "locked")
        code, report, _ = doctor(write_config(tmp_path, body))
    assert code == 1
    assert seen == ["Bearer wrong-key"]  # the model list is asked for with the key
    refused = only(report, "upstream locked", "error", "api key refused")
    assert "answered 401" in refused["detail"] and "api_key of upstream 'locked'" in refused["fix"]
    sick = only(report, "upstream locked", "error", "unhealthy")
    assert "/health answered 503" in sick["detail"]


def test_hung_upstreams_are_reported_within_their_timeouts(tmp_path: Path) -> None:
    """Ten upstreams that accept connections and never answer, checked at once."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the handshakes; nothing ever reads
        port = hung.getsockname()[1]
        body = "".join(upstream(f"hung{i}", port, read_timeout_s=0.3) for i in range(10))
        body += "".join(model(f"m{i}", f"hung{i}") for i in range(10))
        code, report, _ = doctor(write_config(tmp_path, body))
    assert code == 1
    for i in range(10):
        silent = [
            f for f in find(report, f"upstream hung{i}", "error") if f["title"] == "no answer"
        ]
        assert len(silent) == 2, report  # the model list and the health check
        assert all("no answer within 0.3 s" in f["detail"] for f in silent)


# ---- the store --------------------------------------------------------------------------


def test_a_missing_sqlite_file_is_a_warning_and_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "data" / "new.db"
    db.parent.mkdir()
    config = write_config(tmp_path, top=NO_UPSTREAMS, db_url=f"sqlite:///{db}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, report, _ = doctor(config)
    assert code == 0 and report["ok"]
    finding = only(report, "store", "warning", "no database file")
    assert str(db) in finding["detail"] and "bastion serve" in finding["fix"]
    assert not db.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_pending_sqlite_migrations_are_an_error_and_stay_pending(tmp_path: Path) -> None:
    url = sqlite_db(tmp_path, upto=5)
    config = write_config(tmp_path, top=NO_UPSTREAMS, db_url=url)
    for _ in range(2):  # doctor only looks: the second run finds the same
        code, report, _ = doctor(config)
        assert code == 1
        finding = only(report, "store", "error", "migrations pending")
        pending = len(load_migrations()) - 5
        assert finding["detail"].startswith(f"{pending} of {len(load_migrations())} not applied")
        assert "0006_" in finding["detail"] and "bastion serve" in finding["fix"]
    assert not list(tmp_path.glob("*.db-*"))  # no WAL files left behind


def test_a_file_that_is_no_database_is_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    code, report, _ = doctor(write_config(tmp_path, top=NO_UPSTREAMS, db_url=f"sqlite:///{junk}"))
    assert code == 1
    assert "not a database" in only(report, "store", "error", "unreadable")["detail"]


def test_postgres_reachable_then_current_after_migrating(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, top=NO_UPSTREAMS, db_url=pg_url)
    code, report, _ = doctor(config)
    assert code == 1  # a brand-new database: reachable, but no schema
    assert only(report, "store", "ok", "reachable")["detail"].startswith("PostgreSQL ")
    only(report, "store", "error", "migrations pending")

    async def migrate() -> None:
        store = PostgresStore(pg_url)
        try:
            await store.migrate()
        finally:
            await store.close()

    asyncio.run(migrate())
    code, report, _ = doctor(config)
    assert code == 0, report
    only(report, "store", "ok", "schema current")


def test_postgres_unreachable(tmp_path: Path) -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test"
    code, report, _ = doctor(write_config(tmp_path, top=NO_UPSTREAMS, db_url=url))
    assert code == 1
    finding = only(report, "store", "error", "unreachable")
    assert "hunter2" not in json.dumps(report)  # the password is masked everywhere
    assert "postgres:***@127.0.0.1" in finding["detail"]
    assert "database.url" in finding["fix"]


# ---- the rate limiter -------------------------------------------------------------------


def test_redis_reachable_and_not(tmp_path: Path) -> None:
    config = write_config(tmp_path, top=NO_UPSTREAMS, ratelimit=f'url = "{REDIS_URL}"')
    code, report, _ = doctor(config)
    assert code == 0, f"Redis at {REDIS_URL} must be running (set BASTION_TEST_REDIS_URL): {report}"
    only(report, "ratelimit", "ok", "Redis answers")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    code, report, _ = doctor(config, env={"BASTION_REDIS_URL": dead})
    assert code == 1
    finding = only(report, "ratelimit", "error", "Redis unreachable")
    assert dead in finding["detail"] and "BASTION_REDIS_URL" in finding["fix"]
    assert "BASTION_REDIS_URL" in only(report, "config", "ok", "environment overrides")["detail"]


def test_memory_limiter_with_several_workers(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[server]\nworkers = 2\n", top=NO_UPSTREAMS)
    code, report, _ = doctor(config)
    assert code == 1
    assert "redis://" in only(report, "ratelimit", "error", "several workers")["fix"]
    assert "postgresql://" in only(report, "store", "error", "several workers")["fix"]


# ---- the config itself ------------------------------------------------------------------


def test_a_config_that_does_not_parse_is_one_finding(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[server\nport = 8080\n")
    result = CliRunner().invoke(app, ["doctor", "--config", str(config)], env=CLEAN_ENV)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "config" and lines[1].startswith("  ✗ config file is not valid TOML:")
    assert lines[-1] == "✗ 1 error: fix the errors above"
    code, report, _ = doctor(config)
    assert code == 1 and len(report["findings"]) == 1
    finding = report["findings"][0]
    assert finding["check"] == "config" and "line 1" in finding["detail"]
    assert "TOML syntax" in finding["fix"]


@pytest.mark.parametrize(
    ("extra", "says", "fix"),
    [
        ('[webhooks]\nurl = "https://hooks.example.com/b"\n', "webhooks.secret", "openssl rand"),
        (model("iso", "sim", cache_isolation='"account"'), "cache_salt_secret", "openssl rand"),
        (model("lost", "nowhere"), "no upstream named", "[[upstreams]]"),
    ],
)
def test_what_the_config_refuses_comes_out_as_a_finding(
    tmp_path: Path, extra: str, says: str, fix: str
) -> None:
    config = write_config(tmp_path, upstream("sim", free_port()) + extra)
    code, report, _ = doctor(config)
    assert code == 1 and [f["title"] for f in report["findings"]] == ["config refused"]
    assert says in report["findings"][0]["detail"] and fix in report["findings"][0]["fix"]


def test_values_that_look_wrong_are_warnings(tmp_path: Path, sim_port: int) -> None:
    served = "gpt-oss-20b"  # what the simulator lists (max_model_len 131072)
    body = '[admin]\ntoken = "short"\n'
    body += '[webhooks]\nurl = "http://hooks.example.com/in"\nsecret = "s3cret-enough"\n'
    body += upstream("sim", sim_port) + upstream("spare", sim_port)
    body += model("free", "sim", served, input_price='"0"')
    body += model("per-token", "sim", served, output_price='"1500"')
    body += model("huge", "sim", served, max_output_tokens=2_000_000)
    body += model("cheap-output", "sim", served, input_price='"10"', output_price='"0.01"')
    config = write_config(tmp_path, body, ratelimit='url = "memory://"\ndefault_rpm = 0')
    code, report, _ = doctor(config)
    assert code == 0 and report["ok"], report  # warnings only
    only(report, "models", "warning", "free: free input")
    assert "per 1K tokens or per token" in only(report, "models", "warning", "per-token")["detail"]
    reserve = only(report, "models", "warning", "huge: huge max_output_tokens")
    assert "$1.00" in reserve["detail"]  # 2M output tokens at 0.50 USD per 1M
    assert "at most 131,072" in only(report, "upstream sim", "warning", "huge: cap")["fix"]
    assert [f for f in report["findings"] if "cheap-output" in f["title"]] == []
    only(report, "ratelimit", "warning", "default_rpm is 0")
    assert len(find(report, "ratelimit", "warning")) == 1  # default_tpm still limits
    assert "openssl rand" in only(report, "admin", "warning", "short")["fix"]
    assert "https://" in only(report, "webhooks", "warning", "unencrypted")["fix"]
    only(report, "upstream spare", "warning", "no model uses it")
    assert "s3cret" not in json.dumps(report)
