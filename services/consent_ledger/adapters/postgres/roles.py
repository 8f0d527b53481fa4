"""Database roles: the login the services use, limited to the rights of `consent_ledger_service`."""

from __future__ import annotations

import re

import asyncpg

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def ensure_service_login(admin_url: str, login: str) -> None:
    """Create `login` (no superuser, no password: local trust only) and grant it the service role."""
    if not _IDENTIFIER.match(login):
        raise ValueError(f"not a plain role name: {login!r}")
    connection = await asyncpg.connect(admin_url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", login)
        if not exists:
            await connection.execute(f"CREATE ROLE {login} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        await connection.execute(f"GRANT consent_ledger_service TO {login}")
    finally:
        await connection.close()
