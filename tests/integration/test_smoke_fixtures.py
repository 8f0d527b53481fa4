"""The shared fixtures give each test a migrated database it can reach as the service role."""

import asyncpg


async def test_service_role_reads_ledger(service_db: asyncpg.Connection) -> None:
    assert await service_db.fetchval("SELECT count(*) FROM ledger") == 0
