"""Migrations: an empty database ends up with exactly the expected schema, once, and history is checked."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consent_ledger.adapters.embedded import EmbeddedPostgres
from consent_ledger.adapters.postgres.migrations import MigrationError, available_migrations, migrate

EXPECTED_SCHEMA = Path(__file__).with_name("expected_schema.txt")
UPDATE_VARIABLE = "UPDATE_EXPECTED_SCHEMA"
SERVICE_ROLE = "consent_ledger_service"

# Each query yields sorted text lines; together they are the schema as the services depend on it.
_SCHEMA_QUERIES = {
    "tables": """
        SELECT format('table %s', c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')
        ORDER BY 1""",
    "columns": """
        SELECT format('column %s.%s %s%s%s%s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                      CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE ' NULL' END,
                      CASE WHEN a.attidentity <> '' THEN ' IDENTITY ' || a.attidentity ELSE '' END,
                      coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), ''))
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum""",
    "constraints": """
        SELECT format('constraint %s.%s %s', c.relname, k.conname, pg_get_constraintdef(k.oid))
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
        ORDER BY 1""",
    "indexes": """
        SELECT format('index %s', indexdef) FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1""",
    "triggers": """
        SELECT format('trigger %s', pg_get_triggerdef(t.oid))
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND NOT t.tgisinternal
        ORDER BY 1""",
    "functions": """
        SELECT format('function %s(%s) returns %s, body md5 %s', p.proname, pg_get_function_arguments(p.oid),
                      pg_get_function_result(p.oid), md5(p.prosrc))
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
        ORDER BY 1""",
    "grants": f"""
        SELECT format('grant %s on %s to %s', privilege_type, table_name, grantee)
        FROM information_schema.role_table_grants
        WHERE table_schema = 'public' AND grantee IN ('{SERVICE_ROLE}', 'PUBLIC')
        ORDER BY 1""",
    "sequence grants": f"""
        SELECT format('grant %s on sequence %s to %s', privilege_type, object_name, grantee)
        FROM information_schema.usage_privileges
        WHERE object_schema = 'public' AND object_type = 'SEQUENCE' AND grantee IN ('{SERVICE_ROLE}', 'PUBLIC')
        ORDER BY 1""",
    "roles": f"""
        SELECT format('role %s login=%s superuser=%s', rolname, rolcanlogin, rolsuper)
        FROM pg_roles WHERE rolname = '{SERVICE_ROLE}'""",
}


async def dump_schema(url: str) -> str:
    """The schema of `url`'s public schema as stable, sorted text, one fact per line."""
    connection = await asyncpg.connect(url)
    try:
        lines = []
        for section, sql in _SCHEMA_QUERIES.items():
            lines.append(f"# {section}")
            lines += [row[0] for row in await connection.fetch(sql)]
        return "\n".join(lines) + "\n"
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def empty_database(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    """A brand-new database (not the migrated template); yields its superuser URL and drops it after."""
    name = f"empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.superuser_url())
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield postgres.superuser_url(name)
        finally:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


async def test_migrating_an_empty_database_gives_the_expected_schema(postgres: EmbeddedPostgres) -> None:
    async with empty_database(postgres) as url:
        assert "# tables\n# columns" in await dump_schema(url), "the new database is not empty"
        applied = await migrate(url)
        assert [m.version for m in applied] == [m.version for m in available_migrations()]
        actual = await dump_schema(url)
    if os.environ.get(UPDATE_VARIABLE) == "1":
        EXPECTED_SCHEMA.write_text(actual, encoding="utf-8")
    expected = EXPECTED_SCHEMA.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(
        expected.splitlines(keepends=True), actual.splitlines(keepends=True),
        fromfile=str(EXPECTED_SCHEMA.name), tofile="migrated database",
    ))
    assert not diff, (
        f"the migrations give another schema than {EXPECTED_SCHEMA.name}:\n{diff}\n"
        f"If the change is intended, add a migration (never edit an applied one), rerun this test with "
        f"{UPDATE_VARIABLE}=1 and review the file's diff."
    )


async def run_cli_migrate(url: str) -> tuple[int, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONSENT_LEDGER_")}
    env["CONSENT_LEDGER_ADMIN_DATABASE_URL"] = url
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consent_ledger", "migrate", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_migrating_twice_applies_nothing_the_second_time(postgres: EmbeddedPostgres) -> None:
    async with empty_database(postgres) as url:
        code, output = await run_cli_migrate(url)
        assert code == 0, output
        names = ", ".join(f"{m.version}_{m.name}" for m in available_migrations())
        assert f"applied {len(available_migrations())} migration(s): {names}" in output
        schema = await dump_schema(url)
        history = await _history(url)

        code, output = await run_cli_migrate(url)
        assert code == 0, output
        assert "applied 0 migration(s): none" in output
        assert await migrate(url) == []
        assert await dump_schema(url) == schema
        assert await _history(url) == history


async def _history(url: str) -> list[tuple[Any, ...]]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY 1")
        return [tuple(row) for row in rows]
    finally:
        await connection.close()


async def test_an_edited_applied_migration_is_refused(
    admin_db: asyncpg.Connection, postgres: EmbeddedPostgres, database: str
) -> None:
    url = postgres.superuser_url(database)
    assert await migrate(url) == []
    # As if migration 1 had been edited after it was applied: its recorded checksum no longer matches.
    await admin_db.execute("UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 1")
    schema = await dump_schema(url)
    with pytest.raises(MigrationError, match=r"migration 1 \(ledger\) was changed after it was applied"):
        await migrate(url)
    assert await dump_schema(url) == schema
