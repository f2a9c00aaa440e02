"""Is the store there, can it be reached in time, and is its schema current?

Doctor only looks: it never migrates and never creates a database (opening a store
through ``open_store`` would do both), so SQLite is opened with ``mode=rw`` (which
refuses a missing file instead of creating it) and PostgreSQL with one plain
connection, each bounded by ``STORE_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

from bastion.cli.storeopen import masked, sqlite_file
from bastion.config import Config
from bastion.doctor.findings import Finding, error, listed, ok, warning
from bastion.store import StoreError
from bastion.store.migrate import load_migrations
from bastion.store.postgres import CONNECT_TIMEOUT_S

STORE_TIMEOUT_S = CONNECT_TIMEOUT_S  # what the gateway itself waits for a first connect
CHECK = "store"
URL_FIX = "correct database.url (or BASTION_DATABASE_URL)"
MIGRATE_FIX = (
    "start `bastion serve` (it applies pending migrations on start), or run any command that"
    " opens the store with the same config, e.g. `bastion accounts list`; several at once are"
    " safe (migrations take a lock)"
)


async def check_store(config: Config) -> list[Finding]:
    url = config.database_url
    found = _workers(config)
    if url.startswith("sqlite:"):
        return found + await asyncio.to_thread(_sqlite, url)
    if url.startswith(("postgresql:", "postgres:")):
        return found + await _postgres(url)
    return [
        *found,
        error(
            CHECK,
            "unsupported database URL",
            f"{masked(url)}: the gateway cannot open it",
            f"{URL_FIX}: sqlite:///relative.db, sqlite:////absolute.db or postgresql://…",
        ),
    ]


def _workers(config: Config) -> list[Finding]:
    workers = config.server.workers
    if workers > 1 and config.database_url.startswith("sqlite:"):
        return [
            error(
                CHECK,
                "SQLite with several workers",
                f"server.workers = {workers}, but every worker needs the same database and"
                " SQLite is one file on one machine: `bastion serve` refuses to start",
                "set database.url to a postgresql://… URL, or server.workers = 1",
            )
        ]
    return []


def _sqlite(url: str) -> list[Finding]:
    try:
        file = sqlite_file(url)
    except StoreError as exc:
        return [error(CHECK, "bad SQLite URL", str(exc), URL_FIX)]
    if file is None:
        return [
            warning(
                CHECK,
                "in-memory database",
                f"{url} keeps the ledger in memory: each process has its own, lost at exit",
                "set database.url to a file (sqlite:///bastion.db) or postgresql://…",
            )
        ]
    if not file.parent.is_dir():
        return [
            error(
                CHECK,
                "no such directory",
                f"{file.parent} does not exist, so the database {file.name} cannot be created",
                f"create the directory (mkdir -p {file.parent}), or {URL_FIX}",
            )
        ]
    if not file.exists():
        return [
            warning(
                CHECK,
                "no database file yet",
                f"no database at {file}; doctor creates none",
                "`bastion serve` creates it with its schema on start (as does `bastion accounts"
                " create`); if you expected an existing ledger, check database.url or"
                " BASTION_DATABASE_URL (a relative path is relative to the working directory)",
            )
        ]
    try:
        applied = _sqlite_versions(file)
    except sqlite3.Error as exc:
        return [
            error(
                CHECK,
                "database unreadable",
                f"{file}: {exc}",
                f"check that it is a Bastion database and readable by this user, or {URL_FIX}",
            )
        ]
    found = [ok(CHECK, "reachable", f"SQLite file {file}")]
    if not os.access(file, os.W_OK) or not os.access(file.parent, os.W_OK):
        found.append(
            error(
                CHECK,
                "not writable",
                f"{file} (or its directory, for the WAL files) is read-only to this user:"
                " the gateway writes the ledger there",
                "run as the user that owns the file, or give it write permission",
            )
        )
    return found + migration_findings(applied)


def _sqlite_versions(file: Path) -> set[int]:
    """``mode=rw``: opens an existing file only. Closing removes any WAL files it made."""
    conn = sqlite3.connect(f"{file.as_uri()}?mode=rw", uri=True, timeout=STORE_TIMEOUT_S)
    try:
        known = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).fetchone()
        rows = conn.execute("SELECT version FROM schema_migrations").fetchall() if known else []
        return {int(row[0]) for row in rows}
    finally:
        conn.close()


async def _postgres(url: str) -> list[Finding]:
    import asyncpg

    shown = masked(url)
    try:
        async with asyncio.timeout(STORE_TIMEOUT_S * 2):
            conn = await asyncpg.connect(url, timeout=STORE_TIMEOUT_S)
            try:
                known = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
                rows = await conn.fetch("SELECT version FROM schema_migrations") if known else []
            finally:
                await conn.close(timeout=STORE_TIMEOUT_S)
    except TimeoutError:
        return [
            error(
                CHECK,
                "unreachable",
                f"{shown}: no answer within {STORE_TIMEOUT_S:g} s",
                f"check the host and port ({URL_FIX}) and that no firewall drops the connection",
            )
        ]
    except asyncpg.InvalidCatalogNameError as exc:
        return [
            error(
                CHECK,
                "no such database",
                f"{shown}: {exc}",
                f"create it (createdb NAME, or CREATE DATABASE NAME), or {URL_FIX}",
            )
        ]
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        return [
            error(
                CHECK,
                "login refused",
                f"{shown}: {exc}",
                "check the user and password in database.url (or BASTION_DATABASE_URL) and the"
                " server's pg_hba.conf",
            )
        ]
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return [
            error(
                CHECK,
                "unreachable",
                f"{shown}: {exc}",
                f"is PostgreSQL running there and listening? If so, {URL_FIX}",
            )
        ]
    found = [ok(CHECK, "reachable", f"PostgreSQL {shown}")]
    return found + migration_findings({int(row[0]) for row in rows})


def migration_findings(applied: set[int]) -> list[Finding]:
    """Pending migrations are an error; so are ones this release does not know (a newer
    release migrated the database: this one would misread it)."""
    migrations = load_migrations()
    known = {m.version for m in migrations}
    found: list[Finding] = []
    if unknown := sorted(applied - known):
        found.append(
            error(
                CHECK,
                "schema is newer than this Bastion",
                f"the database has migrations {listed([f'{v:04d}' for v in unknown])}, which"
                " this release does not know: a newer release migrated it",
                "upgrade bastion here to the release the gateways run",
            )
        )
    if missing := [m.name for m in migrations if m.version not in applied]:
        found.append(
            error(
                CHECK,
                "migrations pending",
                f"{len(missing)} of {len(migrations)} not applied: {listed(missing, 3)}",
                MIGRATE_FIX,
            )
        )
    elif not unknown:
        latest = migrations[-1].name if migrations else "none"
        found.append(ok(CHECK, "schema current", f"all {len(migrations)} migrations ({latest})"))
    return found
