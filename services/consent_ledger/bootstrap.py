"""The one place that wires settings to servers: embedded ones when none are configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import asyncpg

from consent_ledger.adapters.embedded import DATABASE_NAME, SERVICE_LOGIN, EmbeddedBroker, EmbeddedPostgres
from consent_ledger.adapters.postgres.migrations import migrate
from consent_ledger.adapters.postgres.roles import ensure_service_login
from consent_ledger.config import Settings

log = logging.getLogger("consent_ledger.bootstrap")


async def _create_embedded_database(server: EmbeddedPostgres) -> None:
    admin = await asyncpg.connect(server.superuser_url())
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME):
            await admin.execute(f"CREATE DATABASE {DATABASE_NAME}")
    finally:
        await admin.close()
    await migrate(server.superuser_url(DATABASE_NAME))
    await ensure_service_login(server.superuser_url(DATABASE_NAME), SERVICE_LOGIN)


@contextlib.contextmanager
def running_stack(settings: Settings, *, announce: bool = True) -> Iterator[Settings]:
    """Yield settings whose servers answer: the configured ones, or embedded ones started (and stopped) here."""
    with contextlib.ExitStack() as stack:
        updates: dict[str, object] = {}
        if settings.database_url is None:
            server = stack.enter_context(EmbeddedPostgres(settings.data_dir / "postgres"))
            asyncio.run(_create_embedded_database(server))
            updates["database_url"] = server.service_url()
            updates["admin_database_url"] = server.superuser_url(DATABASE_NAME)
            if announce:
                log.info("embedded PostgreSQL on 127.0.0.1:%d (data in %s)", server.port, server.pgdata)
        else:
            admin_url = settings.admin_database_url or settings.database_url
            asyncio.run(migrate(admin_url))
        if settings.kafka_bootstrap_servers is None:
            broker = stack.enter_context(EmbeddedBroker(settings.data_dir))
            updates["kafka_bootstrap_servers"] = broker.bootstrap_servers
            if announce:
                log.info("embedded Tansu broker on %s (in memory)", broker.bootstrap_servers)
        yield settings.model_copy(update=updates)
