"""Versioned SQL migrations: numbered `.sql` files applied in order, each once, each in its own transaction."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import asyncpg

# Any fixed number works; it only has to be the same for every process that migrates this database.
MIGRATION_LOCK_KEY = 0x636F6E73656E74  # "consent"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    """The database's migration history disagrees with the migrations shipped in this release."""


def available_migrations() -> list[Migration]:
    folder = resources.files("consent_ledger.adapters.postgres") / "migrations"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            version, _, name = item.name.removesuffix(".sql").partition("_")
            found.append(Migration(int(version), name, item.read_text()))
    return sorted(found, key=lambda migration: migration.version)


async def migrate(admin_url: str) -> list[Migration]:
    """Apply the migrations the database lacks; returns those applied. Safe to run concurrently."""
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"""
        )
        applied = {
            row["version"]: row["checksum"]
            for row in await connection.fetch("SELECT version, checksum FROM schema_migrations")
        }
        done = []
        for migration in available_migrations():
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} ({migration.name}) was changed after it was applied; "
                        "ship a new migration instead of editing an old one"
                    )
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            done.append(migration)
        return done
    finally:
        await connection.close()


async def pending_migrations(url: str) -> list[Migration]:
    """Migrations not yet applied (for /readyz and start-up checks); works with the service role."""
    connection = await asyncpg.connect(url)
    try:
        exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        applied: set[int] = set()
        if exists:
            applied = {row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        return [m for m in available_migrations() if m.version not in applied]
    finally:
        await connection.close()
