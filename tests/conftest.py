"""Session-wide real servers (Tansu broker, PostgreSQL) with one database and one topic prefix per test."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from consent_ledger.adapters.embedded import EmbeddedBroker, EmbeddedPostgres
from consent_ledger.adapters.postgres.migrations import migrate
from consent_ledger.adapters.postgres.roles import ensure_service_login
from consent_ledger.config import Settings

TEMPLATE_DB = "consent_ledger_template"
_counter = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long reliability scenarios at full length")


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """One server per session; a migrated template database is cloned for each test."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), durable=False)
    with server:
        import asyncio

        async def prepare() -> None:
            admin = await asyncpg.connect(server.superuser_url())
            try:
                await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
            finally:
                await admin.close()
            await migrate(server.superuser_url(TEMPLATE_DB))
            await ensure_service_login(server.superuser_url(TEMPLATE_DB), "consent_ledger")

        asyncio.run(prepare())
        yield server


@pytest.fixture
async def database(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    """A fresh, migrated database for this test (a template clone); yields its name."""
    name = f"test_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(postgres.superuser_url())
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
        yield name
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
def settings(broker: EmbeddedBroker, postgres: EmbeddedPostgres, database: str, tmp_path: Path) -> Settings:
    """Settings that point every component at this test's database and topic prefix."""
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        database_url=postgres.service_url(database),
        admin_database_url=postgres.superuser_url(database),
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        topic_partitions=4,
        auditor_tokens="auditor-token",  # type: ignore[arg-type]
        pipeline_tokens="pipeline-token",  # type: ignore[arg-type]
        admin_tokens="admin-token",  # type: ignore[arg-type]
        api_port=0,
        # The Tansu broker holds a group join for half the session timeout: 10 s instead of faust's 60 s
        # makes every test that starts a stream processor about 25 s faster.
        processor_session_timeout_seconds=10.0,
        data_dir=tmp_path,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
async def service_db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the service role (insert and select only on the ledger)."""
    assert settings.database_url is not None
    connection = await asyncpg.connect(settings.database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def admin_db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection: for tampering tests and for checks the service role may not make."""
    assert settings.admin_database_url is not None
    connection = await asyncpg.connect(settings.admin_database_url)
    try:
        yield connection
    finally:
        await connection.close()
