"""Versioned schema migrations shared by every backend.

Migrations are the numbered ``NNNN_name.sql`` files next to this module, applied in
order and recorded in ``schema_migrations(version, applied_at)``. The files are plain
portable SQL; this module only finds and splits them, and runs them on SQLite. A
PostgreSQL backend runs the same files under an advisory lock (``migrate_postgres``).
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

SCHEMA_MIGRATIONS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version     BIGINT  PRIMARY KEY,
    applied_at  BIGINT  NOT NULL
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # file name, for messages
    statements: tuple[str, ...]


def split_statements(sql: str) -> list[str]:
    """Split on ';' at the end of a line, dropping ``--`` comment lines.

    Deliberately simple (no string or dollar-quote parsing): our migration files keep
    one statement per ';'-terminated block, which both engines execute one at a time.
    """
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        if line.strip().startswith("--"):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement:
                statements.append(statement)
            current = []
    if tail := "\n".join(current).strip():
        statements.append(tail)
    return statements


def load_migrations() -> list[Migration]:
    """Every migration file in version order; refuses duplicate version numbers."""
    folder = resources.files("bastion.store").joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"two migrations numbered {version}: {entry.name}")
        statements = tuple(split_statements(entry.read_text(encoding="utf-8")))
        found[version] = Migration(version, entry.name, statements)
    return [found[v] for v in sorted(found)]


def pending(done: set[int], upto: int | None) -> list[Migration]:
    """The migrations not applied yet, in order; ``upto``: none numbered above it."""
    wanted = [m for m in load_migrations() if m.version not in done]
    return [m for m in wanted if upto is None or m.version <= upto]


def migrate_sqlite(conn: sqlite3.Connection, upto: int | None = None) -> list[int]:
    """Apply pending migrations in one write transaction; returns the versions applied.

    ``BEGIN IMMEDIATE`` takes SQLite's write lock before reading what is applied, so
    several processes migrating at once serialise (each waits up to busy_timeout) and
    the later ones find nothing left to do. SQLite DDL is transactional, so a failed
    migration leaves nothing half-applied. ``conn`` must be in autocommit mode.
    ``upto`` stops after that version: tests build an older release's schema with it.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(SCHEMA_MIGRATIONS)
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        applied: list[int] = []
        for migration in pending(done, upto):
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (migration.version, time.time_ns() // 1000),
            )
            applied.append(migration.version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


MIGRATION_LOCK_ID = 0x62617374696F6E  # "bastion" in ASCII: the advisory lock key for migrations


async def migrate_postgres(conn: asyncpg.Connection, upto: int | None = None) -> list[int]:
    """Apply pending migrations in one transaction; returns the versions applied.

    ``pg_advisory_xact_lock`` is taken before reading what is applied, so several
    processes migrating at once serialise (the lock is released at commit or
    rollback) and the later ones find nothing left to do. PostgreSQL DDL is
    transactional, so a failed migration leaves nothing half-applied. ``upto`` as
    for ``migrate_sqlite``.
    """
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(SCHEMA_MIGRATIONS)
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in pending(done, upto):
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                migration.version,
                time.time_ns() // 1000,
            )
            applied.append(migration.version)
    return applied
